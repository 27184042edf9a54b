"""Durations written the way people write them: `2h`, `90m`, `1h30m`, `45s`, `1d`."""

from __future__ import annotations

import re
from datetime import timedelta

_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(d|h|m|s)")
_WHOLE = re.compile(r"^\s*(?:\d+(?:\.\d+)?\s*[dhms]\s*)+$")
_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
MAX_SECONDS = 3650 * 86400.0


def parse_duration(text: str | int | float) -> timedelta:
    """Parse a duration such as `2h` or `1h30m`; a bare number means seconds.

    Raises:
        ValueError: the text is not a duration, or is negative.
    """
    if isinstance(text, bool):
        raise ValueError("expected a duration such as 2h, 90m or 45s")
    if isinstance(text, int | float):
        seconds = float(text)
    elif isinstance(text, str) and _WHOLE.match(text):
        seconds = sum(float(n) * _SECONDS[unit] for n, unit in _PART.findall(text))
    else:
        raise ValueError(f"{text!r} is not a duration such as 2h, 90m or 45s")

    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if not seconds <= MAX_SECONDS:  # also refuses NaN and infinity
        raise ValueError("is too long (at most 3650 days)")
    return timedelta(seconds=seconds)


def format_duration(delta: timedelta) -> str:
    """Render a duration compactly, the inverse of parse_duration for whole seconds."""
    total = int(delta.total_seconds())
    if total == 0:
        return "0s"

    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, total = divmod(total, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)

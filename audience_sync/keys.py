"""Trait keys: the snake_case names under which audiences and traits reach Plotline."""

from __future__ import annotations

import re
import unicodedata

KEY_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_]*$")

# A word boundary inside a run of letters: "highValue" splits before "V", and the end of
# an acronym splits before its last capital when a lower-case letter follows
# ("HTTPSUsers" -> "HTTPS" + "Users"). Digits never split from the letters they touch.
_LOWER_UPPER = re.compile(r"(?<=[a-z])(?=[A-Z])")
_ACRONYM_END = re.compile(r"(?<=[A-Z])(?=[A-Z][a-z])")
_NOT_WORD = re.compile(r"[^a-z0-9]+")


def snake_case(name: str) -> str:
    """Return the default key of a name, or "" when nothing of it survives."""
    ascii_name = (
        unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    )

    split = _ACRONYM_END.sub("_", _LOWER_UPPER.sub("_", ascii_name))

    return _NOT_WORD.sub("_", split.lower()).strip("_")


def is_valid_key(key: str) -> bool:
    """Tell whether an explicit key is acceptable to Plotline and to us."""
    return KEY_PATTERN.fullmatch(key) is not None

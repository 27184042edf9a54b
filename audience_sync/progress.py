"""Progress of a long run: a live bar on a terminal, a periodic log line elsewhere."""

from __future__ import annotations

import logging
import time
from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)

logger = logging.getLogger(__name__)


class RunProgress(Protocol):
    """What a run reports as it goes; every method is cheap to call per batch."""

    def reading(self, key: str, rows: int) -> None:
        """`rows` more source rows of `key` were read."""

    def sending(self, key: str, total: int) -> None:
        """`key` has `total` changes to send."""

    def sent(self, key: str, count: int) -> None:
        """`count` more messages of `key` were handled by the transport."""

    def done(self, key: str) -> None:
        """`key` is finished."""


class NoProgress:
    """Report nothing."""

    def reading(self, key: str, rows: int) -> None:
        """Ignore."""

    def sending(self, key: str, total: int) -> None:
        """Ignore."""

    def sent(self, key: str, count: int) -> None:
        """Ignore."""

    def done(self, key: str) -> None:
        """Ignore."""


class LogProgress:
    """An INFO line at most every `interval` seconds, for logs no one watches live."""

    def __init__(self, interval: float = 15.0) -> None:
        self._interval = interval
        self._reset()

    def _reset(self) -> None:
        self._started = time.monotonic()
        self._last = self._started
        self._read = 0
        self._sent = 0
        self._total = 0

    def _due(self) -> bool:
        now = time.monotonic()
        if now - self._last < self._interval:
            return False
        self._last = now
        return True

    def reading(self, key: str, rows: int) -> None:
        """Count rows read; log now and then."""
        self._read += rows
        if self._due():
            rate = self._read / max(time.monotonic() - self._started, 1e-9)
            logger.info("%s: read %d rows (%.0f/s)", key, self._read, rate)

    def sending(self, key: str, total: int) -> None:
        """Start counting what is sent."""
        self._started = time.monotonic()
        self._total = total

    def sent(self, key: str, count: int) -> None:
        """Count messages sent; log now and then with the time left."""
        self._sent += count
        if self._due():
            elapsed = max(time.monotonic() - self._started, 1e-9)
            rate = self._sent / elapsed
            left = (self._total - self._sent) / rate if rate else 0.0
            logger.info(
                "%s: sent %d of %d messages (%.0f/s, about %.0fs left)",
                key,
                self._sent,
                self._total,
                rate,
                left,
            )

    def done(self, key: str) -> None:
        """Start afresh for the next key."""
        self._reset()


class BarProgress:
    """Live bars on a terminal: rows read, then messages sent, rate, time left."""

    def __init__(self, console: Console) -> None:
        self._bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self._tasks: dict[str, TaskID] = {}
        self._started: dict[TaskID, float] = {}
        self._counts: dict[TaskID, int] = {}

    def __enter__(self) -> BarProgress:
        self._bars.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._bars.stop()

    def _task(self, name: str, total: int | None) -> TaskID:
        if name not in self._tasks:
            task = self._bars.add_task(name, total=total, rate="")
            self._tasks[name] = task
            self._started[task] = time.monotonic()
            self._counts[task] = 0
        return self._tasks[name]

    def _advance(self, task: TaskID, count: int) -> None:
        self._counts[task] += count
        elapsed = max(time.monotonic() - self._started[task], 1e-9)
        self._bars.update(
            task, advance=count, rate=f"{self._counts[task] / elapsed:,.0f}/s"
        )

    def reading(self, key: str, rows: int) -> None:
        """Advance the key's reading bar (its total is unknown)."""
        self._advance(self._task(f"{key}: reading", None), rows)

    def sending(self, key: str, total: int) -> None:
        """Open the key's sending bar."""
        self._task(f"{key}: sending", total)

    def sent(self, key: str, count: int) -> None:
        """Advance the key's sending bar."""
        self._advance(self._task(f"{key}: sending", None), count)

    def done(self, key: str) -> None:
        """Remove the key's bars."""
        for name in (f"{key}: reading", f"{key}: sending"):
            task = self._tasks.pop(name, None)
            if task is not None:
                self._bars.remove_task(task)

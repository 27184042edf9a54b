"""Progress of a long run: a live bar on a terminal, a periodic log line elsewhere."""

from __future__ import annotations

import logging
import threading
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
    """An INFO line every `interval` seconds while a key is read or sent.

    A thread of its own writes the lines, so a run that is stuck (a destination
    answering 429 after 429) still says where it is. Use it as a context manager.
    """

    def __init__(self, interval: float = 15.0) -> None:
        self._interval = interval
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name="audience-sync-progress", daemon=True
        )
        self._key: str | None = None
        self._phase = ""
        self._count = 0
        self._total = 0
        self._started = time.monotonic()

    def __enter__(self) -> LogProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopped.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stopped.wait(self._interval):
            self.report()

    def report(self) -> None:
        """Log where the current key is, if one is being read or sent."""
        with self._lock:
            key, phase, count, total = self._key, self._phase, self._count, self._total
            elapsed = max(time.monotonic() - self._started, 1e-9)
        if key is None:
            return
        rate = count / elapsed
        if phase == "reading":
            logger.info("%s: read %d rows (%.0f/s)", key, count, rate)
            return
        left = f"about {(total - count) / rate:.0f}s left" if rate else "waiting"
        logger.info(
            "%s: sent %d of %d messages (%.0f/s, %s)", key, count, total, rate, left
        )

    def _start(self, key: str, phase: str, total: int = 0) -> None:
        self._key, self._phase, self._count, self._total = key, phase, 0, total
        self._started = time.monotonic()

    def reading(self, key: str, rows: int) -> None:
        """Count rows read."""
        with self._lock:
            if self._key != key or self._phase != "reading":
                self._start(key, "reading")
            self._count += rows

    def sending(self, key: str, total: int) -> None:
        """Start counting what is sent."""
        with self._lock:
            self._start(key, "sending", total)

    def sent(self, key: str, count: int) -> None:
        """Count messages handled."""
        with self._lock:
            self._count += count

    def done(self, key: str) -> None:
        """Nothing to report until the next key starts."""
        with self._lock:
            self._key = None


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

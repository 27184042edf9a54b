"""The daemon: a sync at start-up, then one every `every` plus a random `jitter`.

APScheduler's blocking scheduler keeps the time, in UTC, with an interval trigger: the
gap between runs is plain seconds, so daylight-saving changes cannot skip or double a
run. The scheduler's settings carry the rules that matter:

- `max_instances=1`: a run still going when the next is due makes the next one skipped
  (APScheduler logs it), not queued behind it;
- `coalesce=True` with no misfire grace limit: after the machine sleeps past several
  due times, exactly one catch-up run happens, not a burst;
- the job is an importable function with a plain string argument, never a pickled
  engine or client.

Signals: SIGTERM and SIGINT stop starting new work and let the running sync finish
what is in flight within `schedule.shutdown_timeout`; SIGHUP reloads the config file,
keeping the old one if the new one is invalid.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from types import FrameType
from typing import Any

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, JobSubmissionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.interval import IntervalTrigger

from audience_sync.config import Config, load_config
from audience_sync.durations import format_duration
from audience_sync.errors import AudienceSyncError
from audience_sync.health import HealthServer, Metrics, check_health
from audience_sync.progress import LogProgress
from audience_sync.runner import Run, RunOptions
from audience_sync.store import history
from audience_sync.store.database import describe_url, open_store
from audience_sync.store.leases import utcnow
from audience_sync.store.migrate import upgrade

logger = logging.getLogger(__name__)

JOB_ID = "sync"


def scheduler_settings() -> dict[str, Any]:
    """The scheduler's settings: UTC, one run at a time, one catch-up after a sleep."""
    return {
        "timezone": "UTC",
        "executors": {"default": ThreadPoolExecutor(max_workers=1)},
        "job_defaults": {
            "coalesce": True,
            "max_instances": 1,
            "misfire_grace_time": None,
        },
    }


# The daemons of this process by id, so that the scheduler's job can name one with a
# plain string instead of holding a reference to it.
_DAEMONS: dict[str, Daemon] = {}


def scheduled_sync(daemon_id: str) -> None:
    """The scheduler's job: one scheduled sync of the daemon with this id."""
    daemon = _DAEMONS.get(daemon_id)
    if daemon is not None:
        daemon.sync()


def _trigger(config: Config) -> IntervalTrigger:
    return IntervalTrigger(
        seconds=config.schedule.every.total_seconds(),
        jitter=int(config.schedule.jitter.total_seconds()) or None,
        timezone="UTC",
    )


class Daemon:
    """Runs syncs on a schedule until it is told to stop."""

    def __init__(
        self,
        config_path: Path,
        config: Config,
        *,
        health_address: tuple[str, int] | None = None,
    ) -> None:
        self.id = uuid.uuid4().hex
        self.config_path = config_path
        self.config = config
        self.stop = threading.Event()
        self.metrics = Metrics()
        self._idle = threading.Event()
        self._idle.set()
        self._scheduler: BlockingScheduler | None = None
        self._engine = open_store(config.store_url.get_secret_value())
        self._health: HealthServer | None = None
        if health_address is not None:
            self._health = HealthServer(
                *health_address,
                health=lambda: check_health(self._engine, self.config),
                metrics=self.metrics,
            )

    # -- the job ---------------------------------------------------------------

    def sync(self) -> None:
        """Run one scheduled sync of every key that is due, and count it."""
        if self.stop.is_set():
            return
        config = self.config
        self._idle.clear()
        started = time.monotonic()
        try:
            with LogProgress() as progress:
                result = Run(
                    config,
                    RunOptions(now=utcnow(), trigger="schedule"),
                    stop=self.stop,
                    engine=self._engine,
                    progress=progress,
                ).execute()
        except AudienceSyncError as exc:
            # A bad config or an unreachable store: the next run tries again.
            logger.error("The run could not start: %s", exc)
            self.metrics.runs.labels("failed").inc()
            return
        except Exception:
            logger.exception("The run crashed; the next one will try again")
            self.metrics.runs.labels("failed").inc()
            return
        finally:
            self._idle.set()

        seconds = time.monotonic() - started
        self.metrics.observe(result, seconds)
        self._observe_sizes()
        if result.run_id is not None:
            logger.info(
                "Run %d %s in %.1fs (keys synced: %d)",
                result.run_id,
                result.status,
                seconds,
                len([k for k in result.keys if k.status != "locked"]),
            )
        else:
            logger.info("Nothing was due; every key is synced or being synced")

    def _observe_sizes(self) -> None:
        try:
            with self._engine.connect() as connection:
                sizes = {i.key: i.members for i in history.list_keys(connection)}
        except Exception as exc:
            logger.warning("Could not read snapshot sizes: %s", exc)
            return
        self.metrics.observe_sizes(sizes)

    # -- signals ---------------------------------------------------------------

    def request_stop(
        self, signum: int | None = None, _frame: FrameType | None = None
    ) -> None:
        """Stop starting new work; the running sync stops between batches."""
        name = signal.Signals(signum).name if signum else "a stop request"
        logger.info("Received %s: stopping", name)
        self.stop.set()
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def reload(
        self, _signum: int | None = None, _frame: FrameType | None = None
    ) -> None:
        """Read the config file again; keep the old config if the new one is bad."""
        try:
            config = load_config(self.config_path)
        except AudienceSyncError as exc:
            logger.error("Kept the old config; the new one is invalid: %s", exc)
            return
        except Exception as exc:
            # Whatever is wrong with the new file, the daemon keeps running.
            logger.error("Kept the old config; the new one could not be read: %s", exc)
            return

        old = self.config
        self.config = config
        logger.info("Reloaded %s: %d keys", self.config_path, len(config.definitions))
        if config.schedule != old.schedule and self._scheduler is not None:
            self._scheduler.reschedule_job(JOB_ID, trigger=_trigger(config))
            logger.info(
                "New schedule: every %s plus up to %s",
                format_duration(config.schedule.every),
                format_duration(config.schedule.jitter),
            )
        if config.store_url.get_secret_value() != old.store_url.get_secret_value():
            logger.warning("A new store URL takes effect only after a restart")
            self.config = dataclasses.replace(config, store_url=old.store_url)

    # -- the loop --------------------------------------------------------------

    def run_forever(self) -> int:
        """Run until SIGTERM or SIGINT; return the process exit code."""
        upgrade(self._engine)
        _DAEMONS[self.id] = self
        scheduler = BlockingScheduler(
            timezone="UTC",
            executors={"default": ThreadPoolExecutor(max_workers=1)},
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": None,
            },
        )
        self._scheduler = scheduler
        scheduler.add_listener(self._skipped, EVENT_JOB_MAX_INSTANCES)
        scheduler.add_job(
            "audience_sync.scheduler:scheduled_sync",
            trigger=_trigger(self.config),
            args=[self.id],
            id=JOB_ID,
            name="sync",
            next_run_time=utcnow(),  # the first sync at start-up
        )

        previous = self._install_signal_handlers()
        if self._health is not None:
            self._health.start()
        logger.info(
            "Daemon started: %d keys, every %s plus up to %s, store %s",
            len(self.config.definitions),
            format_duration(self.config.schedule.every),
            format_duration(self.config.schedule.jitter),
            _describe_store(self.config),
        )
        try:
            scheduler.start()  # blocks until request_stop shuts it down
        finally:
            self._restore_signal_handlers(previous)

        return self._finish()

    @staticmethod
    def _skipped(event: JobSubmissionEvent) -> None:
        due = event.scheduled_run_times[0] if event.scheduled_run_times else None
        logger.warning(
            "Skipped the run due at %s: the previous run is still going",
            f"{due:%Y-%m-%d %H:%M:%S} UTC" if due else "now",
        )

    def _finish(self) -> int:
        timeout = self.config.schedule.shutdown_timeout.total_seconds()
        if not self._idle.wait(timeout):
            # The sync did not reach a batch boundary in time. Its acknowledged
            # changes are recorded; the run is marked interrupted at the next start.
            logger.warning(
                "The running sync did not stop within %.0fs; exiting", timeout
            )
            logging.shutdown()
            os._exit(0)

        if self._health is not None:
            self._health.stop()
        self._engine.dispose()
        _DAEMONS.pop(self.id, None)
        logger.info("Stopped")
        return 0

    def _install_signal_handlers(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}
        for signum, handler in (
            (signal.SIGTERM, self.request_stop),
            (signal.SIGINT, self.request_stop),
            (signal.SIGHUP, self.reload),
        ):
            previous[signum] = signal.signal(signum, handler)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _describe_store(config: Config) -> str:
    return describe_url(config.store_url.get_secret_value())

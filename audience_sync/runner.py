"""One run: for each key, stage source rows, diff, send, fold acks into the snapshot.

```
source query ──► staged rows ──► diff against snapshot ──► changes
                                                              │
  snapshot ◄── apply acknowledged changes ◄── transport ◄── messages
```

Each key is synced under its lease, on one store connection that holds its staging
table, and commits after every batch, so a process killed at any moment leaves the
snapshot equal to what the destination acknowledged.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from audience_sync.config import Config, Definition
from audience_sync.declarations import DeclarationError, check_declaration
from audience_sync.diff import (
    DiffCounts,
    clear_plan,
    count_diff,
    diff_select,
    finish_staging,
    plan_changes,
    stage,
    staged_count,
    start_staging,
)
from audience_sync.errors import (
    EXIT_INCOMPLETE,
    EXIT_LOCKED,
    EXIT_OK,
    AudienceSyncError,
    ConfigError,
    GuardError,
    LockHeldError,
    SyncError,
    TransportError,
)
from audience_sync.messages import Message, MessageBuilder
from audience_sync.progress import NoProgress, RunProgress
from audience_sync.sources import ReadCounts, Sources, absent_value
from audience_sync.store import history
from audience_sync.store import snapshot as snapshots
from audience_sync.store.database import open_store, sqlite_path, temp_only
from audience_sync.store.leases import Heartbeat, Leases, utcnow
from audience_sync.store.migrate import upgrade
from audience_sync.transports import Delivery, Transport, make_transport

logger = logging.getLogger(__name__)

PAGE_SIZE = 5_000
PREVIEW_LIMIT = 1_000


@dataclass(frozen=True)
class RunOptions:
    """What a run was asked to do."""

    now: datetime
    keys: list[str] | None = None
    full: bool = False
    dry_run: bool = False
    force: bool = False
    trigger: str = "manual"
    wait: float = 0.0


@dataclass
class KeyResult:
    """How one key fared in a run."""

    key: str
    kind: str
    status: str = "running"
    full: bool = False
    members: int = 0
    skipped: int = 0
    duplicates: int = 0
    diff: DiffCounts = field(default_factory=DiffCounts)
    sent: int = 0
    acknowledged: int = 0
    rejected: int = 0
    pending: int = 0
    error: str | None = None
    seconds: float = 0.0
    preview: list[tuple[str, str, str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """The counts stored in history."""
        return {
            "members": self.members,
            "skipped": self.skipped,
            "duplicates": self.duplicates,
            "entered": self.diff.entered,
            "exited": self.diff.exited,
            "changed": self.diff.changed,
            "resent": self.diff.resent,
            "sent": self.sent,
            "acknowledged": self.acknowledged,
            "rejected": self.rejected,
            "pending": self.pending,
        }


@dataclass
class RunResult:
    """How a whole run fared."""

    run_id: int | None
    now: datetime
    dry_run: bool
    keys: list[KeyResult] = field(default_factory=list)
    status: str = "running"
    retries: int = 0

    @property
    def exit_code(self) -> int:
        """0 when every key succeeded, 3 when a lease was held, else 1."""
        if any(k.status == "locked" for k in self.keys):
            return EXIT_LOCKED
        return EXIT_OK if self.status == "succeeded" else EXIT_INCOMPLETE


class _Stopped(Exception):
    """A shutdown request arrived while a key was being read."""


class _LeaseLost(Exception):
    """Another process took over the key's lease while this one was sending."""


def _run_status(keys: list[KeyResult]) -> str:
    if all(k.status in ("succeeded", "dry-run", "retired") for k in keys):
        return "succeeded"
    if all(k.status in ("failed", "locked") for k in keys):
        return "failed"
    return "partial"


class Run:
    """A run over some keys of a config; `execute` does the work."""

    def __init__(
        self,
        config: Config,
        options: RunOptions,
        *,
        stop: threading.Event | None = None,
        transport_factory: Callable[[], Transport] | None = None,
        engine: Engine | None = None,
        progress: RunProgress | None = None,
    ) -> None:
        self.config = config
        self.options = options
        self.stop = stop or threading.Event()
        self._transport_factory = transport_factory or (
            lambda: make_transport(config.destination)
        )
        self._engine = engine
        self._lost: set[str] = set()
        self._fresh: set[str] = set()  # keys declared again after being retired
        self._owner = ""
        self._absent = "false"  # the absent value of the key being sent
        self.progress: RunProgress = progress or NoProgress()

    def execute(self) -> RunResult:
        """Sync every selected key once and record the run."""
        definitions = self.config.select(self.options.keys)
        with ExitStack() as cleanup:
            sources = Sources(self.config.sources)
            cleanup.callback(sources.close)
            # A declaration naming what does not exist is a config error, found
            # before the store is even opened.
            self._check_declarations(sources, definitions)
            if self._engine is not None:
                return self._execute(self._engine, sources, definitions)

            url = self.config.store_url.get_secret_value()
            path = sqlite_path(url)
            if self.options.dry_run and path is not None and not path.exists():
                # A dry run creates no store: with none yet, every member is new, and
                # a throwaway store in a temporary folder says so.
                folder = cleanup.enter_context(tempfile.TemporaryDirectory())
                url = f"sqlite:///{Path(folder) / 'dry-run.db'}"
            engine = open_store(url)
            cleanup.callback(engine.dispose)
            return self._execute(engine, sources, definitions)

    def _execute(
        self, engine: Engine, sources: Sources, definitions: list[Definition]
    ) -> RunResult:
        options = self.options
        upgrade(engine)
        leases = Leases(engine)
        self._owner = leases.owner

        # A key that changed kind is a config error, found before anything is sent.
        with engine.begin() as connection:
            for definition in definitions:
                history.check_kind(connection, definition)
            if not options.dry_run:
                history.mark_interrupted(connection, leases.ttl.total_seconds())

        result = RunResult(run_id=None, now=options.now, dry_run=options.dry_run)
        definitions = self._active(engine, definitions)
        transport: Transport | None = None
        heartbeat = Heartbeat(engine, leases, self._lost.update)
        try:
            with heartbeat:
                for definition in definitions:
                    if self.stop.is_set():
                        break
                    try:
                        leases.acquire(definition.key, result.run_id, wait=options.wait)
                    except LockHeldError as exc:
                        result.keys.append(
                            KeyResult(
                                definition.key,
                                definition.kind,
                                "locked",
                                error=str(exc),
                            )
                        )
                        log = (
                            logger.info
                            if options.trigger == "schedule"
                            else logger.warning
                        )
                        log("Skipped %s: %s", definition.key, exc)
                        continue

                    try:
                        if options.trigger == "schedule" and not self._due(
                            engine, definition
                        ):
                            continue

                        # A run is recorded once it has a key to sync, so replicas that
                        # find nothing to do leave no empty runs behind.
                        computation_id = ""
                        if not options.dry_run:
                            with engine.begin() as connection:
                                if result.run_id is None:
                                    result.run_id = history.start_run(
                                        connection,
                                        options.now,
                                        options.trigger,
                                        options.full,
                                        leases.owner,
                                    )
                                    heartbeat.run_id = result.run_id
                                if history.reactivate(connection, definition):
                                    self._fresh.add(definition.key)
                                computation_id = history.register(
                                    connection, definition
                                )
                            if transport is None:
                                transport = self._transport_factory()

                        result.keys.append(
                            self._sync_key(
                                engine,
                                sources,
                                transport,
                                definition,
                                computation_id,
                                result.run_id,
                            )
                        )
                    finally:
                        leases.release(definition.key)
        finally:
            if transport is not None:
                result.retries = int(getattr(transport, "retries", 0))
                transport.close()

        result.status = _run_status(result.keys)
        if self.stop.is_set():
            result.status = "interrupted"
        if result.run_id is not None:
            with engine.begin() as connection:
                history.finish_run(
                    connection,
                    result.run_id,
                    result.status,
                    "stopped by a shutdown request" if self.stop.is_set() else None,
                )
        return result

    def _active(
        self, engine: Engine, definitions: list[Definition]
    ) -> list[Definition]:
        """Leave out disabled keys, but for those still to be unset once."""
        with engine.connect() as connection:
            retired = history.retired_keys(connection)
        active = []
        for definition in definitions:
            if definition.enabled or (
                definition.on_remove == "unset" and definition.key not in retired
            ):
                active.append(definition)
        return active

    def _check_declarations(
        self, sources: Sources, definitions: list[Definition]
    ) -> None:
        """Check every declared audience and trait against its source, before any run.

        Raises:
            ConfigError: a declaration names an event, table or column that does not
                exist, or compares a column with a value of the wrong kind.
        """
        for definition in definitions:
            if definition.declaration is None or not definition.enabled:
                continue
            source = self.config.sources[definition.source]
            try:
                with sources.engine(definition.source).connect() as connection:
                    check_declaration(definition.declaration, source.events, connection)
            except DeclarationError as exc:
                raise ConfigError(f"{definition.label}: {exc}") from None
            except (SQLAlchemyError, SyncError) as exc:
                # An unreachable source is not a config error; the key fails when
                # the run reaches it, and the other keys go ahead.
                logger.debug("Could not check %s yet: %s", definition.key, exc)

    def _due(self, engine: Engine, definition: Definition) -> bool:
        """Tell whether a scheduled run should sync a key now.

        Several daemons may share a store: a key that one of them synced within the
        last interval is not due, so together they sync each key once per interval.
        """
        with engine.begin() as connection:
            last = history.last_success(connection, definition.key)
        if last is None:
            return True
        # A little slack, so a key synced at the start of the previous run is due
        # again at the start of this one.
        slack = timedelta(
            seconds=min(60.0, self.config.schedule.every.total_seconds() / 10)
        )
        due: bool = last <= utcnow() - self.config.schedule.every + slack
        if not due:
            logger.debug("Not due: %s was synced at %s", definition.key, last)
        return due

    def _sync_key(
        self,
        engine: Engine,
        sources: Sources,
        transport: Transport | None,
        definition: Definition,
        computation_id: str,
        run_id: int | None,
    ) -> KeyResult:
        """Sync one key (its lease already held) and record how it went."""
        result = KeyResult(key=definition.key, kind=definition.kind)
        started = time.monotonic()

        try:
            with engine.connect() as connection:
                self._sync_key_on(
                    connection,
                    sources,
                    transport,
                    definition,
                    computation_id,
                    run_id,
                    result,
                )
        except _Stopped:
            result.status = "interrupted"
            result.error = "stopped by a shutdown request"
        except SyncError as exc:
            result.status, result.error = (
                "held" if isinstance(exc, GuardError) else "failed",
                str(exc),
            )
            logger.warning(
                "%s %s: %s", definition.kind.capitalize(), definition.key, exc
            )
        except SQLAlchemyError as exc:
            result.status = "failed"
            result.error = (
                f"the store failed: {str(getattr(exc, 'orig', exc)).splitlines()[0]}"
            )
            logger.exception("The store failed while syncing %s", definition.key)
        except Exception as exc:
            # Whatever one key's data does, the other keys of the run go ahead.
            result.status = "failed"
            result.error = f"unexpected {type(exc).__name__}: {exc}".splitlines()[0]
            logger.error("%s failed: %s", definition.key, result.error)
            logger.debug("The failure of %s", definition.key, exc_info=True)
        finally:
            self.progress.done(definition.key)
            result.seconds = time.monotonic() - started
            if run_id is not None:
                self._record_end(engine, run_id, result)

        logger.info(
            "%s %s %s in %.1fs: %d members, %d entered, %d exited, %d changed, "
            "%d acknowledged, %d rejected, %d pending",
            definition.kind.capitalize(),
            definition.key,
            result.status,
            result.seconds,
            result.members,
            result.diff.entered,
            result.diff.exited,
            result.diff.changed,
            result.acknowledged,
            result.rejected,
            result.pending,
        )
        return result

    def _record_end(self, engine: Engine, run_id: int, result: KeyResult) -> None:
        try:
            with engine.begin() as connection:
                history.finish_key(
                    connection,
                    run_id,
                    result.key,
                    result.status,
                    error=result.error,
                    **result.counts(),
                )
        except SQLAlchemyError:
            logger.exception("Could not record the end of %s", result.key)

    def _sync_key_on(
        self,
        connection: Connection,
        sources: Sources,
        transport: Transport | None,
        definition: Definition,
        computation_id: str,
        run_id: int | None,
        result: KeyResult,
    ) -> None:
        options = self.options
        key = definition.key
        absent = absent_value(definition)

        with connection.begin():
            full = (
                options.full
                or key in self._fresh
                or not history.has_history(connection, key)
            )
            result.full = full
            if run_id is not None:
                history.start_key(connection, run_id, key, full)

        # 1. Stage the source rows. A failed read raises before anything is diffed.
        with temp_only(connection):
            start_staging(connection)
        read = ReadCounts()
        kept = 0
        store_url = self.config.store_url.get_secret_value()
        if not definition.enabled:
            pass  # a disabled key being unset stages nothing: every member leaves
        elif sources.is_store(definition.source, store_url):
            # The source is the store's own database: no row passes through Python.
            read = self._stage_inside(connection, sources, definition)
            kept = read.rows - read.skipped
        else:
            with sources.attached(connection, definition.source) as attached:
                if attached:
                    # A SQLite source next to a SQLite store: the same, attached.
                    read = self._stage_inside(
                        connection, sources, definition, attached=True
                    )
                    kept = read.rows - read.skipped
                else:
                    kept = self._stage_through(connection, sources, definition, read)

        with temp_only(connection):
            finish_staging(connection)
            result.members = staged_count(connection)
        result.skipped = read.skipped
        result.duplicates = kept - result.members

        # 2. Diff against the snapshot, and guard against a collapse: a held key
        # records no change at all.
        diff = diff_select(key, absent, full=options.full)
        if run_id is None:
            with connection.begin():
                result.diff = count_diff(connection, diff)
                self._check_guard(connection, definition, result)
                result.preview = [
                    tuple(row)  # type: ignore[misc]
                    for row in connection.execute(
                        diff.order_by("user_id").limit(PREVIEW_LIMIT)
                    ).all()
                ]
            result.status = "dry-run"
            return

        with temp_only(connection):
            result.diff = plan_changes(connection, diff)
            try:
                self._check_guard(connection, definition, result)
            except GuardError:
                clear_plan(connection)
                raise
        with connection.begin():
            history.update_key(connection, run_id, key, **result.counts())

        # 4. Send, and fold what was acknowledged into the snapshot.
        assert transport is not None
        self.progress.sending(key, result.diff.total)
        self._deliver(connection, transport, definition, computation_id, run_id, result)

        with connection.begin():
            counts = snapshots.status_counts(connection, run_id, key)
        result.acknowledged = counts.get("acknowledged", 0)
        result.rejected = counts.get("rejected", 0)
        result.pending = counts.get("pending", 0)
        result.status = (
            "succeeded" if result.pending == result.rejected == 0 else "partial"
        )

        # An unset key whose every member was told is retired; declared again later,
        # it starts from an empty baseline.
        if not definition.enabled and result.status == "succeeded":
            with connection.begin():
                history.retire(connection, key)
            result.status = "retired"
            logger.info(
                "Retired %s: its %d members were unset", key, result.diff.exited
            )

    def _stage_inside(
        self,
        connection: Connection,
        sources: Sources,
        definition: Definition,
        *,
        attached: bool = False,
    ) -> ReadCounts:
        """Stage with one statement in the store's database; return what it read."""
        with temp_only(connection):
            read = sources.stage_in(
                connection, definition, self.options.now, attached=attached
            )
        self.progress.reading(definition.key, read.rows)
        logger.debug(
            "Staged %d rows of %s inside the store's database",
            read.rows,
            definition.key,
        )
        return read

    def _stage_through(
        self,
        connection: Connection,
        sources: Sources,
        definition: Definition,
        read: ReadCounts,
    ) -> int:
        """Stream the source's rows into staging in batches; return how many it kept."""
        kept = 0
        for batch in sources.read(definition, self.options.now, read):
            with temp_only(connection):
                stage(connection, batch)
            kept += len(batch)
            self.progress.reading(definition.key, len(batch))
            if self.stop.is_set():
                raise _Stopped
        return kept

    def _check_guard(
        self, connection: Connection, definition: Definition, result: KeyResult
    ) -> None:
        guard = self.config.guard
        if self.options.force or not definition.enabled:
            return
        leaving = result.diff.exited
        if leaving <= guard.max_exit_fraction * guard.min_members:
            return  # too few to trip the guard whatever the size: skip the count
        size = snapshots.snapshot_size(connection, definition.key)
        if size >= guard.min_members and leaving > guard.max_exit_fraction * size:
            raise GuardError(
                f"{leaving} of {size} members would leave at once "
                f"(more than {guard.max_exit_fraction:.0%}); nothing was sent for "
                f"{definition.key!r}. If that is right, run again with --force"
            )

    def _deliver(
        self,
        connection: Connection,
        transport: Transport,
        definition: Definition,
        computation_id: str,
        run_id: int,
        result: KeyResult,
    ) -> None:
        key = definition.key
        self._absent = absent_value(definition)
        builder = MessageBuilder(
            definition, computation_id, run_id, self.options.now, self.config.personas
        )

        # Every planned change is written to history exactly once: acknowledged,
        # rejected, or (when sending stops early) pending.
        # One transaction between two sends does both bookkeeping steps: it records
        # the outcomes of the page just sent and marks the next page's users
        # uncertain before that page leaves, so a page costs one commit.
        recorded_through = 0
        sent: tuple[list[Message], list[Delivery], int] | None = None
        try:
            while True:
                page: Sequence[Any] = []
                if not self.stop.is_set():
                    with temp_only(connection):
                        page = snapshots.planned_page(
                            connection, sent[2] if sent else recorded_through, PAGE_SIZE
                        )

                try:
                    with connection.begin():
                        # The lease is checked in the transaction that records.
                        if (sent or page) and not self._still_ours(connection, key):
                            raise _LeaseLost
                        if sent:
                            self._record_page(
                                connection, run_id, key, *sent[:2], result
                            )
                        if page:
                            snapshots.mark_uncertain(
                                connection, run_id, key, page[0].id, page[-1].id
                            )
                except _LeaseLost:
                    # A process paused past its lease may have sent stale values
                    # after another one synced the key (and cleared their marks).
                    # Mark the users it sent to uncertain again, so that the next
                    # run sends them the truth, and fold nothing into the snapshot.
                    if sent:
                        with connection.begin():
                            snapshots.mark_uncertain(
                                connection,
                                run_id,
                                key,
                                sent[0][0].change_id,
                                sent[0][-1].change_id,
                            )
                    raise SyncError(
                        f"lost the lease of {key!r} to another process; stopped"
                    ) from None
                if sent:
                    recorded_through, sent = sent[2], None
                if not page:
                    break

                messages = [builder.build(row.id, row.user_id, row.new) for row in page]
                try:
                    deliveries = transport.send(messages, self.stop)
                except TransportError as exc:
                    result.error = str(exc)
                    logger.warning("Stopped sending %s: %s", key, exc)
                    break
                result.sent += len(messages)
                self.progress.sent(key, len(messages))
                sent = (messages, deliveries, page[-1].id)
        finally:
            with connection.begin():
                snapshots.leave_pending(
                    connection, run_id, key, after_id=recorded_through
                )

    def _still_ours(self, connection: Connection, key: str) -> bool:
        """Tell whether this process still holds the lease of a key."""
        return key not in self._lost and snapshots.holds_lease(
            connection, key, self._owner
        )

    def _record_page(
        self,
        connection: Connection,
        run_id: int,
        key: str,
        messages: list[Message],
        deliveries: list[Delivery],
        result: KeyResult,
    ) -> None:
        """Append a page's outcomes to history; fold its acks into the snapshot."""
        acknowledged, pending = [], []
        for message, delivery in zip(messages, deliveries, strict=True):
            if delivery.status == "acknowledged":
                acknowledged.append(message.change_id)
            elif delivery.status == "rejected":
                snapshots.reject(
                    connection,
                    run_id,
                    key,
                    message.change_id,
                    delivery.status_code,
                    delivery.reason,
                )
            else:
                pending.append(message.change_id)
        snapshots.acknowledge(connection, run_id, key, acknowledged, self._absent)
        snapshots.leave_pending(connection, run_id, key, pending)

        result.acknowledged += len(acknowledged)
        history.update_key(
            connection, run_id, key, sent=result.sent, acknowledged=result.acknowledged
        )


def run_once(config: Config, options: RunOptions, **kwargs: object) -> RunResult:
    """Run one sync of a config; see Run for the keyword arguments."""
    return Run(config, options, **kwargs).execute()  # type: ignore[arg-type]


__all__ = [
    "AudienceSyncError",
    "KeyResult",
    "Run",
    "RunOptions",
    "RunResult",
    "run_once",
]

"""Sync history: record runs and their keys, and read them back for the command line."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, func, insert, select, update

from audience_sync.config import Definition
from audience_sync.errors import ConfigError
from audience_sync.store.leases import is_gone, utcnow
from audience_sync.store.schema import changes, definitions, run_keys, runs, snapshot
from audience_sync.store.snapshot import status_counts

RUN_STATUSES = ("running", "succeeded", "partial", "failed", "interrupted")

COUNT_FIELDS = (
    "members",
    "entered",
    "exited",
    "changed",
    "acknowledged",
    "rejected",
    "pending",
)


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def check_kind(connection: Connection, definition: Definition) -> None:
    """Refuse a definition whose key was synced before as the other kind."""
    kind = connection.execute(
        select(definitions.c.kind).where(definitions.c.key == definition.key)
    ).scalar_one_or_none()
    if kind is not None and kind != definition.kind:
        raise ConfigError(
            f"the key {definition.key!r} was synced as an {kind}, "
            f"so it cannot now be a {definition.kind}; give it another key"
        )


def register(connection: Connection, definition: Definition) -> str:
    """Remember a key and return its stable computation id.

    A key keeps its id and kind for life; renaming it (with an explicit key) only
    updates the name.
    """
    row = connection.execute(
        select(
            definitions.c.kind, definitions.c.name, definitions.c.computation_id
        ).where(definitions.c.key == definition.key)
    ).first()

    if row is None:
        computation_id = str(uuid.uuid4())
        connection.execute(
            insert(definitions).values(
                key=definition.key,
                kind=definition.kind,
                name=definition.name,
                computation_id=computation_id,
                created_at=utcnow(),
            )
        )
        return computation_id

    check_kind(connection, definition)
    if row.name != definition.name:
        connection.execute(
            update(definitions)
            .where(definitions.c.key == definition.key)
            .values(name=definition.name)
        )
    return str(row.computation_id)


def retired_keys(connection: Connection) -> set[str]:
    """The keys that were unset and retired."""
    return set(
        connection.execute(
            select(definitions.c.key).where(definitions.c.retired_at.is_not(None))
        ).scalars()
    )


def retire(connection: Connection, key: str) -> None:
    """Mark a key retired: it was unset for all its members and is no longer synced."""
    connection.execute(
        update(definitions).where(definitions.c.key == key).values(retired_at=utcnow())
    )


def reactivate(connection: Connection, definition: Definition) -> bool:
    """Bring a retired key back, if it was retired; return whether it was."""
    if not definition.enabled:
        return False
    result = connection.execute(
        update(definitions)
        .where(
            definitions.c.key == definition.key, definitions.c.retired_at.is_not(None)
        )
        .values(retired_at=None)
    )
    return result.rowcount > 0


def has_history(connection: Connection, key: str) -> bool:
    """Tell whether a key has ever been synced (any acknowledged change or snapshot)."""
    return (
        connection.execute(
            select(snapshot.c.user_id).where(snapshot.c.key == key).limit(1)
        ).first()
        is not None
        or connection.execute(
            select(run_keys.c.run_id)
            .where(
                run_keys.c.key == key, run_keys.c.status.in_(["succeeded", "partial"])
            )
            .limit(1)
        ).first()
        is not None
    )


def last_success(connection: Connection, key: str) -> datetime | None:
    """When the latest run that synced a key without failing started, or None."""
    return connection.execute(
        select(func.max(run_keys.c.started_at)).where(
            run_keys.c.key == key, run_keys.c.status.in_(["succeeded", "partial"])
        )
    ).scalar_one_or_none()


def start_run(
    connection: Connection, now: datetime, trigger: str, full: bool, owner: str
) -> int:
    """Open a run and return its id."""
    started = utcnow()
    result = connection.execute(
        insert(runs)
        .values(
            started_at=started,
            now=now,
            status="running",
            trigger=trigger,
            full=full,
            owner=owner,
            heartbeat_at=started,
        )
        .returning(runs.c.id)
    )
    return int(result.scalar_one())


def start_key(connection: Connection, run_id: int, key: str, full: bool) -> None:
    """Open the record of one key in a run."""
    connection.execute(
        insert(run_keys).values(
            run_id=run_id,
            key=key,
            status="running",
            full=full,
            started_at=utcnow(),
            **{
                name: 0
                for name in ("skipped", "duplicates", "sent", "resent", *COUNT_FIELDS)
            },
        )
    )


def update_key(connection: Connection, run_id: int, key: str, **values: Any) -> None:
    """Store counts or a status for one key in a run."""
    connection.execute(
        update(run_keys)
        .where(run_keys.c.run_id == run_id, run_keys.c.key == key)
        .values(**values)
    )


def finish_key(
    connection: Connection, run_id: int, key: str, status: str, **values: Any
) -> None:
    """Close the record of one key in a run."""
    update_key(connection, run_id, key, status=status, finished_at=utcnow(), **values)


def finish_run(
    connection: Connection, run_id: int, status: str, error: str | None = None
) -> None:
    """Close a run with its final status."""
    now = utcnow()
    connection.execute(
        update(runs)
        .where(runs.c.id == run_id)
        .values(status=status, finished_at=now, heartbeat_at=now, error=error)
    )


def mark_interrupted(connection: Connection, stale_after: float) -> list[int]:
    """Mark runs left `running` by a process that is gone as `interrupted`.

    A run's owner is gone when its heartbeat is older than `stale_after` seconds, or
    when it is a process on this machine that no longer exists.
    """
    now = utcnow()
    candidates = connection.execute(
        select(runs.c.id, runs.c.owner, runs.c.heartbeat_at).where(
            runs.c.status == "running"
        )
    ).all()
    dead = [
        row.id
        for row in candidates
        if (now - row.heartbeat_at).total_seconds() > stale_after or is_gone(row.owner)
    ]

    for run_id in dead:
        for row in connection.execute(
            select(
                run_keys.c.key,
                run_keys.c.entered,
                run_keys.c.exited,
                run_keys.c.changed,
                run_keys.c.resent,
            ).where(run_keys.c.run_id == run_id, run_keys.c.status == "running")
        ).all():
            # Changes are written to history as their outcomes arrive; what the
            # dead process never heard back about is pending.
            counts = status_counts(connection, run_id, row.key)
            acknowledged = counts.get("acknowledged", 0)
            rejected = counts.get("rejected", 0)
            planned = row.entered + row.exited + row.changed + row.resent
            update_key(
                connection,
                run_id,
                row.key,
                status="interrupted",
                finished_at=now,
                acknowledged=acknowledged,
                rejected=rejected,
                pending=max(planned - acknowledged - rejected, 0),
            )
        connection.execute(
            update(runs)
            .where(runs.c.id == run_id)
            .values(status="interrupted", finished_at=now, error="the process stopped")
        )
    return dead


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


@dataclass
class KeySummary:
    """One key in one run, as history shows it."""

    key: str
    status: str
    full: bool
    members: int
    entered: int
    exited: int
    changed: int
    acknowledged: int
    rejected: int
    pending: int
    skipped: int
    duplicates: int
    error: str | None

    def as_json(self) -> dict[str, Any]:
        """The stable JSON form of a key in a run."""
        return {
            "key": self.key,
            "status": self.status,
            "full": self.full,
            **{name: getattr(self, name) for name in COUNT_FIELDS},
            "skipped": self.skipped,
            "duplicates": self.duplicates,
            "error": self.error,
        }


@dataclass
class RunSummary:
    """One run, as history shows it."""

    id: int
    started_at: datetime
    finished_at: datetime | None
    now: datetime
    status: str
    trigger: str
    error: str | None
    audiences: list[KeySummary] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """The stable JSON form of a run."""
        return {
            "id": self.id,
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "now": _iso(self.now),
            "status": self.status,
            "trigger": self.trigger,
            "error": self.error,
            "audiences": [key.as_json() for key in self.audiences],
        }


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def list_runs(
    connection: Connection,
    key: str | None = None,
    limit: int | None = 20,
    run_id: int | None = None,
) -> list[RunSummary]:
    """Runs, newest first, optionally only those that synced a key, or only one."""
    query = select(runs).order_by(runs.c.id.desc())
    if run_id is not None:
        query = query.where(runs.c.id == run_id)
    if key is not None:
        query = query.where(
            runs.c.id.in_(select(run_keys.c.run_id).where(run_keys.c.key == key))
        )
    if limit is not None:
        query = query.limit(limit)
    found = [
        RunSummary(
            id=row.id,
            started_at=row.started_at,
            finished_at=row.finished_at,
            now=row.now,
            status=row.status,
            trigger=row.trigger,
            error=row.error,
        )
        for row in connection.execute(query).all()
    ]
    if not found:
        return found

    by_id = {run.id: run for run in found}
    key_query = (
        select(run_keys)
        .where(run_keys.c.run_id.in_(list(by_id)))
        .order_by(run_keys.c.run_id, run_keys.c.started_at, run_keys.c.key)
    )
    if key is not None:
        key_query = key_query.where(run_keys.c.key == key)
    for row in connection.execute(key_query).all():
        by_id[row.run_id].audiences.append(
            KeySummary(
                key=row.key,
                status=row.status,
                full=row.full,
                members=row.members,
                entered=row.entered,
                exited=row.exited,
                changed=row.changed,
                acknowledged=row.acknowledged,
                rejected=row.rejected,
                pending=row.pending,
                skipped=row.skipped,
                duplicates=row.duplicates,
                error=row.error,
            )
        )
    return found


def get_run(connection: Connection, run_id: int) -> RunSummary | None:
    """One run with its keys, or None."""
    found = list_runs(connection, limit=1, run_id=run_id)
    return found[0] if found else None


def list_changes(
    connection: Connection, run_id: int, key: str | None = None
) -> Sequence[Any]:
    """The changes of a run, by key and then user."""
    query = (
        select(
            changes.c.key,
            changes.c.user_id,
            changes.c.kind,
            changes.c.old,
            changes.c.new,
            changes.c.status,
            changes.c.status_code,
            changes.c.reason,
        )
        .where(changes.c.run_id == run_id)
        .order_by(changes.c.key, changes.c.user_id)
    )
    if key is not None:
        query = query.where(changes.c.key == key)
    return connection.execute(query).all()


def change_as_json(row: Any) -> dict[str, Any]:
    """The stable JSON form of one change."""
    return {
        "key": row.key,
        "user_id": row.user_id,
        "kind": row.kind,
        "old": orjson.loads(row.old),
        "new": orjson.loads(row.new),
        "status": row.status,
        "status_code": row.status_code,
        "reason": row.reason,
    }


@dataclass
class KeyInfo:
    """A key the store knows, with its latest state."""

    key: str
    kind: str
    name: str
    computation_id: str
    created_at: datetime
    retired_at: datetime | None
    members: int
    last_run: int | None
    last_status: str | None
    last_synced_at: datetime | None


def list_keys(connection: Connection) -> list[KeyInfo]:
    """Every key the store has seen, with its snapshot size and its latest run."""
    sizes: dict[str, int] = dict(
        connection.execute(
            select(snapshot.c.key, func.count()).group_by(snapshot.c.key)
        ).all()
    )
    newest = (
        select(run_keys.c.key, func.max(run_keys.c.run_id).label("run_id"))
        .group_by(run_keys.c.key)
        .subquery()
    )
    latest = {
        row.key: row
        for row in connection.execute(
            select(
                run_keys.c.key,
                run_keys.c.run_id,
                run_keys.c.status,
                run_keys.c.finished_at,
            ).join(
                newest,
                (newest.c.key == run_keys.c.key)
                & (newest.c.run_id == run_keys.c.run_id),
            )
        ).all()
    }

    found = []
    for row in connection.execute(
        select(definitions).order_by(definitions.c.key)
    ).all():
        last = latest.get(row.key)
        found.append(
            KeyInfo(
                key=row.key,
                kind=row.kind,
                name=row.name,
                computation_id=row.computation_id,
                created_at=row.created_at,
                retired_at=row.retired_at,
                members=sizes.get(row.key, 0),
                last_run=last.run_id if last else None,
                last_status=last.status if last else None,
                last_synced_at=last.finished_at if last else None,
            )
        )
    return found

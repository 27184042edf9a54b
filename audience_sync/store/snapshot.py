"""Fold acknowledged changes into the snapshot, and read membership back out.

The snapshot only ever moves when a destination acknowledges a change: a change that
was rejected, or whose fate is unknown, stays out, so the next run's diff produces it
again with the truth as it is then.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Integer, Text, func, insert, literal, select
from sqlalchemy.dialects import postgresql, sqlite

from audience_sync.diff import planned
from audience_sync.store.schema import changes, leases, snapshot, uncertain


def planned_page(connection: Connection, after_id: int, size: int) -> Sequence[Any]:
    """The next `size` planned changes after `after_id`: `(id, user_id, new)` rows."""
    return connection.execute(
        select(planned.c.id, planned.c.user_id, planned.c.new)
        .where(planned.c.id > after_id)
        .order_by(planned.c.id)
        .limit(size)
    ).all()


def id_ranges(ids: Sequence[int]) -> list[tuple[int, int]]:
    """Collapse sorted ids into inclusive `(first, last)` runs of consecutive ids."""
    ranges: list[tuple[int, int]] = []
    for change_id in ids:
        if ranges and ranges[-1][1] == change_id - 1:
            ranges[-1] = (ranges[-1][0], change_id)
        else:
            ranges.append((change_id, change_id))
    return ranges


def _upsert(connection: Connection) -> Any:
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    return dialect.insert(snapshot)


def _record(
    connection: Connection,
    run_id: int,
    key: str,
    where: Any,
    status: str,
    status_code: int | None = None,
    reason: str | None = None,
) -> None:
    """Append planned changes to history with their outcome."""
    connection.execute(
        insert(changes).from_select(
            ["run_id", "key", "user_id", "kind", "old", "new", "status"]
            + (["status_code", "reason"] if status == "rejected" else []),
            select(
                literal(run_id),
                literal(key),
                planned.c.user_id,
                planned.c.kind,
                planned.c.old,
                planned.c.new,
                literal(status),
                *(
                    [literal(status_code, Integer), literal(reason, Text)]
                    if status == "rejected"
                    else []
                ),
            )
            .where(where)
            .order_by(planned.c.id),
        )
    )


def acknowledge(
    connection: Connection,
    run_id: int,
    key: str,
    change_ids: Sequence[int],
    absent: str,
) -> None:
    """Record acknowledged changes in history and fold them into the snapshot.

    Works on ranges of consecutive ids, so a batch that was acknowledged whole costs
    three statements whatever its size.
    """
    for first, last in id_ranges(sorted(change_ids)):
        in_range = planned.c.id.between(first, last)
        _record(connection, run_id, key, in_range, "acknowledged")

        entering = _upsert(connection).from_select(
            ["key", "user_id", "value", "run_id"],
            select(literal(key), planned.c.user_id, planned.c.new, literal(run_id))
            .where(in_range, planned.c.new != absent)
            .order_by(planned.c.id),
        )
        connection.execute(
            entering.on_conflict_do_update(
                index_elements=["key", "user_id"],
                set_={
                    "value": entering.excluded.value,
                    "run_id": entering.excluded.run_id,
                },
            )
        )

        connection.execute(
            snapshot.delete().where(
                snapshot.c.key == key,
                snapshot.c.user_id.in_(
                    select(planned.c.user_id).where(in_range, planned.c.new == absent)
                ),
            )
        )

        # Acknowledged: the destination's value is known again.
        connection.execute(
            uncertain.delete().where(
                uncertain.c.key == key,
                uncertain.c.user_id.in_(select(planned.c.user_id).where(in_range)),
            )
        )


def mark_uncertain(
    connection: Connection, run_id: int, key: str, first_id: int, last_id: int
) -> None:
    """Mark the users of planned changes about to be sent: their fate is unknown."""
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    connection.execute(
        dialect.insert(uncertain)
        .from_select(
            ["key", "user_id", "run_id"],
            select(literal(key), planned.c.user_id, literal(run_id)).where(
                planned.c.id.between(first_id, last_id)
            ),
        )
        .on_conflict_do_nothing()
    )


def holds_lease(connection: Connection, key: str, owner: str) -> bool:
    """Tell whether `owner` still holds the lease of `key` (nobody took it over)."""
    return (
        connection.execute(
            select(leases.c.key).where(leases.c.key == key, leases.c.owner == owner)
        ).first()
        is not None
    )


def reject(
    connection: Connection,
    run_id: int,
    key: str,
    change_id: int,
    status_code: int | None,
    reason: str | None,
) -> None:
    """Record that the destination refused a change for good."""
    _record(
        connection,
        run_id,
        key,
        planned.c.id == change_id,
        "rejected",
        status_code,
        reason,
    )
    # A refusal leaves the destination as it was: a user this run marked uncertain
    # is certain again (one already uncertain from an earlier run stays so).
    connection.execute(
        uncertain.delete().where(
            uncertain.c.key == key,
            uncertain.c.run_id == run_id,
            uncertain.c.user_id.in_(
                select(planned.c.user_id).where(planned.c.id == change_id)
            ),
        )
    )


def leave_pending(
    connection: Connection,
    run_id: int,
    key: str,
    change_ids: Sequence[int] = (),
    after_id: int | None = None,
) -> None:
    """Record changes whose fate is unknown: these ids, or all after `after_id`."""
    for first, last in id_ranges(sorted(change_ids)):
        _record(connection, run_id, key, planned.c.id.between(first, last), "pending")
    if after_id is not None:
        _record(connection, run_id, key, planned.c.id > after_id, "pending")


def status_counts(connection: Connection, run_id: int, key: str) -> dict[str, int]:
    """Count a key's changes in a run by delivery status."""
    rows = connection.execute(
        select(changes.c.status, func.count())
        .where(changes.c.run_id == run_id, changes.c.key == key)
        .group_by(changes.c.status)
    ).all()
    return {status: count for status, count in rows}


def snapshot_size(connection: Connection, key: str) -> int:
    """How many users the snapshot holds for a key."""
    return connection.execute(
        select(func.count()).select_from(snapshot).where(snapshot.c.key == key)
    ).scalar_one()


def members(
    connection: Connection, key: str, as_of_run: int | None, absent: str
) -> Sequence[Any]:
    """The acknowledged `(user_id, value)` of every member, now or as of a past run.

    The past is rebuilt from history alone: for each user, the latest acknowledged
    change of the key in that run or before it.
    """
    if as_of_run is None:
        return connection.execute(
            select(snapshot.c.user_id, snapshot.c.value)
            .where(snapshot.c.key == key)
            .order_by(snapshot.c.user_id)
        ).all()

    latest = (
        select(func.max(changes.c.id).label("id"))
        .where(
            changes.c.key == key,
            changes.c.run_id <= as_of_run,
            changes.c.status == "acknowledged",
        )
        .group_by(changes.c.user_id)
        .subquery()
    )
    return connection.execute(
        select(changes.c.user_id, changes.c.new)
        .join(latest, latest.c.id == changes.c.id)
        .where(changes.c.new != absent)
        .order_by(changes.c.user_id)
    ).all()

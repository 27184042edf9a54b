"""Fold acknowledged changes into the snapshot, and read membership back out.

The snapshot only ever moves when a destination acknowledges a change: a change that
was rejected, or whose fate is unknown, stays out, so the next run's diff produces it
again with the truth as it is then.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, and_, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from audience_sync.store.schema import changes, snapshot


def pending_page(
    connection: Connection, run_id: int, key: str, after_id: int, size: int
) -> Sequence[Any]:
    """The next `size` pending changes of a key in a run, after `after_id`, by id."""
    return connection.execute(
        select(changes.c.id, changes.c.user_id, changes.c.new)
        .where(
            changes.c.run_id == run_id,
            changes.c.key == key,
            changes.c.id > after_id,
            changes.c.status == "pending",
        )
        .order_by(changes.c.id)
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


def acknowledge(
    connection: Connection, run_id: int, key: str, change_ids: Sequence[int]
) -> None:
    """Apply acknowledged changes to the snapshot and mark them acknowledged.

    Works on ranges of consecutive ids, so a batch that was acknowledged whole costs
    three statements whatever its size.
    """
    for first, last in id_ranges(sorted(change_ids)):
        in_range = and_(
            changes.c.run_id == run_id,
            changes.c.key == key,
            changes.c.id.between(first, last),
            changes.c.status == "pending",
        )

        entering = _upsert(connection).from_select(
            ["key", "user_id", "value", "run_id"],
            select(changes.c.key, changes.c.user_id, changes.c.new, changes.c.run_id)
            .where(in_range, changes.c.kind != "exited")
            .order_by(changes.c.id),
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
                    select(changes.c.user_id).where(
                        in_range, changes.c.kind == "exited"
                    )
                ),
            )
        )

        connection.execute(
            update(changes).where(in_range).values(status="acknowledged")
        )


def reject(
    connection: Connection, change_id: int, status_code: int | None, reason: str | None
) -> None:
    """Record that the destination refused a change for good."""
    connection.execute(
        update(changes)
        .where(changes.c.id == change_id)
        .values(status="rejected", status_code=status_code, reason=reason)
    )


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

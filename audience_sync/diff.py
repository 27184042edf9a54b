"""Stage a key's current rows and diff them against the snapshot, inside the database.

The staged rows live in a temporary table on the run's store connection. The diff is
one set query (a left join for entries and value changes, NOT EXISTS for exits) whose
rows are either counted and previewed (a dry run) or inserted into `changes` as
pending, to be paged through and sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    MetaData,
    Select,
    String,
    Table,
    Text,
    TextClause,
    and_,
    case,
    cast,
    column,
    exists,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    true,
    union_all,
)
from sqlalchemy.dialects import postgresql, sqlite

from audience_sync.store.schema import MAX_USER_ID, changes, snapshot

_temporary = MetaData()

staged = Table(
    "staged",
    _temporary,
    Column("user_id", String(255), primary_key=True),
    Column("value", Text, nullable=False),
    prefixes=["TEMPORARY"],
)

_CREATE_STAGED = (
    "CREATE TEMPORARY TABLE IF NOT EXISTS staged "
    "(user_id VARCHAR(255) PRIMARY KEY, value TEXT NOT NULL)"
)
_CREATE_LANDING = (
    "CREATE TEMPORARY TABLE IF NOT EXISTS staged_landing "
    "(user_id TEXT NOT NULL, value TEXT NOT NULL)"
)

landing = Table(
    "staged_landing",
    _temporary,
    Column("user_id", Text, nullable=False),
    Column("value", Text, nullable=False),
    prefixes=["TEMPORARY"],
)


@dataclass
class DiffCounts:
    """How many users entered, left, changed value, or are re-sent unchanged."""

    entered: int = 0
    exited: int = 0
    changed: int = 0
    resent: int = 0

    @property
    def total(self) -> int:
        """Every change the diff produced."""
        return self.entered + self.exited + self.changed + self.resent


def start_staging(connection: Connection) -> None:
    """Create the staging tables on this connection, or empty the ones already there."""
    if connection.dialect.name not in ("sqlite", "postgresql"):
        raise NotImplementedError(f"a {connection.dialect.name} store is not supported")
    connection.exec_driver_sql(_CREATE_STAGED)
    connection.exec_driver_sql(_CREATE_LANDING)
    connection.execute(staged.delete())
    connection.execute(landing.delete())


def stage(connection: Connection, rows: Sequence[tuple[str, str]]) -> None:
    """Add a batch of `(user_id, value)` rows; a user already staged keeps its row.

    The hot path of a run, so it talks to the driver directly: SQLite's executemany
    with INSERT OR IGNORE, and PostgreSQL's COPY into a landing table that
    `finish_staging` folds into `staged`.
    """
    if not rows:
        return
    driver = connection.connection.driver_connection
    assert driver is not None
    if connection.dialect.name == "sqlite":
        driver.executemany(
            "INSERT OR IGNORE INTO staged (user_id, value) VALUES (?, ?)", rows
        )
        return

    with (
        driver.cursor() as cursor,
        cursor.copy("COPY staged_landing (user_id, value) FROM STDIN") as copy,
    ):
        for row in rows:
            copy.write_row(row)


def finish_staging(connection: Connection) -> None:
    """Make `staged` hold every staged user once (PostgreSQL lands rows first)."""
    if connection.dialect.name == "postgresql":
        # COPY cannot skip duplicates; the first row of a user wins, as on SQLite.
        connection.exec_driver_sql(
            "INSERT INTO staged (user_id, value) "
            "SELECT user_id, value FROM staged_landing ORDER BY ctid "
            "ON CONFLICT (user_id) DO NOTHING"
        )
        connection.exec_driver_sql("TRUNCATE staged_landing")
        connection.exec_driver_sql("ANALYZE staged")


def stage_from_query(
    connection: Connection,
    query: Select[Any] | TextClause,
    parameters: dict[str, Any],
    kind: str,
) -> tuple[int, int]:
    """Stage what a query returns without its rows leaving the database.

    For a source that is the store's own database: one INSERT ... SELECT into the
    landing table (ids trimmed, values as JSON text), then into `staged` keeping the
    first row of each user. Returns `(rows read, rows skipped)`, skipped being null,
    blank or over-long ids.
    """
    if isinstance(query, TextClause):
        names = ["user_id"] if kind == "audience" else ["user_id", "value"]
        rows = query.columns(*(column(name) for name in names)).subquery("source_rows")
    else:
        rows = query.subquery("source_rows")

    user_id = func.coalesce(func.trim(cast(rows.c.user_id, Text)), literal(""))
    if kind == "audience":
        value: Any = literal("true")
        where: Any = true()
    else:
        # The database writes the JSON text; numbers and times may be spelled
        # differently than Python would, but a key always takes the same path.
        encoded = (
            cast(func.to_jsonb(rows.c.value), Text)
            if connection.dialect.name == "postgresql"
            else func.json_quote(rows.c.value)
        )
        value, where = encoded, rows.c.value.is_not(None)
    connection.execute(
        insert(landing).from_select(
            ["user_id", "value"], select(user_id, value).where(where)
        ),
        parameters,
    )

    usable = and_(
        landing.c.user_id != "", func.length(landing.c.user_id) <= MAX_USER_ID
    )
    read, skipped = connection.execute(
        select(
            func.count(),
            func.coalesce(func.sum(case((usable, 0), else_=1)), 0),
        ).select_from(landing)
    ).one()

    order: Any = literal_column(
        "ctid" if connection.dialect.name == "postgresql" else "rowid"
    )
    kept = select(landing.c.user_id, landing.c.value).where(usable).order_by(order)
    statement = (
        postgresql.insert(staged)
        if connection.dialect.name == "postgresql"
        else sqlite.insert(staged)
    )
    connection.execute(
        statement.from_select(["user_id", "value"], kept).on_conflict_do_nothing()
    )
    connection.execute(landing.delete())
    return int(read), int(skipped)


def staged_count(connection: Connection) -> int:
    """How many distinct users are staged."""
    return connection.execute(select(func.count()).select_from(staged)).scalar_one()


def diff_select(
    key: str, absent: str, *, full: bool
) -> Select[tuple[str, str, str, str]]:
    """The changes of one key as rows of `(user_id, kind, old, new)`.

    Args:
        key: the key whose snapshot the staged rows are compared with.
        absent: the JSON value of a user who is not in it (false or null).
        full: also produce every unchanged user, as `resent`.
    """
    current = snapshot.alias("current")
    joined = staged.outerjoin(
        current, and_(current.c.key == key, current.c.user_id == staged.c.user_id)
    )

    kind = case(
        (current.c.value.is_(None), literal("entered")),
        (current.c.value == staged.c.value, literal("resent")),
        else_=literal("changed"),
    )
    present = select(
        staged.c.user_id,
        kind.label("kind"),
        func.coalesce(current.c.value, literal(absent)).label("old"),
        staged.c.value.label("new"),
    ).select_from(joined)
    if not full:
        present = present.where(
            or_(current.c.value.is_(None), current.c.value != staged.c.value)
        )

    gone = select(
        snapshot.c.user_id,
        literal("exited").label("kind"),
        snapshot.c.value.label("old"),
        literal(absent).label("new"),
    ).where(
        snapshot.c.key == key,
        ~exists().where(staged.c.user_id == snapshot.c.user_id),
    )

    union = union_all(present, gone).subquery("diff")
    return select(union.c.user_id, union.c.kind, union.c.old, union.c.new)


def count_diff(
    connection: Connection, diff: Select[tuple[str, str, str, str]]
) -> DiffCounts:
    """Count a diff's rows by kind without storing them."""
    subquery = diff.subquery()
    rows = connection.execute(
        select(subquery.c.kind, func.count()).group_by(subquery.c.kind)
    ).all()
    return DiffCounts(**{kind: count for kind, count in rows})


def record_changes(
    connection: Connection,
    run_id: int,
    key: str,
    diff: Select[tuple[str, str, str, str]],
) -> DiffCounts:
    """Insert a diff's rows into `changes` as pending, and count them by kind."""
    subquery = diff.subquery()
    connection.execute(
        insert(changes).from_select(
            ["run_id", "key", "user_id", "kind", "old", "new", "status"],
            select(
                literal(run_id),
                literal(key),
                subquery.c.user_id,
                subquery.c.kind,
                subquery.c.old,
                subquery.c.new,
                literal("pending"),
            ),
        )
    )

    if connection.dialect.name == "postgresql":
        # A big diff makes the table's statistics stale at once; without fresh ones
        # the planner scans the whole table for every page of changes it sends.
        connection.exec_driver_sql("ANALYZE changes")

    rows = connection.execute(
        select(changes.c.kind, func.count())
        .where(changes.c.run_id == run_id, changes.c.key == key)
        .group_by(changes.c.kind)
    ).all()
    return DiffCounts(**{kind: count for kind, count in rows})

"""Tables of the state store. Alembic migrations create them; nothing else does.

- `definitions`: every key ever synced: kind, current name, stable computation id.
- `runs`: one row per run; `run_keys`: one row per key in a run, with its counts.
- `changes`: one row per user whose value changed in a run, with its delivery status.
  History is these rows: the membership as of any run is the latest acknowledged
  change per user up to that run, so storage grows with changes, not runs x members.
- `snapshot`: for each key and user, the value the destination acknowledged. It is the
  acknowledged changes folded up, kept as a table so that a diff is one set query.
- `uncertain`: users a message was sent to without an acknowledgement; the next run
  re-sends them the truth whatever the snapshot says.
- `leases`: who is syncing a key right now, until when.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
)

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

# The longest user id stored or sent; a longer one is skipped and counted.
MAX_USER_ID = 255

# What is trimmed from both ends of a user id, the same in Python and in SQL.
USER_ID_WHITESPACE = " \t\n\r\f\v"


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is stored in UTC and always comes back timezone-aware."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise ValueError("timestamps in the store must be timezone-aware")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:  # SQLite keeps no offset; what it holds is UTC
            return value.replace(tzinfo=UTC)  # type: ignore[no-any-return]
        return value.astimezone(UTC)  # type: ignore[no-any-return]


# A 64-bit id on PostgreSQL; SQLite's INTEGER PRIMARY KEY is already 64-bit.
Id = BigInteger().with_variant(Integer(), "sqlite")

definitions = Table(
    "definitions",
    metadata,
    Column("key", String(255), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("name", Text, nullable=False),
    Column("computation_id", String(36), nullable=False, unique=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("retired_at", UTCDateTime),
)

runs = Table(
    "runs",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
    Column("now", UTCDateTime, nullable=False),
    Column("status", String(16), nullable=False),
    Column("trigger", String(16), nullable=False),
    Column("full", Boolean, nullable=False, default=False),
    Column("owner", String(255), nullable=False),
    Column("heartbeat_at", UTCDateTime, nullable=False),
    Column("error", Text),
)

run_keys = Table(
    "run_keys",
    metadata,
    Column("run_id", Id, ForeignKey("runs.id"), primary_key=True),
    Column("key", String(255), ForeignKey("definitions.key"), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("full", Boolean, nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
    Column("members", BigInteger, nullable=False, default=0),
    Column("skipped", BigInteger, nullable=False, default=0),
    Column("duplicates", BigInteger, nullable=False, default=0),
    Column("entered", BigInteger, nullable=False, default=0),
    Column("exited", BigInteger, nullable=False, default=0),
    Column("changed", BigInteger, nullable=False, default=0),
    Column("resent", BigInteger, nullable=False, default=0, server_default="0"),
    Column("sent", BigInteger, nullable=False, default=0),
    Column("acknowledged", BigInteger, nullable=False, default=0),
    Column("rejected", BigInteger, nullable=False, default=0),
    Column("pending", BigInteger, nullable=False, default=0),
    Column("error", Text),
)

changes = Table(
    "changes",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("run_id", Id, ForeignKey("runs.id"), nullable=False),
    Column("key", String(255), nullable=False),
    Column("user_id", String(MAX_USER_ID), nullable=False),
    # entered, exited, changed, or resent (a --full run re-sending an unchanged value)
    Column("kind", String(8), nullable=False),
    # JSON text of the value before and after; an absent value is false or null.
    Column("old", Text, nullable=False),
    Column("new", Text, nullable=False),
    # pending, acknowledged or rejected
    Column("status", String(12), nullable=False),
    Column("status_code", Integer),
    Column("reason", Text),
    Index("ix_changes_run_key", "run_id", "key", "id"),
    Index("ix_changes_key_user", "key", "user_id", "id"),
)

snapshot = Table(
    "snapshot",
    metadata,
    Column("key", String(255), primary_key=True),
    Column("user_id", String(MAX_USER_ID), primary_key=True),
    Column("value", Text, nullable=False),
    Column("run_id", Id, nullable=False),
)

# Users whose value at the destination is unknown: a message to them was sent (or
# was about to be) and never acknowledged. The next run re-sends them the truth.
uncertain = Table(
    "uncertain",
    metadata,
    Column("key", String(255), primary_key=True),
    Column("user_id", String(MAX_USER_ID), primary_key=True),
    Column("run_id", Id, nullable=False),
)

leases = Table(
    "leases",
    metadata,
    Column("key", String(255), primary_key=True),
    Column("owner", String(255), nullable=False),
    Column("run_id", Id),
    Column("acquired_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
)

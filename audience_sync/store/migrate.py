"""Create and upgrade the store's schema with Alembic, and check its version."""

from __future__ import annotations

import logging
from importlib.resources import files

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import SQLAlchemyError

from audience_sync.errors import StoreError

logger = logging.getLogger(__name__)

# Any constant will do; it only has to be the same in every process.
_MIGRATION_LOCK_ID = 0x61756469  # "audi"


def alembic_config(connection: Connection | None = None) -> AlembicConfig:
    """Build an Alembic config that points at the migrations shipped in the package."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(files("audience_sync.migrations")))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The revision this version of audience-sync expects."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(connection: Connection) -> str | None:
    """The revision the store is at, or None for a store that was never created."""
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply pending migrations; safe when several processes start at once."""
    try:
        with engine.begin() as connection:
            # SQLite's BEGIN IMMEDIATE already serialises writers; PostgreSQL needs a
            # lock, or two processes would both try to create the same tables.
            if connection.dialect.name == "postgresql":
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:id)"),
                    {"id": _MIGRATION_LOCK_ID},
                )
            before = current_revision(connection)
            command.upgrade(alembic_config(connection), revision)
            after = current_revision(connection)
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot upgrade the store: {_reason(exc)}") from exc

    if before != after:
        logger.info("Upgraded the store from %s to %s", before or "nothing", after)


def downgrade(engine: Engine, revision: str) -> None:
    """Undo migrations down to `revision` (`base` removes every table)."""
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), revision)


def check_current(engine: Engine) -> None:
    """Refuse a store that is missing or not at this version's revision."""
    try:
        with engine.connect() as connection:
            current = current_revision(connection)
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot open the store: {_reason(exc)}") from exc

    if current is None:
        raise StoreError(
            "the store holds no sync history yet; "
            "run `audience-sync run --run-now` or `audience-sync db upgrade` first"
        )
    if current != head_revision():
        raise StoreError(
            f"the store is at revision {current} but this version needs "
            f"{head_revision()}; run `audience-sync db upgrade`"
        )


def _reason(exc: SQLAlchemyError) -> str:
    """The database's own words, without the SQL or parameters SQLAlchemy appends."""
    original = getattr(exc, "orig", None)
    return str(original if original is not None else exc).splitlines()[0]

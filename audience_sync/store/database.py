"""Open the state store: one engine per store, tuned for the database behind it."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

from audience_sync.errors import StoreError

logger = logging.getLogger(__name__)

# The execution option that marks a transaction as writing only temporary tables.
TEMP_ONLY = "audience_sync_temp_only"

# How long a SQLite writer waits for another process's write transaction to end.
SQLITE_BUSY_TIMEOUT_MS = 30_000


def sqlite_path(url: str) -> Path | None:
    """Return the file of a SQLite URL, or None for another database or memory."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (
        None,
        "",
        ":memory:",
    ):
        return None
    return Path(parsed.database)


def describe_url(url: str) -> str:
    """A database URL safe to log: kind, host, port and database, nothing else.

    Passwords can hide in the query string too (`?password=...`), so it is dropped
    whole, with the user name.
    """
    parsed = make_url(url)
    return URL.create(
        parsed.drivername, host=parsed.host, port=parsed.port, database=parsed.database
    ).render_as_string(hide_password=True)


def file_uri(path: Path) -> str:
    """The `file:` URI of a SQLite file, as SQLite reads it with URI filenames on."""
    return "file:" + quote(str(path.resolve()), safe="/")


def _tune_sqlite(engine: Engine, *, read_only: bool) -> None:
    """Make SQLite safe for several processes: WAL, a busy timeout, BEGIN IMMEDIATE."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the driver so that `begin` below decides how
        # a transaction starts.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        if not read_only:
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        # A deferred transaction that reads and then writes can fail with "database is
        # locked" whatever the busy timeout; taking the write lock up front cannot.
        # A transaction that only writes temporary tables needs no lock on the store,
        # and must not hold one while a long source query runs.
        deferred = read_only or connection.get_execution_options().get(TEMP_ONLY)
        connection.exec_driver_sql("BEGIN" if deferred else "BEGIN IMMEDIATE")


@contextmanager
def temp_only(connection: Connection) -> Iterator[None]:
    """A transaction that writes only temporary tables: no lock on the store's file."""
    connection.execution_options(**{TEMP_ONLY: True})
    try:
        with connection.begin():
            yield
    finally:
        connection.execution_options(**{TEMP_ONLY: False})


def open_store(url: str, *, read_only: bool = False) -> Engine:
    """Create the engine of the state store.

    Args:
        url: SQLAlchemy URL of the store.
        read_only: open without the right to write; a missing SQLite file is an error
            instead of being created.
    """
    parsed = make_url(url)
    kwargs: dict[str, Any] = {}

    if parsed.get_backend_name() == "sqlite":
        path = sqlite_path(url)
        if read_only and path is not None:
            if not path.exists():
                raise StoreError(
                    f"there is no store at {path} yet; "
                    "run `audience-sync run --run-now` first"
                )
            parsed = parsed.set(
                database=file_uri(path), query={"mode": "ro", "uri": "true"}
            )
        elif path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except (OSError, ValueError) as exc:
                raise StoreError(
                    f"cannot create the store's folder {path.parent}: "
                    f"{getattr(exc, 'strerror', None) or exc}"
                ) from None
            # URI filenames, so that a SQLite source can be attached read-only.
            parsed = parsed.set(database=file_uri(path), query={"uri": "true"})
        # Each connection is cheap and a file handle; pooling them buys nothing
        # and would keep the temp tables of one run alive into the next.
        kwargs["poolclass"] = NullPool
    elif parsed.get_backend_name() == "postgresql":
        kwargs["pool_pre_ping"] = True
        if read_only:
            # Keep any options the URL already sets (a search_path, say).
            options = str(parsed.query.get("options", ""))
            kwargs["connect_args"] = {
                "options": f"{options} -c default_transaction_read_only=on".strip()
            }

    try:
        engine = create_engine(parsed, **kwargs)
    except ModuleNotFoundError as exc:
        raise StoreError(
            f"the driver for {parsed.drivername} is not installed "
            f"({exc.name}); for PostgreSQL install audience-sync[postgres]"
        ) from None

    if engine.dialect.name == "sqlite":
        _tune_sqlite(engine, read_only=read_only)
    return engine

"""Read audiences and computed traits from their source databases, in batches.

A source query returns `user_id` (and `value` for a computed trait). Rows stream
through in batches so memory does not grow with the audience; each batch comes out as
`(user_id, value)` pairs with the id trimmed and the value as canonical JSON text.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import (
    Connection,
    DateTime,
    Engine,
    TextClause,
    bindparam,
    create_engine,
    literal_column,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from audience_sync.config import Definition, Source
from audience_sync.declarations import (
    DeclarationError,
    compile_audience,
    compile_trait,
    explain,
)
from audience_sync.diff import stage_from_query
from audience_sync.errors import SourceError
from audience_sync.store.database import file_uri, sqlite_path
from audience_sync.store.schema import MAX_USER_ID, USER_ID_WHITESPACE

logger = logging.getLogger(__name__)

TRUE = "true"
FALSE = "false"
NULL = "null"

# The name a SQLite source is attached under on a SQLite store's connection.
_ATTACHED = "audience_source"

# SQLite calls the progress handler every this many virtual machine steps.
_SQLITE_PROGRESS_STEPS = 10_000


@dataclass
class ReadCounts:
    """What a source read saw, beyond the rows it kept."""

    rows: int = 0
    skipped: int = 0


def absent_value(definition: Definition) -> str:
    """The JSON value that means "not in it": false for audiences, null for traits."""
    return FALSE if definition.kind == "audience" else NULL


def encode_value(value: Any) -> str | None:
    """Turn a source value into canonical JSON text; None means the user has none.

    Raises:
        TypeError: the value is not a JSON scalar or something that reads as one.
    """
    if value is None:
        return None
    if isinstance(value, Decimal):
        if not value.is_finite():
            return None  # JSON has no NaN or infinity: the user has no value
        value = int(value) if value == value.to_integral_value() else float(value)
    elif isinstance(value, float) and not math.isfinite(value):
        return None
    elif isinstance(value, datetime):
        # A time without a zone is read as UTC, the only zone audience-sync uses.
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value
        value = value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    elif isinstance(value, date):
        value = value.isoformat()
    elif not isinstance(value, str | int | float | bool):
        raise TypeError(type(value).__name__)
    return orjson.dumps(value).decode()


def clean_user_id(user_id: Any) -> str | None:
    """Trim a user id; None for a null, blank, over-long or NUL-bearing one."""
    if type(user_id) is str:  # the common case, checked first and cheaply
        cleaned = user_id.strip(USER_ID_WHITESPACE)
        if cleaned and len(cleaned) <= MAX_USER_ID and "\x00" not in cleaned:
            return cleaned
        return None
    if user_id is None:
        return None
    if isinstance(user_id, bytes | bytearray | memoryview):
        try:
            user_id = bytes(user_id).decode("utf-8")
        except UnicodeDecodeError:
            return None
    cleaned = (user_id if isinstance(user_id, str) else str(user_id)).strip(
        USER_ID_WHITESPACE
    )
    # PostgreSQL cannot store NUL in text; no destination would want it either.
    if not cleaned or len(cleaned) > MAX_USER_ID or "\x00" in cleaned:
        return None
    return cleaned


class Sources:
    """The source engines of one run, opened on first use and closed together."""

    def __init__(self, sources: dict[str, Source]) -> None:
        self._sources = sources
        self._engines: dict[str, Engine] = {}

    def engine(self, name: str) -> Engine:
        """Return the engine of a source, building the demo warehouse if asked to."""
        if name in self._engines:
            return self._engines[name]

        source = self._sources[name]
        url = source.url.get_secret_value()
        if source.demo:
            # Imported here: only the demo needs the generator.
            from audience_sync.demo import ensure_demo_warehouse  # noqa: PLC0415

            demo_path = sqlite_path(url)
            if demo_path is not None and ensure_demo_warehouse(demo_path):
                logger.info("Built the demo warehouse at %s", demo_path)

        # A source is only ever read: open SQLite files read-only, so that a mistyped
        # path is an error rather than a new empty database.
        path = sqlite_path(url)
        if path is not None:
            url = (
                make_url(url)
                .set(database=f"file:{path}", query={"mode": "ro", "uri": "true"})
                .render_as_string(hide_password=False)
            )

        try:
            engine = create_engine(url)
        except (ModuleNotFoundError, ArgumentError) as exc:
            raise SourceError(f"cannot open source {name!r}: {exc}") from None
        self._engines[name] = engine
        return engine

    def read(
        self,
        definition: Definition,
        now: datetime,
        counts: ReadCounts,
        batch_size: int = 10_000,
    ) -> Iterator[list[tuple[str, str]]]:
        """Stream `(user_id, value)` batches of a definition's query at time `now`.

        Raises:
            SourceError: the query failed, timed out, or returned the wrong columns.
        """
        source = self._sources[definition.source]
        engine = self.engine(definition.source)
        label = f"{definition.kind} {definition.key!r}"

        try:
            with engine.connect() as connection:
                deadline = time.monotonic() + source.timeout.total_seconds()
                _limit_time(connection, source.timeout.total_seconds(), deadline)
                statement, parameters = _statement(definition, source, connection, now)
                result = connection.execution_options(yield_per=batch_size).execute(
                    statement, parameters
                )
                columns = list(result.keys())
                user_index, value_index = _columns(definition, columns, label)

                for partition in result.partitions(batch_size):
                    yield _batch(
                        definition, partition, user_index, value_index, counts, label
                    )
                    if time.monotonic() > deadline:
                        raise SourceError(
                            f"{label}: the source read took longer than its timeout "
                            f"of {source.timeout}"
                        )
        except SQLAlchemyError as exc:
            raise SourceError(
                f"{label}: the source query failed: {_reason(exc)}"
            ) from exc

    def is_store(self, name: str, store_url: str) -> bool:
        """Tell whether a source is the very database the store lives in."""
        return _same_database(self._sources[name].url.get_secret_value(), store_url)

    def stage_in(
        self,
        connection: Connection,
        definition: Definition,
        now: datetime,
        *,
        attached: bool = False,
    ) -> ReadCounts:
        """Stage a definition's rows on the store's connection, inside the database.

        For a source that is the store's own database: no row passes through Python.

        Raises:
            SourceError: the query failed, timed out, or lacks its columns.
        """
        source = self._sources[definition.source]
        label = f"{definition.kind} {definition.key!r}"
        seconds = source.timeout.total_seconds()
        try:
            _limit_time(connection, seconds, time.monotonic() + seconds)
            try:
                statement, parameters = _statement(
                    definition,
                    source,
                    connection,
                    now,
                    schema=_ATTACHED if attached else None,
                )
                if isinstance(statement, TextClause):
                    # Check the columns first, to say what is missing in words.
                    probe: Any = select(literal_column("*")).select_from(
                        statement.columns().subquery("probe")
                    )
                    columns = connection.execute(probe.limit(0), parameters).keys()
                    _columns(definition, list(columns), label)
                rows, skipped = stage_from_query(
                    connection, statement, parameters, definition.kind
                )
            finally:
                _unlimit_time(connection)
        except SQLAlchemyError as exc:
            raise SourceError(
                f"{label}: the source query failed: {_reason(exc)}"
            ) from exc
        return ReadCounts(rows=rows, skipped=skipped)

    @contextmanager
    def attached(self, connection: Connection, name: str) -> Iterator[bool]:
        """Attach a SQLite source to a SQLite store's connection, read-only, if safe.

        Yields whether it is attached: then the source's tables can be read by the
        store's own statements and `stage_in` stages without a row through Python.
        It is not attached when either is not a SQLite file, or when a source table
        has the name of one of the store's (which would shadow it).
        """
        path = sqlite_path(self._sources[name].url.get_secret_value())
        if connection.dialect.name != "sqlite" or path is None or not path.exists():
            yield False
            return

        self.engine(name)  # builds the demo warehouse if it is one
        driver = connection.connection.driver_connection
        assert driver is not None
        driver.execute(
            f"ATTACH DATABASE ? AS {_ATTACHED}", (file_uri(path) + "?mode=ro",)
        )
        try:
            ours = {
                row[0]
                for schema in ("main", "temp")
                for row in driver.execute(f"SELECT name FROM {schema}.sqlite_master")
            }
            theirs = {
                row[0]
                for row in driver.execute(
                    f"SELECT name FROM {_ATTACHED}.sqlite_master "
                    "WHERE type IN ('table', 'view')"
                )
            }
            clash = ours & theirs
            if clash:
                logger.debug("Not attaching %s: it has tables named %s", name, clash)
            yield not clash
        finally:
            driver.execute(f"DETACH DATABASE {_ATTACHED}")

    def sql(self, definition: Definition, now: datetime) -> str:
        """The SQL a definition runs at `now`, in its source's dialect."""
        source = self._sources[definition.source]
        engine = self.engine(definition.source)
        try:
            with engine.connect() as connection:
                statement, parameters = _statement(definition, source, connection, now)
        except SQLAlchemyError as exc:
            raise SourceError(
                f"cannot reach source {source.name!r}: {_reason(exc)}"
            ) from exc
        if definition.declaration is not None:
            return explain(statement, engine.dialect)
        # Show :now the way the driver receives it.
        bound = (
            now.strftime("%Y-%m-%d %H:%M:%S.%f")
            if engine.dialect.name == "sqlite"
            else now.isoformat()
        )
        shown = f"-- :now = {bound}\n" if parameters else ""
        return shown + (definition.query or "").strip()

    def close(self) -> None:
        """Dispose of every engine opened so far."""
        for engine in self._engines.values():
            engine.dispose()
        self._engines.clear()


def _statement(
    definition: Definition,
    source: Source,
    connection: Connection,
    now: datetime,
    schema: str | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The statement to run: a compiled declaration, or the raw query with `:now`.

    `schema` is where a declaration's tables are when the layout names none (the
    name a SQLite source is attached under).
    """
    declaration = definition.declaration
    if declaration is not None:
        layout = source.events
        if schema is not None and layout.schema_ is None:
            layout = layout.model_copy(update={"schema_": schema})
        try:
            if definition.kind == "audience":
                compiled = compile_audience(
                    declaration,  # type: ignore[arg-type]
                    layout,
                    connection,
                    now,
                )
            else:
                compiled = compile_trait(
                    declaration,  # type: ignore[arg-type]
                    layout,
                    connection,
                    now,
                )
        except (DeclarationError, OverflowError) as exc:
            raise SourceError(f"{definition.kind} {definition.key!r}: {exc}") from None
        return compiled, {}

    assert definition.query is not None
    clause = text(definition.query)
    if "now" not in clause._bindparams:
        return clause, {}
    typed = clause.bindparams(bindparam("now", type_=DateTime(timezone=True)))
    return typed, {"now": now}


def _columns(definition: Definition, columns: list[str], label: str) -> tuple[int, int]:
    """Find the user_id (and value) columns, or explain what the query returned."""
    lowered = [c.lower() for c in columns]
    wanted = ["user_id"] if definition.kind == "audience" else ["user_id", "value"]
    missing = [w for w in wanted if w not in lowered]
    if missing:
        raise SourceError(
            f"{label}: the query must return a {' and a '.join(missing)} column "
            f"(it returns {', '.join(columns) or 'no columns'})"
        )
    value_index = lowered.index("value") if definition.kind == "trait" else -1
    return lowered.index("user_id"), value_index


def _batch(
    definition: Definition,
    rows: Any,
    user_index: int,
    value_index: int,
    counts: ReadCounts,
    label: str,
) -> list[tuple[str, str]]:
    """Clean one partition of source rows into `(user_id, value)` pairs."""
    counts.rows += len(rows)
    if value_index < 0:
        # The hot path of a big audience: ids only, cleaned in one comprehension.
        ids = [clean_user_id(row[user_index]) for row in rows]
        batch = [(user_id, TRUE) for user_id in ids if user_id is not None]
        counts.skipped += len(ids) - len(batch)
        return batch

    batch = []
    for row in rows:
        user_id = clean_user_id(row[user_index])
        if user_id is None:
            counts.skipped += 1
            continue

        try:
            value = encode_value(row[value_index])
        except TypeError as exc:
            raise SourceError(
                f"{label}: a value of type {exc} is not a string, number or boolean"
            ) from None
        if value is not None:
            batch.append((user_id, value))
    return batch


def _limit_time(connection: Connection, seconds: float, deadline: float) -> None:
    """Make the database give up on a statement that runs past the source's timeout."""
    dialect = connection.dialect.name
    if dialect == "postgresql":
        # PostgreSQL takes at most 2^31 - 1 milliseconds (about 24.8 days).
        limit = min(int(seconds * 1000), 2**31 - 1)
        connection.exec_driver_sql(f"SET statement_timeout = {limit}")
    elif dialect == "sqlite":
        raw = connection.connection.dbapi_connection
        assert raw is not None
        raw.set_progress_handler(
            lambda: 1 if time.monotonic() > deadline else 0, _SQLITE_PROGRESS_STEPS
        )
    # Other databases have no portable statement timeout; the read loop still checks.


def _unlimit_time(connection: Connection) -> None:
    """Lift the time limit from a connection that goes on to do other work."""
    dialect = connection.dialect.name
    if dialect == "postgresql":
        connection.exec_driver_sql("SET statement_timeout = 0")
    elif dialect == "sqlite":
        raw = connection.connection.dbapi_connection
        assert raw is not None
        raw.set_progress_handler(None, 0)


def _same_database(first: str, second: str) -> bool:
    """Compare two URLs by the database they reach, ignoring driver and options."""
    a, b = make_url(first), make_url(second)
    if a.get_backend_name() != b.get_backend_name():
        return False
    if a.get_backend_name() == "sqlite":
        path_a, path_b = sqlite_path(first), sqlite_path(second)
        return (
            path_a is not None
            and path_b is not None
            and (path_a.resolve() == path_b.resolve())
        )
    return (a.host, a.port, a.database, a.username) == (
        b.host,
        b.port,
        b.database,
        b.username,
    ) and a.query.get("options") == b.query.get("options")


def _reason(exc: SQLAlchemyError) -> str:
    """The database's own words, without the SQL text and parameters."""
    original = getattr(exc, "orig", None)
    message = str(original if original is not None else exc).strip().splitlines()
    reason = message[0] if message else type(exc).__name__
    if reason == "interrupted":
        return "it ran past the source's timeout and was interrupted"
    return reason

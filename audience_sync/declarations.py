"""Engage-style declarations: audiences and computed traits over Segment event data.

Instead of a raw SQL `query:`, an audience may declare a `condition:` and a computed
trait a `compute:`. Both are compiled, with SQLAlchemy Core, into one SELECT over the
warehouse layout Segment writes: `tracks`, one table per event (`Order Completed` ->
`order_completed`), `identifies` and `users`, optionally under a schema (EventLayout).

Audience conditions (exactly one of the keys below decides the kind)::

    {performed: EVENT, within: 30d}                       # at least once
    {performed: EVENT, at_least: 3, within: 90d, where: [FILTER, ...]}
    {performed: EVENT, exactly: 2, between: [START, END]}
    {performed: EVENT, at_most: 1, within: 7d}            # zero times counts too
    {not_performed: EVENT, within: 14d, where: [...]}
    {trait: COLUMN, op: OP, value: VALUE}                 # a column of `users`
    {all: [CONDITION, ...]}  {any: [CONDITION, ...]}  {not: CONDITION}

Computed traits (each gives `user_id, value`)::

    {count: EVENT}                     {distinct_count: PROPERTY, of: EVENT}
    {sum: PROPERTY, of: EVENT}         {average: PROPERTY, of: EVENT}
    {min: PROPERTY, of: EVENT}         {max: PROPERTY, of: EVENT}
    {first: PROPERTY, of: EVENT}       {last: PROPERTY, of: EVENT}
    {most_frequent: PROPERTY, of: EVENT}

and every computed trait also takes `within`/`between` and `where`.

- FILTER is `{property: COLUMN, op: OP, value: VALUE}`; filters of one `where` all hold.
- OP is `=`, `!=`, `<`, `<=`, `>`, `>=`, `contains`, `starts_with`, `in` (a list),
  `exists` or `not_exists` (no value). Comparisons are false on a null (missing)
  value, `!=` too: `{not: {trait: plan, op: "=", value: vip}}` includes users without
  a plan. Text compares case-sensitively and in byte order on every database.
- `within: 30d` (units d, h, m) keeps events with `now - 30d < timestamp <= now`;
  `between: [START, END]` (ISO dates or times, UTC unless an offset is given) keeps
  `START <= timestamp < END`. At most one of the two; no event after `now` ever counts,
  so a run at a past `now` sees the warehouse as it was then.
- `at_least`, `at_most`, `exactly`: at most one; `at_least: 1` by default.

Decisions:

- An event's table is the snake_case of its name (`audience_sync.keys.snake_case`:
  `Order Completed` -> `order_completed`, `productViewed` -> `product_viewed`).
- Identity: an event belongs to its trimmed `user_id`; when that is null or blank, to
  the user `identifies` links its `anonymous_id` to, the smallest trimmed user id in
  byte order when several are linked. Events with neither, and events without a
  timestamp, are ignored.
- The universe of users (for `not`, `not_performed`, and counts that accept zero such
  as `at_most` and `exactly: 0`) is the trimmed, non-blank ids of `users` together with
  every user id that `tracks` events up to `now` resolve to.
- Values are bound parameters, converted to the column's kind first (`"50"` for a
  number column is 50, `10115` for a text column is `'10115'`); a value that cannot be
  converted is an error. `contains`/`starts_with` need a text column.
- `first`/`last`/`min`/`max`/`sum`/`average`/`distinct_count`/`most_frequent` only
  look at events whose property is set; a user without one gets no row, so the sync
  sends null when they drop out. Ties at the same timestamp (`first`, `last`) and
  between equally frequent values (`most_frequent`) go to the smallest value.
  `average` is computed in double precision on every database.
- Timestamps are compared against bounds computed in Python and bound as parameters:
  as `'YYYY-MM-DD HH:MM:SS'` text when the column is text (and always on SQLite, which
  stores them as text), else as a UTC datetime, naive or aware like the column.
- The compiled SQL is the same on every dialect but two spots they require:
  PostgreSQL compares and sorts text with `COLLATE "C"` (byte order, as SQLite and
  DuckDB do), and SQLite finds `contains` with instr() for want of POSITION.

Shapes (ops, windows, counts) are checked by the pydantic models when the config is
loaded (`Condition` and `Compute` are annotated unions to embed in a settings model,
`parse_condition`/`parse_compute` validate alone); the names that need the database
(tables, columns, value kinds) are checked when a declaration is compiled
(`compile_audience`, `compile_trait`), or up front by `check_declaration`. `explain`
renders a compiled statement with its values in place.
"""

from __future__ import annotations

import difflib
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, Literal, Self, TypeAlias

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from sqlalchemy import (
    Boolean,
    Column,
    ColumnElement,
    Connection,
    Date,
    DateTime,
    Double,
    Engine,
    Float,
    Integer,
    MetaData,
    Numeric,
    Select,
    String,
    Subquery,
    Table,
    bindparam,
    case,
    cast,
    exists,
    func,
    inspect,
    select,
    union,
)
from sqlalchemy import column as lightweight_column
from sqlalchemy import table as lightweight_table
from sqlalchemy.engine import Dialect, Inspector
from sqlalchemy.exc import CompileError, NoSuchTableError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import NullType, TypeEngine

from audience_sync.keys import snake_case

Bind: TypeAlias = Engine | Connection


class DeclarationError(ValueError):
    """A declaration that cannot work, with the path of the field at fault."""


# ---------------------------------------------------------------------------
# The shapes: pydantic models, checked when the config is loaded
# ---------------------------------------------------------------------------


class _Strict(BaseModel):
    """Unknown keys are errors, and a parsed declaration never changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class EventLayout(_Strict):
    """Where Segment's tables are: an optional schema and the fixed tables' names."""

    schema_: str | None = Field(default=None, alias="schema")
    tracks: str = "tracks"
    identifies: str = "identifies"
    users: str = "users"


Op = Literal[
    "=",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    "contains",
    "starts_with",
    "in",
    "exists",
    "not_exists",
]
# datetime before date: a datetime is a date too, and must stay one.
Scalar: TypeAlias = StrictBool | StrictInt | StrictFloat | StrictStr | datetime | date
Value: TypeAlias = Scalar | list[Scalar] | None

_ORDERING_OPS = ("<", "<=", ">", ">=")
_TEXT_OPS = ("contains", "starts_with")
_NO_VALUE_OPS = ("exists", "not_exists")


class _Comparison(_Strict):
    """An op and the value it compares with; subclasses name what is compared."""

    op: Op
    value: Value = Field(default=None, validate_default=True)

    @field_validator("value")
    @classmethod
    def _value_fits_op(cls, value: Value, info: ValidationInfo) -> Value:
        op = info.data.get("op")
        if op is None:
            return value  # the op is wrong itself, and its own error says so

        if op in _NO_VALUE_OPS:
            if value is not None:
                raise ValueError(f"must be left out: {op} takes no value")
            return value
        if op == "in":
            if not isinstance(value, list) or not value:
                raise ValueError("must be a non-empty list of values for op 'in'")
            return value
        if value is None:
            raise ValueError(f"is required for op {op!r}")
        if isinstance(value, list):
            raise ValueError(f"must be a single value for op {op!r}; use op 'in'")
        if op in _TEXT_OPS and not isinstance(value, str):
            raise ValueError(f"must be text for op {op!r}")
        if op in _ORDERING_OPS and isinstance(value, bool):
            raise ValueError(f"cannot be true or false for op {op!r}")
        return value


class Filter(_Comparison):
    """`{property, op, value}`: a condition on a column of an event's table."""

    property: str = Field(min_length=1)


_WINDOW = re.compile(r"(?:\d+[dhm])+")
_WINDOW_PART = re.compile(r"(\d+)([dhm])")
_WINDOW_MINUTES = {"d": 24 * 60, "h": 60, "m": 1}


def _parse_window(value: Any) -> Any:
    """Turn `30d`, `12h`, `90m` (or `1d12h`) into a timedelta."""
    if value is None or isinstance(value, timedelta):
        return value
    if not isinstance(value, str) or not _WINDOW.fullmatch(value.strip()):
        raise ValueError(f"{value!r} is not a window such as 30d, 12h or 90m")

    minutes = sum(
        int(count) * _WINDOW_MINUTES[unit]
        for count, unit in _WINDOW_PART.findall(value)
    )
    if minutes == 0:
        raise ValueError("must be longer than zero")
    return timedelta(minutes=minutes)


def _parse_moment(value: Any) -> datetime:
    """Read an ISO date or time (a YAML date too) as an aware UTC datetime."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(
                f"{value!r} is not an ISO date or time such as 2026-01-31 "
                "or 2026-01-31T08:00:00Z"
            ) from None
    else:
        raise ValueError(f"{value!r} is not an ISO date or time")

    # A time without an offset is UTC, like every time in this program.
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


class _Windowed(_Strict):
    """Which events count: a window and filters on their properties."""

    within: timedelta | None = None
    between: tuple[datetime, datetime] | None = None
    where: list[Filter] = Field(default_factory=list)

    @field_validator("within", mode="before")
    @classmethod
    def _within(cls, value: Any) -> Any:
        return _parse_window(value)

    @field_validator("between", mode="before")
    @classmethod
    def _between(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise ValueError("must be a list of two times: [start, end]")

        start, end = (_parse_moment(v) for v in value)
        if start >= end:
            raise ValueError("must end after it starts")
        return (start, end)

    @model_validator(mode="after")
    def _one_window(self) -> Self:
        if self.within is not None and self.between is not None:
            raise ValueError("takes within or between, not both")
        return self


class Performed(_Windowed):
    """Users who performed an event at least, at most or exactly N times."""

    performed: str = Field(min_length=1)
    at_least: StrictInt | None = Field(default=None, ge=1)
    at_most: StrictInt | None = Field(default=None, ge=0)
    exactly: StrictInt | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_count(self) -> Self:
        given = [
            name
            for name in ("at_least", "at_most", "exactly")
            if getattr(self, name) is not None
        ]
        if len(given) > 1:
            raise ValueError(f"takes one of at_least, at_most, exactly, not {given}")
        return self


class NotPerformed(_Windowed):
    """Users of the universe who did not perform an event (in the window)."""

    not_performed: str = Field(min_length=1)


class TraitCondition(_Comparison):
    """Users whose column of the `users` table passes a comparison."""

    trait: str = Field(min_length=1)


class AllOf(_Strict):
    """Users who pass every condition."""

    all: list[Condition] = Field(min_length=1)


class AnyOf(_Strict):
    """Users who pass at least one condition."""

    any: list[Condition] = Field(min_length=1)


class Not(_Strict):
    """Users of the universe who do not pass a condition."""

    not_: Condition = Field(alias="not")


class CountTrait(_Windowed):
    """How many times a user performed an event."""

    count: str = Field(min_length=1)


class _PropertyTrait(_Windowed):
    """A value computed from one property of an event's table."""

    of: str = Field(min_length=1)


class SumTrait(_PropertyTrait):
    """The sum of a property."""

    sum: str = Field(min_length=1)


class AverageTrait(_PropertyTrait):
    """The average of a property."""

    average: str = Field(min_length=1)


class MinTrait(_PropertyTrait):
    """The smallest value of a property."""

    min: str = Field(min_length=1)


class MaxTrait(_PropertyTrait):
    """The largest value of a property."""

    max: str = Field(min_length=1)


class FirstTrait(_PropertyTrait):
    """The property of the earliest event that has it."""

    first: str = Field(min_length=1)


class LastTrait(_PropertyTrait):
    """The property of the latest event that has it."""

    last: str = Field(min_length=1)


class MostFrequentTrait(_PropertyTrait):
    """The value of a property seen most often; the smallest one on a tie."""

    most_frequent: str = Field(min_length=1)


class DistinctCountTrait(_PropertyTrait):
    """How many different values of a property a user has."""

    distinct_count: str = Field(min_length=1)


# The key that decides each kind, and the kind's class. The class name is the union's
# tag, so it shows up in pydantic's error locations; error_path leaves it out.
_CONDITION_KINDS: dict[str, type[BaseModel]] = {
    "performed": Performed,
    "not_performed": NotPerformed,
    "trait": TraitCondition,
    "all": AllOf,
    "any": AnyOf,
    "not": Not,
}
_COMPUTE_KINDS: dict[str, type[BaseModel]] = {
    "count": CountTrait,
    "sum": SumTrait,
    "average": AverageTrait,
    "min": MinTrait,
    "max": MaxTrait,
    "first": FirstTrait,
    "last": LastTrait,
    "most_frequent": MostFrequentTrait,
    "distinct_count": DistinctCountTrait,
}
UNION_TAGS = frozenset(
    kind.__name__ for kind in (*_CONDITION_KINDS.values(), *_COMPUTE_KINDS.values())
)


def _tagger(kinds: Mapping[str, type[BaseModel]]) -> Callable[[Any], str | None]:
    """A discriminator that picks the kind by the first of its keys present."""

    def tag(value: Any) -> str | None:
        if isinstance(value, dict):
            return next((k.__name__ for key, k in kinds.items() if key in value), None)
        if isinstance(value, tuple(kinds.values())):
            return type(value).__name__
        return None

    return tag


def _must_have(kinds: Mapping[str, type[BaseModel]]) -> str:
    """The error for a mapping with none of the keys that decide the kind."""
    names = list(kinds)
    return f"must be a mapping with one of {', '.join(names[:-1])} or {names[-1]}"


Condition: TypeAlias = Annotated[
    Annotated[Performed, Tag("Performed")]
    | Annotated[NotPerformed, Tag("NotPerformed")]
    | Annotated[TraitCondition, Tag("TraitCondition")]
    | Annotated[AllOf, Tag("AllOf")]
    | Annotated[AnyOf, Tag("AnyOf")]
    | Annotated[Not, Tag("Not")],
    Discriminator(
        _tagger(_CONDITION_KINDS),
        custom_error_type="condition_kind",
        custom_error_message=_must_have(_CONDITION_KINDS),
    ),
]

Compute: TypeAlias = Annotated[
    Annotated[CountTrait, Tag("CountTrait")]
    | Annotated[SumTrait, Tag("SumTrait")]
    | Annotated[AverageTrait, Tag("AverageTrait")]
    | Annotated[MinTrait, Tag("MinTrait")]
    | Annotated[MaxTrait, Tag("MaxTrait")]
    | Annotated[FirstTrait, Tag("FirstTrait")]
    | Annotated[LastTrait, Tag("LastTrait")]
    | Annotated[MostFrequentTrait, Tag("MostFrequentTrait")]
    | Annotated[DistinctCountTrait, Tag("DistinctCountTrait")],
    Discriminator(
        _tagger(_COMPUTE_KINDS),
        custom_error_type="compute_kind",
        custom_error_message=_must_have(_COMPUTE_KINDS),
    ),
]

for _model in (AllOf, AnyOf, Not):
    _model.model_rebuild()

_CONDITION_ADAPTER: TypeAdapter[Condition] = TypeAdapter(Condition)
_COMPUTE_ADAPTER: TypeAdapter[Compute] = TypeAdapter(Compute)


def error_path(root: str, loc: Sequence[int | str]) -> str:
    """Render a pydantic error location as the path in the file, without union tags."""
    path = root
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in UNION_TAGS:
            path += f".{part}" if path else part
    return path


def _from_validation(exc: ValidationError, root: str) -> DeclarationError:
    """One sentence for the first problem pydantic found."""
    error = exc.errors()[0]
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        message = "is required"
    elif error["type"] == "extra_forbidden":
        message = "is not a known field here"
    more = len(exc.errors()) - 1
    suffix = f" ({more} more problem{'s' if more > 1 else ''} after it)" if more else ""
    return DeclarationError(f"{error_path(root, error['loc'])}: {message}{suffix}")


def parse_condition(data: Any) -> Condition:
    """Validate the shape of an audience's `condition:`."""
    try:
        return _CONDITION_ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise _from_validation(exc, "condition") from None


def parse_compute(data: Any) -> Compute:
    """Validate the shape of a computed trait's `compute:`."""
    try:
        return _COMPUTE_ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise _from_validation(exc, "compute") from None


# ---------------------------------------------------------------------------
# SQL pieces every dialect shares, and the one SQLite lacks
# ---------------------------------------------------------------------------


class _position(FunctionElement[int]):
    """Where `needle` first occurs in `haystack`, from 1; 0 when it does not."""

    type = Integer()
    inherit_cache = True
    name = "position"


@compiles(_position)
def _position_standard(element: _position, compiler: SQLCompiler, **kw: Any) -> str:
    """Standard SQL, as PostgreSQL, DuckDB and most others take it."""
    needle, haystack = (compiler.process(c, **kw) for c in element.clauses)
    return f"POSITION({needle} IN {haystack})"


@compiles(_position, "sqlite")
def _position_sqlite(element: _position, compiler: SQLCompiler, **kw: Any) -> str:
    """SQLite has no POSITION (and its LIKE ignores case): instr()."""
    needle, haystack = (compiler.process(c, **kw) for c in element.clauses)
    return f"instr({haystack}, {needle})"


_COMPARE: dict[str, Callable[[Any, Any], ColumnElement[bool]]] = {
    "=": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}

_TEXT_TIME = "%Y-%m-%d %H:%M:%S"

# duckdb-engine reflects columns through SQLAlchemy's PostgreSQL queries, which read
# pg_catalog.pg_collation since SQLAlchemy 2.0.45; DuckDB has no such table
# (Mause/duckdb_engine#1391). information_schema answers the same question.
_REFLECT_FROM_INFORMATION_SCHEMA = frozenset({"duckdb"})

Kind = Literal["text", "number", "boolean", "datetime", "date", "other"]


def _type_from_name(name: str) -> TypeEngine[Any]:
    """A SQLAlchemy type for an information_schema data_type such as VARCHAR."""
    upper = name.upper()
    if upper.startswith(("VARCHAR", "TEXT", "CHAR", "STRING", "BPCHAR")):
        return String()
    if upper.startswith("TIMESTAMP"):
        return DateTime(timezone="TIME ZONE" in upper or upper == "TIMESTAMPTZ")
    if upper == "DATE":
        return Date()
    if upper in ("BOOLEAN", "BOOL"):
        return Boolean()
    if upper.startswith(("DECIMAL", "NUMERIC")):
        return Numeric()
    if upper.startswith(("DOUBLE", "FLOAT", "REAL")):
        return Float()
    if upper.endswith("INT") or upper in ("INTEGER", "HUGEINT", "UHUGEINT"):
        return Integer()
    return NullType()


_HOLDS: dict[Kind, str] = {
    "text": "text",
    "number": "numbers",
    "boolean": "true or false",
    "datetime": "times",
    "date": "dates",
    "other": "values of another kind",
}


def _name(of: ColumnElement[Any]) -> str:
    """A column's name, quoted, for messages."""
    return repr(getattr(of, "name", "the column"))


def event_table_name(event: str) -> str:
    """The table Segment keeps an event in: `Order Completed` -> `order_completed`."""
    return snake_case(event)


# ---------------------------------------------------------------------------
# The compiler
# ---------------------------------------------------------------------------


class _Compiler:
    """Turns one declaration into a SELECT, checking every name on the way."""

    def __init__(self, layout: EventLayout, bind: Bind, now: datetime) -> None:
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError("now must be timezone-aware")
        self.layout = layout
        self.bind = bind
        self.dialect = bind.dialect
        self.now = now.astimezone(UTC)
        self.metadata = MetaData()
        self.tables: dict[str, Table | None] = {}
        self._inspector: Inspector | None = None

    @property
    def inspector(self) -> Inspector:
        """One inspector for the whole compilation, so it caches what it reads."""
        if self._inspector is None:
            self._inspector = inspect(self.bind)
        return self._inspector

    # -- names -------------------------------------------------------------

    def qualified(self, name: str) -> str:
        """A table's name as the user would write it."""
        schema = self.layout.schema_
        return f"{schema}.{name}" if schema else name

    def reflect(self, name: str) -> Table | None:
        """The table `name` in the layout's schema, or None when it does not exist."""
        if name in self.tables:
            return self.tables[name]

        # Only the columns matter here: reading keys and indexes too would cost
        # several more catalog queries per table on every run.
        columns: list[tuple[str, TypeEngine[Any]]] | None
        if self.dialect.name in _REFLECT_FROM_INFORMATION_SCHEMA:
            columns = self._columns_from_information_schema(name)
        else:
            try:
                columns = [
                    (found["name"], found["type"])
                    for found in self.inspector.get_columns(
                        name, schema=self.layout.schema_
                    )
                ]
            except NoSuchTableError:
                columns = None

        reflected = None
        if columns:
            reflected = Table(
                name,
                self.metadata,
                *(Column(n, t) for n, t in columns),
                schema=self.layout.schema_,
            )
        self.tables[name] = reflected
        return reflected

    def _columns_from_information_schema(
        self, name: str
    ) -> list[tuple[str, TypeEngine[Any]]]:
        """A table's columns and types, read from information_schema."""
        columns = lightweight_table(
            "columns",
            *(
                lightweight_column(field)
                for field in (
                    "table_catalog",
                    "table_schema",
                    "table_name",
                    "column_name",
                    "data_type",
                    "ordinal_position",
                )
            ),
            schema="information_schema",
        )
        schema = self.layout.schema_
        query = (
            select(columns.c.column_name, columns.c.data_type)
            .where(
                columns.c.table_catalog == func.current_database(),
                columns.c.table_schema
                == (schema if schema is not None else func.current_schema()),
                columns.c.table_name == name,
            )
            .order_by(columns.c.ordinal_position)
        )
        if isinstance(self.bind, Connection):
            rows = self.bind.execute(query).all()
        else:
            with self.bind.connect() as connection:
                rows = connection.execute(query).all()
        return [(str(n), _type_from_name(str(t))) for n, t in rows]

    def require_table(self, name: str, path: str, why: str) -> Table:
        """A table of the layout that must exist."""
        found = self.reflect(name)
        if found is None:
            raise DeclarationError(f"{path}: no table {self.qualified(name)} ({why})")
        return found

    def event_table(self, event: str, path: str) -> Table:
        """The table of an event, with the columns every event table has."""
        name = event_table_name(event)
        found = self.reflect(name) if name else None
        if found is None:
            raise DeclarationError(
                f"{path}: no table {self.qualified(name or '?')} for event {event!r}"
            )
        self.check_event_columns(found, path)
        return found

    def check_event_columns(self, events: Table, path: str) -> None:
        """The identity and time columns every event table has, of a usable type."""
        for needed in ("user_id", "anonymous_id", "timestamp"):
            self.column(events, needed, path)
        kind = self.kind(events.c.timestamp)
        if kind not in ("text", "datetime", "other"):
            raise DeclarationError(
                f"{path}: {self.qualified(events.name)}.timestamp holds "
                f"{_HOLDS[kind]}; it must be a timestamp or 'YYYY-MM-DD HH:MM:SS' text"
            )

    def column(self, source: Table, name: str, path: str) -> ColumnElement[Any]:
        """A column that must exist, with a suggestion when it does not."""
        if name in source.c:
            return source.c[name]
        close = difflib.get_close_matches(name, source.c.keys(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DeclarationError(
            f"{path}: {self.qualified(source.name)} has no column {name!r}{hint}"
        )

    def kind(self, of: ColumnElement[Any]) -> Kind:
        """What a column holds, as far as comparisons are concerned."""
        type_ = of.type
        if isinstance(type_, String):
            return "text"
        if isinstance(type_, DateTime | Date):
            # SQLite has no time types: Segment (and SQLAlchemy) store text there.
            if self.dialect.name == "sqlite":
                return "text"
            return "datetime" if isinstance(type_, DateTime) else "date"
        if isinstance(type_, Boolean):
            return "boolean"
        # Float is no Numeric since SQLAlchemy 2.1: name both.
        if isinstance(type_, Integer | Numeric | Float):
            return "number"
        return "other"

    # -- values ------------------------------------------------------------

    def ordered(self, expr: ColumnElement[Any], kind: Kind) -> ColumnElement[Any]:
        """Text that sorts in byte order, as SQLite and DuckDB sort by default."""
        if kind == "text" and self.dialect.name == "postgresql":
            return expr.collate("C")
        return expr

    def clean_id(self, of: ColumnElement[Any]) -> ColumnElement[Any]:
        """A user id trimmed of spaces, as text."""
        text = of if self.kind(of) == "text" else cast(of, String())
        return func.trim(text)

    def time_bound(
        self, timestamp: ColumnElement[Any], moment: datetime, name: str, *, up: bool
    ) -> ColumnElement[Any]:
        """A bound for a timestamp column, bound in the column's own form.

        Text holds whole seconds, so a bound with a fraction of a second becomes the
        second below it for `>` and `<=`, and the second above it (`up`) for `>=`
        and `<`: the comparison keeps exactly the events the exact bound would.
        """
        kind = self.kind(timestamp)
        if kind == "text":
            whole = moment.replace(microsecond=0)
            if up and moment.microsecond:
                whole += timedelta(seconds=1)
            return bindparam(name, whole.strftime(_TEXT_TIME), String(), unique=True)

        aware = isinstance(timestamp.type, DateTime) and timestamp.type.timezone
        value = moment if aware else moment.replace(tzinfo=None)
        return bindparam(name, value, DateTime(timezone=aware), unique=True)

    def coerce(self, value: Scalar, of: ColumnElement[Any], path: str) -> Any:
        """A declared value in the form the column holds, or a clear error."""
        kind = self.kind(of)
        holds = f"and {_name(of)} holds {_HOLDS[kind]}"
        if kind == "text":
            if isinstance(value, bool):
                return "true" if value else "false"
            if isinstance(value, datetime):
                return _parse_moment(value).strftime(_TEXT_TIME)
            if isinstance(value, date):
                return value.isoformat()
            return str(value)

        if kind == "number":
            if isinstance(value, bool):
                return int(value)
            if isinstance(value, int | float):
                return value
            if isinstance(value, str):
                for number in (int, float):
                    try:
                        return number(value)
                    except ValueError:
                        pass
            raise DeclarationError(f"{path}: {value!r} is not a number, {holds}")

        if kind == "boolean":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise DeclarationError(f"{path}: {value!r} is not true or false, {holds}")

        if kind in ("datetime", "date"):
            if isinstance(value, bool | int | float):
                raise DeclarationError(f"{path}: {value!r} is not a time, {holds}")
            try:
                moment = _parse_moment(value)
            except ValueError as exc:
                raise DeclarationError(f"{path}: {exc}") from None
            if kind == "date":
                return moment.date()
            aware = isinstance(of.type, DateTime) and of.type.timezone
            return moment if aware else moment.replace(tzinfo=None)

        return value

    def bind_type(self, of: ColumnElement[Any]) -> TypeEngine[Any]:
        """The type to bind a compared value with."""
        return String() if self.kind(of) == "text" else of.type

    def predicate(
        self, of: ColumnElement[Any], comparison: _Comparison, path: str
    ) -> ColumnElement[bool]:
        """The SQL test of one `{op, value}` against a column."""
        op, value = comparison.op, comparison.value
        kind = self.kind(of)
        if op == "exists":
            return of.is_not(None)
        if op == "not_exists":
            return of.is_(None)

        if op in _TEXT_OPS:
            if kind not in ("text", "other"):
                raise DeclarationError(
                    f"{path}.op: {op} needs a text column, and {_name(of)} "
                    f"holds {_HOLDS[kind]}"
                )
            needle = bindparam("value", value, String(), unique=True)
            if op == "contains":
                return _position(needle, of) > 0
            return func.substr(of, 1, func.length(needle)) == needle

        if op == "in":
            assert isinstance(value, list)
            values = [
                self.coerce(v, of, f"{path}.value[{i}]") for i, v in enumerate(value)
            ]
            return of.in_(
                bindparam(
                    "values",
                    values,
                    self.bind_type(of),
                    expanding=True,
                    unique=True,
                )
            )

        assert value is not None
        assert not isinstance(value, list)
        bound = bindparam(
            "value",
            self.coerce(value, of, f"{path}.value"),
            self.bind_type(of),
            unique=True,
        )
        left = self.ordered(of, kind) if op in _ORDERING_OPS else of
        return _COMPARE[op](left, bound)

    # -- events ------------------------------------------------------------

    def identities(self, path: str) -> Subquery:
        """`anonymous_id -> user_id` from identifies: the smallest linked user id."""
        identifies = self.require_table(
            self.layout.identifies, path, "needed to link anonymous events to users"
        )
        anonymous_id = self.column(identifies, "anonymous_id", path)
        user_id = self.clean_id(self.column(identifies, "user_id", path))
        return (
            select(
                anonymous_id.label("anonymous_id"),
                func.min(self.ordered(user_id, "text")).label("user_id"),
            )
            .where(anonymous_id.is_not(None), user_id != "")
            .group_by(anonymous_id)
            .subquery("identities")
        )

    def events_of(
        self, events: Table, columns: Sequence[str], path: str
    ) -> Select[Any]:
        """`user_id, timestamp, <columns>` of the events up to now that have a user.

        Callers add their own WHERE on the table's columns, then make a subquery.
        """
        identities = self.identities(path)
        own = self.clean_id(events.c.user_id)
        user_id = case((own != "", own), else_=identities.c.user_id)
        timestamp = events.c.timestamp
        extra = [events.c[c] for c in dict.fromkeys(columns) if c not in _EVENT_KEYS]
        return (
            select(user_id.label("user_id"), timestamp.label("timestamp"), *extra)
            .select_from(
                events.outerjoin(
                    identities, events.c.anonymous_id == identities.c.anonymous_id
                )
            )
            .where(
                user_id.is_not(None),
                timestamp <= self.time_bound(timestamp, self.now, "now", up=False),
            )
        )

    def window(self, events: Table, spec: _Windowed) -> list[ColumnElement[bool]]:
        """The window's tests on an event table's timestamp."""
        timestamp = events.c.timestamp
        if spec.within is not None:
            since = self.now - spec.within
            return [timestamp > self.time_bound(timestamp, since, "since", up=False)]
        if spec.between is not None:
            start, end = spec.between
            return [
                timestamp >= self.time_bound(timestamp, start, "start", up=True),
                timestamp < self.time_bound(timestamp, end, "end", up=True),
            ]
        return []

    def filters(
        self, events: Table, spec: _Windowed, path: str
    ) -> list[ColumnElement[bool]]:
        """The `where:` tests on an event table's columns."""
        tests = []
        for index, item in enumerate(spec.where):
            where = f"{path}.where[{index}]"
            of = self.column(events, item.property, f"{where}.property")
            tests.append(self.predicate(of, item, where))
        return tests

    def matching(
        self, events: Table, spec: _Windowed, columns: Sequence[str], path: str
    ) -> Select[Any]:
        """The events of a table that fall in the window and pass the filters."""
        return self.events_of(events, columns, path).where(
            *self.window(events, spec), *self.filters(events, spec, path)
        )

    def universe(self, path: str) -> Subquery:
        """Every user a negation can match: ids of `users` and of `tracks` events."""
        users = self.require_table(
            self.layout.users, path, "the users a condition can match"
        )
        user_id = self.clean_id(self.column(users, "id", path))
        tracks = self.require_table(
            self.layout.tracks, path, "the users a condition can match"
        )
        self.check_event_columns(tracks, path)

        seen = self.events_of(tracks, (), path).subquery()
        return union(
            select(user_id.label("user_id")).where(user_id != ""),
            select(seen.c.user_id),
        ).subquery("universe")

    # -- audiences ---------------------------------------------------------

    def condition(self, spec: Condition, path: str) -> Select[Any]:
        """A SELECT of one column `user_id` (maybe with duplicates)."""
        if isinstance(spec, Performed | NotPerformed):
            return self.performed(spec, path)
        if isinstance(spec, TraitCondition):
            return self.trait(spec, path)
        if isinstance(spec, AllOf):
            parts = [
                self.condition(c, f"{path}.all[{i}]").subquery()
                for i, c in enumerate(spec.all)
            ]
            first = parts[0]
            return select(first.c.user_id).where(
                *(first.c.user_id.in_(select(p.c.user_id)) for p in parts[1:])
            )
        if isinstance(spec, AnyOf):
            parts = [
                self.condition(c, f"{path}.any[{i}]").subquery()
                for i, c in enumerate(spec.any)
            ]
            if len(parts) == 1:
                return select(parts[0].c.user_id)
            merged = union(*(select(p.c.user_id) for p in parts)).subquery()
            return select(merged.c.user_id)

        negated = self.condition(spec.not_, f"{path}.not").subquery()
        everyone = self.universe(f"{path}.not")
        return select(everyone.c.user_id).where(
            ~exists().where(negated.c.user_id == everyone.c.user_id)
        )

    def performed(self, spec: Performed | NotPerformed, path: str) -> Select[Any]:
        """Users by how many matching events they have."""
        if isinstance(spec, Performed):
            field, event = "performed", spec.performed
            if spec.at_most is not None:
                test, times = "<=", spec.at_most
            elif spec.exactly is not None:
                test, times = "=", spec.exactly
            else:
                test, times = ">=", spec.at_least or 1
        else:
            field, event, test, times = "not_performed", spec.not_performed, "=", 0

        events = self.event_table(event, f"{path}.{field}")
        matching = self.matching(events, spec, (), path).subquery("matching")
        bound = bindparam("times", times, Integer(), unique=True)

        # Counts that cannot be zero only need the users that have events.
        if not _COMPARE[test](0, times):
            if (test, times) == (">=", 1):
                return select(matching.c.user_id).distinct()
            return (
                select(matching.c.user_id)
                .group_by(matching.c.user_id)
                .having(_COMPARE[test](func.count(), bound))
            )

        # Zero passes: every user of the universe without events passes too.
        counts = (
            select(matching.c.user_id, func.count().label("times"))
            .group_by(matching.c.user_id)
            .subquery("counts")
        )
        everyone = self.universe(f"{path}.{field}")
        return (
            select(everyone.c.user_id)
            .select_from(
                everyone.outerjoin(counts, counts.c.user_id == everyone.c.user_id)
            )
            .where(_COMPARE[test](func.coalesce(counts.c.times, 0), bound))
        )

    def trait(self, spec: TraitCondition, path: str) -> Select[Any]:
        """Users whose column of `users` passes the comparison."""
        users = self.require_table(self.layout.users, path, "needed for traits")
        of = self.column(users, spec.trait, f"{path}.trait")
        user_id = self.clean_id(self.column(users, "id", path))
        return select(user_id.label("user_id")).where(
            user_id != "", self.predicate(of, spec, path)
        )

    # -- computed traits ---------------------------------------------------

    def compute(self, spec: Compute, path: str) -> Select[Any]:
        """A SELECT of `user_id, value`, one row per user that has a value."""
        if isinstance(spec, CountTrait):
            events = self.event_table(spec.count, f"{path}.count")
            matching = self.matching(events, spec, (), path).subquery("matching")
            return select(matching.c.user_id, func.count().label("value")).group_by(
                matching.c.user_id
            )

        field = _COMPUTE_FIELD[type(spec)]
        name: str = getattr(spec, field)
        events = self.event_table(spec.of, f"{path}.of")
        of = self.column(events, name, f"{path}.{field}")
        kind = self.kind(of)
        if field in ("sum", "average") and kind not in ("number", "other"):
            raise DeclarationError(
                f"{path}.{field}: {field} needs a number column, and {name!r} "
                f"holds {_HOLDS[kind]}"
            )

        matching = (
            self.matching(events, spec, (name,), path)
            .where(of.is_not(None))
            .subquery("matching")
        )
        user_id = matching.c.user_id
        value = matching.c[name]
        if field in _AGGREGATES:
            aggregate = _AGGREGATES[field](self.ordered(value, kind))
            return select(user_id, aggregate.label("value")).group_by(user_id)
        if field in ("first", "last"):
            when = matching.c.timestamp
            return self.pick(
                matching,
                value,
                (when.asc() if field == "first" else when.desc()),
                self.ordered(value, kind).asc(),
            )

        # most_frequent: count each value, then keep the most frequent.
        tally = (
            select(user_id, value.label("value"), func.count().label("times"))
            .group_by(user_id, value)
            .subquery("tally")
        )
        return self.pick(
            tally,
            tally.c.value,
            tally.c.times.desc(),
            self.ordered(tally.c.value, kind).asc(),
        )

    def pick(
        self, rows: Subquery, value: ColumnElement[Any], *order: ColumnElement[Any]
    ) -> Select[Any]:
        """The value of each user's first row in the given order."""
        ranked = select(
            rows.c.user_id,
            value.label("value"),
            func.row_number()
            .over(partition_by=rows.c.user_id, order_by=list(order))
            .label("pick"),
        ).subquery("ranked")
        return select(ranked.c.user_id, ranked.c.value).where(ranked.c.pick == 1)


_EVENT_KEYS = ("user_id", "timestamp")

_AGGREGATES: dict[str, Callable[[ColumnElement[Any]], ColumnElement[Any]]] = {
    "sum": func.sum,
    # As double precision everywhere: PostgreSQL would average integers as numeric.
    "average": lambda value: func.avg(cast(value, Double())),
    "min": func.min,
    "max": func.max,
    "distinct_count": lambda value: func.count(value.distinct()),
}

_COMPUTE_FIELD: dict[type[BaseModel], str] = {
    kind: key for key, kind in _COMPUTE_KINDS.items()
}


# ---------------------------------------------------------------------------
# The API
# ---------------------------------------------------------------------------


def compile_audience(
    condition: Condition, layout: EventLayout, bind: Bind, now: datetime
) -> Select[Any]:
    """A DISTINCT SELECT of `user_id`: the audience's members at `now`.

    Raises:
        DeclarationError: a table or column is missing, or a value does not fit.
    """
    members = _Compiler(layout, bind, now).condition(condition, "condition")
    audience = members.subquery("audience")
    return select(audience.c.user_id).distinct()


def compile_trait(
    compute: Compute, layout: EventLayout, bind: Bind, now: datetime
) -> Select[Any]:
    """A SELECT of `user_id, value`: the trait's values at `now`.

    Raises:
        DeclarationError: a table or column is missing, or a value does not fit.
    """
    return _Compiler(layout, bind, now).compute(compute, "compute")


def check_declaration(
    declaration: Condition | Compute, layout: EventLayout, bind: Bind
) -> None:
    """Check every table, column and value a declaration names against the database.

    Raises:
        DeclarationError: naming the field at fault, such as
            `condition.all[1].performed: no table order_complete for event ...`.
    """
    compiler = _Compiler(layout, bind, datetime.now(UTC))
    if isinstance(
        declaration, Performed | NotPerformed | TraitCondition | AllOf | AnyOf | Not
    ):
        compiler.condition(declaration, "condition")
    else:
        compiler.compute(declaration, "compute")


def explain(statement: Select[Any], dialect: Dialect) -> str:
    """The SQL of a compiled declaration, its bound values written in place."""
    try:
        return str(
            statement.compile(dialect=dialect, compile_kwargs={"literal_binds": True})
        )
    except (CompileError, NotImplementedError):
        # Some dialects cannot write some values (times, mostly) as literals: show
        # the parameters after the statement instead.
        compiled = statement.compile(dialect=dialect)
        values = "\n".join(
            f"-- {name} = {value!r}" for name, value in compiled.params.items()
        )
        return f"{compiled}\n{values}"


__all__ = [
    "AllOf",
    "AnyOf",
    "AverageTrait",
    "Compute",
    "Condition",
    "CountTrait",
    "DeclarationError",
    "DistinctCountTrait",
    "EventLayout",
    "Filter",
    "FirstTrait",
    "LastTrait",
    "MaxTrait",
    "MinTrait",
    "MostFrequentTrait",
    "Not",
    "NotPerformed",
    "Performed",
    "SumTrait",
    "TraitCondition",
    "check_declaration",
    "compile_audience",
    "compile_trait",
    "error_path",
    "event_table_name",
    "explain",
    "parse_compute",
    "parse_condition",
]

"""Declared audiences and computed traits, compiled and run on real databases.

Each test builds a small Segment-style warehouse on SQLite (text timestamps), on
PostgreSQL (timestamptz, when AUDIENCE_SYNC_TEST_DATABASE_URL is set) and on DuckDB
(naive TIMESTAMP, when duckdb-engine is installed), and pins the members or values.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Double,
    Engine,
    Integer,
    MetaData,
    PickleType,
    Table,
    Text,
    bindparam,
    create_engine,
    literal_column,
    select,
    text,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.types import TypeEngine

from audience_sync.declarations import (
    DeclarationError,
    EventLayout,
    Performed,
    check_declaration,
    compile_audience,
    compile_trait,
    explain,
    parse_compute,
    parse_condition,
)
from audience_sync.demo import build_demo_warehouse
from audience_sync.sources import encode_value

POSTGRES_ENV = "AUDIENCE_SYNC_TEST_DATABASE_URL"
T = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
SECOND = timedelta(seconds=1)

EVENT_PROPERTIES: dict[str, dict[str, TypeEngine[Any]]] = {
    "Order Completed": {
        "order_id": Text(),
        "revenue": Double(),
        "currency": Text(),
        "products": Integer(),
        "coupon": Text(),
    },
    "Product Viewed": {"product_id": Text(), "category": Text(), "price": Double()},
    "Application Opened": {"version": Text(), "from_background": Integer()},
}
USER_TRAITS: dict[str, TypeEngine[Any]] = {
    "name": Text(),
    "plan": Text(),
    "country": Text(),
    "lifetime_value": Double(),
    "email_opt_in": Boolean(),
}


# ---------------------------------------------------------------------------
# Databases and warehouses
# ---------------------------------------------------------------------------


@dataclass
class Database:
    """An empty database to build a warehouse in."""

    name: str
    engine: Engine
    schema: str
    time_type: TypeEngine[Any]


DATABASES = ["sqlite", "postgres", "duckdb"]


@contextmanager
def open_database(kind: str, folder: Path) -> Iterator[Database]:
    """An empty SQLite file, PostgreSQL schema or DuckDB file."""
    if kind == "postgres":
        with postgres_schema() as (engine, schema):
            yield Database("postgres", engine, schema, DateTime(timezone=True))
        return

    if kind == "duckdb":
        pytest.importorskip("duckdb_engine")
        engine = create_engine(f"duckdb:///{folder / 'warehouse.duckdb'}")
        database = Database("duckdb", engine, "main", DateTime())
    else:
        engine = create_engine(f"sqlite:///{folder / 'warehouse.db'}")
        database = Database("sqlite", engine, "main", Text())
    try:
        yield database
    finally:
        engine.dispose()


@pytest.fixture(params=DATABASES)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A database of its own, for a test that shapes its tables itself."""
    with open_database(request.param, tmp_path) as database:
        yield database


@pytest.fixture(scope="module", params=DATABASES)
def shared_warehouse(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Warehouse]:
    """The standard warehouse on each database, built once for the module."""
    with open_database(request.param, tmp_path_factory.mktemp("shared")) as database:
        yield Warehouse(database)


class postgres_schema:
    """A fresh PostgreSQL schema on the search path, dropped on exit."""

    def __init__(self, **options: str) -> None:
        base = os.environ.get(POSTGRES_ENV)
        if not base:
            pytest.skip(f"set {POSTGRES_ENV} to run against PostgreSQL")
        self.base = base
        self.schema = f"declarations_test_{uuid.uuid4().hex[:12]}"
        self.options = " ".join(
            [f"-csearch_path={self.schema}"]
            + [f"-c{name}={value}" for name, value in options.items()]
        )
        self.admin = create_engine(base)
        self.engine: Engine | None = None

    def __enter__(self) -> tuple[Engine, str]:
        with self.admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{self.schema}"'))
        url = make_url(self.base).update_query_dict({"options": self.options})
        self.engine = create_engine(url)
        return self.engine, self.schema

    def __exit__(self, *exc: object) -> None:
        if self.engine is not None:
            self.engine.dispose()
        with self.admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{self.schema}" CASCADE'))
        self.admin.dispose()


class Warehouse:
    """Segment's tables in a database: tracks, one per event, identifies, users."""

    def __init__(
        self,
        database: Database,
        *,
        time_type: TypeEngine[Any] | None = None,
        layout: EventLayout | None = None,
    ) -> None:
        self.database = database
        self.engine = database.engine
        self.layout = layout or EventLayout()
        self.time_type = time_type if time_type is not None else database.time_type
        self.metadata = MetaData(schema=self.layout.schema_)
        self.count = 0

        def base(*columns: Column[Any]) -> list[Column[Any]]:
            return [
                Column("id", Text(), primary_key=True),
                Column("user_id", Text()),
                Column("anonymous_id", Text()),
                Column("timestamp", self.time_type),
                *columns,
            ]

        self.tracks = Table(
            self.layout.tracks,
            self.metadata,
            *base(Column("event", Text()), Column("event_text", Text())),
        )
        self.events = {
            name: Table(
                name.lower().replace(" ", "_"),
                self.metadata,
                *base(*(Column(p, t) for p, t in properties.items())),
            )
            for name, properties in EVENT_PROPERTIES.items()
        }
        self.identifies = Table(
            self.layout.identifies, self.metadata, *base(Column("email", Text()))
        )
        self.users = Table(
            self.layout.users,
            self.metadata,
            Column("id", Text()),
            *(Column(n, t) for n, t in USER_TRAITS.items()),
        )
        self.metadata.create_all(self.engine, checkfirst=False)

    def clear(self) -> None:
        """Delete every row."""
        with self.engine.begin() as connection:
            for table in self.metadata.sorted_tables:
                connection.execute(table.delete())
        self.count = 0

    def stamp(self, moment: datetime) -> Any:
        """A moment as the timestamp columns hold it."""
        if isinstance(self.time_type, DateTime):
            return moment if self.time_type.timezone else moment.replace(tzinfo=None)
        return moment.strftime("%Y-%m-%d %H:%M:%S")

    def next_id(self) -> str:
        self.count += 1
        return f"m{self.count:05d}"

    def track(
        self,
        event: str,
        user_id: str | None = None,
        at: datetime = T,
        anonymous_id: str | None = None,
        **properties: Any,
    ) -> None:
        """Record one event in tracks and in its own table."""
        row = {
            "id": self.next_id(),
            "user_id": user_id,
            "anonymous_id": anonymous_id or f"device-of-{user_id}",
            "timestamp": self.stamp(at),
        }
        with self.engine.begin() as connection:
            connection.execute(
                self.tracks.insert(),
                {**row, "event": self.events[event].name, "event_text": event},
            )
            connection.execute(self.events[event].insert(), {**row, **properties})

    def identify(
        self, anonymous_id: str, user_id: str | None, at: datetime = T
    ) -> None:
        """Link a device to a user id."""
        with self.engine.begin() as connection:
            connection.execute(
                self.identifies.insert(),
                {
                    "id": self.next_id(),
                    "anonymous_id": anonymous_id,
                    "user_id": user_id,
                    "timestamp": self.stamp(at),
                },
            )

    def user(self, user_id: str, **traits: Any) -> None:
        """Add a row to users."""
        with self.engine.begin() as connection:
            connection.execute(self.users.insert(), {"id": user_id, **traits})

    def members(self, condition: Any, now: datetime = T) -> set[str]:
        """The user ids of a declared audience at `now`."""
        statement = compile_audience(
            parse_condition(condition), self.layout, self.engine, now
        )
        with self.engine.connect() as connection:
            rows = connection.execute(statement).all()
        ids = [row.user_id for row in rows]
        assert len(ids) == len(set(ids)), "an audience lists each member once"
        return set(ids)

    def values(self, compute: Any, now: datetime = T) -> dict[str, str]:
        """`{user_id: value as the JSON text the sync sends}` of a computed trait."""
        statement = compile_trait(parse_compute(compute), self.layout, self.engine, now)
        with self.engine.connect() as connection:
            rows = connection.execute(statement).all()
        found = {row.user_id: encode_value(row.value) for row in rows}
        assert len(found) == len(rows), "a trait has one row per user"
        return {user: value for user, value in found.items() if value is not None}

    def check(self, declaration: Any, kind: str = "condition") -> None:
        """check_declaration on a parsed condition or compute."""
        parse = parse_condition if kind == "condition" else parse_compute
        check_declaration(parse(declaration), self.layout, self.engine)


@pytest.fixture
def warehouse(shared_warehouse: Warehouse) -> Warehouse:
    """The standard warehouse on each database, emptied: rows cost less than DDL."""
    shared_warehouse.clear()
    return shared_warehouse


@pytest.fixture
def people(warehouse: Warehouse) -> Warehouse:
    """Four users with traits, for the operators."""
    warehouse.user(
        "u1",
        name="Ada Lovelace",
        plan="vip",
        country="US",
        lifetime_value=120.0,
        email_opt_in=True,
    )
    warehouse.user(
        "u2",
        name="Ben Adams",
        plan="free",
        country="GB",
        lifetime_value=80.0,
        email_opt_in=False,
    )
    warehouse.user("u3", name="ada byron", country="DE")
    warehouse.user("u4", name="Zed", plan="Vip", country="US", lifetime_value=120.5)
    return warehouse


# ---------------------------------------------------------------------------
# The grammar
# ---------------------------------------------------------------------------

YAML_EXAMPLES = """
conditions:
  - {performed: Order Completed, within: 30d}
  - {performed: Order Completed, at_least: 3, within: 90d,
     where: [{property: revenue, op: ">", value: 50}]}
  - {performed: Product Viewed, exactly: 2, between: ["2026-01-01", "2026-02-01"]}
  - {performed: Product Viewed, between: [2026-01-01, 2026-02-01T06:00:00Z]}
  - {performed: Application Opened, at_most: 1, within: 7d}
  - {not_performed: Application Opened, within: 14d}
  - {trait: plan, op: "=", value: vip}
  - {all: [{trait: plan, op: exists}, {any: [{not: {trait: plan, op: "=", value: x}}]}]}
computes:
  - {count: Order Completed, within: 90d}
  - {sum: revenue, of: Order Completed, within: 180d,
     where: [{property: currency, op: in, value: [USD, EUR]}]}
  - {average: revenue, of: Order Completed}
  - {min: price, of: Product Viewed}
  - {max: price, of: Product Viewed}
  - {first: category, of: Product Viewed}
  - {last: category, of: Product Viewed}
  - {most_frequent: category, of: Product Viewed, within: 30d}
  - {distinct_count: product_id, of: Product Viewed}
"""


def test_every_example_of_the_grammar_parses() -> None:
    """The YAML forms of the design all validate."""
    examples = yaml.safe_load(YAML_EXAMPLES)

    conditions = [parse_condition(item) for item in examples["conditions"]]
    computes = [parse_compute(item) for item in examples["computes"]]

    assert len(conditions) == 8
    assert len(computes) == 9


def test_between_reads_dates_and_times_as_utc() -> None:
    """A date is midnight UTC, a time with an offset is converted to UTC."""
    condition = parse_condition(
        {"performed": "X", "between": ["2026-01-01", "2026-02-01T02:00:00+02:00"]}
    )

    assert isinstance(condition, Performed)
    assert condition.between == (
        datetime(2026, 1, 1, tzinfo=UTC),
        datetime(2026, 2, 1, tzinfo=UTC),
    )


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        (
            {"trait": "plan", "op": "like", "value": "v"},
            "condition.op: Input should be '=', '!=', '<', '<=', '>', '>=', "
            "'contains', 'starts_with', 'in', 'exists' or 'not_exists'",
        ),
        (
            {"performed": "X", "within": "30x"},
            "condition.within: '30x' is not a window such as 30d, 12h or 90m",
        ),
        (
            {"performed": "X", "within": "0d"},
            "condition.within: must be longer than zero",
        ),
        (
            {
                "performed": "X",
                "within": "30d",
                "between": ["2026-01-01", "2026-02-01"],
            },
            "condition: takes within or between, not both",
        ),
        (
            {"performed": "X", "between": ["2026-02-01", "2026-01-01"]},
            "condition.between: must end after it starts",
        ),
        (
            {"performed": "X", "between": ["2026-02-30", "2026-03-01"]},
            "condition.between: '2026-02-30' is not an ISO date or time such as "
            "2026-01-31 or 2026-01-31T08:00:00Z",
        ),
        (
            {"performed": "X", "at_least": 2, "exactly": 3},
            "condition: takes one of at_least, at_most, exactly, "
            "not ['at_least', 'exactly']",
        ),
        (
            {"performed": "X", "at_least": 0},
            "condition.at_least: Input should be greater than or equal to 1",
        ),
        (
            {"trait": "plan", "op": "in", "value": "vip"},
            "condition.value: must be a non-empty list of values for op 'in'",
        ),
        (
            {"trait": "plan", "op": "exists", "value": "vip"},
            "condition.value: must be left out: exists takes no value",
        ),
        ({"trait": "plan", "op": "="}, "condition.value: is required for op '='"),
        (
            {"trait": "plan", "op": "=", "value": ["a", "b"]},
            "condition.value: must be a single value for op '='; use op 'in'",
        ),
        (
            {"trait": "name", "op": "contains", "value": 5},
            "condition.value: must be text for op 'contains'",
        ),
        (
            {"trait": "age", "op": "<", "value": True},
            "condition.value: cannot be true or false for op '<'",
        ),
        (
            {"performed": "X", "witin": "30d"},
            "condition.witin: is not a known field here",
        ),
        (
            {"preformed": "X"},
            "condition: must be a mapping with one of performed, not_performed, "
            "trait, all, any or not",
        ),
        (
            {"any": [{"not": {"performed": "X", "within": "2w"}}]},
            "condition.any[0].not.within: '2w' is not a window such as 30d, 12h or 90m",
        ),
        (
            {"all": [{"performed": "X", "where": [{"property": "p", "op": "~"}]}]},
            "condition.all[0].where[0].op: Input should be '=', '!=', '<', '<=', '>', "
            "'>=', 'contains', 'starts_with', 'in', 'exists' or 'not_exists'",
        ),
        (
            {"all": []},
            "condition.all: List should have at least 1 item after validation, not 0",
        ),
    ],
)
def test_a_badly_shaped_condition_is_refused(
    condition: dict[str, Any], message: str
) -> None:
    """A shape error names the field's path, union tags left out."""
    with pytest.raises(DeclarationError) as caught:
        parse_condition(condition)

    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("compute", "message"),
    [
        (
            {"sum": "revenue"},
            "compute.of: is required",
        ),
        (
            {"median": "revenue", "of": "Order Completed"},
            "compute: must be a mapping with one of count, sum, average, min, max, "
            "first, last, most_frequent or distinct_count",
        ),
        (
            {"count": "Order Completed", "within": "90"},
            "compute.within: '90' is not a window such as 30d, 12h or 90m",
        ),
    ],
)
def test_a_badly_shaped_compute_is_refused(
    compute: dict[str, Any], message: str
) -> None:
    """A computed trait's shape error names the field's path."""
    with pytest.raises(DeclarationError) as caught:
        parse_compute(compute)

    assert str(caught.value) == message


# ---------------------------------------------------------------------------
# Operators, on the users table
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "op", "value", "expected"),
    [
        ("plan", "=", "vip", {"u1"}),
        ("plan", "!=", "vip", {"u2", "u4"}),
        ("name", "contains", "Ada", {"u1", "u2"}),
        ("name", "starts_with", "Ada", {"u1"}),
        ("country", "in", ["US", "DE"], {"u1", "u3", "u4"}),
        ("plan", "exists", None, {"u1", "u2", "u4"}),
        ("plan", "not_exists", None, {"u3"}),
    ],
)
def test_trait_operators_on_text(
    people: Warehouse, field: str, op: str, value: Any, expected: set[str]
) -> None:
    """Each text operator, case-sensitive; comparisons skip nulls, != too."""
    condition: dict[str, Any] = {"trait": field, "op": op}
    if value is not None:
        condition["value"] = value

    members = people.members(condition)

    assert members == expected


@pytest.mark.parametrize(
    ("op", "expected"),
    [
        ("<", {"u2"}),
        ("<=", {"u1", "u2"}),
        (">", {"u4"}),
        (">=", {"u1", "u4"}),
        ("=", {"u1"}),
        ("!=", {"u2", "u4"}),
    ],
)
def test_trait_operators_on_numbers(
    people: Warehouse, op: str, expected: set[str]
) -> None:
    """Each ordering operator on a number column."""
    members = people.members({"trait": "lifetime_value", "op": op, "value": 120})

    assert members == expected


def test_trait_equals_true_on_a_boolean_column(people: Warehouse) -> None:
    """A boolean trait compares with true and false."""
    members = people.members({"trait": "email_opt_in", "op": "=", "value": True})

    assert members == {"u1"}


def test_text_orders_by_bytes(people: Warehouse) -> None:
    """Upper case sorts before lower case on every database."""
    members = people.members({"trait": "plan", "op": "<", "value": "free"})

    assert members == {"u4"}


def test_text_orders_by_bytes_under_a_linguistic_collation() -> None:
    """On PostgreSQL, columns with an ICU collation still compare in byte order."""
    with postgres_schema() as (engine, schema):
        warehouse = Warehouse(Database("postgres", engine, schema, DateTime(True)))
        with engine.begin() as connection:
            for name in (
                "users ALTER COLUMN plan",
                "order_completed ALTER COLUMN coupon",
            ):
                connection.execute(
                    text(f'ALTER TABLE {name} TYPE text COLLATE "en-x-icu"')
                )
        warehouse.user("u1", plan="Vip")
        warehouse.user("u2", plan="free")
        warehouse.track("Order Completed", "u1", coupon="free")
        warehouse.track("Order Completed", "u1", coupon="Vip")

        members = warehouse.members({"trait": "plan", "op": "<", "value": "free"})
        smallest = warehouse.values({"min": "coupon", "of": "Order Completed"})

    assert members == {"u1"}
    assert smallest == {"u1": '"Vip"'}


def test_numeric_text_value_is_read_as_a_number(people: Warehouse) -> None:
    """`value: "100"` on a number column compares as 100."""
    members = people.members({"trait": "lifetime_value", "op": ">", "value": "100"})

    assert members == {"u1", "u4"}


def test_a_number_value_on_a_text_column_compares_as_text(
    warehouse: Warehouse,
) -> None:
    """`value: 10115` on a text column matches the text '10115'."""
    warehouse.user("u1", country="10115")
    warehouse.user("u2", country="10116")

    members = warehouse.members({"trait": "country", "op": "=", "value": 10115})

    assert members == {"u1"}


def test_values_are_bound_not_pasted(warehouse: Warehouse) -> None:
    """A quote in a value is data: it matches itself and is absent from the SQL."""
    sneaky = "x' OR '1'='1"
    warehouse.user("u1", plan=sneaky)
    warehouse.user("u2", plan="free")
    statement = compile_audience(
        parse_condition({"trait": "plan", "op": "=", "value": sneaky}),
        warehouse.layout,
        warehouse.engine,
        T,
    )

    members = warehouse.members({"trait": "plan", "op": "=", "value": sneaky})
    sql = str(statement.compile(dialect=warehouse.engine.dialect))

    assert members == {"u1"}
    assert sneaky not in sql


def test_trait_ids_are_trimmed_and_blank_ids_dropped(warehouse: Warehouse) -> None:
    """`users.id` is trimmed; a blank id is nobody."""
    warehouse.user(" u1 ", plan="vip")
    warehouse.user("  ", plan="vip")

    members = warehouse.members({"trait": "plan", "op": "=", "value": "vip"})

    assert members == {"u1"}


# ---------------------------------------------------------------------------
# performed and not_performed
# ---------------------------------------------------------------------------


def test_performed_within_means_at_least_once(warehouse: Warehouse) -> None:
    """One order in the last 30 days is enough; an older one is not."""
    warehouse.track("Order Completed", "u1", T - 3 * DAY)
    warehouse.track("Order Completed", "u2", T - 31 * DAY)

    members = warehouse.members({"performed": "Order Completed", "within": "30d"})

    assert members == {"u1"}


def test_performed_without_a_window_counts_all_time(warehouse: Warehouse) -> None:
    """No window: every event up to now counts."""
    warehouse.track("Order Completed", "u1", T - 300 * DAY)

    members = warehouse.members({"performed": "Order Completed"})

    assert members == {"u1"}


@pytest.mark.parametrize(
    ("now", "member"),
    [
        (T - SECOND, False),
        (T, True),
        (T + 30 * DAY - SECOND, True),
        (T + 30 * DAY, False),
        (T + 30 * DAY + SECOND, False),
    ],
)
def test_within_window_moves_with_now(
    warehouse: Warehouse, now: datetime, member: bool
) -> None:
    """An order at T makes a member for now in [T, T+30d), never before it happened."""
    warehouse.track("Order Completed", "u1", T)

    members = warehouse.members(
        {"performed": "Order Completed", "within": "30d"}, now=now
    )

    assert members == ({"u1"} if member else set())


@pytest.mark.parametrize(
    ("within", "age", "member"),
    [
        ("12h", timedelta(hours=12) - SECOND, True),
        ("12h", timedelta(hours=12), False),
        ("90m", timedelta(minutes=90) - SECOND, True),
        ("90m", timedelta(minutes=90), False),
        ("1d12h", timedelta(hours=36) - SECOND, True),
    ],
)
def test_within_takes_hours_and_minutes(
    warehouse: Warehouse, within: str, age: timedelta, member: bool
) -> None:
    """`12h` and `90m` windows end exactly at their length."""
    warehouse.track("Order Completed", "u1", T - age)

    members = warehouse.members({"performed": "Order Completed", "within": within})

    assert members == ({"u1"} if member else set())


def test_within_bounds_with_fractions_of_a_second(warehouse: Warehouse) -> None:
    """A `now` between whole seconds keeps exactly the events the exact bound keeps."""
    warehouse.track("Order Completed", "u1", T)
    half = timedelta(milliseconds=500)
    condition = {"performed": "Order Completed", "within": "30d"}

    inside = warehouse.members(condition, now=T + 30 * DAY - half)
    outside = warehouse.members(condition, now=T + 30 * DAY + half)
    before = warehouse.members(condition, now=T - half)

    assert inside == {"u1"}
    assert outside == set()
    assert before == set()


def test_between_includes_its_start_and_excludes_its_end(
    warehouse: Warehouse,
) -> None:
    """`between: [start, end]` keeps start <= timestamp < end."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    end = datetime(2026, 2, 1, tzinfo=UTC)
    warehouse.track("Product Viewed", "at_start", start)
    warehouse.track("Product Viewed", "before_start", start - SECOND)
    warehouse.track("Product Viewed", "before_end", end - SECOND)
    warehouse.track("Product Viewed", "at_end", end)

    members = warehouse.members(
        {"performed": "Product Viewed", "between": ["2026-01-01", "2026-02-01"]}
    )

    assert members == {"at_start", "before_end"}


def test_between_with_fractional_bounds(warehouse: Warehouse) -> None:
    """A start half a second after an event excludes it; an end after it keeps it."""
    warehouse.track("Product Viewed", "u1", T)

    late_start = warehouse.members(
        {
            "performed": "Product Viewed",
            "between": ["2026-03-01T12:00:00.5Z", "2026-03-02"],
        }
    )
    early_end = warehouse.members(
        {
            "performed": "Product Viewed",
            "between": ["2026-02-28", "2026-03-01T12:00:00.5Z"],
        }
    )

    assert late_start == set()
    assert early_end == {"u1"}


def test_no_event_after_now_counts(warehouse: Warehouse) -> None:
    """A run at a past now sees the warehouse as it was then."""
    warehouse.track("Order Completed", "u1", T + DAY)

    members = warehouse.members(
        {"performed": "Order Completed", "between": ["2026-01-01", "2027-01-01"]}
    )

    assert members == set()


def test_at_least_counts_events_in_the_window(warehouse: Warehouse) -> None:
    """at_least: 3 needs three events inside the window."""
    for days in (1, 2, 3):
        warehouse.track("Order Completed", "three", T - days * DAY)
    for days in (1, 2, 100):
        warehouse.track("Order Completed", "two_recent", T - days * DAY)

    members = warehouse.members(
        {"performed": "Order Completed", "at_least": 3, "within": "90d"}
    )

    assert members == {"three"}


def test_at_most_includes_users_who_never_did_it(warehouse: Warehouse) -> None:
    """at_most: 1 keeps users with 0 or 1 events, from users and from any event."""
    warehouse.user("known_idle")
    warehouse.track("Application Opened", "once", T - DAY)
    for days in (1, 2):
        warehouse.track("Application Opened", "twice", T - days * DAY)
    warehouse.track("Product Viewed", "other_event_only", T - DAY)
    warehouse.track("Application Opened", "old_only", T - 30 * DAY)

    members = warehouse.members(
        {"performed": "Application Opened", "at_most": 1, "within": "7d"}
    )

    assert members == {"known_idle", "once", "other_event_only", "old_only"}


def test_exactly_counts_exactly(warehouse: Warehouse) -> None:
    """exactly: 2 keeps users with two events, not one or three."""
    for user, times in (("one", 1), ("two", 2), ("three", 3)):
        for i in range(times):
            warehouse.track("Product Viewed", user, T - i * DAY)

    members = warehouse.members(
        {"performed": "Product Viewed", "exactly": 2, "within": "30d"}
    )

    assert members == {"two"}


def test_exactly_zero_is_the_universe_without_the_event(
    warehouse: Warehouse,
) -> None:
    """exactly: 0 matches users who did not do it, like not_performed."""
    warehouse.user("idle")
    warehouse.track("Product Viewed", "viewer")

    members = warehouse.members({"performed": "Product Viewed", "exactly": 0})

    assert members == {"idle"}


def test_not_performed_takes_the_universe(warehouse: Warehouse) -> None:
    """Users of `users` and of any event, less those with the event in the window."""
    warehouse.user("known_idle")
    warehouse.track("Application Opened", "recent", T - DAY)
    warehouse.track("Application Opened", "lapsed", T - 20 * DAY)
    warehouse.track("Order Completed", "buyer_only", T - DAY)
    warehouse.track("Order Completed", None, T, anonymous_id="stranger")

    members = warehouse.members(
        {"not_performed": "Application Opened", "within": "14d"}
    )

    assert members == {"known_idle", "lapsed", "buyer_only"}


def test_where_filters_the_events_counted(warehouse: Warehouse) -> None:
    """Only orders over 50 count towards at_least: 2."""
    warehouse.track("Order Completed", "big", T - DAY, revenue=80.0)
    warehouse.track("Order Completed", "big", T - 2 * DAY, revenue=60.0)
    warehouse.track("Order Completed", "mixed", T - DAY, revenue=80.0)
    warehouse.track("Order Completed", "mixed", T - 2 * DAY, revenue=20.0)

    members = warehouse.members(
        {
            "performed": "Order Completed",
            "at_least": 2,
            "where": [{"property": "revenue", "op": ">", "value": 50}],
        }
    )

    assert members == {"big"}


def test_where_filters_all_hold(warehouse: Warehouse) -> None:
    """Several filters in one where all apply: in, not_exists and >=."""
    warehouse.track("Order Completed", "u1", currency="EUR", products=2)
    warehouse.track("Order Completed", "u2", currency="EUR", products=2, coupon="X")
    warehouse.track("Order Completed", "u3", currency="GBP", products=2)
    warehouse.track("Order Completed", "u4", currency="USD", products=1)

    members = warehouse.members(
        {
            "performed": "Order Completed",
            "where": [
                {"property": "currency", "op": "in", "value": ["EUR", "USD"]},
                {"property": "coupon", "op": "not_exists"},
                {"property": "products", "op": ">=", "value": 2},
            ],
        }
    )

    assert members == {"u1"}


def test_not_performed_with_where_ignores_other_events(
    warehouse: Warehouse,
) -> None:
    """not_performed with a filter: only events that pass the filter exclude."""
    warehouse.track("Order Completed", "coupon_user", coupon="SPRING15")
    warehouse.track("Order Completed", "full_price")

    members = warehouse.members(
        {
            "not_performed": "Order Completed",
            "where": [{"property": "coupon", "op": "exists"}],
        }
    )

    assert members == {"full_price"}


# ---------------------------------------------------------------------------
# all, any, not
# ---------------------------------------------------------------------------


def test_all_intersects(warehouse: Warehouse) -> None:
    """all: users passing every condition."""
    warehouse.user("u1", plan="vip")
    warehouse.user("u2", plan="vip")
    warehouse.user("u3", plan="free")
    warehouse.track("Order Completed", "u1")
    warehouse.track("Order Completed", "u3")

    members = warehouse.members(
        {
            "all": [
                {"trait": "plan", "op": "=", "value": "vip"},
                {"performed": "Order Completed"},
            ]
        }
    )

    assert members == {"u1"}


def test_any_unites(warehouse: Warehouse) -> None:
    """any: users passing at least one condition."""
    warehouse.user("u1", plan="vip")
    warehouse.user("u2", plan="free")
    warehouse.track("Order Completed", "u3")

    members = warehouse.members(
        {
            "any": [
                {"trait": "plan", "op": "=", "value": "vip"},
                {"performed": "Order Completed"},
            ]
        }
    )

    assert members == {"u1", "u3"}


def test_not_complements_within_the_universe(warehouse: Warehouse) -> None:
    """not: everyone in users or in events who does not pass; nulls included."""
    warehouse.user("u1", plan="vip")
    warehouse.user("u2", plan="free")
    warehouse.user("u3")
    warehouse.track("Application Opened", "u4")

    members = warehouse.members({"not": {"trait": "plan", "op": "=", "value": "vip"}})

    assert members == {"u2", "u3", "u4"}


def test_nested_negations_and_unions(warehouse: Warehouse) -> None:
    """not of not, inside all and any, gives back the inner condition."""
    warehouse.user("u1", plan="vip")
    warehouse.user("u2", plan="free")
    warehouse.track("Order Completed", "u2", T - DAY)
    warehouse.track("Order Completed", "u3", T - 60 * DAY)

    members = warehouse.members(
        {
            "all": [
                {"not": {"not": {"any": [{"trait": "plan", "op": "exists"}]}}},
                {"not": {"performed": "Order Completed", "at_most": 0}},
                {"any": [{"performed": "Order Completed", "within": "30d"}]},
            ]
        }
    )

    assert members == {"u2"}


# ---------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------


def test_anonymous_events_count_for_the_identified_user(
    warehouse: Warehouse,
) -> None:
    """An event with no user id counts for the user its device was identified as."""
    warehouse.identify("phone-1", "u1", T - 5 * DAY)
    warehouse.track("Order Completed", None, T - 10 * DAY, anonymous_id="phone-1")
    warehouse.track("Order Completed", "", T - 10 * DAY, anonymous_id="phone-1")

    members = warehouse.members(
        {"performed": "Order Completed", "at_least": 2, "within": "30d"}
    )

    assert members == {"u1"}


def test_events_that_never_get_a_user_id_are_ignored(warehouse: Warehouse) -> None:
    """Anonymous events of a device never identified match nobody, not even in not."""
    warehouse.track("Order Completed", None, T, anonymous_id="stranger")
    warehouse.track("Order Completed", "  ", T, anonymous_id="stranger")
    warehouse.identify("stranger", "   ")
    warehouse.user("u1")

    performed = warehouse.members({"performed": "Order Completed"})
    negated = warehouse.members({"not": {"performed": "Order Completed"}})

    assert performed == set()
    assert negated == {"u1"}


def test_user_ids_are_trimmed(warehouse: Warehouse) -> None:
    """Padded user ids on events and identifies count for the trimmed id."""
    warehouse.track("Order Completed", " u1", T - DAY)
    warehouse.track("Order Completed", "u1 ", T - 2 * DAY)
    warehouse.identify("tablet", " u1 ")
    warehouse.track("Order Completed", None, T - 3 * DAY, anonymous_id="tablet")

    members = warehouse.members({"performed": "Order Completed", "exactly": 3})

    assert members == {"u1"}


def test_an_own_user_id_wins_over_identifies(warehouse: Warehouse) -> None:
    """An event with its own user id keeps it, whatever its device is linked to."""
    warehouse.identify("shared", "u2")
    warehouse.track("Order Completed", "u1", anonymous_id="shared")

    members = warehouse.members({"performed": "Order Completed"})

    assert members == {"u1"}


def test_a_device_linked_to_several_users_goes_to_the_smallest_id(
    warehouse: Warehouse,
) -> None:
    """Ties in identifies resolve to the smallest trimmed user id, in byte order."""
    warehouse.identify("family-ipad", "bob", T - 2 * DAY)
    warehouse.identify("family-ipad", "Zoe", T - DAY)
    warehouse.identify("family-ipad", "", T)
    warehouse.track("Order Completed", None, T, anonymous_id="family-ipad")

    members = warehouse.members({"performed": "Order Completed"})

    assert members == {"Zoe"}


# ---------------------------------------------------------------------------
# Timestamps and layout
# ---------------------------------------------------------------------------


def test_text_timestamps_compare_on_every_database(db: Database) -> None:
    """Timestamps kept as 'YYYY-MM-DD HH:MM:SS' text work on each database."""
    warehouse = Warehouse(db, time_type=Text())
    warehouse.track("Order Completed", "u1", T)
    warehouse.track("Order Completed", "u2", T - 30 * DAY)

    now_members = warehouse.members({"performed": "Order Completed", "within": "30d"})
    later = warehouse.members(
        {"performed": "Order Completed", "within": "30d"}, now=T + 30 * DAY
    )

    assert now_members == {"u1"}
    assert later == set()


@pytest.mark.parametrize("time_zone", [True, False])
def test_timestamps_compare_in_utc_whatever_the_session_time_zone(
    time_zone: bool,
) -> None:
    """On PostgreSQL in New York time, naive and aware columns both compare in UTC."""
    with postgres_schema(timezone="America/New_York") as (engine, schema):
        database = Database("postgres", engine, schema, DateTime(timezone=time_zone))
        warehouse = Warehouse(database)
        warehouse.track("Order Completed", "u1", T)

        at_t = warehouse.members(
            {"performed": "Order Completed", "within": "1h"}, now=T
        )
        hour_later = warehouse.members(
            {"performed": "Order Completed", "within": "1h"}, now=T + timedelta(hours=1)
        )

    assert at_t == {"u1"}
    assert hour_later == set()


def test_schema_and_table_names_come_from_the_layout(db: Database) -> None:
    """A layout with a schema and other table names is followed everywhere."""
    layout = EventLayout.model_validate(
        {
            "schema": db.schema,
            "tracks": "all_tracks",
            "identifies": "all_identifies",
            "users": "people",
        }
    )
    warehouse = Warehouse(db, layout=layout)
    warehouse.user("u1", plan="vip")
    warehouse.identify("phone", "u2")
    warehouse.track("Order Completed", None, anonymous_id="phone")

    members = warehouse.members(
        {
            "any": [
                {"not": {"not_performed": "Order Completed"}},
                {"trait": "plan", "op": "=", "value": "vip"},
            ]
        }
    )

    assert members == {"u1", "u2"}


# ---------------------------------------------------------------------------
# Computed traits
# ---------------------------------------------------------------------------


def test_count_counts_events_in_the_window(warehouse: Warehouse) -> None:
    """count: events per user in the window; users without any get no row."""
    for days in (1, 2, 3):
        warehouse.track("Order Completed", "u1", T - days * DAY)
    warehouse.track("Order Completed", "u2", T - 100 * DAY)
    warehouse.user("u3")

    values = warehouse.values({"count": "Order Completed", "within": "90d"})

    assert values == {"u1": "3"}


def test_sum_adds_a_property_of_filtered_events(warehouse: Warehouse) -> None:
    """sum with where: only matching events with the property set add up."""
    warehouse.track("Order Completed", "u1", T - DAY, revenue=10.5, currency="USD")
    warehouse.track("Order Completed", "u1", T - DAY, revenue=20.25, currency="USD")
    warehouse.track("Order Completed", "u1", T - DAY, revenue=99.0, currency="EUR")
    warehouse.track("Order Completed", "u1", T - DAY, currency="USD")
    warehouse.track("Order Completed", "u2", T - DAY, currency="USD")

    values = warehouse.values(
        {
            "sum": "revenue",
            "of": "Order Completed",
            "within": "180d",
            "where": [{"property": "currency", "op": "=", "value": "USD"}],
        }
    )

    assert values == {"u1": "30.75"}


def test_average_of_a_property(warehouse: Warehouse) -> None:
    """average over the events that have the property."""
    for revenue in (10.0, 20.0, 45.0):
        warehouse.track("Order Completed", "u1", revenue=revenue)
    warehouse.track("Order Completed", "u1")

    values = warehouse.values({"average": "revenue", "of": "Order Completed"})

    assert values == {"u1": "25.0"}


def test_average_of_integers_is_the_same_float_everywhere(
    warehouse: Warehouse,
) -> None:
    """average of an integer column is a double on every database."""
    for products in (1, 2, 2):
        warehouse.track("Order Completed", "u1", products=products)

    values = warehouse.values({"average": "products", "of": "Order Completed"})

    assert values == {"u1": "1.6666666666666667"}


@pytest.mark.parametrize(("kind", "expected"), [("min", "5.5"), ("max", "40.0")])
def test_min_and_max_of_a_number(
    warehouse: Warehouse, kind: str, expected: str
) -> None:
    """min and max of a number property."""
    for price in (12.0, 5.5, 40.0):
        warehouse.track("Product Viewed", "u1", price=price)

    values = warehouse.values({kind: "price", "of": "Product Viewed"})

    assert values == {"u1": expected}


@pytest.mark.parametrize(("kind", "expected"), [("min", '"Zen"'), ("max", '"banana"')])
def test_min_and_max_of_text_in_byte_order(
    warehouse: Warehouse, kind: str, expected: str
) -> None:
    """min and max of text use byte order on every database."""
    for category in ("apple", "Zen", "banana"):
        warehouse.track("Product Viewed", "u1", category=category)

    values = warehouse.values({kind: "category", "of": "Product Viewed"})

    assert values == {"u1": expected}


@pytest.mark.parametrize(
    ("kind", "expected"), [("first", '"Shoes"'), ("last", '"Home"')]
)
def test_first_and_last_take_the_earliest_and_latest_event(
    warehouse: Warehouse, kind: str, expected: str
) -> None:
    """first/last: the property of the earliest/latest event that has it."""
    warehouse.track("Product Viewed", "u1", T - 3 * DAY)
    warehouse.track("Product Viewed", "u1", T - 2 * DAY, category="Shoes")
    warehouse.track("Product Viewed", "u1", T - 1 * DAY, category="Beauty")
    warehouse.track("Product Viewed", "u1", T - 1 * SECOND, category="Home")
    warehouse.track("Product Viewed", "u1", T)

    values = warehouse.values({kind: "category", "of": "Product Viewed"})

    assert values == {"u1": expected}


@pytest.mark.parametrize("kind", ["first", "last"])
def test_first_and_last_break_ties_by_the_smallest_value(
    warehouse: Warehouse, kind: str
) -> None:
    """Two events at the same second: the smaller value wins."""
    warehouse.track("Product Viewed", "u1", T, category="Shoes")
    warehouse.track("Product Viewed", "u1", T, category="Home")

    values = warehouse.values({kind: "category", "of": "Product Viewed"})

    assert values == {"u1": '"Home"'}


def test_most_frequent_breaks_ties_by_the_smallest_value(
    warehouse: Warehouse,
) -> None:
    """most_frequent: the commonest value in the window; ties go to the smallest."""
    for category in ("Shoes", "Home", "Shoes", "Home", "Apparel"):
        warehouse.track("Product Viewed", "u1", T - DAY, category=category)
    for category in ("Home", "Shoes", "Shoes"):
        warehouse.track("Product Viewed", "u2", T - DAY, category=category)
    for category in ("Home", "Home", "Home"):
        warehouse.track("Product Viewed", "u2", T - 40 * DAY, category=category)

    values = warehouse.values(
        {"most_frequent": "category", "of": "Product Viewed", "within": "30d"}
    )

    assert values == {"u1": '"Home"', "u2": '"Shoes"'}


def test_distinct_count_counts_different_values(warehouse: Warehouse) -> None:
    """distinct_count: different non-null values of a property."""
    for product in ("p1", "p2", "p1", None):
        warehouse.track("Product Viewed", "u1", product_id=product)
    warehouse.track("Product Viewed", "u2")

    values = warehouse.values({"distinct_count": "product_id", "of": "Product Viewed"})

    assert values == {"u1": "2"}


def test_a_user_whose_events_left_the_window_gets_no_value(
    warehouse: Warehouse,
) -> None:
    """Without events in the window a user has no row, so the sync sends null."""
    warehouse.track("Order Completed", "u1", T - 10 * DAY, revenue=5.0)

    before = warehouse.values(
        {"sum": "revenue", "of": "Order Completed", "within": "30d"}
    )
    after = warehouse.values(
        {"sum": "revenue", "of": "Order Completed", "within": "30d"}, now=T + 21 * DAY
    )

    assert before == {"u1": "5.0"}
    assert after == {}


def test_computed_traits_merge_anonymous_events(warehouse: Warehouse) -> None:
    """A trait counts anonymous events of an identified device for its user."""
    warehouse.identify("phone", "u1")
    warehouse.track("Order Completed", None, anonymous_id="phone", revenue=4.0)
    warehouse.track("Order Completed", "u1", revenue=6.0)
    warehouse.track("Order Completed", None, anonymous_id="stranger", revenue=50.0)

    values = warehouse.values({"sum": "revenue", "of": "Order Completed"})

    assert values == {"u1": "10.0"}


def test_a_trait_of_the_timestamp_itself(warehouse: Warehouse) -> None:
    """`max: timestamp` gives the latest event time."""
    warehouse.track("Application Opened", "u1", T - DAY)
    warehouse.track("Application Opened", "u1", T - 2 * DAY)

    values = warehouse.values({"max": "timestamp", "of": "Application Opened"})

    assert values["u1"].strip('"')[:19].replace("T", " ") == "2026-02-28 12:00:00"


# ---------------------------------------------------------------------------
# Errors that need the database
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("declaration", "kind", "message"),
    [
        (
            {
                "all": [
                    {"trait": "plan", "op": "exists"},
                    {"performed": "Order Complete"},
                ]
            },
            "condition",
            "condition.all[1].performed: no table order_complete for event "
            "'Order Complete'",
        ),
        (
            {
                "not_performed": "Refund Issued",
                "where": [{"property": "amount", "op": ">", "value": 1}],
            },
            "condition",
            "condition.not_performed: no table refund_issued for event 'Refund Issued'",
        ),
        (
            {
                "performed": "Order Completed",
                "where": [{"property": "revnue", "op": ">", "value": 1}],
            },
            "condition",
            "condition.where[0].property: order_completed has no column 'revnue' "
            "(did you mean 'revenue'?)",
        ),
        (
            {"any": [{"not": {"trait": "plna", "op": "exists"}}]},
            "condition",
            "condition.any[0].not.trait: users has no column 'plna' "
            "(did you mean 'plan'?)",
        ),
        (
            {"trait": "lifetime_value", "op": "contains", "value": "1"},
            "condition",
            "condition.op: contains needs a text column, and 'lifetime_value' "
            "holds numbers",
        ),
        (
            {"trait": "lifetime_value", "op": ">", "value": "lots"},
            "condition",
            "condition.value: 'lots' is not a number, and 'lifetime_value' "
            "holds numbers",
        ),
        (
            {"trait": "lifetime_value", "op": "in", "value": [1, "x"]},
            "condition",
            "condition.value[1]: 'x' is not a number, and 'lifetime_value' "
            "holds numbers",
        ),
        (
            {"trait": "email_opt_in", "op": "=", "value": "yes"},
            "condition",
            "condition.value: 'yes' is not true or false, and 'email_opt_in' "
            "holds true or false",
        ),
        (
            {"sum": "currency", "of": "Order Completed"},
            "compute",
            "compute.sum: sum needs a number column, and 'currency' holds text",
        ),
        (
            {"average": "price", "of": "Product Viewd"},
            "compute",
            "compute.of: no table product_viewd for event 'Product Viewd'",
        ),
        (
            {"count": "Signed Up"},
            "compute",
            "compute.count: no table signed_up for event 'Signed Up'",
        ),
        (
            {"first": "colour", "of": "Product Viewed"},
            "compute",
            "compute.first: product_viewed has no column 'colour'",
        ),
    ],
)
def test_check_declaration_names_the_field_at_fault(
    warehouse: Warehouse, declaration: dict[str, Any], kind: str, message: str
) -> None:
    """Unknown tables and columns and misfit values are errors with their path."""
    with pytest.raises(DeclarationError) as caught:
        warehouse.check(declaration, kind)

    assert str(caught.value) == message


def test_compiling_raises_the_same_errors(warehouse: Warehouse) -> None:
    """compile_audience checks names too, before any SQL runs."""
    condition = parse_condition({"performed": "Order Complete"})

    with pytest.raises(DeclarationError) as caught:
        compile_audience(condition, warehouse.layout, warehouse.engine, T)

    assert str(caught.value).startswith("condition.performed: no table")


def test_a_negation_needs_the_users_table(db: Database) -> None:
    """not without a users table names the missing table."""
    warehouse = Warehouse(db, layout=EventLayout(users="nobody"))
    with warehouse.engine.begin() as connection:
        connection.execute(text("DROP TABLE nobody"))

    with pytest.raises(DeclarationError) as caught:
        warehouse.check({"not": {"performed": "Order Completed"}})

    assert str(caught.value) == (
        "condition.not: no table nobody (the users a condition can match)"
    )


def test_events_need_the_identifies_table(db: Database) -> None:
    """performed without identifies names the missing table."""
    warehouse = Warehouse(db, layout=EventLayout(identifies="links"))
    with warehouse.engine.begin() as connection:
        connection.execute(text("DROP TABLE links"))

    with pytest.raises(DeclarationError) as caught:
        warehouse.check({"performed": "Order Completed"})

    assert str(caught.value) == (
        "condition: no table links (needed to link anonymous events to users)"
    )


def test_an_event_table_needs_a_usable_timestamp(db: Database) -> None:
    """A timestamp column of numbers is refused with the table's name."""
    warehouse = Warehouse(db, time_type=Integer())

    with pytest.raises(DeclarationError) as caught:
        warehouse.check({"performed": "Order Completed"})

    assert str(caught.value) == (
        "condition.performed: order_completed.timestamp holds numbers; it must be "
        "a timestamp or 'YYYY-MM-DD HH:MM:SS' text"
    )


def test_check_declaration_accepts_names_that_exist(warehouse: Warehouse) -> None:
    """Every table and column named exists: no error."""
    condition = {
        "all": [
            {"not": {"trait": "plan", "op": "in", "value": ["vip", 1]}},
            {
                "performed": "Order Completed",
                "at_most": 2,
                "where": [{"property": "revenue", "op": "<", "value": "10.5"}],
            },
        ]
    }

    warehouse.check(condition)
    warehouse.check({"most_frequent": "category", "of": "Product Viewed"}, "compute")


def test_a_naive_now_is_refused(warehouse: Warehouse) -> None:
    """now must be timezone-aware."""
    condition = parse_condition({"performed": "Order Completed"})

    with pytest.raises(ValueError, match="timezone-aware"):
        compile_audience(
            condition, warehouse.layout, warehouse.engine, datetime(2026, 1, 1)
        )


# ---------------------------------------------------------------------------
# explain
# ---------------------------------------------------------------------------


def test_explain_shows_the_bound_values(warehouse: Warehouse) -> None:
    """explain renders the SQL with the window bounds and values in place."""
    statement = compile_audience(
        parse_condition(
            {
                "all": [
                    {"performed": "Order Completed", "within": "30d"},
                    {"trait": "plan", "op": "in", "value": ["vip", "gold"]},
                ]
            }
        ),
        warehouse.layout,
        warehouse.engine,
        T,
    )

    sql = explain(statement, warehouse.engine.dialect)

    assert "2026-01-30 12:00:00" in sql
    assert "'vip'" in sql
    assert "'gold'" in sql
    assert "order_completed" in sql


def test_explain_lists_values_it_cannot_write_in_place() -> None:
    """A value with no literal form is listed after the statement instead."""
    statement = select(literal_column("1")).where(
        bindparam("shape", object(), PickleType()) != None  # noqa: E711
    )

    sql = explain(statement, sqlite.dialect())

    assert sql.splitlines()[-1].startswith("-- shape = <object object at")


# ---------------------------------------------------------------------------
# The demo warehouse
# ---------------------------------------------------------------------------

DEMO_ANCHOR = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="session")
def demo_warehouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real demo warehouse, built once."""
    path = tmp_path_factory.mktemp("declarations-demo") / "w.db"
    build_demo_warehouse(path, anchor=DEMO_ANCHOR)
    return path


def _ordered_last_30_days(path: Path, now: datetime) -> set[str]:
    """The same audience, computed in plain Python from the rows."""
    connection = sqlite3.connect(path)
    try:
        links = connection.execute(
            "SELECT anonymous_id, user_id FROM identifies"
        ).fetchall()
        orders = connection.execute(
            "SELECT user_id, anonymous_id, timestamp FROM order_completed"
        ).fetchall()
    finally:
        connection.close()

    owner: dict[str, str] = {}
    for anonymous_id, user_id in links:
        cleaned = (user_id or "").strip()
        if anonymous_id is not None and cleaned:
            owner[anonymous_id] = min(owner.get(anonymous_id, cleaned), cleaned)

    members = set()
    for user_id, anonymous_id, stamp in orders:
        moment = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
        user = (user_id or "").strip() or owner.get(anonymous_id)
        if user and now - timedelta(days=30) < moment <= now:
            members.add(user)
    return members


def test_demo_orders_in_the_last_30_days_match_plain_python(
    demo_warehouse: Path,
) -> None:
    """On the demo warehouse, the compiled audience equals a Python computation."""
    engine = create_engine(f"sqlite:///{demo_warehouse}")
    now = DEMO_ANCHOR - timedelta(hours=5)
    statement = compile_audience(
        parse_condition({"performed": "Order Completed", "within": "30d"}),
        EventLayout(),
        engine,
        now,
    )

    with engine.connect() as connection:
        members = {row.user_id for row in connection.execute(statement)}
    engine.dispose()
    expected = _ordered_last_30_days(demo_warehouse, now)

    assert members == expected
    assert len(members) > 100

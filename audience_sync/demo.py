"""Deterministic demo warehouse: a SQLite file laid out like Segment's warehouses.

A new user gets real-looking data to sync with no set-up: about 5,000 users and
150,000 events over the 90 days before an anchor time, with power users, churners,
new sign-ups, anonymous visitors and the small data-quality warts real warehouses
have. The same seed and anchor always give the same rows in the same order.
"""

import os
import random
import sqlite3
import tempfile
from datetime import UTC, datetime
from itertools import accumulate
from pathlib import Path
from typing import NamedTuple

DEFAULT_SEED: int = 7

WINDOW_DAYS = 90
USER_COUNT = 5_000
ANONYMOUS_VISITORS = 2_500
DAY = 86_400
HOUR = 3_600

Value = str | int | float | None
Row = tuple[Value, ...]

APPLICATION_OPENED = "Application Opened"
PRODUCT_VIEWED = "Product Viewed"
PRODUCT_ADDED = "Product Added"
CHECKOUT_STARTED = "Checkout Started"
ORDER_COMPLETED = "Order Completed"
SUBSCRIPTION_STARTED = "Subscription Started"

# Property columns of each event's own table; id, user_id, anonymous_id and
# timestamp come first in every one of them.
EVENT_PROPERTIES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    (APPLICATION_OPENED, (("version", "TEXT"), ("from_background", "INTEGER"))),
    (
        PRODUCT_VIEWED,
        (
            ("product_id", "TEXT"),
            ("name", "TEXT"),
            ("category", "TEXT"),
            ("price", "REAL"),
        ),
    ),
    (
        PRODUCT_ADDED,
        (
            ("product_id", "TEXT"),
            ("name", "TEXT"),
            ("category", "TEXT"),
            ("price", "REAL"),
            ("quantity", "INTEGER"),
        ),
    ),
    (
        CHECKOUT_STARTED,
        (
            ("order_id", "TEXT"),
            ("value", "REAL"),
            ("currency", "TEXT"),
            ("products", "INTEGER"),
        ),
    ),
    (
        ORDER_COMPLETED,
        (
            ("order_id", "TEXT"),
            ("revenue", "REAL"),
            ("currency", "TEXT"),
            ("products", "INTEGER"),
            ("coupon", "TEXT"),
        ),
    ),
    (SUBSCRIPTION_STARTED, (("plan", "TEXT"), ("billing_period", "TEXT"))),
)

USERS_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "TEXT PRIMARY KEY"),
    ("email", "TEXT"),
    ("name", "TEXT"),
    ("plan", "TEXT"),
    ("country", "TEXT"),
    ("created_at", "TEXT"),
    ("lifetime_value", "REAL"),
    ("email_opt_in", "INTEGER"),
)
IDENTIFIES_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "TEXT PRIMARY KEY"),
    ("anonymous_id", "TEXT"),
    ("user_id", "TEXT"),
    ("timestamp", "TEXT"),
    ("email", "TEXT"),
    ("name", "TEXT"),
    ("plan", "TEXT"),
    ("country", "TEXT"),
)
TRACKS_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "TEXT PRIMARY KEY"),
    ("user_id", "TEXT"),
    ("anonymous_id", "TEXT"),
    ("event", "TEXT"),
    ("event_text", "TEXT"),
    ("timestamp", "TEXT"),
)
EVENT_BASE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "TEXT PRIMARY KEY"),
    ("user_id", "TEXT"),
    ("anonymous_id", "TEXT"),
    ("timestamp", "TEXT"),
)
META_COLUMNS: tuple[tuple[str, str], ...] = (
    ("key", "TEXT PRIMARY KEY"),
    ("value", "TEXT"),
)

# fmt: off
FIRST_NAMES = (
    "Ada", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas",
    "Kira", "Liam", "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq",
    "Uma", "Victor", "Wen", "Ximena", "Yusuf", "Zoe", "Aiko", "Bruno", "Carmen",
    "Diego", "Emma", "Felix", "Hana", "Ivan", "Julia", "Kofi", "Lena", "Mateo",
)
LAST_NAMES = (
    "Adams", "Bauer", "Chen", "Diaz", "Evans", "Fischer", "Garcia", "Haddad", "Ito",
    "Jensen", "Kim", "Lopez", "Muller", "Nguyen", "Okafor", "Patel", "Rossi",
    "Silva", "Tanaka", "Umar", "Vargas", "Weber", "Yilmaz", "Zhang", "Novak",
    "Moreau", "Kowalski", "Andersen", "Costa", "Sato",
)
# Relative activity by UTC hour and by weekday (Monday first): quiet nights,
# busy evenings, a little more shopping at the weekend.
HOUR_WEIGHTS = (
    2, 1, 1, 1, 1, 2, 3, 5, 7, 8, 8, 9,
    10, 9, 9, 9, 10, 11, 13, 14, 14, 12, 8, 4,
)
WEEKDAY_WEIGHTS = (10, 10, 10, 10, 11, 13, 12)
# (country, weight): the store sells mostly in North America and Europe.
COUNTRIES = (
    ("US", 40), ("GB", 12), ("DE", 10), ("FR", 7), ("CA", 7), ("NL", 4), ("ES", 4),
    ("AU", 5), ("BR", 4), ("IN", 4), ("JP", 3),
)
# fmt: on
# (category, lowest price, highest price, product nouns)
CATEGORIES = (
    ("Shoes", 45, 180, ("Runner", "Trail Shoe", "Sneaker", "Boot", "Sandal")),
    ("Apparel", 15, 120, ("Hoodie", "T-Shirt", "Jacket", "Jeans", "Sweater")),
    ("Accessories", 10, 90, ("Cap", "Backpack", "Wallet", "Belt", "Scarf")),
    ("Home", 12, 150, ("Mug", "Lamp", "Blanket", "Vase", "Candle")),
    ("Electronics", 25, 400, ("Headphones", "Speaker", "Charger", "Watch", "Tracker")),
    ("Beauty", 8, 70, ("Serum", "Cleanser", "Lip Balm", "Perfume", "Sunscreen")),
)
ADJECTIVES = ("Classic", "Urban", "Alpine", "Everyday", "Studio", "Coastal", "Nordic")
APP_VERSIONS = ("4.2.0", "4.2.1", "4.3.0", "4.3.2", "4.4.0")
COUPONS = ("WELCOME10", "SPRING15", "FRIENDS20")


class _Persona(NamedTuple):
    """How often a kind of user visits and how readily they buy."""

    name: str
    share: float
    sessions_per_day: float
    min_views: int
    max_views: int
    add_rate: float
    checkout_rate: float
    purchase_rate: float


# The last persona takes whatever users the shares leave over.
PERSONAS: tuple[_Persona, ...] = (
    _Persona("power", 0.05, 0.40, 2, 7, 0.20, 0.70, 0.80),
    _Persona("churner", 0.20, 0.07, 1, 5, 0.13, 0.50, 0.60),
    _Persona("new", 0.10, 0.15, 1, 5, 0.16, 0.55, 0.65),
    _Persona("dormant", 0.05, 0.0, 1, 1, 0.0, 0.0, 0.0),
    _Persona("regular", 0.60, 0.04, 1, 5, 0.13, 0.50, 0.65),
)
VISITOR = _Persona("visitor", 0.0, 0.0, 0, 3, 0.08, 0.0, 0.0)


class _Product(NamedTuple):
    """One catalog item."""

    product_id: str
    name: str
    category: str
    price: float


class _User(NamedTuple):
    """A known user and the traits the users table keeps."""

    user_id: str
    email: str
    name: str
    country: str
    persona: _Persona
    signup: int
    plan: str
    past_value: float
    email_opt_in: int


class _Event(NamedTuple):
    """One track call; `properties` fill the event table's own columns."""

    timestamp: int
    event_id: str
    user_id: str | None
    anonymous_id: str
    name: str
    properties: Row


def build_demo_warehouse(
    path: Path, *, anchor: datetime | None = None, seed: int = DEFAULT_SEED
) -> None:
    """Build the demo warehouse at `path` atomically: a temp file, then os.replace."""
    path = Path(path)
    anchor = _resolve_anchor(anchor)

    # Generate everything before touching the disk, so a bug here leaves nothing.
    tables = _Generator(anchor, seed).generate()
    tables["demo_meta"] = [("anchor", anchor.isoformat()), ("seed", str(seed))]

    # The demo folder is git-ignored, so a fresh clone does not have it yet.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
    )
    os.close(fd)
    temp = Path(temp_name)
    try:
        _write_database(temp, tables)
        # mkstemp makes the file private; a demo warehouse is ordinary data.
        os.chmod(temp, 0o644)
        _fsync_file(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise

    _fsync_directory(path.parent)


def ensure_demo_warehouse(path: Path, *, anchor: datetime | None = None) -> bool:
    """Build the demo warehouse at `path` unless it exists; return True when built."""
    path = Path(path)
    if path.exists():
        return False

    build_demo_warehouse(path, anchor=anchor)
    return True


def demo_anchor(path: Path) -> datetime:
    """Read the UTC anchor time a built warehouse's events end at from demo_meta."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no demo warehouse at {path}")

    # Read-only, so a wrong path never leaves an empty database behind.
    connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        row = connection.execute(
            "SELECT value FROM demo_meta WHERE key = 'anchor'"
        ).fetchone()
    finally:
        connection.close()

    if row is None:
        raise ValueError(f"{path} has no anchor in demo_meta")
    return datetime.fromisoformat(str(row[0])).astimezone(UTC)


def _uuid_text(bits: int) -> str:
    """The 8-4-4-4-12 text form of a 128-bit UUID."""
    digits = f"{bits:032x}"
    return "-".join(
        (digits[:8], digits[8:12], digits[12:16], digits[16:20], digits[20:])
    )


def _resolve_anchor(anchor: datetime | None) -> datetime:
    """Default to the current hour; refuse naive times, which have no meaning here."""
    if anchor is None:
        return datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    if anchor.tzinfo is None or anchor.utcoffset() is None:
        raise ValueError("anchor must be timezone-aware (UTC)")
    return anchor.astimezone(UTC)


def _snake_case(event_name: str) -> str:
    """Table name Segment gives an event: 'Order Completed' -> 'order_completed'."""
    return event_name.strip().lower().replace(" ", "_")


def _table_columns() -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    """Every table of the warehouse with its columns, in creation order."""
    tables = [
        ("demo_meta", META_COLUMNS),
        ("users", USERS_COLUMNS),
        ("identifies", IDENTIFIES_COLUMNS),
        ("tracks", TRACKS_COLUMNS),
    ]
    for event_name, properties in EVENT_PROPERTIES:
        tables.append((_snake_case(event_name), EVENT_BASE_COLUMNS + properties))
    return tables


def _index_statements() -> list[str]:
    """Indexes for the lookups audience queries make, built after the bulk load."""
    statements = [
        "CREATE INDEX tracks_user_id ON tracks (user_id)",
        "CREATE INDEX tracks_anonymous_id ON tracks (anonymous_id)",
        "CREATE INDEX tracks_event_timestamp ON tracks (event, timestamp)",
        "CREATE INDEX identifies_anonymous_id ON identifies (anonymous_id)",
        "CREATE INDEX identifies_user_id ON identifies (user_id)",
    ]
    for event_name, _ in EVENT_PROPERTIES:
        table = _snake_case(event_name)
        statements.append(
            f"CREATE INDEX {table}_user_timestamp ON {table} (user_id, timestamp)"
        )
    return statements


def _write_database(path: Path, tables: dict[str, list[Row]]) -> None:
    """Create the schema and load every table in one transaction."""
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        # The file is private until os.replace, so crash safety comes from the
        # rename and a single fsync rather than from SQLite's journal.
        connection.execute("PRAGMA journal_mode = MEMORY")
        connection.execute("PRAGMA synchronous = OFF")
        connection.execute("BEGIN")

        for name, columns in _table_columns():
            column_sql = ", ".join(f"{column} {kind}" for column, kind in columns)
            connection.execute(f"CREATE TABLE {name} ({column_sql})")
            placeholders = ", ".join("?" for _ in columns)
            connection.executemany(
                f"INSERT INTO {name} VALUES ({placeholders})", tables[name]
            )

        for statement in _index_statements():
            connection.execute(statement)
        connection.execute("COMMIT")
    finally:
        connection.close()


def _fsync_file(path: Path) -> None:
    """Flush a file's contents to disk so the rename never exposes a torn file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(path: Path) -> None:
    """Flush the rename itself; only POSIX can open a directory for this."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Generator:
    """One build's random users, sessions and events, drawn from a single seed."""

    def __init__(self, anchor: datetime, seed: int) -> None:
        # Reproducible demo data, not secrets: a seeded PRNG is exactly right.
        self.rng = random.Random(seed)  # noqa: S311
        # Whole seconds, rounded down, so no event can land after the anchor.
        self.end = int(anchor.replace(microsecond=0).timestamp())
        self.start = self.end - WINDOW_DAYS * DAY
        self.products = self._catalog()
        # Zipf-like popularity, accumulated once because choices() is on a hot path.
        self.product_cum_weights = list(
            accumulate(1.0 / rank for rank in range(1, len(self.products) + 1))
        )
        self.day_prefixes: dict[int, str] = {}
        self.events: list[_Event] = []
        self.identifies: list[Row] = []
        self.user_rows: list[Row] = []

    def generate(self) -> dict[str, list[Row]]:
        """All table rows except demo_meta, each table in a stable order."""
        for user in self._users():
            revenue = self._user_activity(user)
            self.user_rows.append(
                (
                    user.user_id,
                    user.email,
                    user.name,
                    user.plan,
                    user.country,
                    self._format_time(user.signup),
                    round(user.past_value + revenue, 2),
                    user.email_opt_in,
                )
            )

        for _ in range(ANONYMOUS_VISITORS):
            self._visitor_activity()

        self._add_warts()

        self.events.sort(key=lambda event: (event.timestamp, event.event_id))
        self.identifies.sort(key=lambda row: (str(row[3]), str(row[0])))
        return self._rows()

    def _rows(self) -> dict[str, list[Row]]:
        """Split the sorted events into tracks and one table per event."""
        tables: dict[str, list[Row]] = {
            "users": self.user_rows,
            "identifies": self.identifies,
            "tracks": [],
        }
        table_of = {name: _snake_case(name) for name, _ in EVENT_PROPERTIES}
        for table in table_of.values():
            tables[table] = []

        for event in self.events:
            table = table_of[event.name]
            timestamp = self._format_time(event.timestamp)
            tables["tracks"].append(
                (
                    event.event_id,
                    event.user_id,
                    event.anonymous_id,
                    table,
                    event.name,
                    timestamp,
                )
            )
            tables[table].append(
                (
                    event.event_id,
                    event.user_id,
                    event.anonymous_id,
                    timestamp,
                    *event.properties,
                )
            )
        return tables

    def _format_time(self, seconds: int) -> str:
        """Segment-style UTC timestamp text that SQLite's datetime() compares with."""
        # strftime for every one of ~200,000 rows is slow; dates repeat, times don't.
        day, second_of_day = divmod(seconds, DAY)
        prefix = self.day_prefixes.get(day)
        if prefix is None:
            prefix = datetime.fromtimestamp(day * DAY, UTC).strftime("%Y-%m-%d")
            self.day_prefixes[day] = prefix
        hours, rest = divmod(second_of_day, HOUR)
        minutes, secs = divmod(rest, 60)
        return f"{prefix} {hours:02d}:{minutes:02d}:{secs:02d}"

    def _uuid(self) -> str:
        """A random version 4 UUID, drawn from the seeded generator."""
        bits = self.rng.getrandbits(128)
        bits = bits & ~(0xF << 76) | 0x4 << 76
        return _uuid_text(bits & ~(0x3 << 62) | 0x2 << 62)

    def _message_id(self, moment: int) -> str:
        """A time-ordered version 7 UUID for a message sent at `moment`."""
        # Ids that grow with time keep the primary-key inserts sequential,
        # which halves the load time against random ids.
        millis = moment * 1000 + self._between(0, 999)
        bits = millis << 80 | 0x7 << 76 | self.rng.getrandbits(12) << 64
        return _uuid_text(bits | 0x2 << 62 | self.rng.getrandbits(62))

    def _between(self, low: int, high: int) -> int:
        """A uniform integer in [low, high]; randint is too slow for the hot paths."""
        return low + int(self.rng.random() * (high - low + 1))

    def _moment(self, low: int, high: int) -> int:
        """A second in [low, high], likelier at busy hours and on weekends."""
        peak = max(HOUR_WEIGHTS) * max(WEEKDAY_WEIGHTS)
        while True:
            moment = self._between(low, high)
            hour = moment % DAY // HOUR
            # 1 January 1970 was a Thursday, weekday 3 counting from Monday.
            weekday = (moment // DAY + 3) % 7
            weight = HOUR_WEIGHTS[hour] * WEEKDAY_WEIGHTS[weekday]
            if self.rng.random() * peak < weight:
                return moment

    def _catalog(self) -> list[_Product]:
        """A small product catalog; earlier products are the popular ones."""
        products = []
        for category, low, high, nouns in CATEGORIES:
            for noun in nouns:
                for adjective in self.rng.sample(ADJECTIVES, 2):
                    price = self.rng.randint(low, high) - 0.01
                    products.append(
                        _Product("", f"{adjective} {noun}", category, price)
                    )
        self.rng.shuffle(products)
        return [
            product._replace(product_id=f"P{1001 + index}")
            for index, product in enumerate(products)
        ]

    def _users(self) -> list[_User]:
        """Known users with their persona, sign-up time, plan and traits."""
        personas: list[_Persona] = []
        for persona in PERSONAS[:-1]:
            personas += [persona] * round(persona.share * USER_COUNT)
        personas += [PERSONAS[-1]] * (USER_COUNT - len(personas))
        self.rng.shuffle(personas)

        countries = [country for country, _ in COUNTRIES]
        country_weights = [weight for _, weight in COUNTRIES]
        taken_emails: set[str] = set()
        users = []
        for number, persona in enumerate(personas, start=1):
            first = self.rng.choice(FIRST_NAMES)
            last = self.rng.choice(LAST_NAMES)
            email = f"{first}.{last}@example.com".lower()
            suffix = 1
            while email in taken_emails:
                suffix += 1
                email = f"{first}.{last}{suffix}@example.com".lower()
            taken_emails.add(email)

            signup = self._signup(persona)
            users.append(
                _User(
                    user_id=f"u_{number:05d}",
                    email=email,
                    name=f"{first} {last}",
                    country=self.rng.choices(countries, country_weights)[0],
                    persona=persona,
                    signup=signup,
                    plan=self._plan(persona),
                    past_value=self._past_value(persona, signup),
                    email_opt_in=int(self.rng.random() < 0.7),
                )
            )
        return users

    def _signup(self, persona: _Persona) -> int:
        """When a user of this persona signed up; some did inside the window."""
        if persona.name == "new":
            return self._moment(self.end - 21 * DAY, self.end - HOUR)
        if persona.name == "regular" and self.rng.random() < 0.2:
            return self._moment(self.start + 5 * DAY, self.end - 22 * DAY)
        if persona.name == "churner" and self.rng.random() < 0.25:
            return self._moment(self.start + DAY, self.start + 20 * DAY)
        return self.start - self.rng.randint(DAY, 3 * 365 * DAY)

    def _plan(self, persona: _Persona) -> str:
        """Current plan; power users pay far more often, vip stays rare overall."""
        roll = self.rng.random()
        vip, pro = (0.40, 0.45) if persona.name == "power" else (0.03, 0.22)
        if roll < vip:
            return "vip"
        if roll < vip + pro:
            return "pro"
        return "free"

    def _past_value(self, persona: _Persona, signup: int) -> float:
        """Revenue from before the window, which the warehouse only keeps as a trait."""
        if signup >= self.start or persona.name == "new":
            return 0.0
        scale = 900.0 if persona.name == "power" else 80.0
        if self.rng.random() < 0.4 and persona.name != "power":
            return 0.0
        return round(self.rng.expovariate(1.0 / scale), 2)

    def _session_starts(
        self, user: _User, active_from: int, active_to: int
    ) -> list[int]:
        """Session start times spread over the user's active span."""
        persona = user.persona
        span_days = max(active_to - active_from, 0) / DAY
        # Gamma keeps the mean rate but spreads users from barely to very active.
        expected = (
            persona.sessions_per_day * span_days * self.rng.gammavariate(1.5, 1 / 1.5)
        )
        count = int(expected) + int(self.rng.random() < expected - int(expected))
        return [self._moment(active_from, active_to) for _ in range(count)]

    def _user_activity(self, user: _User) -> float:
        """Emit one known user's sessions and identifies; return revenue in window."""
        persona = user.persona
        if persona.name == "dormant":
            return 0.0

        active_from = max(self.start, user.signup)
        active_to = self.end
        starts = []
        if persona.name == "churner":
            # Last seen at least 35 days ago, so they fall out of 30-day audiences.
            churn = self.end - self.rng.randint(35 * DAY, 75 * DAY)
            active_to = max(churn, user.signup + 3 * DAY)
            starts.append(active_to)
        signed_up_in_window = user.signup >= self.start
        if signed_up_in_window:
            starts.append(user.signup)
        starts += self._session_starts(user, active_from, active_to)
        starts.sort()
        if not starts:
            return 0.0

        devices = [self._uuid()]
        if self.rng.random() < 0.25:
            devices.append(self._uuid())

        if signed_up_in_window and self.rng.random() < 0.6:
            self._anonymous_prelude(user, devices[0])

        upgrade_at = self._upgrade_session(user, len(starts), signed_up_in_window)
        plan_now = "free" if upgrade_at is not None else user.plan
        seen_devices: set[str] = set()
        revenue = 0.0
        for index, start in enumerate(starts):
            device = devices[0] if index == 0 else self.rng.choice(devices)
            if device not in seen_devices:
                seen_devices.add(device)
                self._identify(user, device, start, plan_now)

            upgrade = user.plan if index == upgrade_at else None
            session = self._session(
                user.user_id, device, start, persona, upgrade=upgrade
            )
            revenue += self._keep(session)

            # Apps identify again after a purchase changes the plan trait.
            for event in session:
                if event.name == SUBSCRIPTION_STARTED and event.timestamp <= self.end:
                    plan_now = user.plan
                    self._identify(user, device, event.timestamp, plan_now)
        return revenue

    def _upgrade_session(
        self, user: _User, session_count: int, signed_up_in_window: bool
    ) -> int | None:
        """Which session, if any, bought the user's paid plan inside the window."""
        if user.plan == "free":
            return None
        if signed_up_in_window:
            return 0
        if self.rng.random() < 0.12:
            return self.rng.randrange(session_count)
        return None

    def _anonymous_prelude(self, user: _User, device: str) -> None:
        """Browsing before sign-up: user_id NULL, later linked by an identify."""
        low = max(self.start, user.signup - 7 * DAY)
        high = user.signup - 10 * 60
        if low >= high:
            return
        for _ in range(self.rng.randint(1, 3)):
            start = self._moment(low, high)
            self._keep(self._session(None, device, start, user.persona, upgrade=None))

    def _visitor_activity(self) -> None:
        """An anonymous visitor who never signs up, so is never identified."""
        device = self._uuid()
        sessions = 1 + (self.rng.randint(1, 3) if self.rng.random() < 0.3 else 0)
        for _ in range(sessions):
            start = self._moment(self.start, self.end)
            self._keep(self._session(None, device, start, VISITOR, upgrade=None))

    def _identify(self, user: _User, device: str, moment: int, plan: str) -> None:
        """Record that `device` belongs to `user`, with the traits known then."""
        self.identifies.append(
            (
                self._message_id(moment),
                device,
                user.user_id,
                self._format_time(moment),
                user.email,
                user.name,
                plan,
                user.country,
            )
        )

    def _keep(self, session: list[_Event]) -> float:
        """Store the part of a session that happened by the anchor; return revenue."""
        revenue = 0.0
        for event in session:
            if event.timestamp > self.end:
                break
            self.events.append(event)
            if event.name == ORDER_COMPLETED:
                _, order_revenue, *_ = event.properties
                revenue += float(order_revenue or 0.0)
        return revenue

    def _session(
        self,
        user_id: str | None,
        device: str,
        start: int,
        persona: _Persona,
        *,
        upgrade: str | None,
    ) -> list[_Event]:
        """One visit: open the app, browse, maybe fill a basket and buy."""
        rng = self.rng
        moment = start
        events = []

        def emit(at: int, name: str, properties: Row) -> None:
            event_id = self._message_id(at)
            events.append(_Event(at, event_id, user_id, device, name, properties))

        emit(
            moment,
            APPLICATION_OPENED,
            (rng.choice(APP_VERSIONS), int(rng.random() < 0.35)),
        )
        if upgrade is not None:
            moment += self._between(20, 240)
            emit(
                moment,
                SUBSCRIPTION_STARTED,
                (upgrade, rng.choice(("monthly", "annual"))),
            )

        basket: list[tuple[_Product, int]] = []
        view_count = self._between(persona.min_views, persona.max_views)
        viewed = rng.choices(
            self.products, cum_weights=self.product_cum_weights, k=view_count
        )
        for product in viewed:
            moment += self._between(8, 150)
            emit(
                moment,
                PRODUCT_VIEWED,
                (product.product_id, product.name, product.category, product.price),
            )
            if rng.random() < persona.add_rate:
                moment += self._between(5, 60)
                quantity = 1 if rng.random() < 0.85 else 2
                emit(
                    moment,
                    PRODUCT_ADDED,
                    (
                        product.product_id,
                        product.name,
                        product.category,
                        product.price,
                        quantity,
                    ),
                )
                basket.append((product, quantity))

        # Anonymous visitors cannot check out: the store requires an account.
        if not basket or user_id is None or rng.random() >= persona.checkout_rate:
            return events

        order_id = f"ord_{self.rng.getrandbits(48):012x}"
        items = sum(quantity for _, quantity in basket)
        value = round(sum(product.price * quantity for product, quantity in basket), 2)
        moment += self._between(20, 180)
        emit(moment, CHECKOUT_STARTED, (order_id, value, "USD", items))
        if rng.random() >= persona.purchase_rate:
            return events

        coupon = rng.choice(COUPONS) if rng.random() < 0.15 else None
        discount = int(coupon[-2:]) / 100 if coupon else 0.0
        moment += self._between(30, 300)
        emit(
            moment,
            ORDER_COMPLETED,
            (order_id, round(value * (1 - discount), 2), "USD", items, coupon),
        )
        return events

    def _add_warts(self) -> None:
        """Blank and space-padded user ids, as buggy SDKs and backfills leave them."""
        recent = self.end - 30 * DAY
        anonymous_opens = [
            index
            for index, event in enumerate(self.events)
            if event.user_id is None and event.name == APPLICATION_OPENED
        ]
        old_orders = [
            index
            for index, event in enumerate(self.events)
            if event.user_id
            and event.name == ORDER_COMPLETED
            and event.timestamp <= recent
        ]
        recent_orders = [
            index
            for index, event in enumerate(self.events)
            if event.user_id
            and event.name == ORDER_COMPLETED
            and event.timestamp > recent
        ]
        other_known = [
            index
            for index, event in enumerate(self.events)
            if event.user_id and event.name != ORDER_COMPLETED
        ]

        blanks = self.rng.sample(anonymous_opens, 10) + self.rng.sample(old_orders, 4)
        for position, index in enumerate(blanks):
            blank = "" if position % 2 == 0 else "  "
            self.events[index] = self.events[index]._replace(user_id=blank)

        padded = self.rng.sample(recent_orders, 10) + self.rng.sample(other_known, 10)
        for position, index in enumerate(padded):
            user_id = self.events[index].user_id
            spaced = f" {user_id}" if position % 2 == 0 else f"{user_id} "
            self.events[index] = self.events[index]._replace(user_id=spaced)

"""One run end to end on real databases: stage, diff, send to a file, fold acks in."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select

from audience_sync.config import Config, FileDestination, load_config
from audience_sync.runner import RunOptions, RunResult, run_once
from audience_sync.store import snapshot as snapshots
from audience_sync.store.database import open_store
from audience_sync.store.schema import changes, runs
from audience_sync.transports.base import ACKNOWLEDGED, PENDING, Delivery
from tests.conftest import Warehouse, write_config

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def sync(config: Config, **options: Any) -> RunResult:
    options.setdefault("now", NOW)
    return run_once(config, RunOptions(**options))


def sent(config: Config) -> list[dict[str, Any]]:
    """Every message the file transport has written so far, in order."""
    assert isinstance(config.destination, FileDestination)
    path = config.destination.path
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def traits_sent(
    config: Config, skip: int = 0, until: int | None = None
) -> dict[str, Any]:
    """`{user_id: value}` of the messages from index `skip` up to `until`."""
    found = {}
    for message in sent(config)[skip:until]:
        ((_, value),) = message["traits"].items()
        found[message["userId"]] = value
    return found


def current_members(config: Config, key: str, absent: str = "false") -> dict[str, str]:
    engine = open_store(config.store_url.get_secret_value(), read_only=True)
    with engine.connect() as connection:
        rows = snapshots.members(connection, key, None, absent)
    engine.dispose()
    return dict(rows)


def test_first_run_sends_every_member_as_true(
    make_config: Any, warehouse: Warehouse
) -> None:
    """The initial sync of an audience is full: every member gets `true`."""
    warehouse.set_members("Beta Testers", ["u1", "u2", "u3"])
    config = make_config()

    result = sync(config)

    assert result.status == "succeeded"
    assert result.exit_code == 0
    (key,) = result.keys
    assert (key.key, key.full, key.members, key.diff.entered) == (
        "beta_testers",
        True,
        3,
        3,
    )
    assert traits_sent(config) == {"u1": True, "u2": True, "u3": True}
    assert current_members(config, "beta_testers") == {
        "u1": "true",
        "u2": "true",
        "u3": "true",
    }


def test_identify_message_has_the_engage_shape(
    make_config: Any, warehouse: Warehouse
) -> None:
    """Messages carry the trait, the personas context, integrations and a stable id."""
    warehouse.set_members("Beta Testers", ["u1"])
    config = make_config()

    sync(config)
    (message,) = sent(config)

    assert message["type"] == "identify"
    assert message["userId"] == "u1"
    assert message["traits"] == {"beta_testers": True}
    assert message["integrations"] == {"All": False, "Plotline": True}
    assert message["timestamp"] == "2026-03-01T12:00:00.000Z"
    personas = message["context"]["personas"]
    assert personas["computation_class"] == "audience"
    assert personas["computation_key"] == "beta_testers"
    assert len(personas["computation_id"]) == 36
    assert message["context"]["library"]["name"] == "audience-sync"
    assert len(message["messageId"]) == 36


def test_second_run_with_same_data_sends_nothing(
    make_config: Any, warehouse: Warehouse
) -> None:
    """An unchanged audience produces a run with zero changes and no messages."""
    warehouse.set_members("Beta Testers", ["u1", "u2"])
    config = make_config()
    sync(config)

    result = sync(config, now=NOW + timedelta(hours=2))

    (key,) = result.keys
    assert result.status == "succeeded"
    assert key.full is False
    assert (key.members, key.diff.total, key.acknowledged) == (2, 0, 0)
    assert len(sent(config)) == 2


def test_leaving_sends_false_and_reentering_sends_true(
    make_config: Any, warehouse: Warehouse
) -> None:
    """Exits send `false`; a user who comes back gets `true` again."""
    warehouse.set_members("Beta Testers", ["u1", "u2", "u3"])
    config = make_config()
    sync(config)

    warehouse.set_members("Beta Testers", ["u1", "u2"])
    left = sync(config, now=NOW + timedelta(hours=2))
    after_leaving = len(sent(config))
    warehouse.set_members("Beta Testers", ["u1", "u2", "u3", "u4"])
    back = sync(config, now=NOW + timedelta(hours=4))

    assert left.keys[0].diff.exited == 1
    assert traits_sent(config, skip=3, until=after_leaving) == {"u3": False}
    assert back.keys[0].diff.entered == 2
    assert traits_sent(config, skip=after_leaving) == {"u3": True, "u4": True}
    assert set(current_members(config, "beta_testers")) == {"u1", "u2", "u3", "u4"}


def test_user_ids_are_trimmed_blank_skipped_and_duplicates_counted_once(
    make_config: Any, warehouse: Warehouse
) -> None:
    """Blank and null ids are skipped and counted; padded ids trim; case is kept."""
    warehouse.set_members(
        "Beta Testers", ["u1", " u1 ", "U1", None, "", "   ", "u2", "u2", 42]
    )
    config = make_config()

    result = sync(config)

    (key,) = result.keys
    assert key.members == 4
    assert key.skipped == 3
    assert key.duplicates == 2
    assert traits_sent(config) == {"u1": True, "U1": True, "u2": True, "42": True}


def test_trait_values_enter_change_and_leave_as_null(
    make_config: Any, warehouse: Warehouse
) -> None:
    """A computed trait sends new values, changed values, and null when it goes."""
    warehouse.set_values("Lifetime Orders", {"u1": 1, "u2": 5, "u3": "vip", "u4": 2.5})
    config = make_config(audiences=[], traits=["Lifetime Orders"])
    first = sync(config)

    warehouse.set_values(
        "Lifetime Orders", {"u1": 1, "u2": 6, "u4": None, "u5": "gold"}
    )
    second = sync(config, now=NOW + timedelta(hours=2))

    assert first.keys[0].diff.entered == 4
    assert traits_sent(config, until=4) == {"u1": 1, "u2": 5, "u3": "vip", "u4": 2.5}
    assert (second.keys[0].diff.entered, second.keys[0].diff.changed) == (1, 1)
    assert second.keys[0].diff.exited == 2
    assert traits_sent(config, skip=4) == {
        "u2": 6,
        "u3": None,
        "u4": None,
        "u5": "gold",
    }
    assert current_members(config, "lifetime_orders", "null") == {
        "u1": "1",
        "u2": "6",
        "u5": '"gold"',
    }
    assert sent(config)[0]["context"]["personas"]["computation_class"] == "trait"


def test_dry_run_sends_and_records_nothing(
    make_config: Any, warehouse: Warehouse
) -> None:
    """A dry run after a sync reports what it would send, and leaves no trace."""
    warehouse.set_members("Beta Testers", ["u1", "u2"])
    config = make_config()
    sync(config)
    warehouse.set_members("Beta Testers", ["u2", "u3"])

    result = sync(config, now=NOW + timedelta(hours=2), dry_run=True)

    engine = open_store(config.store_url.get_secret_value(), read_only=True)
    with engine.connect() as connection:
        run_count = connection.execute(select(func.count()).select_from(runs)).scalar()
        change_count = connection.execute(
            select(func.count()).select_from(changes)
        ).scalar()
    engine.dispose()
    assert result.run_id is None
    assert (result.keys[0].diff.entered, result.keys[0].diff.exited) == (1, 1)
    assert sorted(row[:2] for row in result.keys[0].preview) == [
        ("u1", "exited"),
        ("u3", "entered"),
    ]
    assert len(sent(config)) == 2
    assert (run_count, change_count) == (1, 2)


def test_dry_run_without_a_store_creates_none(
    tmp_path: Path, warehouse: Warehouse
) -> None:
    """With no store yet, a dry run shows every member as new and creates no file."""
    warehouse.set_members("Beta Testers", ["u1", "u2"])
    config = load_config(
        write_config(tmp_path, f"sqlite:///{tmp_path / 'store.db'}", warehouse)
    )

    result = sync(config, dry_run=True)

    assert result.keys[0].diff.entered == 2
    assert not (tmp_path / "store.db").exists()
    assert sent(config) == []


def test_full_resends_every_member_without_changing_membership(
    make_config: Any, warehouse: Warehouse
) -> None:
    """--full re-sends current values; history still shows the same members."""
    warehouse.set_members("Beta Testers", ["u1", "u2"])
    config = make_config()
    sync(config)

    result = sync(config, now=NOW + timedelta(hours=2), full=True)

    (key,) = result.keys
    assert key.full is True
    assert key.diff.resent == 2
    assert key.acknowledged == 2
    assert traits_sent(config, skip=2) == {"u1": True, "u2": True}
    assert set(current_members(config, "beta_testers")) == {"u1", "u2"}


def test_members_as_of_a_past_run_are_rebuilt_from_history(
    make_config: Any, warehouse: Warehouse
) -> None:
    """The membership as of any past run can be listed after later runs."""
    config = make_config()
    warehouse.set_members("Beta Testers", ["u1", "u2"])
    first = sync(config)
    warehouse.set_members("Beta Testers", ["u2", "u3"])
    second = sync(config, now=NOW + timedelta(hours=2))
    warehouse.set_members("Beta Testers", ["u3"])
    sync(config, now=NOW + timedelta(hours=4))

    engine = open_store(config.store_url.get_secret_value(), read_only=True)
    with engine.connect() as connection:
        as_of_first = snapshots.members(
            connection, "beta_testers", first.run_id, "false"
        )
        as_of_second = snapshots.members(
            connection, "beta_testers", second.run_id, "false"
        )
        now_ = snapshots.members(connection, "beta_testers", None, "false")
        stored_changes = connection.execute(
            select(func.count()).select_from(changes)
        ).scalar()
    engine.dispose()

    assert [u for u, _ in as_of_first] == ["u1", "u2"]
    assert [u for u, _ in as_of_second] == ["u2", "u3"]
    assert [u for u, _ in now_] == ["u3"]
    # Storage grows with changes: 2 entries, then 1 exit + 1 entry, then 1 exit.
    assert stored_changes == 5


def test_a_failing_source_sends_nothing_and_other_audiences_go_ahead(
    tmp_path: Path, store_url: str, warehouse: Warehouse
) -> None:
    """A source error fails its key only; the run is partial with exit code 1."""
    warehouse.set_members("Good", ["u1"])
    path = write_config(
        tmp_path,
        store_url,
        warehouse,
        audiences=["Good"],
        extra=(
            "  - name: Broken\n"
            "    source: warehouse\n"
            "    query: SELECT user_id FROM no_such_table\n"
        ),
    )
    config = load_config(path)

    result = sync(config)

    by_key = {k.key: k for k in result.keys}
    assert result.status == "partial"
    assert result.exit_code == 1
    assert by_key["good"].status == "succeeded"
    assert by_key["broken"].status == "failed"
    assert "no such table: no_such_table" in (by_key["broken"].error or "")
    assert traits_sent(config) == {"u1": True}


def test_a_query_without_user_id_is_a_clear_failure(
    tmp_path: Path, store_url: str, warehouse: Warehouse
) -> None:
    """A query returning the wrong columns names the column it needs."""
    path = write_config(
        tmp_path,
        store_url,
        warehouse,
        audiences=[],
        extra="  - name: Wrong\n    source: warehouse\n    query: SELECT 1 AS id\n",
    )
    config = load_config(path)

    result = sync(config)

    assert result.keys[0].status == "failed"
    assert result.keys[0].error == (
        "audience 'wrong': the query must return a user_id column (it returns id)"
    )


def test_query_gets_now_bound_as_utc_time(
    tmp_path: Path, store_url: str, warehouse: Warehouse
) -> None:
    """`:now` is the run's reference time, so windows move with --now."""
    warehouse.add_events(
        [("u1", "order", "2026-02-25 10:00:00"), ("u2", "order", "2026-01-20 10:00:00")]
    )
    query = (
        "SELECT DISTINCT user_id FROM events WHERE ts > datetime(:now, '-30 days') "
        "AND ts <= datetime(:now)"
    )
    path = write_config(
        tmp_path,
        store_url,
        warehouse,
        audiences=[],
        extra=f'  - name: Recent Buyers\n    source: warehouse\n    query: "{query}"\n',
    )
    config = load_config(path)

    first = sync(config, now=NOW)
    later = sync(config, now=NOW + timedelta(days=30))

    assert first.keys[0].members == 1
    assert traits_sent(config, skip=0)["u1"] is False
    assert later.keys[0].diff.exited == 1


def test_a_source_in_the_store_database_is_staged_inside_it(
    tmp_path: Path, store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Source == store: INSERT ... SELECT in the database, same results as reading."""
    engine = create_engine(store_url)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE crm (user_id TEXT, score INTEGER)")
        connection.exec_driver_sql(
            "INSERT INTO crm VALUES ('u1', 5), (' u2 ', 7), ('', 1), (NULL, 2), "
            "('u1', 9), ('u3', NULL)"
        )
    engine.dispose()
    (tmp_path / "config.yaml").write_text(
        f"store: '{store_url}'\n"
        f"sources: {{crm: '{store_url}'}}\n"
        "destination: {transport: file, path: messages.jsonl}\n"
        "audiences:\n"
        "  - {name: Scored, source: crm, query: SELECT user_id FROM crm}\n"
        "traits:\n"
        "  - name: Score\n"
        "    source: crm\n"
        "    query: SELECT user_id, score AS value FROM crm\n"
    )
    config = load_config(tmp_path / "config.yaml")

    with caplog.at_level("DEBUG", logger="audience_sync.runner"):
        result = sync(config)

    audience, trait = result.keys
    assert "Staged 6 rows of scored inside the store's database" in caplog.text
    assert (audience.members, audience.skipped, audience.duplicates) == (3, 2, 1)
    assert (trait.members, trait.skipped, trait.duplicates) == (2, 2, 1)
    assert traits_sent(config, until=3) == {"u1": True, "u2": True, "u3": True}
    assert traits_sent(config, skip=3) == {"u1": 5, "u2": 7}


class Destination:
    """A transport that applies every message it is handed, like Plotline would,
    and reports back what the test chooses (an acknowledgement can get lost)."""

    name = "test"

    def __init__(self) -> None:
        self.state: dict[str, dict[str, Any]] = {}
        self.answer = ACKNOWLEDGED

    def send(self, messages: Any, stop: Any) -> list[Delivery]:
        for message in messages:
            self.state.setdefault(message.user_id, {}).update(message.body["traits"])
        return [self.answer] * len(messages)

    def close(self) -> None:
        pass


def test_a_change_whose_fate_is_unknown_is_corrected_later(
    make_config: Any, warehouse: Warehouse
) -> None:
    """Arrived but never acknowledged, then the truth reverts: the next run fixes it."""
    destination = Destination()
    config = make_config()
    warehouse.set_members("Beta Testers", ["u1"])
    destination.answer = PENDING

    lost = run_once(config, RunOptions(now=NOW), transport_factory=lambda: destination)
    warehouse.set_members("Beta Testers", [])
    destination.answer = ACKNOWLEDGED
    fixed = run_once(
        config,
        RunOptions(now=NOW + timedelta(hours=2)),
        transport_factory=lambda: destination,
    )
    settled = run_once(
        config,
        RunOptions(now=NOW + timedelta(hours=4)),
        transport_factory=lambda: destination,
    )

    assert lost.keys[0].pending == 1
    assert (fixed.keys[0].diff.resent, fixed.keys[0].diff.exited) == (1, 0)
    assert destination.state == {"u1": {"beta_testers": False}}
    assert settled.keys[0].diff.total == 0


def test_correcting_uncertain_users_does_not_trip_the_guard(
    make_config: Any, warehouse: Warehouse
) -> None:
    """Undoing many unacknowledged entries is not a collapse: nobody leaves."""
    destination = Destination()
    config = make_config()
    warehouse.set_members("Beta Testers", [f"m{i}" for i in range(150)])
    run_once(config, RunOptions(now=NOW), transport_factory=lambda: destination)
    warehouse.set_members(
        "Beta Testers", [f"m{i}" for i in range(150)] + [f"n{i}" for i in range(200)]
    )
    destination.answer = PENDING
    run_once(
        config,
        RunOptions(now=NOW + timedelta(hours=1)),
        transport_factory=lambda: destination,
    )
    warehouse.set_members("Beta Testers", [f"m{i}" for i in range(150)])
    destination.answer = ACKNOWLEDGED

    fixed = run_once(
        config,
        RunOptions(now=NOW + timedelta(hours=2)),
        transport_factory=lambda: destination,
    )

    assert fixed.keys[0].status == "succeeded"
    assert (fixed.keys[0].diff.exited, fixed.keys[0].diff.resent) == (0, 200)
    assert {u for u, t in destination.state.items() if t["beta_testers"]} == {
        f"m{i}" for i in range(150)
    }

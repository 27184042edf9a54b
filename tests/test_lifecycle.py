"""An audience over its life: declared, changed, removed, unset, declared again."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from audience_sync.cli import cli
from audience_sync.config import load_config
from audience_sync.errors import ConfigError
from audience_sync.runner import RunOptions, RunResult, run_once
from audience_sync.store import history
from audience_sync.store.database import open_store

NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)


@pytest.fixture
def events(tmp_path: Path) -> Path:
    """A small warehouse in Segment's layout: users, tracks and one event table."""
    path = tmp_path / "warehouse.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE users (id TEXT PRIMARY KEY, plan TEXT)")
        db.execute(
            "CREATE TABLE tracks (id TEXT, user_id TEXT, anonymous_id TEXT, "
            "event TEXT, event_text TEXT, timestamp TEXT)"
        )
        db.execute(
            "CREATE TABLE identifies (id TEXT, anonymous_id TEXT, user_id TEXT, "
            "timestamp TEXT)"
        )
        db.execute(
            "CREATE TABLE order_completed (id TEXT, user_id TEXT, anonymous_id TEXT, "
            "timestamp TEXT, revenue REAL)"
        )
        db.executemany(
            "INSERT INTO users VALUES (?, ?)",
            [("u1", "vip"), ("u2", "free"), ("u3", "vip")],
        )
        for number, (user, when, revenue) in enumerate(
            [
                ("u1", "2026-02-20 10:00:00", 30.0),
                ("u2", "2026-02-25 10:00:00", 70.0),
                ("u3", "2025-12-01 10:00:00", 10.0),
            ]
        ):
            db.execute(
                "INSERT INTO tracks VALUES (?, ?, NULL, 'order_completed', "
                "'Order Completed', ?)",
                (f"e{number}", user, when),
            )
            db.execute(
                "INSERT INTO order_completed VALUES (?, ?, NULL, ?, ?)",
                (f"e{number}", user, when, revenue),
            )
    db.close()
    return path


def write(folder: Path, body: str, store: str = "sqlite:///store.db") -> Path:
    path = folder / "config.yaml"
    path.write_text(
        f"store: '{store}'\n"
        "sources: {warehouse: sqlite:///warehouse.db}\n"
        "destination: {transport: file, path: out.jsonl}\n" + body
    )
    return path


BUYERS = """\
audiences:
  - name: Recent Buyers
    source: warehouse
    condition: {performed: Order Completed, within: 30d}
"""


def sync(path: Path, now: datetime = NOW, **options: Any) -> RunResult:
    return run_once(load_config(path), RunOptions(now=now, **options))


def sent(
    folder: Path, skip: int = 0, until: int | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """`(user_id, traits)` of the messages written, from `skip` up to `until`."""
    lines = (folder / "out.jsonl").read_text().splitlines()[skip:until]
    return [(m["userId"], m["traits"]) for m in map(json.loads, lines)]


def test_a_declared_audience_enters_on_the_order_and_leaves_30_days_later(
    tmp_path: Path, events: Path
) -> None:
    """order_completed_last_30days-style: windows move with now, no new data needed."""
    path = write(tmp_path, BUYERS)

    first = sync(path, now=datetime(2026, 2, 21, tzinfo=UTC))
    second = sync(path, now=datetime(2026, 2, 26, tzinfo=UTC))
    third = sync(path, now=datetime(2026, 3, 22, 10, 0, 1, tzinfo=UTC))
    fourth = sync(path, now=datetime(2026, 3, 27, 10, 0, 1, tzinfo=UTC))

    assert first.keys[0].members == 1
    assert sent(tmp_path, 0)[0] == ("u1", {"recent_buyers": True})
    assert sent(tmp_path, 1)[0] == ("u2", {"recent_buyers": True})
    assert second.keys[0].diff.entered == 1
    assert third.keys[0].diff.exited == 1
    assert sent(tmp_path, 2, 3) == [("u1", {"recent_buyers": False})]
    assert fourth.keys[0].diff.exited == 1
    assert sent(tmp_path, 3) == [("u2", {"recent_buyers": False})]


def test_a_declaration_naming_a_missing_event_is_a_config_error(
    tmp_path: Path, events: Path
) -> None:
    """An unknown event table is reported before anything runs, naming the field."""
    path = write(
        tmp_path,
        "audiences:\n  - name: Ghosts\n    source: warehouse\n"
        "    condition: {performed: Order Cancelled, within: 30d}\n",
    )

    with pytest.raises(ConfigError) as caught:
        sync(path)

    assert "audiences[0] ('Ghosts'): condition.performed" in str(caught.value)
    assert "order_cancelled" in str(caught.value)
    assert not (tmp_path / "out.jsonl").exists()
    assert not (tmp_path / "store.db").exists()


def test_a_declaration_with_a_bad_window_fails_when_loading(tmp_path: Path) -> None:
    """A window like 30x is refused with the field and line at load time."""
    path = write(
        tmp_path,
        "audiences:\n  - name: Odd\n    source: warehouse\n"
        "    condition: {performed: Order Completed, within: 30x}\n",
    )

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert "line 7: audiences[0].condition.within" in str(caught.value)


def test_removing_an_audience_from_the_config_keeps_its_trait(
    tmp_path: Path, events: Path, store_url: str
) -> None:
    """A removed audience sends nothing: Plotline keeps the trait, as with Engage."""
    path = write(tmp_path, BUYERS, store_url)
    sync(path)
    write(tmp_path, "audiences: []\n", store_url)

    result = sync(path, now=NOW + timedelta(days=60))

    assert result.keys == []
    assert len(sent(tmp_path)) == 2


def test_unset_on_remove_sends_false_once_then_retires_the_key(
    tmp_path: Path, events: Path, store_url: str
) -> None:
    """enabled: false with on_remove: unset tells every last-known member, once."""
    path = write(tmp_path, BUYERS, store_url)
    sync(path)
    write(tmp_path, BUYERS + "    enabled: false\n    on_remove: unset\n", store_url)

    unset = sync(path, now=NOW + timedelta(hours=2))
    again = sync(path, now=NOW + timedelta(hours=4))

    engine = open_store(store_url, read_only=True)
    with engine.connect() as connection:
        retired = history.retired_keys(connection)
    engine.dispose()
    assert unset.keys[0].status == "retired"
    assert unset.exit_code == 0
    assert sorted(sent(tmp_path, 2)) == [
        ("u1", {"recent_buyers": False}),
        ("u2", {"recent_buyers": False}),
    ]
    assert again.keys == []
    assert retired == {"recent_buyers"}


def test_a_retired_key_declared_again_starts_with_a_full_sync(
    tmp_path: Path, events: Path, store_url: str
) -> None:
    """Back from retirement, every member is sent again and the run is full."""
    path = write(tmp_path, BUYERS, store_url)
    sync(path)
    write(tmp_path, BUYERS + "    enabled: false\n    on_remove: unset\n", store_url)
    sync(path, now=NOW + timedelta(hours=2))
    write(tmp_path, BUYERS, store_url)

    back = sync(path, now=NOW + timedelta(hours=4))

    assert back.keys[0].full is True
    assert back.keys[0].diff.entered == 2
    assert sorted(sent(tmp_path, 4)) == [
        ("u1", {"recent_buyers": True}),
        ("u2", {"recent_buyers": True}),
    ]


def test_a_trait_unset_sends_null(tmp_path: Path, events: Path, store_url: str) -> None:
    """A computed trait unset on removal sends null to every user that had a value."""
    trait = (
        "traits:\n  - name: Revenue\n    source: warehouse\n"
        "    compute: {sum: revenue, of: Order Completed}\n"
    )
    path = write(tmp_path, trait, store_url)
    sync(path)
    write(tmp_path, trait + "    enabled: false\n    on_remove: unset\n", store_url)

    sync(path, now=NOW + timedelta(hours=2))

    assert dict(sent(tmp_path, 0, 3)) == {
        "u1": {"revenue": 30.0},
        "u2": {"revenue": 70.0},
        "u3": {"revenue": 10.0},
    }
    assert dict(sent(tmp_path, 3)) == {
        "u1": {"revenue": None},
        "u2": {"revenue": None},
        "u3": {"revenue": None},
    }


def test_changing_a_definition_sends_only_the_difference(
    tmp_path: Path, events: Path, store_url: str
) -> None:
    """Editing a condition is an ordinary run: the diff sends what changed."""
    path = write(tmp_path, BUYERS, store_url)
    sync(path)
    write(tmp_path, BUYERS.replace("within: 30d", "within: 120d"), store_url)

    result = sync(path, now=NOW + timedelta(hours=2))

    assert (result.keys[0].diff.entered, result.keys[0].diff.exited) == (1, 0)
    assert sent(tmp_path, 2) == [("u3", {"recent_buyers": True})]


def test_explain_prints_the_compiled_sql_and_the_count(
    tmp_path: Path, events: Path
) -> None:
    """explain shows the SQL a declaration compiles to and how many users it returns."""
    write(tmp_path, BUYERS)

    result = CliRunner().invoke(
        cli,
        [
            "--config",
            str(tmp_path / "config.yaml"),
            "explain",
            "recent_buyers",
            "--now",
            "2026-03-01T12:00:00Z",
        ],
    )

    assert result.exit_code == 0, result.output
    assert "SELECT DISTINCT" in result.output
    assert "order_completed" in result.output
    assert "'2026-01-30 12:00:00'" in result.output
    assert "-- returns 2 rows at 2026-03-01 12:00:00 UTC" in result.output

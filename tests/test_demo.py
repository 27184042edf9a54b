"""Tests for the demo warehouse generator."""

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from audience_sync.demo import (
    build_demo_warehouse,
    demo_anchor,
    ensure_demo_warehouse,
)

ANCHOR = datetime(2024, 6, 1, 12, 34, 56, tzinfo=UTC)
EVENT_TABLES = (
    "application_opened",
    "product_viewed",
    "product_added",
    "checkout_started",
    "order_completed",
    "subscription_started",
)
ORDERS_LAST_30_DAYS = """
    SELECT DISTINCT TRIM(user_id) FROM tracks
    WHERE event = 'order_completed'
      AND timestamp > datetime(:now, '-30 days') AND timestamp <= :now
      AND TRIM(COALESCE(user_id, '')) <> ''
"""


def _text(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _rows(
    path: Path, sql: str, params: dict[str, str] | None = None
) -> list[tuple[Any, ...]]:
    connection = sqlite3.connect(path)
    try:
        return connection.execute(sql, params or {}).fetchall()
    finally:
        connection.close()


def _dump(path: Path) -> list[str]:
    connection = sqlite3.connect(path)
    try:
        return list(connection.iterdump())
    finally:
        connection.close()


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("demo") / "warehouse.db"
    build_demo_warehouse(path, anchor=ANCHOR)
    return path


def test_same_seed_and_anchor_give_identical_rows(
    warehouse: Path, tmp_path: Path
) -> None:
    """Two builds with one seed and anchor hold the same rows in the same order."""
    again = tmp_path / "again.db"
    build_demo_warehouse(again, anchor=ANCHOR)

    assert _dump(again) == _dump(warehouse)


def test_warehouse_has_thousands_of_users_and_over_100k_events(
    warehouse: Path,
) -> None:
    """The default build has thousands of users and more than 100,000 events."""
    [(users,)] = _rows(warehouse, "SELECT COUNT(*) FROM users")
    [(events,)] = _rows(warehouse, "SELECT COUNT(*) FROM tracks")

    assert 1_000 <= users < 10_000
    assert events > 100_000


def test_every_timestamp_lies_in_the_90_days_before_the_anchor(
    warehouse: Path,
) -> None:
    """Events and identifies all fall within [anchor - 90 days, anchor]."""
    low, high = _text(ANCHOR - timedelta(days=90)), _text(ANCHOR)
    bounds = {
        table: _rows(warehouse, f"SELECT MIN(timestamp), MAX(timestamp) FROM {table}")
        for table in ("tracks", "identifies", *EVENT_TABLES)
    }

    for [(first, last)] in bounds.values():
        assert low <= first <= last <= high


def test_every_tracks_row_has_its_event_table_row(warehouse: Path) -> None:
    """Each tracks row has a row with the same id, user and time in its table."""
    missing = {
        table: _rows(
            warehouse,
            f"""
            SELECT COUNT(*) FROM tracks AS t LEFT JOIN {table} AS e
              ON e.id = t.id AND e.user_id IS t.user_id
             AND e.anonymous_id IS t.anonymous_id AND e.timestamp = t.timestamp
            WHERE t.event = :table AND e.id IS NULL
            """,
            {"table": table},
        )[0][0]
        for table in EVENT_TABLES
    }
    event_rows = sum(
        _rows(warehouse, f"SELECT COUNT(*) FROM {table}")[0][0]
        for table in EVENT_TABLES
    )
    [(tracks_rows,)] = _rows(warehouse, "SELECT COUNT(*) FROM tracks")

    assert missing == dict.fromkeys(EVENT_TABLES, 0)
    assert event_rows == tracks_rows


def test_anonymous_events_are_some_linked_and_some_never_identified(
    warehouse: Path,
) -> None:
    """Anonymous events exist; identifies links some, others stay anonymous."""
    linked = """
        SELECT COUNT(DISTINCT anonymous_id) FROM tracks
        WHERE user_id IS NULL
          AND anonymous_id {} IN (SELECT anonymous_id FROM identifies)
    """
    [(linked_visitors,)] = _rows(warehouse, linked.format(""))
    [(never_linked,)] = _rows(warehouse, linked.format("NOT"))

    assert linked_visitors > 100
    assert never_linked > 100


def test_order_audience_has_hundreds_at_the_anchor_and_ages_out(
    warehouse: Path,
) -> None:
    """Recent buyers number 200-3000 at the anchor and none 31 days later."""
    at_anchor = _rows(warehouse, ORDERS_LAST_30_DAYS, {"now": _text(ANCHOR)})
    later = _rows(
        warehouse, ORDERS_LAST_30_DAYS, {"now": _text(ANCHOR + timedelta(days=31))}
    )

    assert 200 <= len(at_anchor) <= 3_000
    assert later == []


def test_churners_and_recent_sign_ups_exist(warehouse: Path) -> None:
    """Some users went quiet 30+ days ago and some signed up in the last 30 days."""
    params = {"now": _text(ANCHOR)}
    [(churned,)] = _rows(
        warehouse,
        """
        SELECT COUNT(*) FROM (
            SELECT TRIM(user_id) FROM tracks WHERE TRIM(COALESCE(user_id, '')) <> ''
            GROUP BY TRIM(user_id)
            HAVING MAX(timestamp) <= datetime(:now, '-30 days')
        )
        """,
        params,
    )
    [(new,)] = _rows(
        warehouse,
        "SELECT COUNT(*) FROM users WHERE created_at > datetime(:now, '-30 days')",
        params,
    )

    assert churned >= 500
    assert new >= 100


def test_vip_plan_is_rare(warehouse: Path) -> None:
    """Plans are free, pro or vip, and vip users are about 5% of all users."""
    plans = dict(_rows(warehouse, "SELECT plan, COUNT(*) FROM users GROUP BY plan"))

    assert set(plans) == {"free", "pro", "vip"}
    assert 0.02 <= plans["vip"] / sum(plans.values()) <= 0.08


def test_warehouse_has_blank_and_space_padded_user_ids(warehouse: Path) -> None:
    """A few tracks rows carry '' or blank user ids, and a few padded real ids."""
    blanks = _rows(
        warehouse,
        "SELECT DISTINCT user_id FROM tracks WHERE TRIM(user_id) = '' ORDER BY 1",
    )
    padded = _rows(
        warehouse,
        """
        SELECT user_id FROM tracks
        WHERE user_id <> TRIM(user_id) AND TRIM(user_id) LIKE 'u\\_%' ESCAPE '\\'
        """,
    )

    assert blanks == [("",), ("  ",)]
    assert 0 < len(padded) < 100


def test_ensure_builds_once_then_leaves_the_file_alone(tmp_path: Path) -> None:
    """ensure_demo_warehouse builds a missing file, then returns False untouched."""
    path = tmp_path / "warehouse.db"
    built = ensure_demo_warehouse(path, anchor=ANCHOR)
    first_stat = path.stat()
    first_bytes = path.read_bytes()

    again = ensure_demo_warehouse(path, anchor=ANCHOR + timedelta(days=1))

    assert built is True
    assert again is False
    assert path.stat().st_mtime_ns == first_stat.st_mtime_ns
    assert path.read_bytes() == first_bytes


def test_naive_anchor_raises_value_error(tmp_path: Path) -> None:
    """A naive anchor is refused before anything is written."""
    with pytest.raises(ValueError, match="timezone-aware"):
        build_demo_warehouse(tmp_path / "warehouse.db", anchor=datetime(2024, 6, 1))

    assert list(tmp_path.iterdir()) == []


def test_failed_build_under_a_file_leaves_nothing(tmp_path: Path) -> None:
    """A target whose parent is a regular file fails and leaves no files behind."""
    parent = tmp_path / "not-a-folder"
    parent.write_text("x")

    with pytest.raises(OSError):
        build_demo_warehouse(parent / "warehouse.db", anchor=ANCHOR)

    assert list(tmp_path.iterdir()) == [parent]
    assert parent.read_text() == "x"


def test_failed_replace_removes_the_finished_temp_file(tmp_path: Path) -> None:
    """When the final rename fails, the fully written temp file is deleted."""
    target = tmp_path / "warehouse.db"
    target.mkdir()
    (target / "keep.txt").write_text("mine")

    with pytest.raises(OSError):
        build_demo_warehouse(target, anchor=ANCHOR)

    assert list(tmp_path.iterdir()) == [target]
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_demo_anchor_round_trips(warehouse: Path) -> None:
    """demo_anchor returns the exact UTC anchor the warehouse was built with."""
    anchor = demo_anchor(warehouse)

    assert anchor == ANCHOR
    assert anchor.utcoffset() == timedelta(0)


def test_default_anchor_is_the_current_utc_hour(tmp_path: Path) -> None:
    """Without an anchor, events end at the current UTC time truncated to the hour."""
    path = tmp_path / "warehouse.db"
    before = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    build_demo_warehouse(path)
    after = datetime.now(UTC)

    anchor = demo_anchor(path)

    assert before <= anchor <= after
    assert (anchor.minute, anchor.second, anchor.microsecond) == (0, 0, 0)
    assert _rows(path, "SELECT value FROM demo_meta WHERE key = 'seed'") == [("7",)]


def test_demo_anchor_of_a_missing_file_creates_nothing(tmp_path: Path) -> None:
    """Asking a missing warehouse for its anchor fails without creating a file."""
    with pytest.raises(FileNotFoundError):
        demo_anchor(tmp_path / "missing.db")

    assert list(tmp_path.iterdir()) == []

"""Delivery end to end: the CLI against the emulator, under every fault, and kill -9.

The truth is computed independently: the demo config's queries run straight on the
warehouse with sqlite3, ids cleaned as the tool documents. The emulator's final
per-user state must equal it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from audience_sync.demo import build_demo_warehouse
from audience_sync.emulator import Emulator
from audience_sync.keys import snake_case
from audience_sync.runner import PAGE_SIZE

pytestmark = pytest.mark.slow

ANCHOR = datetime(2026, 6, 1, 12, tzinfo=UTC)
NOW = "2026-06-01T12:00:00Z"


@pytest.fixture(scope="module")
def demo_warehouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo warehouse, built once for this module."""
    path = tmp_path_factory.mktemp("warehouse") / "warehouse.db"
    build_demo_warehouse(path, anchor=ANCHOR)
    return path


# The demo's audiences and traits as raw SQL, so that the truth is computed from the
# warehouse by sqlite3 alone, with nothing of the tool in between.
DEFINITIONS = [
    {
        "kind": "audience",
        "name": "Order Completed Last 30days",
        "query": (
            "SELECT DISTINCT user_id FROM tracks WHERE event = 'order_completed' "
            "AND timestamp > datetime(:now, '-30 days') AND timestamp <= datetime(:now)"
        ),
    },
    {
        "kind": "audience",
        "name": "VIP Customers",
        "query": "SELECT id AS user_id FROM users WHERE plan = 'vip'",
    },
    {
        "kind": "trait",
        "name": "Orders Last 90 Days",
        "query": (
            "SELECT user_id, COUNT(*) AS value FROM order_completed "
            "WHERE user_id IS NOT NULL AND timestamp > datetime(:now, '-90 days') "
            "AND timestamp <= datetime(:now) GROUP BY user_id"
        ),
    },
]


def demo_definitions() -> list[dict[str, Any]]:
    return DEFINITIONS


def truth(warehouse: Path, now: str = NOW) -> dict[str, dict[str, Any]]:
    """`{user_id: {key: value}}` from the warehouse: what Plotline should hold."""
    stamp = datetime.fromisoformat(now).strftime("%Y-%m-%d %H:%M:%S.%f")
    state: dict[str, dict[str, Any]] = {}
    with sqlite3.connect(warehouse) as db:
        for definition in demo_definitions():
            key = definition.get("key") or snake_case(definition["name"])
            for row in db.execute(definition["query"], {"now": stamp}):
                user_id = (row[0] or "").strip()
                if not user_id:
                    continue
                value = True if definition["kind"] == "audience" else row[1]
                state.setdefault(user_id, {}).setdefault(key, value)
    db.close()
    return state


def project(tmp_path: Path, warehouse: Path, destination: str) -> Path:
    """A config over a copy of the demo warehouse, with a chosen destination."""
    shutil.copy(warehouse, tmp_path / "warehouse.db")
    lines = [
        "store: sqlite:///store.db",
        "sources: {warehouse: sqlite:///warehouse.db}",
        "destination:",
        destination.rstrip("\n"),
    ]
    for section, kind in (("audiences", "audience"), ("traits", "trait")):
        lines.append(f"{section}:")
        for definition in DEFINITIONS:
            if definition["kind"] == kind:
                lines += [
                    f"  - name: {definition['name']}",
                    "    source: warehouse",
                    f'    query: "{definition["query"]}"',
                ]
    (tmp_path / "config.yaml").write_text("\n".join(lines) + "\n")
    return tmp_path


def http_destination(transport: str, emulator: Emulator, **settings: Any) -> str:
    lines = [f"  transport: {transport}"]
    if transport == "segment":
        lines += [
            f"  endpoint: {emulator.segment_endpoint}",
            "  write_key: ${WRITE_KEY}",
        ]
    else:
        lines += [f"  endpoint: {emulator.plotline_endpoint}", "  api_key: ${API_KEY}"]
    defaults = {
        "max_retry_wait": "0.05s",
        "read_timeout": "1s",
        "request_timeout": "5s",
        "max_attempts": 8,
        "max_in_flight": 8,
    }
    lines += [f"  {name}: {value}" for name, value in {**defaults, **settings}.items()]
    return "\n".join(lines) + "\n"


def cli(
    folder: Path, *args: str, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "audience_sync", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "WRITE_KEY": "secret-wk", "API_KEY": "secret-ak"},
        check=False,
    )


def cli_json(folder: Path, *args: str) -> Any:
    result = cli(folder, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def without(
    state: dict[str, dict[str, Any]], users: tuple[str, ...]
) -> dict[str, dict[str, Any]]:
    return {user: traits for user, traits in state.items() if user not in users}


def emulated(emulator: Emulator) -> dict[str, dict[str, Any]]:
    """The emulator's state, leaving out the false and null that mean "not in it"."""
    return {
        user: kept
        for user, traits in emulator.state.items()
        if (
            kept := {
                k: v for k, v in traits.items() if v is not None and v is not False
            }
        )
    }


@pytest.mark.parametrize("transport", ["segment", "plotline"])
def test_demo_audiences_arrive_intact_through_every_fault(
    transport: str, tmp_path: Path, demo_warehouse: Path
) -> None:
    """20% 429s, 10% 500s, 3 users refused, a hung and a dropped request."""
    expected = truth(demo_warehouse)
    rejected_users = tuple(sorted(expected)[:3])
    with Emulator("secret-wk", "secret-ak", seed=3) as emulator:
        emulator.set_faults(
            rate_limit=0.2,
            retry_after=0.01,
            server_error=0.1,
            reject_users=frozenset(rejected_users),
            hang_on=3,
            hang_for=2.0,
            drop_on=5,
        )
        folder = project(
            tmp_path, demo_warehouse, http_destination(transport, emulator)
        )

        first = cli(folder, "run", "--run-now", "--now", NOW)
        emulator.set_faults(
            rate_limit=0.0, server_error=0.0, hang_on=None, drop_on=None
        )
        second = cli(folder, "run", "--run-now", "--now", NOW)
        state = emulated(emulator)
        faulted = dict(emulator.faulted)

    runs = cli_json(folder, "history")
    rejected = [
        c for c in cli_json(folder, "changes", "1") if c["status"] == "rejected"
    ]
    assert first.returncode == 1, first.stderr
    assert "secret-wk" not in first.stderr + first.stdout
    assert "secret-ak" not in first.stderr + first.stdout
    assert state == without(expected, rejected_users)
    assert faulted["429"] > 0
    assert faulted["500"] > 0
    assert faulted["hang"] == 1
    assert {c["user_id"] for c in rejected} == set(rejected_users)
    assert {c["status_code"] for c in rejected} == {400}
    assert runs[1]["status"] == "partial"
    assert sum(a["rejected"] for a in runs[1]["audiences"]) == len(rejected)
    assert sum(a["pending"] for a in runs[1]["audiences"]) == 0
    # The second run diffs the refused users again and is refused again; nothing else.
    assert second.returncode == 1
    assert sum(
        a["entered"] + a["exited"] + a["changed"] for a in runs[0]["audiences"]
    ) == len(rejected)


def test_kill_9_mid_sync_then_a_second_run_leaves_the_truth(
    tmp_path: Path, demo_warehouse: Path
) -> None:
    """A process killed mid-run loses nothing; only in-flight messages arrive twice."""
    with Emulator("secret-wk", "secret-ak") as emulator:
        destination = http_destination(
            "plotline", emulator, rate_limit=400, max_in_flight=4
        )
        folder = project(tmp_path, demo_warehouse, destination)
        process = subprocess.Popen(
            [sys.executable, "-m", "audience_sync", "run", "--run-now", "--now", NOW],
            cwd=folder,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "API_KEY": "secret-ak"},
        )
        deadline = time.monotonic() + 60
        while emulator.received < 1500 and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
        at_kill = emulator.received

        second = cli(folder, "run", "--run-now", "--now", NOW)
        state = emulated(emulator)
        duplicates = emulator.duplicates
        received = emulator.received

    runs = cli_json(folder, "history")
    expected = truth(demo_warehouse)
    total_changes = sum(len(traits) for traits in expected.values())
    assert 0 < at_kill < total_changes
    assert second.returncode == 0, second.stderr
    assert state == expected
    assert runs[1]["status"] == "interrupted"
    assert runs[0]["status"] == "succeeded"
    assert sum(a["acknowledged"] for a in runs[1]["audiences"]) <= at_kill
    # No message was delivered twice within a run; across the kill, only the page
    # that was being sent (not yet recorded) goes out again, with the truth.
    assert duplicates == 0
    assert total_changes <= received <= total_changes + PAGE_SIZE


def test_a_user_who_left_while_undelivered_gets_nothing(tmp_path: Path) -> None:
    """A change never acknowledged is recomputed: a user who left gets no stale true."""
    warehouse = tmp_path / "w.db"
    with sqlite3.connect(warehouse) as db:
        db.execute("CREATE TABLE m (user_id TEXT)")
        db.executemany("INSERT INTO m VALUES (?)", [("a",), ("b",)])
    db.close()
    with Emulator("secret-wk", "secret-ak") as emulator:
        emulator.set_faults(reject_users=frozenset({"b"}), server_error=0.0)
        (tmp_path / "config.yaml").write_text(
            "store: sqlite:///s.db\n"
            "sources: {w: sqlite:///w.db}\n"
            "destination:\n"
            + http_destination("plotline", emulator)
            + "audiences:\n  - {name: Beta, source: w, query: SELECT user_id FROM m}\n"
        )
        first = cli(tmp_path, "run", "--run-now")
        with sqlite3.connect(warehouse) as db:
            db.execute("DELETE FROM m WHERE user_id = 'b'")
        db.close()
        emulator.set_faults(reject_users=frozenset())
        second = cli(tmp_path, "run", "--run-now")
        state = emulator.state

    runs = cli_json(tmp_path, "history")
    assert first.returncode == 1
    assert second.returncode == 0
    assert state == {"a": {"beta": True}}
    assert runs[0]["audiences"][0]["entered"] == 0


def test_the_collapse_guard_holds_an_emptied_audience(tmp_path: Path) -> None:
    """Most members leaving at once sends nothing and exits 1; --force sends it."""
    warehouse = tmp_path / "w.db"
    with sqlite3.connect(warehouse) as db:
        db.execute("CREATE TABLE m (aud TEXT, user_id TEXT)")
        db.executemany(
            "INSERT INTO m VALUES (?, ?)",
            [("big", f"u{i}") for i in range(200)] + [("small", "s1")],
        )
    db.close()
    (tmp_path / "config.yaml").write_text(
        "store: sqlite:///s.db\n"
        "sources: {w: sqlite:///w.db}\n"
        "destination: {transport: file, path: out.jsonl}\n"
        "audiences:\n"
        "  - {name: Big, source: w,\n"
        "     query: \"SELECT user_id FROM m WHERE aud = 'big'\"}\n"
        "  - {name: Small, source: w,\n"
        "     query: \"SELECT user_id FROM m WHERE aud = 'small'\"}\n"
    )
    cli(tmp_path, "run", "--run-now")
    with sqlite3.connect(warehouse) as db:
        db.execute("DELETE FROM m WHERE aud = 'big' AND user_id != 'u1'")
        db.execute("INSERT INTO m VALUES ('small', 's2')")
    db.close()
    sent_before = len((tmp_path / "out.jsonl").read_text().splitlines())

    held = cli(tmp_path, "run", "--run-now")
    held_full = cli(tmp_path, "run", "--run-now", "--full", "--audience", "big")
    sent_while_held = len((tmp_path / "out.jsonl").read_text().splitlines())
    forced = cli(tmp_path, "run", "--run-now", "--force", "--audience", "big")
    runs = cli_json(tmp_path, "history")

    assert held.returncode == 1
    assert "199 of 200 members would leave at once" in held.stdout
    assert held_full.returncode == 1  # --full re-sends; it does not force
    assert sent_while_held == sent_before + 1  # only small's new member
    assert runs[1]["audiences"][0]["status"] == "held"
    assert runs[2]["audiences"][0]["status"] == "held"
    assert forced.returncode == 0
    assert runs[0]["audiences"][0]["exited"] == 199

"""The command line end to end, as a user runs it: real processes, real SQLite files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Warehouse, write_config


def cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m audience_sync` with arguments, in a folder."""
    return subprocess.run(
        [sys.executable, "-m", "audience_sync", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
        check=False,
    )


def cli_json(*args: str, cwd: Path) -> Any:
    result = cli(*args, "--json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def project(tmp_path: Path, warehouse: Warehouse) -> Path:
    """A folder with a config.yaml on a SQLite store and the test warehouse."""
    warehouse.set_members("Beta Testers", ["u1", "u2", "u3"])
    warehouse.set_values("Lifetime Orders", {"u1": 3, "u2": 1})
    write_config(
        tmp_path,
        f"sqlite:///{tmp_path / 'store.db'}",
        warehouse,
        audiences=["Beta Testers"],
        traits=["Lifetime Orders"],
    )
    return tmp_path


def test_run_history_show_changes_members_audiences(
    project: Path, warehouse: Warehouse
) -> None:
    """A sync, then every read command shows it, in stable JSON."""
    first = cli("run", "--run-now", "--now", "2026-03-01T12:00:00Z", cwd=project)
    warehouse.set_members("Beta Testers", ["u1", "u2"])
    second = cli("run", "--run-now", "--now", "2026-03-01T14:00:00Z", cwd=project)

    runs = cli_json("history", cwd=project)
    shown = cli_json("show", "1", cwd=project)
    changed = cli_json("changes", "2", cwd=project)
    members_now = cli_json("members", "beta_testers", cwd=project)
    members_then = cli_json("members", "beta_testers", "--as-of", "1", cwd=project)
    keys = cli_json("audiences", cwd=project)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert "Run 1 succeeded" in first.stdout
    assert [r["id"] for r in runs] == [2, 1]
    assert runs[1]["now"] == "2026-03-01T12:00:00Z"
    assert runs[0]["status"] == "succeeded"
    assert set(runs[0]) >= {
        "id",
        "started_at",
        "finished_at",
        "now",
        "status",
        "audiences",
    }
    audience = next(a for a in shown["audiences"] if a["key"] == "beta_testers")
    assert {
        k: audience[k]
        for k in (
            "status",
            "full",
            "members",
            "entered",
            "exited",
            "changed",
            "acknowledged",
            "rejected",
            "pending",
        )
    } == {
        "status": "succeeded",
        "full": True,
        "members": 3,
        "entered": 3,
        "exited": 0,
        "changed": 0,
        "acknowledged": 3,
        "rejected": 0,
        "pending": 0,
    }
    assert changed == [
        {
            "key": "beta_testers",
            "user_id": "u3",
            "kind": "exited",
            "old": True,
            "new": False,
            "status": "acknowledged",
            "status_code": None,
            "reason": None,
        }
    ]
    assert members_now == [
        {"user_id": "u1", "value": True},
        {"user_id": "u2", "value": True},
    ]
    assert [m["user_id"] for m in members_then] == ["u1", "u2", "u3"]
    assert {k["key"]: k["members"] for k in keys} == {
        "beta_testers": 2,
        "lifetime_orders": 2,
    }


def test_human_output_is_a_table_in_utc(project: Path) -> None:
    """history prints a readable table with UTC times."""
    cli("run", "--run-now", "--now", "2026-03-01T12:00:00+02:00", cwd=project)

    result = cli("history", cwd=project)

    assert result.returncode == 0
    assert "times in UTC" in result.stdout
    assert "2026-03-01 10:00:00" in result.stdout
    assert "succeeded" in result.stdout


def test_a_config_error_exits_2_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    """A bad config gives one sentence on stderr, exit code 2, and no store file."""
    (tmp_path / "config.yaml").write_text(
        "store: sqlite:///store.db\ndestination: {transport: file, path: m.jsonl}\n"
        "schedule: {every: soon}\n"
    )

    result = cli("run", "--run-now", cwd=tmp_path)

    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "Traceback" not in result.stderr
    assert "line 3: schedule.every 'soon' is not a duration" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_read_commands_never_create_the_store(project: Path) -> None:
    """history on a store that does not exist says so, exits 2, and creates nothing."""
    result = cli("history", cwd=project)

    assert result.returncode == 2
    assert "there is no store at" in result.stderr
    assert not (project / "store.db").exists()


def test_config_comes_from_the_environment_variable(
    project: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """$AUDIENCE_SYNC_CONFIG names the config when --config is not given."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")

    result = cli(
        "run",
        "--run-now",
        cwd=elsewhere,
        env={"AUDIENCE_SYNC_CONFIG": str(project / "config.yaml")},
    )

    assert result.returncode == 0, result.stderr
    assert (project / "messages.jsonl").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("run", "--full"), "--full works only with --run-now"),
        (
            ("run", "--run-now", "--now", "yesterday"),
            "--now 'yesterday' is not an ISO 8601 time",
        ),
        (
            ("run", "--run-now", "--audience", "nope"),
            "no audience or trait has the key 'nope'",
        ),
        (("show", "99"), "there is no run 99"),
        (("members", "nope"), "the store knows no key 'nope'"),
    ],
)
def test_usage_errors_exit_2_with_one_sentence(
    project: Path, args: tuple[str, ...], message: str
) -> None:
    """Each misuse ends in exit code 2 and one line naming the problem."""
    cli("run", "--run-now", cwd=project)

    result = cli(*args, cwd=project)

    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_dry_run_prints_changes_and_exits_0(project: Path) -> None:
    """--dry-run shows what would be sent and writes no message."""
    result = cli("run", "--run-now", "--dry-run", cwd=project)

    assert result.returncode == 0, result.stderr
    assert "Dry run" in result.stdout
    assert "u3" in result.stdout
    assert not (project / "messages.jsonl").exists()


def test_only_selected_audiences_run(project: Path) -> None:
    """--audience limits the run to the keys given."""
    result = cli_json("run", "--run-now", "--audience", "lifetime_orders", cwd=project)

    assert [a["key"] for a in result["audiences"]] == ["lifetime_orders"]


def test_db_upgrade_creates_the_store_and_reports_head(tmp_path: Path) -> None:
    """db upgrade creates the schema; db current then reports it at head."""
    (tmp_path / "config.yaml").write_text(
        "store: sqlite:///s.db\ndestination: {transport: file, path: m.jsonl}\n"
    )

    upgraded = cli("db", "upgrade", cwd=tmp_path)
    current = cli("db", "current", cwd=tmp_path)

    assert upgraded.returncode == 0, upgraded.stderr
    assert "(head)" in upgraded.stdout
    assert current.stdout.strip() == "store: 0003; this version needs: 0003"

"""Hostile and odd input: every mistake is one sentence, every odd value is handled."""

from __future__ import annotations

import base64
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner

from audience_sync.cli import cli
from audience_sync.config import PlotlineDestination, parse_config
from audience_sync.errors import ConfigError
from audience_sync.sources import clean_user_id, encode_value
from audience_sync.store.database import describe_url
from audience_sync.transports.plotline import PlotlineTransport

HEAD = "destination: {transport: file, path: out.jsonl}\n"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (float("inf"), None),
        (float("nan"), None),
        (Decimal("Infinity"), None),
        (Decimal("NaN"), None),
        (Decimal("10.50"), "10.5"),
        (Decimal("7"), "7"),
        (datetime(2026, 1, 2, 3, 4, 5), '"2026-01-02T03:04:05Z"'),
        (datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), '"2026-01-02T03:04:05Z"'),
    ],
)
def test_values_without_a_json_form_are_no_value(value: object, expected: str) -> None:
    """NaN and infinity become "no value"; naive times are read as UTC."""
    assert encode_value(value) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"ab", "ab"),
        (b"\xff\xfe", None),
        ("u\x001", None),
        ("x" * 256, None),
        ("x" * 255, "x" * 255),
        (" \tu1\n", "u1"),
        (42, "42"),
    ],
)
def test_user_ids_are_cleaned_or_skipped(raw: object, expected: str | None) -> None:
    """Bytes decode as UTF-8; NUL-bearing, over-long and undecodable ids are skipped."""
    assert clean_user_id(raw) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (HEAD + "schedule: {every: 99999999999999999d}\n", "is too long"),
        (HEAD + "schedule: {every: .inf}\n", "is too long"),
        (HEAD + "sources: {w: {url: 'sqlite:///w.db', timeout: .nan}}\n", "too long"),
        (HEAD + "store: 'sqlite://'\n", "must name a SQLite file"),
        (HEAD + "store: 'duckdb:///x.duckdb'\n", "must be a SQLite or PostgreSQL URL"),
        ("destination: {transport: file, path: ''}\n", "must name a file"),
        (HEAD + 'personas: {space_id: "a\x01b"}\n', "is not valid YAML"),
        (
            HEAD + "sources: {w: 'sqlite:///w.db'}\naudiences:\n"
            f"  - {{name: A, key: {'k' * 256}, source: w, query: q}}\n",
            "is longer than 255 characters",
        ),
    ],
)
def test_extreme_settings_are_one_sentence(text: str, expected: str) -> None:
    """Overflowing durations, odd stores and control characters are config errors."""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, Path("/srv/config.yaml"), {})

    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_destination_path_that_is_a_folder_is_refused(tmp_path: Path) -> None:
    """A file destination must name a file, not an existing folder."""
    (tmp_path / "out").mkdir()

    with pytest.raises(ConfigError, match="is a folder; name a file"):
        parse_config(
            "destination: {transport: file, path: out}\n", tmp_path / "c.yaml", {}
        )


def test_logged_store_urls_carry_no_password_anywhere() -> None:
    """A password in the userinfo or in the query string never reaches a log line."""
    url = "postgresql+psycopg://u:pw1@db:5432/s?password=pw2&options=-csearch_path%3Dx"

    shown = describe_url(url)

    assert "pw1" not in shown
    assert "pw2" not in shown
    assert shown == "postgresql+psycopg://db:5432/s"


@pytest.mark.parametrize(
    "now",
    ["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00", "+99999999d", "soon"],
)
def test_out_of_range_now_is_a_usage_error(tmp_path: Path, now: str) -> None:
    """--now beyond the calendar is exit 2 with one sentence, before anything runs."""
    (tmp_path / "config.yaml").write_text(HEAD)

    result = CliRunner().invoke(
        cli,
        ["--config", str(tmp_path / "config.yaml"), "run", "--run-now", "--now", now],
    )

    assert result.exit_code == 2
    assert f"--now {now!r}" in result.output
    assert not (tmp_path / "audience_sync.db").exists()


def test_now_accepts_a_shift_from_the_present(tmp_path: Path) -> None:
    """--now +10d is ten days from now."""
    (tmp_path / "config.yaml").write_text(HEAD)
    before = datetime.now(UTC)

    result = CliRunner().invoke(
        cli,
        [
            "--config",
            str(tmp_path / "config.yaml"),
            "run",
            "--run-now",
            "--dry-run",
            "--json",
            "--now",
            "+10d",
        ],
    )

    now = datetime.fromisoformat(result.output.split('"now": "')[1].split('"')[0])
    assert result.exit_code == 0, result.output
    assert timedelta(days=10) <= now - before < timedelta(days=10, minutes=1)


def test_markup_in_user_ids_is_shown_as_written(tmp_path: Path) -> None:
    """A user id like [/x] or [bold]b[/bold] is data, printed as it is."""
    with sqlite3.connect(tmp_path / "w.db") as db:
        db.execute("CREATE TABLE m (user_id TEXT)")
        db.executemany("INSERT INTO m VALUES (?)", [("[/x]",), ("[bold]b[/bold]",)])
    db.close()
    (tmp_path / "config.yaml").write_text(
        HEAD + "sources: {w: 'sqlite:///w.db'}\n"
        "audiences:\n  - {name: M, source: w, query: SELECT user_id FROM m}\n"
    )
    config = ["--config", str(tmp_path / "config.yaml")]

    CliRunner().invoke(cli, [*config, "run", "--run-now"])
    shown = CliRunner().invoke(cli, [*config, "members", "m"])

    assert shown.exit_code == 0, shown.output
    assert "[/x]" in shown.output
    assert "[bold]b[/bold]" in shown.output


def test_an_echoed_authorization_header_is_redacted() -> None:
    """A destination echoing the Basic token in a refusal does not leak the key."""
    transport = PlotlineTransport(
        PlotlineDestination(
            transport="plotline", endpoint="http://127.0.0.1:9/p", api_key="AK_SECRET"
        )
    )
    token = base64.b64encode(b"AK_SECRET:").decode()

    redacted = transport._redact(
        f"Basic {token} / AK_SECRET / {token.rstrip('=')} / basic {token.lower()}"
        f" / {token.replace('=', '%3D')}"
    )
    transport.close()

    assert "AK_SECRET" not in redacted
    assert token.rstrip("=").lower() not in redacted.lower()
    assert redacted.count("***") == 5


def test_staging_inside_sqlite_cleans_ids_as_python_does(tmp_path: Path) -> None:
    """An attached SQLite source: whitespace trimmed, NUL and binary ids skipped."""
    with sqlite3.connect(tmp_path / "w.db") as db:
        db.execute("CREATE TABLE m (user_id)")
        db.executemany(
            "INSERT INTO m VALUES (?)",
            [("\tok2\n",), ("\t\n",), ("bad\x00nul",), (b"\x00\xff",), ("ok1",)],
        )
    db.close()
    (tmp_path / "config.yaml").write_text(
        HEAD + "store: sqlite:///store.db\nsources: {w: 'sqlite:///w.db'}\n"
        "audiences:\n  - {name: M, source: w, query: SELECT user_id FROM m}\n"
    )
    config = ["--config", str(tmp_path / "config.yaml")]

    ran = CliRunner().invoke(cli, [*config, "run", "--run-now", "--json"])
    shown = CliRunner().invoke(cli, [*config, "members", "m", "--json"])

    assert ran.exit_code == 0, ran.output
    assert '"skipped": 3' in ran.output
    assert [m["user_id"] for m in json.loads(shown.output)] == ["ok1", "ok2"]

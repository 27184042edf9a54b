"""Shared fixtures: real SQLite files, a real PostgreSQL when one is configured."""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from audience_sync.config import Config, load_config

POSTGRES_ENV = "AUDIENCE_SYNC_TEST_DATABASE_URL"


def _postgres_url() -> str | None:
    return os.environ.get(POSTGRES_ENV) or None


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A store URL on a fresh SQLite file, or on a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return

    base = _postgres_url()
    if base is None:
        pytest.skip(f"set {POSTGRES_ENV} to run against PostgreSQL")
    schema = f"audience_sync_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


class Warehouse:
    """A small source database on a real SQLite file, for tests to shape at will."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE members (audience TEXT, user_id TEXT)")
            db.execute("CREATE TABLE trait_values (trait TEXT, user_id TEXT, value)")
            db.execute("CREATE TABLE events (user_id TEXT, event TEXT, ts TEXT)")
        # sqlite3's context manager commits but does not close.
        db.close()

    def set_members(self, audience: str, user_ids: list[Any]) -> None:
        """Replace the members of an audience."""
        with sqlite3.connect(self.path) as db:
            db.execute("DELETE FROM members WHERE audience = ?", (audience,))
            db.executemany(
                "INSERT INTO members VALUES (?, ?)", [(audience, u) for u in user_ids]
            )
        db.close()

    def set_values(self, trait: str, values: dict[Any, Any]) -> None:
        """Replace the values of a computed trait."""
        with sqlite3.connect(self.path) as db:
            db.execute("DELETE FROM trait_values WHERE trait = ?", (trait,))
            db.executemany(
                "INSERT INTO trait_values VALUES (?, ?, ?)",
                [(trait, u, v) for u, v in values.items()],
            )
        db.close()

    def add_events(self, rows: list[tuple[str, str, str]]) -> None:
        """Add `(user_id, event, 'YYYY-MM-DD HH:MM:SS')` rows."""
        with sqlite3.connect(self.path) as db:
            db.executemany("INSERT INTO events VALUES (?, ?, ?)", rows)
        db.close()


@pytest.fixture
def warehouse(tmp_path: Path) -> Warehouse:
    """An empty source warehouse on a SQLite file."""
    return Warehouse(tmp_path / "warehouse.db")


def write_config(
    folder: Path,
    store_url: str,
    warehouse: Warehouse,
    audiences: list[str] = ("Beta Testers",),  # type: ignore[assignment]
    traits: list[str] = (),  # type: ignore[assignment]
    extra: str = "",
) -> Path:
    """Write a config whose audiences and traits read from the test warehouse.

    `extra` is appended to the audiences list when it starts with an item
    (`  - name: ...`), else after everything as more settings.
    """
    lines = [
        f"store: '{store_url}'",
        "sources:",
        f"  warehouse: '{warehouse.url}'",
        "destination:",
        "  transport: file",
        "  path: messages.jsonl",
        "audiences:",
    ]
    for name in audiences:
        lines += [
            f"  - name: {name}",
            "    source: warehouse",
            f"    query: SELECT user_id FROM members WHERE audience = '{name}'",
        ]
    if not audiences and not extra.startswith("  - "):
        lines[-1] = "audiences: []"
    if extra.startswith("  - "):
        lines.append(extra.rstrip("\n"))
        extra = ""
    if traits:
        lines.append("traits:")
    for name in traits:
        lines += [
            f"  - name: {name}",
            "    source: warehouse",
            "    query: SELECT user_id, value FROM trait_values "
            f"WHERE trait = '{name}'",
        ]
    path = folder / "config.yaml"
    path.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
    return path


@pytest.fixture
def make_config(tmp_path: Path, store_url: str, warehouse: Warehouse) -> Any:
    """Write a config for the test warehouse and the parametrized store; load it."""

    def make(**kwargs: Any) -> Config:
        return load_config(write_config(tmp_path, store_url, warehouse, **kwargs))

    return make

"""The store: migrations, leases, and runs left behind by a process that died."""

from __future__ import annotations

import socket
import subprocess
import sys
from datetime import timedelta

import pytest
from alembic import command
from sqlalchemy import inspect, update

from audience_sync.errors import LockHeldError, StoreError
from audience_sync.store import history
from audience_sync.store.database import open_store
from audience_sync.store.leases import Leases, utcnow
from audience_sync.store.migrate import (
    alembic_config,
    check_current,
    downgrade,
    upgrade,
)
from audience_sync.store.schema import leases, runs

TABLES = {
    "alembic_version",
    "uncertain",
    "changes",
    "definitions",
    "leases",
    "run_keys",
    "runs",
    "snapshot",
}


def test_upgrade_downgrade_and_upgrade_again(store_url: str) -> None:
    """Migrations create every table, remove them all, and create them again."""
    engine = open_store(store_url)

    upgrade(engine)
    created = set(inspect(engine).get_table_names())
    downgrade(engine, "base")
    after_downgrade = set(inspect(engine).get_table_names())
    upgrade(engine)
    check_current(engine)
    engine.dispose()

    assert created == TABLES
    assert after_downgrade == {"alembic_version"}


def test_models_and_migrations_agree(store_url: str) -> None:
    """Alembic finds nothing to autogenerate: the migrations match the tables."""
    engine = open_store(store_url)
    upgrade(engine)

    with engine.begin() as connection:
        command.check(alembic_config(connection))
    engine.dispose()


def test_upgrade_is_idempotent(store_url: str) -> None:
    """Upgrading a store at head changes nothing and does not fail."""
    engine = open_store(store_url)

    upgrade(engine)
    upgrade(engine)
    check_current(engine)
    engine.dispose()


def test_a_store_never_created_is_reported(store_url: str) -> None:
    """Reading a store with no schema says how to create it."""
    engine = open_store(store_url)

    with pytest.raises(StoreError, match="holds no sync history yet"):
        check_current(engine)
    engine.dispose()


def test_a_lease_held_by_a_live_owner_is_refused(store_url: str) -> None:
    """A second owner cannot take a live lease, and is told who holds it."""
    engine = open_store(store_url)
    upgrade(engine)
    first, second = Leases(engine), Leases(engine)
    second.owner = "another-host:4242:abcdef12"

    first.acquire("vip", run_id=None)
    with pytest.raises(LockHeldError) as caught:
        second.acquire("vip", run_id=None)
    engine.dispose()

    assert "is being synced by process" in str(caught.value)
    assert caught.value.exit_code == 3


def test_an_expired_lease_can_be_taken(store_url: str) -> None:
    """A holder that stopped renewing loses the key once its lease expires."""
    engine = open_store(store_url)
    upgrade(engine)
    holder, taker = Leases(engine), Leases(engine)
    holder.owner = "another-host:4242:abcdef12"
    holder.acquire("vip", run_id=None)
    with engine.begin() as connection:
        connection.execute(
            update(leases).values(expires_at=utcnow() - timedelta(seconds=1))
        )

    taker.acquire("vip", run_id=None)
    lost = holder.renew()
    engine.dispose()

    assert lost == ["vip"]


def test_a_lease_of_a_dead_local_process_is_taken_at_once(store_url: str) -> None:
    """A holder on this machine whose process is gone does not block until expiry."""
    engine = open_store(store_url)
    upgrade(engine)
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(finished.stdout)
    holder, taker = Leases(engine), Leases(engine)
    holder.owner = f"{socket.gethostname()}:{dead_pid}:deadbeef"
    holder.acquire("vip", run_id=None)

    taker.acquire("vip", run_id=None)
    engine.dispose()


def test_a_run_left_running_by_a_dead_process_is_marked_interrupted(
    store_url: str,
) -> None:
    """A run whose heartbeat stopped is marked interrupted at the next start."""
    engine = open_store(store_url)
    upgrade(engine)
    with engine.begin() as connection:
        run_id = history.start_run(
            connection, utcnow(), "manual", False, "other-host:1:aaaaaaaa"
        )
        connection.execute(
            update(runs).values(heartbeat_at=utcnow() - timedelta(minutes=10))
        )

    with engine.begin() as connection:
        marked = history.mark_interrupted(connection, stale_after=90)
        found = history.get_run(connection, run_id)
    engine.dispose()

    assert marked == [run_id]
    assert found is not None
    assert found.status == "interrupted"

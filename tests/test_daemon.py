"""The daemon as it runs in production: real processes, signals, a shared store."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import select

from audience_sync.scheduler import scheduler_settings
from audience_sync.store import snapshot
from audience_sync.store.database import open_store
from audience_sync.store.schema import leases, run_keys, runs
from tests.conftest import Warehouse

pytestmark = pytest.mark.slow


def slow_query(audience: str, rows: int) -> str:
    """An audience query that burns CPU for a while before it returns its members."""
    return (
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
        f"WHERE x < {rows}) SELECT user_id FROM members "
        f"WHERE audience = '{audience}' AND (SELECT MAX(x) FROM c) > 0"
    )


def write_daemon_config(
    folder: Path,
    store_url: str,
    warehouse: Warehouse,
    audiences: dict[str, str],
    every: str = "2s",
    jitter: str = "1s",
) -> Path:
    """A config with the given `{name: query}` audiences and a short schedule."""
    lines = [
        f"store: '{store_url}'",
        f"sources: {{warehouse: '{warehouse.url}'}}",
        "destination: {transport: file, path: messages.jsonl}",
        f"schedule: {{every: {every}, jitter: {jitter}, shutdown_timeout: 20s}}",
        "audiences:",
    ]
    for name, query in audiences.items():
        lines += [f"  - name: {name}", "    source: warehouse", f'    query: "{query}"']
    path = folder / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def plain(audience: str) -> str:
    return f"SELECT user_id FROM members WHERE audience = '{audience}'"


class Daemons:
    """Starts daemon processes and makes sure none outlives the test."""

    def __init__(self) -> None:
        self.processes: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, config: Path, *args: str) -> subprocess.Popen[bytes]:
        log = config.parent / f"daemon-{len(self.processes)}.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "audience_sync",
                    "--config",
                    str(config),
                    "run",
                    *args,
                ],
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        self.processes.append((process, log))
        return process

    def log(self, index: int = 0) -> str:
        return self.processes[index][1].read_text()

    def stop_all(self) -> list[int]:
        codes = []
        for process, _ in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, _ in self.processes:
            try:
                codes.append(process.wait(timeout=30))
            except subprocess.TimeoutExpired:
                process.kill()
                codes.append(process.wait())
        return codes


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    """Daemon processes, all stopped at the end of the test."""
    started = Daemons()
    yield started
    for process, _ in started.processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_for(condition: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Poll until `condition` returns something truthy, or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out waiting for the daemon")


def store_rows(store_url: str, query: Any) -> list[Any]:
    engine = (
        open_store(store_url, read_only=True)
        if store_url.startswith("sqlite")
        and Path(store_url.removeprefix("sqlite:///")).exists()
        else open_store(store_url)
    )
    try:
        with engine.connect() as connection:
            return list(connection.execute(query).all())
    except Exception:
        return []
    finally:
        engine.dispose()


def finished_runs(store_url: str) -> list[Any]:
    return store_rows(
        store_url,
        select(runs).where(runs.c.finished_at.is_not(None)).order_by(runs.c.id),
    )


def test_syncs_at_start_up_and_then_on_schedule(
    tmp_path: Path, warehouse: Warehouse, daemons: Daemons
) -> None:
    """The first sync runs at once; later ones follow every + up to jitter."""
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    warehouse.set_members("Beta", ["u1", "u2"])
    config = write_daemon_config(
        tmp_path, store_url, warehouse, {"Beta": plain("Beta")}
    )
    launched = datetime.now(UTC)

    daemons.start(config)
    found = wait_for(lambda: (r := finished_runs(store_url)) and len(r) >= 3 and r)
    codes = daemons.stop_all()

    assert codes == [0]
    assert found[0].started_at - launched < timedelta(seconds=10)
    gaps = [(b.started_at - a.started_at).total_seconds() for a, b in pairwise(found)]
    assert all(1.8 <= gap <= 6.0 for gap in gaps), gaps
    assert all(run.status == "succeeded" for run in found)
    assert "Daemon started: 1 keys, every 2s plus up to 1s" in daemons.log()


def test_an_overlapping_run_is_skipped_not_queued(
    tmp_path: Path, warehouse: Warehouse, daemons: Daemons
) -> None:
    """A sync longer than the interval makes the next one skip; runs never overlap."""
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    warehouse.set_members("Slow", ["u1"])
    config = write_daemon_config(
        tmp_path,
        store_url,
        warehouse,
        {"Slow": slow_query("Slow", 12_000_000)},
        every="1s",
        jitter="0s",
    )

    daemons.start(config)
    found = wait_for(
        lambda: (r := finished_runs(store_url)) and len(r) >= 2 and r, timeout=60
    )
    daemons.stop_all()

    assert "the previous run is still going" in daemons.log()
    for earlier, later in pairwise(found):
        assert later.started_at >= earlier.finished_at


def test_sigterm_mid_run_stops_cleanly_with_a_consistent_snapshot(
    tmp_path: Path, warehouse: Warehouse, daemons: Daemons
) -> None:
    """SIGTERM while sending: exit 0, run interrupted, snapshot == what was written."""
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    warehouse.set_members("Big", [f"u{i:07d}" for i in range(400_000)])
    config = write_daemon_config(
        tmp_path, store_url, warehouse, {"Big": plain("Big")}, every="1h"
    )
    messages = tmp_path / "messages.jsonl"

    process = daemons.start(config)
    wait_for(lambda: messages.exists() and messages.stat().st_size > 0, timeout=60)
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=60)

    written = {
        json.loads(line)["userId"] for line in messages.read_text().splitlines() if line
    }
    (run,) = store_rows(store_url, select(runs))
    (key,) = store_rows(store_url, select(run_keys))
    engine = open_store(store_url, read_only=True)
    with engine.connect() as connection:
        members = {
            user for user, _ in snapshot.members(connection, "big", None, "false")
        }
    engine.dispose()
    assert code == 0
    assert run.status == "interrupted"
    assert members == written
    assert key.acknowledged == len(written)
    assert key.acknowledged + key.pending == key.entered == 400_000


def test_run_now_while_the_daemon_holds_the_lease_exits_3(
    tmp_path: Path, warehouse: Warehouse, daemons: Daemons
) -> None:
    """A one-shot run waits up to --wait, then exits 3 naming the holder."""
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    warehouse.set_members("Slow", ["u1"])
    config = write_daemon_config(
        tmp_path,
        store_url,
        warehouse,
        {"Slow": slow_query("Slow", 20_000_000)},
        every="1h",
    )
    daemons.start(config)
    wait_for(lambda: store_rows(store_url, select(leases)))

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "audience_sync",
            "--config",
            str(config),
            "run",
            "--run-now",
            "--wait",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    daemons.stop_all()

    assert result.returncode == 3
    assert "error: 'slow' is being synced by process" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_source_outage_fails_the_key_and_the_daemon_recovers(
    tmp_path: Path, warehouse: Warehouse, daemons: Daemons
) -> None:
    """While the source is gone runs fail and /healthz says 503; then it recovers."""
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    warehouse.set_members("Beta", ["u1"])
    moved = warehouse.path.with_suffix(".away")
    warehouse.path.rename(moved)
    config = write_daemon_config(
        tmp_path, store_url, warehouse, {"Beta": plain("Beta")}, every="1s", jitter="0s"
    )

    daemons.start(config, "--health-port", "0")
    wait_for(lambda: "Serving /healthz" in daemons.log())
    port = int(
        daemons.log().split("Serving /healthz and /metrics on 127.0.0.1:")[1].split()[0]
    )
    wait_for(lambda: any(r.status == "failed" for r in finished_runs(store_url)))
    during = health(port)
    moved.rename(warehouse.path)
    wait_for(lambda: finished_runs(store_url)[-1].status == "succeeded")
    after = wait_for(lambda: (h := health(port))[0] == 200 and h)
    metrics = (
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
        .read()
        .decode()
    )
    codes = daemons.stop_all()

    assert codes == [0]
    assert during[0] == 503
    assert during[1]["keys"]["beta"]["last_status"] == "failed"
    assert after[1]["status"] == "ok"
    assert 'audience_sync_runs_total{status="failed"}' in metrics
    assert 'audience_sync_snapshot_members{key="beta"} 1.0' in metrics


def health(port: int) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/healthz", timeout=5
        ) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_sighup_reloads_the_config_and_keeps_it_when_invalid(
    tmp_path: Path, warehouse: Warehouse, daemons: Daemons
) -> None:
    """After SIGHUP a new audience is synced; an invalid file is reported, ignored."""
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    warehouse.set_members("Beta", ["u1"])
    warehouse.set_members("Gamma", ["u2"])
    config = write_daemon_config(
        tmp_path, store_url, warehouse, {"Beta": plain("Beta")}, every="1s", jitter="0s"
    )
    process = daemons.start(config)
    wait_for(lambda: finished_runs(store_url))

    write_daemon_config(
        tmp_path,
        store_url,
        warehouse,
        {"Beta": plain("Beta"), "Gamma": plain("Gamma")},
        every="1s",
        jitter="0s",
    )
    process.send_signal(signal.SIGHUP)
    wait_for(
        lambda: store_rows(store_url, select(run_keys).where(run_keys.c.key == "gamma"))
    )
    config.write_text("destination: {transport: nowhere}\n")
    process.send_signal(signal.SIGHUP)
    wait_for(lambda: "Kept the old config" in daemons.log())
    runs_before = len(finished_runs(store_url))
    wait_for(lambda: len(finished_runs(store_url)) > runs_before + 1)
    codes = daemons.stop_all()

    assert codes == [0]
    assert "Reloaded" in daemons.log()
    assert "destination.transport must be one of" in daemons.log()


def test_after_a_long_sleep_exactly_one_catch_up_run() -> None:
    """Many missed due times give one run at once, not a burst."""
    calls: list[float] = []
    ran = threading.Event()

    def job() -> None:
        calls.append(time.monotonic())
        ran.set()

    scheduler = BackgroundScheduler(**scheduler_settings())
    scheduler.add_job(
        job,
        trigger=IntervalTrigger(seconds=1, timezone="UTC"),
        next_run_time=datetime.now(UTC) - timedelta(seconds=30),
    )
    scheduler.start()
    ran.wait(5)
    time.sleep(0.5)
    scheduler.shutdown()

    assert len(calls) == 1


@pytest.mark.postgres
def test_three_daemons_on_postgresql_share_the_audiences(
    tmp_path: Path, store_url: str, warehouse: Warehouse, daemons: Daemons
) -> None:
    """Each key is synced by one daemon at a time, and all keys keep being synced."""
    if not store_url.startswith("postgresql"):
        pytest.skip("this test needs a PostgreSQL store")
    names = [f"Aud{i}" for i in range(6)]
    for name in names:
        warehouse.set_members(name, [f"{name}-u{j}" for j in range(50)])
    config = write_daemon_config(
        tmp_path,
        store_url,
        warehouse,
        {n: slow_query(n, 1_500_000) for n in names},
        every="2s",
        jitter="1s",
    )

    for _ in range(3):
        daemons.start(config)
    wait_for(
        lambda: (
            len(
                {
                    r.key
                    for r in store_rows(
                        store_url,
                        select(run_keys).where(run_keys.c.status == "succeeded"),
                    )
                }
            )
            == 6
        ),
        timeout=60,
    )
    time.sleep(6)
    codes = daemons.stop_all()

    rows = store_rows(store_url, select(run_keys, runs.c.owner).join(runs))
    by_key: dict[str, list[Any]] = {}
    for row in rows:
        by_key.setdefault(row.key, []).append(row)
    assert codes == [0, 0, 0]
    assert set(by_key) == {n.lower() for n in names}
    for key, syncs in by_key.items():
        syncs.sort(key=lambda r: r.started_at)
        assert len(syncs) >= 2, key
        for earlier, later in pairwise(syncs):
            assert later.started_at >= earlier.finished_at, key
    assert len({row.owner for row in rows}) >= 2


def test_sigterm_stops_a_one_shot_run_and_marks_it_interrupted(
    tmp_path: Path, warehouse: Warehouse
) -> None:
    """run --run-now on SIGTERM: stops between batches, records, exits 1."""
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    warehouse.set_members("Big", [f"u{i:07d}" for i in range(400_000)])
    config = write_daemon_config(
        tmp_path, store_url, warehouse, {"Big": plain("Big")}, every="1h"
    )
    messages = tmp_path / "messages.jsonl"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "audience_sync",
            "--config",
            str(config),
            "run",
            "--run-now",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: messages.exists() and messages.stat().st_size > 0, timeout=60)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        assert process.stderr is not None
        stderr = process.stderr.read().decode()
        process.stderr.close()

    (run,) = store_rows(store_url, select(runs))
    (key,) = store_rows(store_url, select(run_keys))
    written = len(messages.read_text().splitlines())
    assert code == 1
    assert "Received SIGTERM" in stderr
    assert "Traceback" not in stderr
    assert run.status == "interrupted"
    assert key.acknowledged == written
    assert key.acknowledged + key.pending == 400_000

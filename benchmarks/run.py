"""Benchmark audience-sync against the bare database and a hand-written script.

    .venv/bin/python benchmarks/run.py [--members N] [--store sqlite|postgresql]
        [--postgres-url URL] [--only NAME ...] [--keep DIR]

In a fresh work folder it builds a SQLite source with an audience of N members, then
times, each in a fresh process, three diff runs and the delivery to an emulator:

1. the initial sync of N members (file transport);
2. an incremental run after 1% churn (N/100 members leave, N/100 new ones arrive);
3. a run with no change;
4. delivery to a local Segment/Plotline emulator, with and without 1% of requests
   answered 429, from a fresh store's initial sync of a smaller audience.

Beside runs 1-3 it times the floor (the store's database alone loading the members and
computing the same diff with NOT EXISTS) and naive_diff.py (Python sets and a JSON
snapshot). Peak RSS is each process's own high-water mark as the kernel reports it to
wait4(). Every diff count is checked against the truth known from the generated data,
and the benchmark aborts if one disagrees.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NAIVE = HERE / "naive_diff.py"

DEFAULT_MEMBERS = 1_000_000
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
TOOLS = ("sync", "floor", "naive", "segment", "plotline")

AUDIENCE = "Bench Audience"
KEY = "bench_audience"
QUERY = "SELECT user_id FROM members"
SEED = 20_240_601

SEGMENT_MEMBERS = 100_000
PLOTLINE_MEMBERS = 20_000  # plotline is one request per message
RATE_LIMITED = 0.01  # fraction of requests the emulator answers 429
RETRY_AFTER = 0.05  # seconds such a 429 asks the client to wait
WRITE_KEY = "bench-wk"
API_KEY = "bench-ak"

RUNS = {1: "1 initial", 2: "2 churn 1%", 3: "3 no change"}
SYNC = "audience-sync"
FLOOR = "floor"
NAIVE_TOOL = "naive script"

MB = 1_000_000  # bytes: RSS is shown, and the 150 MB target read, in decimal MB


class BenchmarkError(RuntimeError):
    """The benchmark cannot go on: a process failed or a count disagrees."""


def expect(condition: bool, message: str) -> None:
    """Abort the benchmark, loudly, unless `condition` holds."""
    if not condition:
        raise BenchmarkError(message)


# ---------------------------------------------------------------------------
# Measuring one process
# ---------------------------------------------------------------------------

# Spawns one command with its output in files, prints its pid, reaps it with wait4()
# and prints its wall time and rusage. It runs as `python -I -S`, a few MB, because on
# Linux a process's ru_maxrss starts from the RSS of the image it was forked from:
# spawned straight from this larger process, a small child would report our size.
_WRAPPER = """
import json, os, sys, time
out, err, *command = sys.argv[1:]
flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
actions = [
    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
    (os.POSIX_SPAWN_OPEN, 1, out, flags, 0o644),
    (os.POSIX_SPAWN_OPEN, 2, err, flags, 0o644),
]
started = time.perf_counter()
pid = os.posix_spawn(command[0], command, os.environ, file_actions=actions)
print(json.dumps({"pid": pid}), flush=True)
_, status, usage = os.wait4(pid, 0)
print(json.dumps({
    "wall": time.perf_counter() - started,
    "cpu": usage.ru_utime + usage.ru_stime,
    "maxrss": usage.ru_maxrss,
    "code": os.waitstatus_to_exitcode(status),
}))
"""


@dataclass(frozen=True)
class Child:
    """A finished process: wall and CPU time, peak RSS, exit code and output."""

    name: str
    wall: float  # seconds from spawn to exit
    cpu: float  # user + system seconds
    peak_rss: int  # bytes
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        """The process's stdout as JSON; abort when it failed or printed none."""
        expect(
            self.code == 0,
            f"{self.name} exited with {self.code}:\n{self.stderr[-3000:]}",
        )
        try:
            return json.loads(self.stdout)
        except json.JSONDecodeError:
            raise BenchmarkError(
                f"{self.name} printed no JSON:\n{self.stdout[-2000:]}"
                f"\n{self.stderr[-2000:]}"
            ) from None


def child_env() -> dict[str, str]:
    """The environment of every child: this checkout's package comes first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), env.get("PYTHONPATH", "")) if p
    )
    return env


def wrapped(command: Sequence[str], logs: Path, name: str) -> list[str]:
    """The wrapper command that runs `command` with its output in `logs`."""
    logs.mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-I", "-S", "-c", _WRAPPER, *log_files(logs, name)]


def log_files(logs: Path, name: str) -> tuple[str, str]:
    """Where a child's stdout and stderr go."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return str(logs / f"{slug}.out"), str(logs / f"{slug}.err")


def finished(name: str, logs: Path, wrapper_output: str) -> Child:
    """Read a child's rusage from the wrapper's last line, and its output files."""
    try:
        usage = json.loads(wrapper_output.strip().splitlines()[-1])
        wall, cpu, maxrss, code = (usage[k] for k in ("wall", "cpu", "maxrss", "code"))
    except (IndexError, KeyError, json.JSONDecodeError):
        raise BenchmarkError(f"could not measure {name}: {wrapper_output!r}") from None

    out, err = log_files(logs, name)
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return Child(
        name=name,
        wall=wall,
        cpu=cpu,
        peak_rss=maxrss * scale,
        code=code,
        stdout=Path(out).read_text(encoding="utf-8", errors="replace"),
        stderr=Path(err).read_text(encoding="utf-8", errors="replace"),
    )


def measure(name: str, command: Sequence[str], logs: Path) -> Child:
    """Run `command` to its end in a fresh process; time it and read its peak RSS."""
    wrapper = subprocess.run(
        [*wrapped(command, logs, name), *command],
        env=child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    return finished(name, logs, wrapper.stdout + wrapper.stderr)


@dataclass
class Measurement:
    """One row of the results table."""

    run: str
    tool: str
    child: Child
    count: int  # rows read, or messages acknowledged
    entered: int | None = None
    exited: int | None = None
    requests: int = 0  # HTTP requests the emulator received
    note: str = ""

    @property
    def wall(self) -> float:
        """Wall time of the process, in seconds."""
        return self.child.wall

    @property
    def peak_rss(self) -> int:
        """Peak RSS of the process, in bytes."""
        return self.child.peak_rss

    @property
    def rate(self) -> float:
        """Rows or messages per second of wall time."""
        return self.count / self.wall if self.wall else 0.0


# ---------------------------------------------------------------------------
# The data
# ---------------------------------------------------------------------------


def id_width(members: int) -> int:
    """Digits in a user id, so that ids sort in numeric order."""
    return max(8, len(str(members + members // 100)))


def create_source(path: Path, members: int) -> None:
    """A SQLite source whose `members` table holds user_00000001 .. user_N."""
    db = sqlite3.connect(path)
    try:
        db.execute("CREATE TABLE members (user_id TEXT NOT NULL)")
        db.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
            "WHERE i < ?) INSERT INTO members "
            f"SELECT printf('user_%0{id_width(members)}d', i) FROM n",
            (members,),
        )
        db.commit()
    finally:
        db.close()


def churn(path: Path, members: int) -> int:
    """Remove N/100 random members and add N/100 new ones; return N/100."""
    moved = members // 100
    width = id_width(members)
    rng = random.Random(SEED)  # noqa: S311 (a reproducible sample, not a secret)
    leaving = [
        (f"user_{i:0{width}d}",) for i in rng.sample(range(1, members + 1), moved)
    ]
    arriving = [
        (f"user_{i:0{width}d}",) for i in range(members + 1, members + moved + 1)
    ]
    db = sqlite3.connect(path)
    try:
        db.execute("CREATE TEMPORARY TABLE leaving (user_id TEXT PRIMARY KEY)")
        db.executemany("INSERT INTO leaving VALUES (?)", leaving)
        db.execute("DELETE FROM members WHERE user_id IN (SELECT user_id FROM leaving)")
        db.executemany("INSERT INTO members VALUES (?)", arriving)
        db.commit()
        (count,) = db.execute("SELECT count(*) FROM members").fetchone()
    finally:
        db.close()
    expect(count == members, f"the churned source has {count} members, not {members}")
    return moved


def count_lines(path: Path, start: int) -> int:
    """Newlines in a file from byte `start` on."""
    if not path.exists():
        return 0
    lines = 0
    with path.open("rb") as handle:
        handle.seek(start)
        while chunk := handle.read(1 << 22):
            lines += chunk.count(b"\n")
    return lines


def size_of(path: Path) -> int:
    """A file's size, 0 when it does not exist yet."""
    return path.stat().st_size if path.exists() else 0


# ---------------------------------------------------------------------------
# Stores: SQLite files, or PostgreSQL schemas that are dropped at the end
# ---------------------------------------------------------------------------


class Stores:
    """Hands out fresh state stores and drops the PostgreSQL ones at the end."""

    def __init__(self, kind: str, folder: Path, postgres_url: str) -> None:
        self.kind = kind
        self.folder = folder
        self.postgres_url = postgres_url
        self._schemas: list[str] = []
        self._engine: Any = None

    def new(self, name: str) -> str:
        """The SQLAlchemy URL of a fresh, empty store."""
        if self.kind == "sqlite":
            return f"sqlite:///{self.folder / f'{name}.db'}"
        return self._schema_url(self._create_schema(name))

    def floor_target(self) -> str:
        """Where the floor works: a SQLite file, or a libpq URL of a fresh schema."""
        if self.kind == "sqlite":
            return str(self.folder / "floor.db")
        from sqlalchemy.engine import make_url  # noqa: PLC0415

        url = make_url(self._schema_url(self._create_schema("floor")))
        return url.set(drivername="postgresql").render_as_string(hide_password=False)

    def _schema_url(self, schema: str) -> str:
        from sqlalchemy.engine import make_url  # noqa: PLC0415

        url = make_url(self.postgres_url).update_query_dict(
            {"options": f"-csearch_path={schema}"}
        )
        return url.render_as_string(hide_password=False)

    def _create_schema(self, name: str) -> str:
        from sqlalchemy import create_engine, text  # noqa: PLC0415
        from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415

        schema = f"audience_sync_bench_{uuid.uuid4().hex[:8]}_{name}".replace("-", "_")
        try:
            if self._engine is None:
                self._engine = create_engine(self.postgres_url)
            with self._engine.begin() as connection:
                connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        except (SQLAlchemyError, ModuleNotFoundError) as exc:
            reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            raise BenchmarkError(
                f"cannot create a PostgreSQL schema: {reason}"
            ) from None
        self._schemas.append(schema)
        return schema

    def close(self) -> None:
        """Drop every schema this benchmark created."""
        if self._engine is None:
            return
        from sqlalchemy import text  # noqa: PLC0415

        try:
            if self._schemas:
                with self._engine.begin() as connection:
                    for schema in self._schemas:
                        connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
                self._schemas.clear()
        finally:
            self._engine.dispose()
            self._engine = None


def write_config(
    folder: Path, store_url: str, source: Path, destination: list[str], query: str
) -> Path:
    """An audience-sync config with one audience read from the source."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        f"store: '{store_url}'",
        "sources:",
        f"  bench: 'sqlite:///{source}'",
        "destination:",
        *(f"  {line}" for line in destination),
        "audiences:",
        f"  - name: {AUDIENCE}",
        "    source: bench",
        f"    query: {query}",
    ]
    path = folder / "config.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def sync_command(config: Path) -> list[str]:
    """The command a user runs for one sync."""
    return [
        sys.executable,
        "-m",
        "audience_sync",
        "--config",
        str(config),
        "--log-level",
        "warning",
        "run",
        "--run-now",
        "--json",
    ]


def check_sync(child: Child, *, members: int, entered: int, exited: int) -> None:
    """Check a run's --json output against the truth; abort when they disagree."""
    result = child.json()
    audiences = result.get("audiences", [])
    expect(len(audiences) == 1, f"{child.name}: expected one audience: {result}")
    found = audiences[0]
    expect(
        result.get("status") == "succeeded" and found.get("status") == "succeeded",
        f"{child.name}: the run did not succeed: {result}",
    )
    wanted = {
        "key": KEY,
        "members": members,
        "entered": entered,
        "exited": exited,
        "changed": 0,
        "acknowledged": entered + exited,
        "rejected": 0,
        "pending": 0,
    }
    wrong = {k: (found.get(k), v) for k, v in wanted.items() if found.get(k) != v}
    expect(
        not wrong,
        f"{child.name}: counts disagree with the generated data "
        f"(field: (reported, true)): {wrong}",
    )


def check_counts(child: Child, truth: dict[str, int]) -> None:
    """Check the counts a floor or naive process printed; abort when they are wrong."""
    counts = child.json()
    expect(
        counts == truth,
        f"{child.name}: counts {counts} disagree with the generated data {truth}",
    )


def check_written(child: Child, path: Path, start: int, expected: int) -> None:
    """Check that a run appended one line per change to its message file."""
    written = count_lines(path, start)
    expect(
        written == expected,
        f"{child.name} wrote {written} messages to {path}, expected {expected}",
    )


# ---------------------------------------------------------------------------
# The diff runs: audience-sync, the floor, the naive script
# ---------------------------------------------------------------------------


@dataclass
class Bench:
    """The work folder, the options, and the measurements taken so far."""

    folder: Path
    members: int
    store: str
    tools: set[str]
    stores: Stores
    out: TextIO
    measurements: list[Measurement] = field(default_factory=list)

    @property
    def source(self) -> Path:
        """The source database every tool reads."""
        return self.folder / "source.db"

    @property
    def logs(self) -> Path:
        """Where each child's stdout and stderr go."""
        return self.folder / "logs"

    def say(self, text: str) -> None:
        """Print a progress line at once."""
        print(text, file=self.out, flush=True)

    def add(self, m: Measurement) -> None:
        """Record and announce a measurement."""
        self.measurements.append(m)
        self.say(
            f"  {m.run:<14} {m.tool:<20} {m.wall:7.2f} s  "
            f"{m.peak_rss / MB:6.1f} MB  {m.rate:11,.0f}/s  {notes(m)}"
        )


class SyncTool:
    """audience-sync on the file transport, one store across the three runs."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        folder = bench.folder / "sync"
        self.messages = folder / "messages.jsonl"
        self.config = write_config(
            folder,
            bench.stores.new("sync"),
            bench.source,
            ["transport: file", f"path: {self.messages}"],
            QUERY,
        )

    def run(self, run: int, entered: int, exited: int) -> Measurement:
        """Time one run and check its counts and the messages it wrote."""
        start = size_of(self.messages)
        child = measure(f"{SYNC} run {run}", sync_command(self.config), self.bench.logs)
        n = self.bench.members
        check_sync(child, members=n, entered=entered, exited=exited)
        check_written(child, self.messages, start, entered + exited)
        return Measurement(RUNS[run], SYNC, child, n, entered, exited)


class FloorTool:
    """The store's database alone: load the members, index them, diff with SQL."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.target = bench.stores.floor_target()
        floor_prepare(self.target)

    def run(self, run: int, entered: int, exited: int) -> Measurement:
        """Time the floor's diff of one run in a fresh process and check its counts."""
        command = [sys.executable, str(Path(__file__).resolve()), "floor"]
        command += ["--target", self.target, "--source", str(self.bench.source)]
        command += ["--run", str(run)]
        child = measure(f"floor run {run}", command, self.bench.logs)
        n = self.bench.members
        check_counts(child, {"members": n, "entered": entered, "exited": exited})
        tool = f"{FLOOR} ({self.bench.store})"
        return Measurement(RUNS[run], tool, child, n, entered, exited)


class NaiveTool:
    """naive_diff.py with its JSON snapshot and JSON Lines output."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.folder = bench.folder / "naive"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.messages = self.folder / "messages.jsonl"

    def run(self, run: int, entered: int, exited: int) -> Measurement:
        """Time one run of the naive script and check its counts and messages."""
        command = [sys.executable, str(NAIVE), "--source", str(self.bench.source)]
        command += ["--query", QUERY, "--key", KEY]
        command += ["--snapshot", str(self.folder / "snapshot.json")]
        command += ["--out", str(self.messages)]
        start = size_of(self.messages)
        child = measure(f"naive run {run}", command, self.bench.logs)
        n = self.bench.members
        check_counts(child, {"members": n, "entered": entered, "exited": exited})
        check_written(child, self.messages, start, entered + exited)
        return Measurement(RUNS[run], NAIVE_TOOL, child, n, entered, exited)


def diff_runs(bench: Bench) -> None:
    """Runs 1-3 for each selected tool, with the churn before run 2."""
    tools: list[SyncTool | FloorTool | NaiveTool] = []
    if "sync" in bench.tools:
        tools.append(SyncTool(bench))
    if "floor" in bench.tools:
        tools.append(FloorTool(bench))
    if "naive" in bench.tools:
        tools.append(NaiveTool(bench))
    if not tools:
        return

    n = bench.members
    bench.say(f"Diff runs on {n:,} members:")
    truth = {1: (n, 0), 3: (0, 0)}  # (entered, exited) of each run
    for run in RUNS:
        if run == 2:
            moved = churn(bench.source, n)
            truth[2] = (moved, moved)
        entered, exited = truth[run]
        for tool in tools:
            bench.add(tool.run(run, entered, exited))


# ---------------------------------------------------------------------------
# The floor, run as `run.py floor ...` in a process of its own
# ---------------------------------------------------------------------------


def floor_prepare(target: str) -> None:
    """Create the empty membership that run 1 is diffed against."""
    if target.startswith("postgresql"):
        import psycopg  # noqa: PLC0415

        with psycopg.connect(target) as pg:
            pg.execute("CREATE TABLE members_0 (user_id text NOT NULL)")
            pg.execute("CREATE INDEX members_0_user_id ON members_0 (user_id)")
        return
    db = sqlite3.connect(target)
    try:
        db.execute("CREATE TABLE members_0 (user_id TEXT NOT NULL)")
        db.execute("CREATE INDEX members_0_user_id ON members_0 (user_id)")
        db.commit()
    finally:
        db.close()


def _diff_sql(run: int) -> tuple[str, str, str]:
    """Count the members, and the entered and exited ones, of run `run`."""
    new, old = f"members_{run}", f"members_{run - 1}"
    return (
        f"SELECT count(*) FROM {new}",
        f"SELECT count(*) FROM {new} n WHERE NOT EXISTS "
        f"(SELECT 1 FROM {old} o WHERE o.user_id = n.user_id)",
        f"SELECT count(*) FROM {old} o WHERE NOT EXISTS "
        f"(SELECT 1 FROM {new} n WHERE n.user_id = o.user_id)",
    )


def floor_sqlite(target: str, source: str, run: int) -> list[int]:
    """Copy the members in with ATTACH and CREATE TABLE AS, index them, diff them."""
    db = sqlite3.connect(target, isolation_level=None)
    try:
        # The store's own settings: WAL, and fsync at checkpoints only.
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("ATTACH DATABASE ? AS source", (source,))
        db.execute("BEGIN")
        db.execute(f"CREATE TABLE members_{run} AS SELECT user_id FROM source.members")
        db.execute(f"CREATE INDEX members_{run}_user_id ON members_{run} (user_id)")
        counts = [db.execute(sql).fetchone()[0] for sql in _diff_sql(run)]
        db.execute("COMMIT")
    finally:
        db.close()
    return counts


def floor_postgresql(target: str, source: str, run: int) -> list[int]:
    """COPY the members in, index them, diff them with NOT EXISTS."""
    import psycopg  # noqa: PLC0415

    src = sqlite3.connect(source)
    try:
        with psycopg.connect(target) as pg, pg.cursor() as cursor:
            cursor.execute(f"CREATE TABLE members_{run} (user_id text NOT NULL)")
            with cursor.copy(f"COPY members_{run} (user_id) FROM STDIN") as copy:
                for row in src.execute("SELECT user_id FROM members"):
                    copy.write_row(row)
            cursor.execute(
                f"CREATE INDEX members_{run}_user_id ON members_{run} (user_id)"
            )
            cursor.execute(f"ANALYZE members_{run}")
            counts = []
            for sql in _diff_sql(run):
                row = cursor.execute(sql).fetchone()
                counts.append(row[0] if row else -1)
    finally:
        src.close()
    return counts


def floor_main(argv: Sequence[str]) -> None:
    """Entry point of the floor's own process: print its counts as JSON."""
    parser = argparse.ArgumentParser(prog="run.py floor")
    parser.add_argument("--target", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--run", type=int, required=True)
    args = parser.parse_args(argv)
    floor = floor_postgresql if args.target.startswith("postgresql") else floor_sqlite
    members, entered, exited = floor(args.target, args.source, args.run)
    print(json.dumps({"members": members, "entered": entered, "exited": exited}))


# ---------------------------------------------------------------------------
# Delivery to the emulator
# ---------------------------------------------------------------------------


class EmulatorProcess:
    """`python -m audience_sync.emulator` on 127.0.0.1 and a free port."""

    def __init__(self, logs: Path, name: str, rate_limit: float) -> None:
        self.logs = logs
        self.name = name
        self.rate_limit = rate_limit
        self.url = ""
        self.stats: dict[str, int] = {}
        self.cpu = 0.0
        self._wrapper: subprocess.Popen[str] | None = None
        self._pid = 0

    def __enter__(self) -> EmulatorProcess:
        command = [sys.executable, "-m", "audience_sync.emulator", "--port", "0"]
        command += ["--write-key", WRITE_KEY, "--api-key", API_KEY, "--seed", "1"]
        if self.rate_limit:
            command += ["--rate-limit", str(self.rate_limit)]
            command += ["--retry-after", str(RETRY_AFTER)]
        self._wrapper = subprocess.Popen(
            [*wrapped(command, self.logs, self.name), *command],
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert self._wrapper.stdout is not None
            first = self._wrapper.stdout.readline()
            try:
                self._pid = json.loads(first)["pid"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise BenchmarkError(f"the emulator did not start: {first!r}") from None
            self.url = self._wait_for_banner()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for_banner(self, timeout: float = 30) -> str:
        out = Path(log_files(self.logs, self.name)[0])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = out.read_text(encoding="utf-8") if out.exists() else ""
            found = re.search(r"http://127\.0\.0\.1:(\d+)", text)
            if found:
                return f"http://127.0.0.1:{found.group(1)}"
            if self._wrapper is None or self._wrapper.poll() is not None:
                break
            time.sleep(0.02)
        raise BenchmarkError(f"the emulator did not start; see {out}")

    def stop(self) -> None:
        """Stop the emulator with SIGTERM; read what it received and its CPU time."""
        wrapper, self._wrapper = self._wrapper, None
        if wrapper is None:
            return
        if self._pid and wrapper.poll() is None:
            os.kill(self._pid, signal.SIGTERM)
        try:
            output, _ = wrapper.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            if self._pid:
                os.kill(self._pid, signal.SIGKILL)
            output, _ = wrapper.communicate()
        try:
            child = finished(self.name, self.logs, output)
        except BenchmarkError:
            return  # no stats: the caller's checks say what went wrong
        self.cpu = child.cpu
        found = re.search(
            r"(\d+) requests, (\d+) messages, (\d+) users, (\d+) duplicates",
            child.stdout,
        )
        if found:
            names = ("requests", "messages", "users", "duplicates")
            self.stats = dict(zip(names, map(int, found.groups()), strict=True))

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def deliver(bench: Bench, transport: str, rate_limit: float) -> Measurement:
    """Time an initial sync of a fresh store to the emulator through one transport."""
    cap = SEGMENT_MEMBERS if transport == "segment" else PLOTLINE_MEMBERS
    members = min(bench.members, cap)
    name = transport + ("-429" if rate_limit else "")

    with EmulatorProcess(bench.logs, f"emulator {name}", rate_limit) as emulator:
        if transport == "segment":
            destination = [f"endpoint: {emulator.url}", f"write_key: {WRITE_KEY}"]
        else:
            destination = [f"endpoint: {emulator.url}/plotline", f"api_key: {API_KEY}"]
        config = write_config(
            bench.folder / name,
            bench.stores.new(name),
            bench.source,
            [f"transport: {transport}", *destination],
            f"{QUERY} LIMIT {members}",
        )
        child = measure(f"{SYNC} {name}", sync_command(config), bench.logs)
        emulator.stop()

    check_sync(child, members=members, entered=members, exited=0)
    stats = emulator.stats
    expect(
        stats.get("users") == members,
        f"{child.name}: the emulator holds {stats.get('users')} users, "
        f"expected {members} ({stats})",
    )
    requests = stats["requests"]
    note = f"{requests:,} requests"
    # The same messages go in the same batches, so the extra requests are retries.
    baseline = next((m for m in bench.measurements if m.run == f"4 {transport}"), None)
    if rate_limit and baseline is not None:
        note += f" ({requests - baseline.requests} more: 429 retries)"
    if stats["duplicates"]:
        note += f", {stats['duplicates']} duplicates"
    note += f"; emulator CPU {emulator.cpu:.1f} s"
    run = f"4 {name}"
    return Measurement(run, SYNC, child, members, requests=requests, note=note)


def delivery_runs(bench: Bench) -> None:
    """Delivery through each selected HTTP transport, with and without 429s."""
    chosen = [t for t in ("segment", "plotline") if t in bench.tools]
    if not chosen:
        return
    bench.say("Delivery to the emulator (messages acknowledged / wall time):")
    for transport in chosen:
        for rate_limit in (0.0, RATE_LIMITED):
            bench.add(deliver(bench, transport, rate_limit))


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------


@dataclass
class Report:
    """Everything one benchmark measured."""

    members: int
    store: str
    measurements: list[Measurement]

    def find(self, run: str, tool: str) -> Measurement | None:
        """The measurement of a run by a tool (a tool name prefix), if taken."""
        for m in self.measurements:
            if m.run == run and m.tool.startswith(tool):
                return m
        return None


def notes(m: Measurement) -> str:
    """The changes a diff run found, or a delivery's notes."""
    if m.entered is not None:
        return f"+{m.entered:,} -{m.exited:,}"
    return m.note


def _ratio(value: Measurement, base: Measurement | None) -> str:
    if base is None or not base.wall:
        return ""
    return f"{value.wall / base.wall:.2f}x"


def table(report: Report) -> str:
    """The results table: one row per measurement."""
    head = (
        "run",
        "tool",
        "wall s",
        "CPU s",
        "peak RSS MB",
        "rows or msg/s",
        "vs floor",
        "vs naive",
        "changes / notes",
    )
    rows = [head]
    for m in report.measurements:
        diff = m.run in RUNS.values()
        floor = report.find(m.run, FLOOR) if diff else None
        naive = report.find(m.run, NAIVE_TOOL) if diff else None
        rows.append(
            (
                m.run,
                m.tool,
                f"{m.wall:.2f}",
                f"{m.child.cpu:.2f}",
                f"{m.peak_rss / MB:.1f}",
                f"{m.rate:,.0f}",
                _ratio(m, floor),
                _ratio(m, naive),
                notes(m),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    right = {2, 3, 4, 5, 6, 7}

    def line(row: Sequence[str]) -> str:
        cells = [
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        return " | ".join(cells).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(rows[0]), rule, *(line(r) for r in rows[1:])])


@dataclass(frozen=True)
class Target:
    """One performance target and how this benchmark fared against it."""

    text: str
    held: bool | None  # None: not measured in this benchmark
    measured: str = ""


def targets(report: Report) -> list[Target]:
    """Check the targets set for SQLite at N = 1,000,000."""
    run1 = report.find(RUNS[1], SYNC)
    run2 = report.find(RUNS[2], SYNC)
    run3 = report.find(RUNS[3], SYNC)
    floor2 = report.find(RUNS[2], FLOOR)
    segment = report.find("4 segment", SYNC)
    ours = [m for m in report.measurements if m.tool == SYNC]

    def under(text: str, m: Measurement | None, limit: float) -> Target:
        if m is None:
            return Target(text, None)
        return Target(text, m.wall < limit, f"{m.wall:.2f} s")

    found = [under("run 1 (initial sync) under 60 s", run1, 60)]
    text = "run 2 (1% churn) within 3x the floor"
    if run2 is None or floor2 is None:
        found.append(Target(text, None))
    else:
        ratio = run2.wall / floor2.wall
        measured = f"{ratio:.2f}x ({run2.wall:.2f} s vs {floor2.wall:.2f} s)"
        found.append(Target(text, ratio <= 3, measured))
    found.append(under("run 2 (1% churn) under 10 s", run2, 10))
    found.append(under("run 3 (no change) under 8 s", run3, 8))

    text = "peak RSS under 150 MB in every audience-sync run"
    if not ours:
        found.append(Target(text, None))
    else:
        worst = max(ours, key=lambda m: m.peak_rss)
        measured = f"highest {worst.peak_rss / MB:.1f} MB ({worst.run})"
        found.append(Target(text, worst.peak_rss < 150 * MB, measured))

    text = "segment transport at least 20,000 msg/s (no 429s)"
    if segment is None:
        found.append(Target(text, None))
    else:
        found.append(Target(text, segment.rate >= 20_000, f"{segment.rate:,.0f} msg/s"))
    return found


def print_report(report: Report, out: TextIO) -> None:
    """Print the table and the targets."""
    print(f"\n{table(report)}\n", file=out)
    print("Targets (set for SQLite at N = 1,000,000):", file=out)
    if report.store != "sqlite" or report.members != DEFAULT_MEMBERS:
        print(
            f"  (this benchmark ran on {report.store} at N = {report.members:,}, "
            "so these verdicts are indicative only)",
            file=out,
        )
    for target in targets(report):
        verdict = {True: "held", False: "missed", None: "not measured"}[target.held]
        measured = f": {target.measured}" if target.measured else ""
        print(f"  {verdict:<12} {target.text}{measured}", file=out)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description="Time audience-sync's diff runs and deliveries, each in a fresh "
        "process, beside the bare database and a hand-written script.",
    )
    parser.add_argument(
        "--members",
        type=int,
        default=DEFAULT_MEMBERS,
        metavar="N",
        help="audience size (default %(default)s)",
    )
    parser.add_argument(
        "--store",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="the state store, and the floor's database (default %(default)s)",
    )
    parser.add_argument(
        "--postgres-url",
        default=DEFAULT_POSTGRES_URL,
        metavar="URL",
        help="with --store postgresql: where to create (and drop) fresh schemas "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        action="extend",
        choices=TOOLS,
        metavar="NAME",
        help=f"measure only these: {', '.join(TOOLS)} (sync, floor and naive do "
        "runs 1-3; segment and plotline deliver, with and without 429s)",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="work in DIR (new or empty) and keep it, instead of a temp folder",
    )
    args = parser.parse_args(argv)
    if args.members < 100:
        parser.error("--members must be at least 100 (churn moves N/100 of them)")
    return args


@contextlib.contextmanager
def work_folder(keep: Path | None) -> Iterator[Path]:
    """A fresh folder: DIR when --keep gives one (kept), else a temp folder."""
    if keep is None:
        folder = Path(tempfile.mkdtemp(prefix="audience-sync-bench-"))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    keep.mkdir(parents=True, exist_ok=True)
    if any(keep.iterdir()):
        raise BenchmarkError(f"--keep {keep}: the folder is not empty")
    yield keep.resolve()


def describe(bench: Bench) -> None:
    """Say what is being measured, and on what."""
    import audience_sync  # noqa: PLC0415

    bench.say(
        f"audience-sync {audience_sync.__version__} from "
        f"{Path(audience_sync.__file__).parent}\n"
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs\n"
        f"store: {bench.store}; members: {bench.members:,}; work folder: "
        f"{bench.folder}\n"
        "Each row is one fresh process: wall time, CPU time and peak RSS (wait4)."
    )


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> Report:
    """Run the benchmark, print the table and the targets, and return the results."""
    args = parse_args(argv)
    out = out or sys.stdout
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    with work_folder(args.keep) as folder:
        stores = Stores(args.store, folder, args.postgres_url)
        bench = Bench(
            folder=folder,
            members=args.members,
            store=args.store,
            tools=set(args.only or TOOLS),
            stores=stores,
            out=out,
        )
        try:
            describe(bench)
            started = time.perf_counter()
            create_source(bench.source, bench.members)
            bench.say(
                f"Built the source in {time.perf_counter() - started:.1f} s; "
                "wall s, peak RSS, rows or messages per second:"
            )
            diff_runs(bench)
            delivery_runs(bench)
        finally:
            stores.close()

    report = Report(args.members, args.store, bench.measurements)
    print_report(report, out)
    return report


if __name__ == "__main__":
    if sys.argv[1:2] == ["floor"]:
        floor_main(sys.argv[2:])
        sys.exit(0)
    try:
        main()
    except BenchmarkError as error:
        print(f"\nBENCHMARK ABORTED: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)

"""The benchmark (benchmarks/run.py) at a small size: its counts and its emulator."""

from __future__ import annotations

import importlib.util
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import POSTGRES_ENV

RUN_PY = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
MEMBERS = 2_000


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    """benchmarks/run.py, imported from its path."""
    spec = importlib.util.spec_from_file_location("benchmark_run", RUN_PY)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def store_args(store: str) -> list[str]:
    """The benchmark's store options, or a skip when PostgreSQL is not configured."""
    if store == "sqlite":
        return ["--store", "sqlite"]
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"set {POSTGRES_ENV} to run against PostgreSQL")
    return ["--store", "postgresql", "--postgres-url", url]


@pytest.mark.slow
@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_diff_counts(bench: ModuleType, tmp_path: Path, store: str) -> None:
    """audience-sync, the floor and the naive script each find every run's changes."""
    out = io.StringIO()
    argv = ["--members", str(MEMBERS), "--only", "sync", "floor", "naive"]
    report = bench.main(
        [*argv, *store_args(store), "--keep", str(tmp_path / "work")], out=out
    )
    found = {(m.run, m.tool): (m.entered, m.exited) for m in report.measurements}
    moved = MEMBERS // 100
    truth = {"1 initial": (MEMBERS, 0), "2 churn 1%": (moved, moved)}
    truth["3 no change"] = (0, 0)
    tools = ["audience-sync", f"floor ({store})", "naive script"]
    expected = {(run, tool): truth[run] for run in truth for tool in tools}

    assert found == expected
    assert all(m.wall > 0 and m.peak_rss > 0 for m in report.measurements)
    assert "run 2 (1% churn) within 3x the floor" in out.getvalue()


@pytest.mark.slow
def test_wrong_counts_abort(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tool whose counts disagree with the generated data stops the benchmark."""
    churn = bench.churn
    monkeypatch.setattr(bench, "churn", lambda path, members: churn(path, members) + 1)
    argv = ["--members", "500", "--only", "naive", "--keep", str(tmp_path / "work")]

    with pytest.raises(bench.BenchmarkError, match="disagree with the generated data"):
        bench.main(argv, out=io.StringIO())


@pytest.mark.slow
def test_delivery(bench: ModuleType, tmp_path: Path) -> None:
    """Both HTTP transports deliver every message to the emulator, 429s or not."""
    argv = ["--members", "300", "--only", "segment", "plotline"]
    report = bench.main([*argv, "--keep", str(tmp_path / "work")], out=io.StringIO())
    runs = {m.run: m for m in report.measurements}

    assert set(runs) == {
        "4 segment",
        "4 segment-429",
        "4 plotline",
        "4 plotline-429",
    }
    assert all(m.count == 300 for m in runs.values())
    assert runs["4 plotline"].requests == 300
    assert runs["4 plotline-429"].requests >= 300

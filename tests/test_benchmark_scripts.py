"""The benchmark scripts at HEAD run with the commands BENCHMARKS.md writes (the smallest sizes here): a module
moved or an option renamed breaks these, not the next person who wants the figures. The figures themselves are
not checked: they belong to BENCHMARKS.md, measured on a quiet machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (REPO / "benchmarks").glob("bench_*.py"))


def _run(args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "IMGRAG_HOME": str(tmp_path / "home")}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_every_benchmark_script_is_listed_here() -> None:
    assert SCRIPTS == ["bench_fast.py", "bench_gpu.py", "bench_loads.py", "bench_omnigen.py", "bench_overhead.py",
                       "bench_ray.py", "bench_rounds.py", "bench_steering.py", "bench_store.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_explains_itself(script: str, tmp_path: Path) -> None:
    done = _run([f"benchmarks/{script}", "--help"], tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--json" in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ["benchmarks/bench_omnigen.py", "--repeats", "1"],
    ["benchmarks/bench_loads.py", "--count", "1", "--max-rounds", "1"],
    ["benchmarks/bench_gpu.py", "--dry-run", "--repeat", "1", "--rounds", "1", "--passes", "1"],
], ids=["omnigen", "loads", "gpu-dry-run"])
def test_the_smallest_run_of_a_benchmark_writes_its_json(args: list[str], tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = _run([*args, "--json", str(out)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert json.loads(out.read_text(encoding="utf-8"))

"""The agent end to end on the tiny kit, through the real entry point: every tool runs on a real
(random-weight) model, so these check the plumbing and the counters, never the quality."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.cli import run_cli

MODELS = {"generator", "judge", "llm", "embedder"}


@pytest.fixture
def indexed_store(tiny_settings, tmp_path: Path, capsys: pytest.CaptureFixture) -> Path:
    folder = tmp_path / "refs"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(folder / f"r{i}.png")
        (folder / f"r{i}.txt").write_text(f"reference photo number {i}", encoding="utf-8")
    code, _, err = run_cli(capsys, "index", str(folder), "--profile", "tiny", "--json")
    assert code == 0, err
    return folder


def test_run_goes_through_every_tool_and_loads_each_model_once(indexed_store: Path, capsys) -> None:
    code, out, err = run_cli(capsys, "run", "a beautiful retriever and a cradle", "--profile", "tiny",
                             "--max-rounds", "2", "--json")
    assert code == 0, err
    result = json.loads(out)
    tools = [step["tool"] for step in result["steps"]]
    for tool in ("generate", "critique", "retrieve", "regenerate"):
        assert tool in tools, tools
    assert result["rounds"] == 2
    assert result["status"] in {"matched", "budget_exhausted"}  # round 2 was the last: it matched or ran out
    assert result["model_loads"] == {name: 1 for name in MODELS}
    assert Path(result["final_image"]).is_file()
    run_dir = Path(result["final_image"]).parents[1]
    assert json.loads((run_dir / "result.json").read_text()) == result
    trace = [json.loads(line) for line in (run_dir / "trace.jsonl").read_text().splitlines()]
    assert trace[0]["event"] == "start" and trace[0]["prompt"] == "a beautiful retriever and a cradle"
    # Tool executions carry their round (the planner's decisions do not): one drawing per round, in order.
    drawn = [(s["tool"], s["round"]) for s in trace if "round" in s and s["tool"] in ("generate", "regenerate")]
    assert drawn == [("generate", 1), ("regenerate", 2)]
    # The references that guided the redraw are paths into the indexed folder, not copies.
    regenerated = [c for c in result["candidates"] if c["reference_ids"]]
    assert regenerated, "the second round must be guided by retrieved references"
    assert "tiny profile" in err  # the noise warning is shown wherever tiny output is


def test_batch_loads_each_model_once_and_resume_skips_finished(indexed_store: Path, tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red kettle\n# a comment\n\na heron on a post\na wooden cradle\n", encoding="utf-8")
    out_dir = tmp_path / "batch-out"
    code, out, err = run_cli(capsys, "batch", str(prompts), "--profile", "tiny", "--max-rounds", "1",
                             "--out", str(out_dir), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert [item["prompt"] for item in summary["items"]] == ["a red kettle", "a heron on a post", "a wooden cradle"]
    assert all(item["status"] in {"matched", "budget_exhausted"} for item in summary["items"]), summary
    # One process for the whole batch: three prompts, one load of each model.
    assert summary["model_loads"]["generator"] == 1
    assert summary["model_loads"]["judge"] == 1
    assert summary["model_loads"]["embedder"] == 1
    assert summary["model_loads"].get("llm", 0) <= 1
    # Each run's record says what that run loaded: the first prompt loads the models, the others reuse them.
    first, *rest = summary["items"]
    assert first["model_loads"]["generator"] == 1 and first["model_loads"]["judge"] == 1
    assert all(sum(item["model_loads"].values()) == 0 for item in rest), rest
    for item in summary["items"]:
        run_result = json.loads((out_dir / item["run_id"] / "result.json").read_text())
        assert run_result["model_loads"] == item["model_loads"]
    summary_file = Path(summary["batch_dir"]) / "summary.json"
    results_before = {p: p.read_bytes() for p in [summary_file, *out_dir.glob("*/result.json")]}

    code, out, err = run_cli(capsys, "batch", str(prompts), "--profile", "tiny", "--max-rounds", "1",
                             "--out", str(out_dir), "--resume", "--json")
    assert code == 0, err
    again = json.loads(out)
    # Nothing was redone, and the records of the finished batch are left exactly as they were.
    assert again == summary
    assert {p: p.read_bytes() for p in results_before} == results_before

    # So is a finished run's record when it is resumed.
    run_id = first["run_id"]
    code, out, err = run_cli(capsys, "run", "--resume", run_id, "--profile", "tiny", "--out", str(out_dir), "--json")
    assert code == 0, err
    assert json.loads(out)["model_loads"] == first["model_loads"]
    assert {p: p.read_bytes() for p in results_before} == results_before


@pytest.mark.slow
def test_run_killed_mid_way_resumes_without_redoing_steps(indexed_store: Path, tmp_path: Path, capsys) -> None:
    """kill -9 after the first critique, then `imgrag run --resume`: the first drawing is not redone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out_dir = tmp_path / "runs"
    command = [sys.executable, "-m", "agent.frontends.cli", "run", "a wooden cradle", "--profile", "tiny",
            "--planner", "fixed",
               "--max-rounds", "2", "--out", str(out_dir)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    deadline = time.monotonic() + 120
    trace = None
    while time.monotonic() < deadline and process.poll() is None:
        traces = list(out_dir.glob("*/trace.jsonl"))
        if traces and '"tool": "critique"' in traces[0].read_text(encoding="utf-8"):
            trace = traces[0]
            break
        time.sleep(0.05)
    assert trace is not None, "the run never reached its first critique"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (trace.parent / "result.json").exists()

    run_id = trace.parent.name
    code, out, err = run_cli(capsys, "run", "--resume", run_id, "--profile", "tiny", "--out", str(out_dir), "--json")
    assert code == 0, err
    result = json.loads(out)
    tools = [step["tool"] for step in result["steps"]]
    assert tools.count("generate") == 1, tools
    assert "regenerate" in tools and result["rounds"] == 2
    events = [json.loads(line)["event"] for line in trace.read_text().splitlines() if '"event"' in line]
    assert events[0] == "start" and "resume" in events and events[-1] == "end"

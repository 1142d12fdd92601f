"""Ctrl-C in ``imgrag run`` and ``imgrag batch``, as a user presses it: a real SIGINT to a real process.

A shell without job control starts background commands with SIGINT ignored (NOTES.md), so the child resets
SIGINT to its default before exec; otherwise the test would pass or fail for the shell's reasons."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli import run_cli

pytestmark = pytest.mark.slow


def _start(args: list[str], home: Path) -> subprocess.Popen:
    env = {**os.environ, "IMGRAG_HOME": str(home), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-m", "agent.frontends.cli", *args], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
                            env=env, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(predicate, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            pytest.fail(f"the process ended first: {process.communicate()[1][-2000:]}")
        time.sleep(0.05)
    process.kill()
    pytest.fail("timed out waiting for the process")


def _has_step(trace: Path, tool: str) -> bool:
    return trace.exists() and f'"tool": "{tool}"' in trace.read_text(encoding="utf-8")


def test_ctrl_c_in_run_writes_an_interrupted_result_and_the_resume_command(tiny_settings, tmp_path: Path,
                                                                          capsys, monkeypatch) -> None:
    monkeypatch.setenv("IMGRAG_HOME", str(tmp_path))  # the same thread store for the child and the resume here
    out_dir = tmp_path / "runs"
    process = _start(["run", "a wooden cradle", "--profile", "tiny", "--planner", "fixed", "--max-rounds", "3",
                      "--out", str(out_dir)], tmp_path)
    _wait_for(lambda: any(_has_step(t, "critique") for t in out_dir.glob("*/trace.jsonl")), process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    (run_dir,) = out_dir.iterdir()
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "interrupted"
    assert result["model_loads"]["generator"] == 1  # what this run loaded before Ctrl-C
    # c0 was drawn and judged before Ctrl-C: the partial record names the best so far (c0, or a later drawing
    # that finished before the signal landed, whether or not it was checkpointed).
    assert result["final_candidate"] in {c["id"] for c in result["candidates"]}
    assert Path(result["final_image"]).is_file()
    expected = f"resume with: imgrag run --resume {run_dir.name} --profile tiny --out {out_dir}"
    assert expected in err, err
    assert "Traceback" not in err
    events = [json.loads(line).get("event") for line in (run_dir / "trace.jsonl").read_text().splitlines()]
    assert "interrupted" in events
    assert result["candidates"], "Ctrl-C came after the first drawing was checkpointed"

    code, out, err = run_cli(capsys, "run", "--resume", run_dir.name, "--profile", "tiny", "--out", str(out_dir),
                             "--json")
    assert code == 0, err
    resumed = json.loads(out)
    assert resumed["status"] in ("matched", "budget_exhausted")
    # What the checkpoint held at Ctrl-C is kept, not drawn again.
    before = {c["id"]: c["path"] for c in result["candidates"]}
    assert before.items() <= {c["id"]: c["path"] for c in resumed["candidates"]}.items()
    # The run's loads add up over both processes: the generator once before Ctrl-C, once after.
    assert resumed["model_loads"]["generator"] == 2


def test_ctrl_c_in_batch_then_one_resume_finishes_every_prompt(tiny_settings, tmp_path: Path, capsys,
                                                               monkeypatch) -> None:
    monkeypatch.setenv("IMGRAG_HOME", str(tmp_path))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red kettle\na heron on a post\na wooden cradle\n", encoding="utf-8")
    out_dir = tmp_path / "runs"
    args = ["batch", str(prompts), "--profile", "tiny", "--planner", "fixed", "--max-rounds", "2",
            "--out", str(out_dir)]
    process = _start(args, tmp_path)
    # Ctrl-C as soon as the second prompt has started drawing.
    _wait_for(lambda: any(_has_step(t, "generate") for t in out_dir.glob("batch-*-001/trace.jsonl")), process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    (batch_json,) = out_dir.glob("batch-*/batch.json")
    items = json.loads(batch_json.read_text())["items"]
    assert items[0]["status"] in ("matched", "budget_exhausted")
    assert items[1]["status"] == "interrupted"
    assert items[2]["status"] == "pending"
    assert f"resume with: imgrag batch {prompts} --resume --profile tiny --out {out_dir} --planner fixed " \
           "--max-rounds 2" in err, err
    interrupted = json.loads((out_dir / items[1]["run_id"] / "result.json").read_text())
    assert interrupted["status"] == "interrupted"

    code, out, err = run_cli(capsys, *args, "--resume", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert [i["status"] in ("matched", "budget_exhausted") for i in summary["items"]] == [True] * 3, summary
    assert summary["items"][1]["run_id"] == items[1]["run_id"]  # continued, not started again under a new id

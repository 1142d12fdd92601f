"""The full-step redraw of a matched fast run fails for real, through the real runner on the tiny profile: it never
ends the run with a traceback, it catches what a tool catches, and a full disk closes the record as elsewhere.

The generator is the real tiny SDXL; the judge is scripted (the tiny one never matches), so the run matches in
round 2 with a guided redraw whose reference files are real PNGs."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import tools.final_redraw as final_redraw
from agent.runner import DiskFull, Runner, open_checkpointer
from imgrag.models.generator import Generator
from imgrag.models.judge import Verdict
from imgrag.records.runs import RESERVE_NAME
from imgrag.settings import Settings
from tests.cli import run_cli
from tests.fakes import FakeEmbedder, FakeManager, MemoryStore, ScriptedJudge


@pytest.fixture
def fast_settings(tiny_settings: Settings, tmp_path: Path) -> Settings:
    tiny_settings.generation.fast = "lcm-lora"
    tiny_settings.generation.fast_final_redraw = True
    tiny_settings.output_dir = str(tmp_path / "runs")
    return tiny_settings


class OnRedraw:
    """The runner's event sink: runs ``action(state_of_the_run)`` when the final redraw starts, i.e. after the graph
    ended matched and before the redraw opens its references or draws."""

    def __init__(self, action) -> None:
        self.action = action
        self.fired = 0

    def __call__(self, event: dict[str, Any]) -> None:
        if event["event"] == "tool_start" and event["tool"] == "final_redraw":
            self.fired += 1
            self.action(event)


def make_runner(settings: Settings, tmp_path: Path, generator: Generator, on_event=None,
                verdicts=None) -> Runner:
    judge = ScriptedJudge(verdicts or [Verdict(match=False, missing=["cradle"]), Verdict(match=True)])
    (tmp_path / "refs").mkdir(exist_ok=True)
    return Runner(settings, manager=FakeManager({"generator": generator, "judge": judge, "embedder": FakeEmbedder()}),
                  reference_store=MemoryStore(tmp_path / "refs"), on_event=on_event,
                  checkpointer=open_checkpointer(tmp_path / "threads.sqlite"))


def matched_refs(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "refs").glob("*.png"))


def _failures():
    """Each kind of failure of the redraw: what makes it fail, and what its error says."""
    def delete_references(generator: Generator, tmp_path: Path):
        def act(event):
            for path in matched_refs(tmp_path):
                path.unlink()
        return act

    def raising(exc: Exception):
        def make(generator: Generator, tmp_path: Path):
            def act(event):
                def generate(*args, **kwargs):
                    raise exc
                generator.generate = generate  # the real generator, failing on its next drawing
            return act
        return make

    return [
        pytest.param(delete_references, "cradle.png: no such file", False, id="reference-deleted"),
        pytest.param(raising(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")),
                     "out of GPU memory running 'generator'", False, id="out-of-memory"),  # the manager's one line
        pytest.param(raising(RuntimeError("Expected all tensors to be on the same device")),
                     "final_redraw failed: RuntimeError: Expected all tensors", True, id="runtime-error"),
        pytest.param(raising(ValueError("height must be divisible by 8")),
                     "final_redraw failed: ValueError: height must be divisible by 8", True, id="value-error"),
        pytest.param(raising(KeyError("text_embeds")),
                     "final_redraw failed: KeyError: 'text_embeds'", True, id="key-error-inside-the-generator"),
    ]


@pytest.mark.parametrize("make_failure, says, has_traceback", _failures())
def test_a_failing_final_redraw_keeps_the_matched_draft_as_the_answer(fast_settings: Settings, tmp_path: Path,
                                                                      make_failure, says: str,
                                                                      has_traceback: bool) -> None:
    generator = Generator.from_pretrained(fast_settings)
    sink = OnRedraw(make_failure(generator, tmp_path))
    runner = make_runner(fast_settings, tmp_path, generator, on_event=sink)
    result = runner.run("a wooden cradle", seed=4, planner="fixed", max_rounds=3)

    assert sink.fired == 1
    assert result["status"] == "matched" and Path(result["final_image"]).is_file()  # the fast draft stays
    full = result["final_full"]
    assert full["candidate_id"] == result["final_candidate"] and says in full["error"] and "path" not in full
    assert "\n" not in full["error"]
    run_dir = Path(result["run_dir"])
    assert not (run_dir / final_redraw.FINAL_FULL_NAME).exists()
    on_disk = json.loads((run_dir / "result.json").read_text())
    assert on_disk["status"] == "matched" and on_disk["final_full"] == full
    steps = [json.loads(line) for line in (run_dir / "trace.jsonl").read_text().splitlines()]
    redraw = next(s for s in steps if s.get("tool") == "final_redraw")
    assert redraw["ok"] is False and says in redraw["message"]
    assert ("exception" in redraw) is has_traceback  # an unexpected error keeps its traceback in the trace
    assert steps[-1]["event"] == "end" and steps[-1]["status"] == "matched"
    assert not any(s.get("event") == "error" for s in steps)  # caught as a step, not as the run's error
    assert not (run_dir / RESERVE_NAME).exists()


def test_a_full_disk_during_the_final_redraw_closes_the_record_and_resume_redraws(fast_settings: Settings,
                                                                                  tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch):
    real_save = final_redraw.save_image

    def no_room(image, path, provenance):  # the disk fills up as the picture is written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(final_redraw, "save_image", no_room)
    generator = Generator.from_pretrained(fast_settings)
    runner = make_runner(fast_settings, tmp_path, generator)
    with pytest.raises(DiskFull) as caught:
        runner.run("a wooden cradle", seed=4, planner="fixed", max_rounds=3, run_id="full")
    message = str(caught.value)
    run_dir = Path(fast_settings.output_dir) / "full"
    assert "\n" not in message and "No space left on device" in message
    assert str(run_dir / final_redraw.FINAL_FULL_NAME) in message and "kept 2 candidate(s) and result.json" in message
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "interrupted" and result["stop_reason"].startswith("the disk is full")
    assert result["final_candidate"] == "c1" and Path(result["final_image"]).is_file()  # the matched draft
    steps = [json.loads(line) for line in (run_dir / "trace.jsonl").read_text().splitlines()]
    assert steps[-1]["event"] == "disk_full" and not (run_dir / RESERVE_NAME).exists()

    # Space freed: --resume draws nothing the run drew, only the redraw the full disk refused.
    monkeypatch.setattr(final_redraw, "save_image", real_save)
    calls: list[dict] = []
    real_generate = generator.generate

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real_generate(*args, **kwargs)

    generator.generate = counting
    again = make_runner(fast_settings, tmp_path, generator, verdicts=[]).resume("full")
    assert again["status"] == "matched" and again["final_candidate"] == "c1"
    assert [c["fast"] for c in calls] == ["off"] and Path(again["final_full"]["path"]).is_file()
    assert [c["id"] for c in again["candidates"]] == ["c0", "c1"]


def test_a_full_disk_during_the_final_redraw_is_one_line_with_the_resume_command(fast_settings: Settings,
                                                                                 tmp_path: Path, capsys,
                                                                                 monkeypatch: pytest.MonkeyPatch):
    import agent.frontends.cli.run as cli_run

    def no_room(image, path, provenance):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(final_redraw, "save_image", no_room)
    runner = make_runner(fast_settings, tmp_path, Generator.from_pretrained(fast_settings))
    monkeypatch.setattr(cli_run, "_make_runner", lambda *a, **k: (runner, fast_settings))
    code, out, err = run_cli(capsys, "run", "a wooden cradle", "--planner", "fixed", "--profile", "tiny",
                             "--seed", "4", "--max-rounds", "3")
    text = " ".join(err.split())
    assert code == 1 and "Traceback" not in err and out == ""
    assert "No space left on device" in text and final_redraw.FINAL_FULL_NAME in text
    assert "free some space, then continue with: imgrag run --resume" in text and "--profile tiny" in text


def test_a_failed_final_redraw_is_said_on_screen_and_the_run_exits_0(fast_settings: Settings, tmp_path: Path,
                                                                     capsys, monkeypatch: pytest.MonkeyPatch):
    import agent.frontends.cli.run as cli_run

    generator = Generator.from_pretrained(fast_settings)

    def break_generator(event):
        def generate(*args, **kwargs):
            raise RuntimeError("the pipeline broke")
        generator.generate = generate

    def runner_for(*args, **kwargs):
        progress = args[4]  # the CLI's progress printer: the run's events go to it, the sink breaks the generator
        sink = OnRedraw(break_generator)
        return make_runner(fast_settings, tmp_path, generator,
                           on_event=lambda event: (sink(event), progress(event))), fast_settings

    monkeypatch.setattr(cli_run, "_make_runner", runner_for)
    code, out, err = run_cli(capsys, "run", "a wooden cradle", "--planner", "fixed", "--profile", "tiny",
                             "--seed", "4", "--max-rounds", "3")
    text = " ".join(err.split())
    assert code == 0 and "Traceback" not in err and out.startswith("matched")
    assert "warning: the full-step redraw of c1 failed (final_redraw failed: RuntimeError: the pipeline broke); " \
           "the answer is its fast draft" in text

"""What ``imgrag eval`` says about what a user gives it: every bad line of a prompt file at once, the unreadable
pictures of a class folder named, a contradictory --planner/--arms refused, eval.csv readable by any CSV reader with
the tiny mark in it, and what Ctrl-C keeps (and a clean exit 130, never an abort)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from agent.eval_inputs import read_eval_file
from agent.evaluation import Evaluation, choose_arms, read_splits
from imgrag.errors import UserError
from imgrag.images import UnreadableImage, probe_image
from imgrag.scoring.class_folders import read_class_folder, split_classes
from imgrag.scoring.summary import write_csv
from imgrag.settings import load_settings
from tests.cli import run_cli
from tests.test_eval import make_evaluation
from tests.test_eval_protocol import make_classes

JUNK = b"\x00\x01 this is not a picture \xff" * 4


def one_error(code: int, err: str) -> list[str]:
    """The lines of a user mistake's error (exit 1, no traceback, one ``error:``)."""
    assert code == 1, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    return err[err.index("error:"):].strip().splitlines()


def reason_of(path: Path) -> str:
    """The one-line reason the rest of imgrag gives for an unreadable file (imgrag/images.py)."""
    with pytest.raises(UnreadableImage) as info:
        probe_image(path)
    return info.value.reason


# ----- 1. a prompt file: every bad line at once -----

def test_every_bad_line_of_an_eval_file_is_listed_at_once(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # the file's folder is the current folder: one place to look, named once
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "ok.png")
    (tmp_path / "x.jpg").write_bytes(JUNK)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "gold": "nosuch.jpg"}\n'
                   '{"prompt": "b", "seed": "x"}\n'
                   '{"prompt": "c", "gold": "ok.png"}\n'
                   '{"prompt": "d", "gold": "x.jpg", "sed": 3}\n'
                   '{"prompt": "e", "negative": "blurry"}\n')
    with pytest.raises(UserError) as info:
        read_eval_file(Path("bad.jsonl"))
    lines = str(info.value).splitlines()
    assert lines[0] == "bad.jsonl: 4 bad lines (nothing was run; fix them and run again):"
    assert lines[1] == "bad.jsonl:1: gold image 'nosuch.jpg' not found (looked in nosuch.jpg)"
    assert lines[2] == 'bad.jsonl:2: "seed" must be an integer, got "x"'
    # A gold file that is no picture says why, as imgrag says it everywhere; the same line's other key too.
    assert lines[3].startswith('bad.jsonl:4: unknown key "sed" (did you mean "seed"?')  # unknown keys first, as batch
    assert lines[3].endswith("; gold image 'x.jpg' is not a usable picture: " + reason_of(tmp_path / "x.jpg"))
    # A batch key would do nothing in an evaluation: refused, not ignored.
    assert lines[4].startswith('bad.jsonl:5: "negative" does nothing in imgrag eval')
    assert len(lines) == 5

    code, _, err = run_cli(capsys, "eval", "bad.jsonl", "--profile", "tiny")  # before any model loads
    assert one_error(code, err) == ["error: " + lines[0], *lines[1:]]


def test_a_gold_path_is_looked_for_in_each_place_once(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "prompts").mkdir()
    bad = tmp_path / "prompts" / "bad.jsonl"
    bad.write_text('{"prompt": "a", "gold": "nosuch.jpg"}\n{"prompt": "b", "gold": "~/nosuch.jpg"}\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(UserError) as info:
        read_eval_file(Path("prompts/bad.jsonl"))
    lines = str(info.value).splitlines()
    # Two different places: the file's folder, then the current one.
    assert lines[1] == "prompts/bad.jsonl:1: gold image 'nosuch.jpg' not found (looked in prompts/nosuch.jpg, " \
                       "nosuch.jpg)"
    # ~ is the home folder, one place (it is absolute once expanded).
    assert lines[2] == (f"prompts/bad.jsonl:2: gold image '~/nosuch.jpg' not found (looked in "
                        f"{tmp_path}/home/nosuch.jpg)")


# ----- 2. a class folder: unreadable pictures named -----

def test_a_class_with_unreadable_pictures_names_them_and_counts_them(tmp_path: Path, capsys) -> None:
    root = make_classes(tmp_path / "classes", {"a": 2, "b": 4, "c": 1})
    (root / "a" / "x.jpg").write_bytes(JUNK)
    (root / "c" / "y.png").write_bytes(JUNK)
    (root / "c" / "z.webp").write_bytes(b"")
    why = reason_of(root / "a" / "x.jpg")
    code, _, err = run_cli(capsys, "eval", "--classes", str(root), "--profile", "tiny")  # gold_per_class 2: needs 3
    lines = one_error(code, err)
    # Every class that is too small at once, each with its unreadable files counted (the first named).
    assert lines == [
        "error: 2 classes are too small for the protocol:",
        f"class 'a' has 2 distinct readable picture(s) and 1 unreadable file ({root}/a/x.jpg: {why}); the protocol "
        "needs at least 3 (eval.gold_per_class = 2, plus one to retrieve)",
        f"class 'c' has 1 distinct readable picture(s) and 2 unreadable files (the first {root}/c/y.png: {why}); the "
        "protocol needs at least 3 (eval.gold_per_class = 2, plus one to retrieve)"]
    # Every unreadable file is named with its reason, as `imgrag index` lists what it skipped.
    notes = err[:err.index("error:")]
    assert f"skipped {root}/a/x.jpg: {why}" in notes and f"skipped {root}/c/y.png: {why}" in notes
    assert f"skipped {root}/c/z.webp: empty file" in notes


def test_unreadable_pictures_of_a_class_that_is_big_enough_are_named_too(tmp_path: Path) -> None:
    root = make_classes(tmp_path / "classes", {"a": 4})
    (root / "a" / "x.jpg").write_bytes(JUNK)
    settings = load_settings("tiny")
    events: list[dict] = []
    (split,) = read_splits(settings, root, events.append)
    assert events == [{"event": "note", "text": f"skipped {root}/a/x.jpg: {reason_of(root / 'a' / 'x.jpg')}"}]
    assert [Path(s["path"]).name for s in split.skipped] == ["x.jpg"] and len(split.gold) == 2
    # Without a listener the split is the same, and a single too-small class is one line.
    with pytest.raises(UserError) as info:
        split_classes(read_class_folder(root), gold_per_class=4)
    assert str(info.value).startswith("class 'a' has 4 distinct readable picture(s) and 1 unreadable file (")
    assert "\n" not in str(info.value)


# ----- 3. a contradictory --planner / --arms -----

def test_planner_fixed_with_an_arm_that_needs_the_llm_is_refused_before_any_model_loads(
        tmp_path: Path, monkeypatch, capsys) -> None:
    import agent.frontends.cli.report as cli_report

    def no_models(settings):
        raise AssertionError("models were prepared")

    monkeypatch.setattr(cli_report, "prepare_models", no_models)
    prompts = tmp_path / "ev.txt"
    prompts.write_text("a cat\n")
    code, _, err = run_cli(capsys, "eval", str(prompts), "--planner", "fixed", "--arms", "loop-agent",
                           "--profile", "tiny")
    assert one_error(code, err) == ["error: --planner fixed runs only the arms that need no LLM, and loop-agent "
                                    "needs it: drop it from --arms, or drop --planner fixed"]
    settings = load_settings("tiny")
    with pytest.raises(UserError, match="--planner fixed runs only the arms that need no LLM"):
        Evaluation(settings, planner="fixed", arms=["plain", "loop-agent"])
    # What does not contradict itself still runs as asked.
    assert choose_arms(["imagerag", "loop-fixed"], "fixed", settings) == ["plain", "imagerag", "loop-fixed"]
    assert choose_arms(["loop-agent"], "agent", settings) == ["plain", "loop-agent"]
    assert "loop-agent" not in choose_arms(None, "fixed", settings)


# ----- 4. the tiny mark: before the numbers, and in a plain CSV -----

def test_eval_csv_is_plain_csv_with_the_profile_in_every_row(tmp_path: Path) -> None:
    import pandas as pd

    doc = {"profile": "tiny", "note": "tiny profile: noise. Every number below is plumbing.",
           "items": [{"index": 0, "prompt": "a cat", "seed": 1, "class": None,
                      "arms": {"plain": {"status": "drawn", "scores": {"clip_text": 0.25}},
                               "imagerag": {"status": "redrawn", "scores": {"clip_text": 0.3}}}}]}
    write_csv(tmp_path / "eval.csv", doc)
    assert (tmp_path / "eval.csv").read_text().splitlines()[0].startswith("profile,index,prompt,")
    rows = list(csv.DictReader((tmp_path / "eval.csv").open()))
    assert [(r["profile"], r["arm"]) for r in rows] == [("tiny", "plain"), ("tiny", "imagerag")]
    frame = pd.read_csv(tmp_path / "eval.csv")
    assert list(frame["profile"]) == ["tiny", "tiny"] and list(frame["arm"]) == ["plain", "imagerag"]
    assert frame["clip_text_minus_plain"].iloc[1] == pytest.approx(0.05)


def test_the_tiny_note_comes_before_the_numbers_it_qualifies(tmp_path: Path, capsys) -> None:
    from agent.frontends.cli.report import print_eval

    prompts = tmp_path / "ev.txt"
    prompts.write_text("a cat\n")
    evaluation, _ = make_evaluation(tmp_path)
    doc = evaluation.run(prompts)
    capsys.readouterr()
    print_eval({**doc, "note": "THE TINY NOTE"})
    out = capsys.readouterr().out
    assert out.index("THE TINY NOTE") < out.index("imgrag eval —") < out.index("per arm, seconds")


# ----- 5. Ctrl-C -----

def test_ctrl_c_after_the_eval_folder_exists_says_it_is_kept(tmp_path: Path, monkeypatch, capsys) -> None:
    import agent.eval_arms
    import agent.evaluation
    import agent.frontends.cli.report as cli_report
    from agent.runner import Runner, open_checkpointer
    from tests.fakes import FakeEmbedder, FakeGenerator, FakeManager, MemoryStore, ScriptedJudge
    from tests.test_eval import MATCH

    def pressed(ctx, item):
        raise KeyboardInterrupt

    exits: list[int] = []

    def exit_now(code: int) -> None:  # os._exit would end pytest too
        exits.append(code)
        raise SystemExit(code)

    manager = FakeManager({"generator": FakeGenerator(), "judge": ScriptedJudge([MATCH]), "embedder": FakeEmbedder()})
    (tmp_path / "refs").mkdir()

    def fake_runner(settings, **kw):  # the command's own runner, on scripted models
        return Runner(settings, manager=manager, reference_store=MemoryStore(tmp_path / "refs"),
                      checkpointer=open_checkpointer(tmp_path / "threads.sqlite"), on_event=kw.get("on_event"))

    monkeypatch.setattr(agent.evaluation, "Runner", fake_runner)
    monkeypatch.setitem(agent.eval_arms.ARMS, "imagerag", pressed)  # Ctrl-C once plain has drawn
    monkeypatch.setattr(cli_report, "prepare_models", lambda settings: None)
    monkeypatch.setattr(os, "_exit", exit_now)
    prompts = tmp_path / "ev.txt"
    prompts.write_text("a cat\n")
    out_dir = tmp_path / "out"
    code, _, err = run_cli(capsys, "eval", str(prompts), "--planner", "fixed", "--out", str(out_dir))
    (eval_dir,) = out_dir.glob("eval-ev-*")
    assert code == 130 and exits == [130], err
    assert (eval_dir / "plain" / "000" / "candidates" / "c0.png").is_file()  # drawn before Ctrl-C, and kept
    assert f"interrupted: the eval folder {eval_dir} is kept" in err
    assert "running the same command again starts a new evaluation" in err
    assert "nothing was written" not in err and "Traceback" not in err


def test_ctrl_c_before_anything_is_written_says_so(tmp_path: Path, monkeypatch, capsys) -> None:
    import agent.frontends.cli.report as cli_report

    def pressed(settings):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_report, "prepare_models", pressed)
    prompts = tmp_path / "ev.txt"
    prompts.write_text("a cat\n")
    code, _, err = run_cli(capsys, "eval", str(prompts), "--profile", "tiny", "--out", str(tmp_path / "out"))
    assert code == 130 and err.strip().endswith("interrupted: nothing was written yet; run the same command again")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_a_real_ctrl_c_mid_drawing_exits_130_without_an_abort(tiny_settings, tmp_path: Path) -> None:
    """A real SIGINT while the model thread is inside torch: before, the interpreter's exit ended that daemon thread
    mid-call and C++ aborted ("terminate called without an active exception", exit 134)."""
    prompts = tmp_path / "ev.txt"
    prompts.write_text("".join(f"a red fox number {n}\n" for n in range(8)))
    out_dir = tmp_path / "out"
    env = {**os.environ, "IMGRAG_HOME": str(tmp_path / "home"), "IMGRAG_TINY_KIT_DIR": str(tiny_settings.tiny_kit_dir),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("OMP_NUM_THREADS", None)  # torch's own thread pool, busy at Ctrl-C, is what aborted the exit
    process = subprocess.Popen([sys.executable, "-m", "agent.frontends.cli", "eval", str(prompts), "--profile", "tiny",
                                "--planner", "fixed", "--out", str(out_dir)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 180
    while not list(out_dir.glob("eval-ev-*/plain")):  # the models are loaded and the arms begin
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no first picture: {process.communicate()[1][-2000:]}")
        time.sleep(0.02)
    time.sleep(0.1)  # the first drawings: the model thread is busy in torch (where it aborted most often)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert "terminate called" not in err and "Traceback" not in err
    (eval_dir,) = {p.parent for p in out_dir.glob("eval-ev-*/plain")}  # the loop runs' folders sit beside it
    assert f"interrupted: the eval folder {eval_dir} is kept" in err
    assert (eval_dir / "plain").is_dir() and not (eval_dir / "eval.json").exists()  # kept, unscored, as it says

"""Negative prompt, guidance and schedulers: each reaches the tiny kit's real SDXL pipeline (its scheduler class and
options, its call arguments), is recorded in provenance and the A1111 ``parameters`` line, and arrives the same way
from every front end (``generate``, ``run``, batch lines, the chat); a bad value is one line. The judge never
sees the negative prompt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from agent.chat import ChatSession
from agent.runner import Runner, open_checkpointer
from imgrag.drawing.draw_options import DrawOptions, parse_options
from imgrag.drawing.schedulers import SCHEDULER_NAMES, SCHEDULERS, check_scheduler, describe
from imgrag.errors import UserError
from imgrag.models.generator import Generator
from imgrag.records.provenance import PARAMETERS_KEY, read_provenance
from imgrag.settings import Settings, SettingsError, load_settings
from tests.cli import run_cli
from tests.fakes import FakeEmbedder, FakeGenerator, FakeManager, FakeVerdict, MemoryStore, ScriptedJudge


@pytest.fixture(scope="module")
def settings(tiny_kit: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Settings:
    home = tmp_path_factory.mktemp("options-home")
    return load_settings("tiny", environ={"IMGRAG_TINY_KIT_DIR": str(tiny_kit["generator"].parent),
                                          "IMGRAG_HOME": str(home)})


@pytest.fixture(scope="module")
def generator(settings: Settings) -> Generator:
    return Generator.from_pretrained(settings)


class CallRecorder:
    """Wraps the real pipeline's ``__call__`` (an instance attribute shadows nothing on a class, so the pipeline's
    class is wrapped for the test's duration): every call's keyword arguments and the scheduler it drew with."""

    def __init__(self, pipe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[dict[str, Any]] = []
        real = type(pipe).__call__
        recorder = self

        def call(this: Any, *args: Any, **kwargs: Any) -> Any:
            recorder.calls.append({**kwargs, "_scheduler": this.scheduler})
            return real(this, *args, **kwargs)

        monkeypatch.setattr(type(pipe), "__call__", call)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# ----- schedulers -----

def test_names_are_read_loosely_and_a_wrong_one_lists_every_choice() -> None:
    assert check_scheduler("dpm++ 2m  KARRAS") == "DPM++ 2M Karras"
    assert check_scheduler("euler A") == "Euler a" and check_scheduler("default") == "" == check_scheduler(None)
    with pytest.raises(UserError) as refused:
        check_scheduler("Euler b", "--scheduler")
    text = str(refused.value)
    assert text.startswith("unknown --scheduler 'Euler b'; choose one of") and "\n" not in text
    assert all(name in text for name in SCHEDULER_NAMES)
    with pytest.raises(SettingsError, match="generation.scheduler: unknown scheduler 'nope'"):
        load_settings("default", environ={"IMGRAG_GENERATION_SCHEDULER": "nope"})


def test_every_listed_scheduler_reaches_the_pipeline_with_its_options(
        generator: Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each name swaps its diffusers class in on the loaded pipeline (from the checkpoint's config, no reload) with
    the options diffusers' A1111 table gives it, draws, and is what the record calls the sampler."""
    import diffusers

    pipe, unet = generator.pipe, generator.pipe.unet
    recorder = CallRecorder(pipe, monkeypatch)
    own = type(generator.fast.own_scheduler)
    for entry in SCHEDULERS:
        picture = generator.generate("a red fox", seed=2, scheduler=entry.name)
        used = recorder.calls[-1]["_scheduler"]
        assert type(used) is getattr(diffusers, entry.cls), entry.name
        for key, value in entry.options.items():
            assert used.config[key] == value, (entry.name, key)
        if "use_karras_sigmas" not in entry.options and "use_karras_sigmas" in used.config:
            assert not used.config["use_karras_sigmas"], entry.name
        # the checkpoint's own schedule is kept: only the sampling algorithm changes
        assert used.config["beta_schedule"] == generator.fast.own_scheduler.config["beta_schedule"]
        assert generator.last_scheduler == entry.name == describe(used)
        assert np.isfinite(_pixels(picture)).all() and picture.size == (64, 64)
    assert generator.pipe is pipe and generator.pipe.unet is unet  # swapped, never reloaded
    generator.generate("a red fox", seed=2)  # no choice: the checkpoint's own again
    assert type(recorder.calls[-1]["_scheduler"]) is own and generator.last_scheduler == "Euler"
    assert {e.name for e in SCHEDULERS} >= {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE Karras",
                                            "DDIM", "UniPC", "Heun", "LMS"}


def test_the_lcm_lora_refuses_a_scheduler_and_the_distilled_mode_steps_trailing(generator: Generator) -> None:
    with pytest.raises(UserError, match="does not apply with fast = lcm-lora"):
        generator.generate("a fox", seed=1, fast="lcm-lora", scheduler="Euler a")
    generator.generate("a fox", seed=1, fast="distilled", scheduler="Euler a")
    assert type(generator.pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert generator.pipe.scheduler.config["timestep_spacing"] == "trailing"


# ----- negative prompt and guidance -----

def test_negative_prompt_and_guidance_reach_the_pipeline_and_change_the_picture(
        generator: Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = CallRecorder(generator.pipe, monkeypatch)
    plain = generator.generate("a red fox", seed=5, guidance=5.0)
    assert "negative_prompt" not in recorder.calls[-1]  # none: SDXL's zeroed unconditional branch, as before
    steered = generator.generate("a red fox", seed=5, guidance=5.0, negative_prompt="  blurry, text ")
    assert recorder.calls[-1]["negative_prompt"] == "blurry, text"
    assert recorder.calls[-1]["guidance_scale"] == 5.0
    other = generator.generate("a red fox", seed=5, guidance=9.5)
    assert recorder.calls[-1]["guidance_scale"] == 9.5
    assert not np.array_equal(_pixels(plain), _pixels(steered))
    assert not np.array_equal(_pixels(plain), _pixels(other))


def test_options_are_checked_in_one_line() -> None:
    assert DrawOptions(scheduler="euler a").scheduler == "Euler a"
    for values, expected in (({"guidance": 31}, "guidance: Input should be less than or equal to 30"),
                             ({"per_round": 0}, "per_round: Input should be greater than or equal to 1"),
                             ({"scheduler": "Eulr"}, "scheduler: unknown scheduler 'Eulr'"),
                             ({"negatve": "x"}, "negatve: unknown key (known: negative_prompt, guidance")):
        with pytest.raises(UserError, match=expected.replace("(", r"\(")):
            parse_options(values, "prompts.jsonl:3")


# ----- provenance and the parameters line -----

def test_generate_records_them_and_redraws_the_same_picture_from_its_recipe(
        settings: Settings, capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGRAG_TINY_KIT_DIR", settings.tiny_kit_dir)
    out = tmp_path / "fox.png"
    code, stdout, err = run_cli(capsys, "generate", "a red fox", "-o", str(out), "--profile", "tiny", "--json",
                                "--negative", "blurry, text", "--guidance", "7", "--scheduler", "dpm++ 2m karras")
    assert code == 0, err
    result = json.loads(stdout)
    assert (result["negative_prompt"], result["guidance"], result["scheduler"], result["sampler"]) == (
        "blurry, text", 7.0, "DPM++ 2M Karras", "DPM++ 2M Karras")
    doc = read_provenance(out)
    assert (doc["negative_prompt"], doc["guidance"], doc["scheduler"], doc["sampler"]) == (
        "blurry, text", 7.0, "DPM++ 2M Karras", "DPM++ 2M Karras")
    with Image.open(out) as im:
        lines = im.info[PARAMETERS_KEY].split("\n")
    assert lines[0] == "a red fox" and lines[1] == "Negative prompt: blurry, text"
    assert lines[2].startswith("Steps: 2, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 0, Size: 64x64")
    again = tmp_path / "again.png"
    code, _, err = run_cli(capsys, "generate", "-o", str(again), "--from-image", str(out))
    assert code == 0, err
    assert np.array_equal(_pixels(Image.open(out)), _pixels(Image.open(again)))
    assert read_provenance(again)["sampler"] == "DPM++ 2M Karras"
    # The default: no negative prompt line, the checkpoint's own sampler named as A1111 names it.
    plain = tmp_path / "plain.png"
    assert run_cli(capsys, "generate", "a red fox", "-o", str(plain), "--profile", "tiny")[0] == 0
    with Image.open(plain) as im:
        text = im.info[PARAMETERS_KEY]
    assert "Negative prompt" not in text and "Sampler: Euler, CFG scale: 5" in text


def test_bad_values_on_the_command_line_are_one_line(
        settings: Settings, capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGRAG_TINY_KIT_DIR", settings.tiny_kit_dir)
    out = str(tmp_path / "x.png")
    for flags, expected in ((["--scheduler", "Euler b"], "error: unknown --scheduler 'Euler b'; choose one of"),
                            (["--guidance", "99"], "error: --guidance must be a number from 0 to 30"),
                            (["--fast", "lcm-lora", "--scheduler", "Euler"], "does not apply with fast = lcm-lora")):
        code, _, err = run_cli(capsys, "generate", "a fox", "-o", out, "--profile", "tiny", *flags)
        assert code == 1 and expected in err and "Traceback" not in err, err
        assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    code, _, err = run_cli(capsys, "run", "a fox", "--profile", "tiny", "--per-round", "9")
    assert code == 1 and "generation.per_round: Input should be less than or equal to 8" in err
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a fox"}\n{"prompt": "a cat", "scheduler": "DPM++ 9M"}\n', encoding="utf-8")
    code, _, err = run_cli(capsys, "batch", str(prompts), "--profile", "tiny", "--planner", "fixed")
    assert code == 1 and f"error: {prompts}:2: scheduler: unknown scheduler 'DPM++ 9M'; choose one of" in err


# ----- through the runs: tools, batch lines, chat; the judge never sees the negative prompt -----

class RecordingGenerator(FakeGenerator):
    """The fake generator, keeping every drawing's keyword arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.kwargs: list[dict[str, Any]] = []
        self.last_scheduler = "Euler"

    def generate(self, prompt: str, *, seed: int, **kwargs: Any) -> Image.Image:
        self.kwargs.append(kwargs)
        self.last_scheduler = kwargs.get("scheduler") or "Euler"
        return super().generate(prompt, seed=seed, **kwargs)


class RecordingJudge(ScriptedJudge):
    def __init__(self) -> None:
        super().__init__([FakeVerdict(False, ["a wooden cradle"], "no cradle")])
        self.prompts: list[str] = []

    def judge(self, image: Image.Image, prompt: str, **kwargs: Any) -> FakeVerdict:
        self.prompts.append(prompt)
        return super().judge(image, prompt, **kwargs)


def _runner(tmp_path: Path) -> tuple[Runner, RecordingGenerator, RecordingJudge]:
    settings = load_settings("default", environ={"IMGRAG_HOME": str(tmp_path / "home")})
    generator, judge = RecordingGenerator(), RecordingJudge()
    (tmp_path / "refs").mkdir(exist_ok=True)
    runner = Runner(settings, manager=FakeManager({"generator": generator, "judge": judge,
                                                   "embedder": FakeEmbedder()}),
                    reference_store=MemoryStore(tmp_path / "refs"), checkpointer=open_checkpointer(settings.threads_db))
    return runner, generator, judge


def test_a_run_draws_every_round_with_its_options_and_the_judge_sees_only_the_prompt(tmp_path: Path) -> None:
    runner, generator, judge = _runner(tmp_path)
    options = DrawOptions(negative_prompt="blurry, watermark", guidance=7.5, scheduler="UniPC")
    result = runner.run("a dog and a cradle", planner="fixed", max_rounds=2, options=options)
    assert len(generator.kwargs) == 2 and all(
        (k["negative_prompt"], k["guidance"], k["scheduler"]) == ("blurry, watermark", 7.5, "UniPC")
        for k in generator.kwargs)
    assert judge.prompts and set(judge.prompts) == {"a dog and a cradle"}
    assert result["drawing"] == {"negative_prompt": "blurry, watermark", "guidance": 7.5, "scheduler": "UniPC",
                                 "per_round": 1, "loras": []}
    for candidate in result["candidates"]:
        assert (candidate["negative_prompt"], candidate["guidance"], candidate["sampler"]) == (
            "blurry, watermark", 7.5, "UniPC")
        doc = read_provenance(candidate["path"])
        assert doc["negative_prompt"] == "blurry, watermark" and doc["scheduler"] == "UniPC"
    trace = [json.loads(line) for line in (Path(result["run_dir"]) / "trace.jsonl").read_text().splitlines()]
    assert trace[0]["drawing"]["negative_prompt"] == "blurry, watermark"
    assert any(s.get("tool") == "generate" and s.get("sampler") == "UniPC" for s in trace)


def test_batch_lines_carry_their_own_options_over_the_flags(tmp_path: Path) -> None:
    runner, generator, _ = _runner(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a fox"}\n'
                       '{"prompt": "a cat", "negative": "dogs", "guidance": 3, "scheduler": "euler a"}\n',
                       encoding="utf-8")
    summary = runner.batch(prompts, planner="fixed", max_rounds=1, options=DrawOptions(negative_prompt="blurry"))
    assert [item["status"] for item in summary["items"]] == ["budget_exhausted", "budget_exhausted"]
    assert [(k["negative_prompt"], k["guidance"], k["scheduler"]) for k in generator.kwargs] == [
        ("blurry", None, ""), ("dogs", 3.0, "Euler a")]


def test_the_chat_sets_them_for_the_next_requests(tmp_path: Path) -> None:
    runner, generator, judge = _runner(tmp_path)
    session = ChatSession(runner, planner="fixed", rounds=1)
    with pytest.raises(UserError, match="unknown scheduler 'Eulr'; choose one of"):
        session.set_drawing(scheduler="Eulr")
    with pytest.raises(UserError, match="/guidance takes a number"):
        session.set_guidance("lots")
    with pytest.raises(UserError, match="/per-round takes a whole number from 1 to 8"):
        session.set_per_round("12")
    assert session.drawing == {}  # nothing changed by the mistakes
    session.set_drawing(negative_prompt="text")
    session.set_guidance("6")
    session.send("a dog and a cradle")
    assert (generator.kwargs[-1]["negative_prompt"], generator.kwargs[-1]["guidance"]) == ("text", 6.0)
    session.set_drawing(scheduler="DDIM")
    session.set_guidance("default")
    session.send("make the cradle wooden")
    assert (generator.kwargs[-1]["negative_prompt"], generator.kwargs[-1]["guidance"],
            generator.kwargs[-1]["scheduler"]) == ("text", None, "DDIM")
    assert session.values()["drawing"]["scheduler"] == "DDIM"  # kept in the thread: a later process draws the same
    assert all("text" not in p for p in judge.prompts)


def test_the_terminal_chats_slash_commands(tmp_path: Path, capsys: pytest.CaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.chat import parse_line
    from agent.frontends.cli.chat import ChatRepl

    monkeypatch.setenv("IMGRAG_HOME", str(tmp_path / "home"))
    repl = ChatRepl(load_settings("default", environ={"IMGRAG_HOME": str(tmp_path / "home")}), "fixed", 1)
    assert parse_line("/sch euler a").name == "scheduler" and parse_line("/per 3").name == "per-round"
    with pytest.raises(UserError, match="ambiguous"):
        parse_line("/ne off")  # /new or /negative
    repl.handle("/scheduler euler a")
    repl.handle("/negative blurry, text")
    repl.handle("/guidance 6.5")
    repl.handle("/per-round 3")
    assert repl.session.drawing == {"scheduler": "Euler a", "negative_prompt": "blurry, text", "guidance": 6.5,
                                    "per_round": 3}
    shown = capsys.readouterr().out
    assert "scheduler Euler a" in shown and "negative prompt: blurry, text" in shown
    assert "3 drawing(s) per round" in shown
    repl.guard(lambda: repl.handle("/scheduler Euler b"))
    err = capsys.readouterr().err
    assert "error: unknown scheduler 'Euler b'; choose one of" in err and "Traceback" not in err
    repl.handle("/scheduler list")
    assert "DPM++ 2M Karras" in capsys.readouterr().out
    repl.handle("/negative off")
    repl.handle("/scheduler default")
    assert repl.session.drawing_options().negative_prompt == "" and repl.session.drawing_options().scheduler == ""

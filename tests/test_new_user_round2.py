"""A new user's second round: a full disk, exact resumes, recipes that travel, messages that name the fix.

Each test is of a kind (not of one example): the trace's writes and reads, every tool call on resume, every
usage error, every bound. Scripted fakes stand in for the models (tests/fakes.py); the manager is the real one."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from agent.runner import DiskFull, Runner, open_checkpointer
from imgrag.records.runs import RESERVE_NAME, RunRecord
from imgrag.settings import load_settings
from tests.cli import run_cli
from tests.fakes import FakeEmbedder, FakeGenerator, FakeManager, FakeVerdict, MemoryStore, ScriptedJudge

NO_CRADLE = FakeVerdict(False, ["a wooden cradle"], "no cradle")
MATCH = FakeVerdict(True, [], "all there")


@pytest.fixture
def settings(tmp_path: Path):
    return load_settings("default", environ={"IMGRAG_HOME": str(tmp_path / "home")})


def make_runner(settings, tmp_path: Path, verdicts, generator=None, on_event=None):
    models = {"generator": generator or FakeGenerator(), "judge": ScriptedJudge(verdicts), "embedder": FakeEmbedder()}
    refs = tmp_path / "refs"
    refs.mkdir(exist_ok=True)
    runner = Runner(settings, manager=FakeManager(models), reference_store=MemoryStore(refs), on_event=on_event,
                    checkpointer=open_checkpointer(tmp_path / "threads.sqlite"))
    return runner, models


def whole_json_lines(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "", "the trace ends in a whole line"
    return [json.loads(line) for line in lines[:-1]]


# ----- the trace: whole lines or none -----

def test_a_trace_line_is_written_whole_or_not_at_all_and_a_torn_line_is_skipped_and_reported(tmp_path, monkeypatch):
    import imgrag.records.runs as runs

    record = RunRecord(tmp_path / "run")
    record.append_step({"event": "start"})
    before = record.trace_path.read_bytes()
    real_write = os.write

    def half_then_full(fd: int, data: bytes) -> int:  # the filesystem fills up in the middle of the line
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(runs.os, "write", half_then_full)
    with pytest.raises(OSError) as caught:
        record.append_step({"tool": "generate", "message": "x" * 500})
    assert caught.value.filename == str(record.trace_path)  # the error names the file
    assert record.trace_path.read_bytes() == before  # the half line was cut back off
    monkeypatch.setattr(runs.os, "write", real_write)

    # A crash (kill -9) mid-line leaves a torn last line: the next step starts a line of its own.
    with record.trace_path.open("ab") as fh:
        fh.write(b'{"tool": "regen')
    assert [s["event"] for s in record.read_steps()] == ["start"]
    assert len(record.trace_problems) == 1 and "line 2: torn" in record.trace_problems[0]
    record.append_step({"event": "resume"})
    assert [s["event"] for s in record.read_steps()] == ["start", "resume"]
    assert record.trace_path.read_text().split("\n")[1] == '{"tool": "regen'  # kept, on its own line


# ----- a full disk mid-run -----

class DiskFiller:
    """A filesystem-full fake at the write layer of imgrag.records.runs: once ``fill()`` is called, every new file and
    every append in the run folders fails with ENOSPC until the run's reserve file is removed (which is what
    frees the space on a real disk)."""

    def __init__(self, monkeypatch, runs_dir: Path) -> None:
        import tempfile

        import imgrag.records.runs as runs

        self.runs_dir = runs_dir
        self.full = False
        real_mkstemp, real_write = tempfile.mkstemp, os.write

        def mkstemp(*args, dir=None, **kwargs):  # noqa: A002  (tempfile's own name)
            if self._no_room(dir):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dir))
            return real_mkstemp(*args, dir=dir, **kwargs)

        def write(fd: int, data: bytes) -> int:
            if self._no_room(os.readlink(f"/proc/self/fd/{fd}")):
                return real_write(fd, data[:3])  # a short write: the disk filled up mid-line
            return real_write(fd, data)

        monkeypatch.setattr(runs.tempfile, "mkstemp", mkstemp)
        monkeypatch.setattr(runs.os, "write", write)

    def _no_room(self, where) -> bool:
        if not self.full or where is None or not str(where).startswith(str(self.runs_dir)):
            return False
        return any(self.runs_dir.glob(f"*/{RESERVE_NAME}"))

    def fill(self) -> None:
        self.full = True


class FillingGenerator(FakeGenerator):
    def __init__(self, filler: DiskFiller | None, at_call: int) -> None:
        super().__init__()
        self.filler, self.at_call = filler, at_call

    def generate(self, *args, **kwargs):
        image = super().generate(*args, **kwargs)
        if self.filler is not None and len(self.calls) == self.at_call:
            self.filler.fill()
        return image


def test_a_full_disk_mid_run_closes_the_record_with_its_best_candidate_and_resume_finishes(settings, tmp_path,
                                                                                           monkeypatch):
    filler = DiskFiller(monkeypatch, Path(settings.output_dir))
    runner, _ = make_runner(settings, tmp_path, [NO_CRADLE, MATCH], generator=FillingGenerator(filler, 2))
    with pytest.raises(DiskFull) as caught:
        runner.run("a retriever and a cradle", planner="fixed", max_rounds=3, run_id="full")
    message = str(caught.value)
    run_dir = Path(settings.output_dir) / "full"
    assert "\n" not in message and "No space left on device" in message and "left on the disk of" in message
    assert str(run_dir / "candidates") in message and "kept 1 candidate(s) and result.json" in message
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "interrupted" and result["stop_reason"].startswith("the disk is full")
    assert result["final_candidate"] == "c0" and Path(result["final_image"]).is_file()
    steps = whole_json_lines(run_dir / "trace.jsonl")
    assert steps[-1]["event"] == "disk_full"
    assert not (run_dir / RESERVE_NAME).exists()

    filler.full = False  # space freed: the resume goes on from the checkpoint, nothing finished is redone
    runner2, models2 = make_runner(settings, tmp_path, [MATCH])
    result = runner2.resume("full")
    assert result["status"] == "matched"
    assert len(models2["generator"].calls) == 1  # only the drawing the full disk refused
    assert [c["id"] for c in result["candidates"]] == ["c0", "c1"]
    whole_json_lines(run_dir / "trace.jsonl")


def test_a_full_disk_is_one_line_with_the_resume_command(settings, tmp_path, monkeypatch, capsys):
    import agent.frontends.cli.run as cli_run

    filler = DiskFiller(monkeypatch, Path(settings.output_dir))
    runner, _ = make_runner(settings, tmp_path, [NO_CRADLE], generator=FillingGenerator(filler, 1))
    monkeypatch.setattr(cli_run, "_make_runner", lambda *a, **k: (runner, settings))
    code, out, err = run_cli(capsys, "run", "a cradle", "--planner", "fixed", "--profile", "cpu")
    text = " ".join(err.split())
    assert code == 1 and "Traceback" not in err and out == ""
    assert "error:" in text and "No space left on device" in text
    assert "free some space, then continue with: imgrag run --resume" in text and "--profile cpu" in text


# ----- exact resume -----

class StopAfter:
    """Ctrl-C right after a tool finished, before LangGraph checkpointed its result (the event sink raises)."""

    def __init__(self, tool: str) -> None:
        self.tool = tool

    def __call__(self, event: dict) -> None:
        if event["event"] == "tool_end" and event["tool"] == self.tool and event["ok"]:
            raise KeyboardInterrupt


@pytest.mark.parametrize("tool", ["generate", "critique", "regenerate"])
def test_a_resume_never_redoes_a_step_that_finished_before_the_interruption(settings, tmp_path, tool) -> None:
    from agent.runner import RunInterrupted

    runner, models = make_runner(settings, tmp_path, [NO_CRADLE, MATCH], on_event=StopAfter(tool))
    with pytest.raises(RunInterrupted) as caught:
        runner.run("a retriever and a cradle", planner="fixed", max_rounds=3, run_id="exact")
    partial = caught.value.result
    drawn = len(models["generator"].calls)
    # The interrupted record names the best candidate drawn so far, even one the checkpoint never got.
    assert partial["final_image"] is not None and Path(partial["final_image"]).is_file()
    assert len(partial["candidates"]) == drawn

    runner2, models2 = make_runner(settings, tmp_path, [MATCH] if tool != "generate" else [NO_CRADLE, MATCH])
    result = runner2.resume("exact")
    ids = [c["id"] for c in result["candidates"]]
    assert ids == [f"c{n}" for n in range(len(ids))], ids  # no orphaned candidate, no duplicate round
    assert len(ids) == drawn + len(models2["generator"].calls)
    seeds = [(c["round"], c["seed"]) for c in result["candidates"]]
    assert len(set(seeds)) == len(seeds)
    if tool == "critique":
        assert models2["judge"].calls == 1  # the finished critique was replayed; only the next one is asked
    files = sorted(p.name for p in (Path(settings.output_dir) / "exact" / "candidates").iterdir())
    assert files == [f"{i}.png" for i in ids]
    events = [s.get("event") for s in RunRecord(Path(settings.output_dir) / "exact").read_steps()]
    assert "replayed" in events


# ----- usage errors -----

@pytest.mark.parametrize("argv, needles", [
    (["run", "--no-such-flag"], ["No such option: --no-such-flag", "imgrag run --help"]),
    (["index"], ["Missing argument", "imgrag index --help"]),
    (["generate", "a cat", "-o", "x.png", "--steps", "many"], ["--steps", "imgrag generate --help"]),
    (["search", "x", "-k"], ["-k", "requires an argument"]),
    (["no-such-command"], ["No such command", "imgrag --help"]),
])
def test_usage_errors_are_one_line_and_exit_1(capsys, argv, needles) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:"), err
    for needle in needles:
        assert needle in err, (needle, err)


# ----- bounds -----

@pytest.mark.parametrize("argv, needle", [
    (["generate", "a cat", "-o", "x.png", "--size", "16384x16384"], "generation.max_side"),
    (["generate", "a cat", "-o", "x.png", "--steps", "100000"], "generation.max_steps"),
])
def test_sizes_and_steps_have_bounds_a_user_can_raise(capsys, tmp_path, monkeypatch, argv, needle) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, *argv)
    assert code == 1 and needle in err and "Traceback" not in err
    # Raised on purpose, the bound lets it through (the default profile then stops at its missing checkpoint).
    monkeypatch.setenv("IMGRAG_GENERATION_MAX_SIDE", "16384")
    monkeypatch.setenv("IMGRAG_GENERATION_MAX_STEPS", "100000")
    code, _, err = run_cli(capsys, *argv)
    assert code == 1 and needle not in err, err


def test_the_bounds_hold_for_the_generator_itself() -> None:
    from imgrag.errors import UserError
    from imgrag.models.draw_checks import validate_request
    from imgrag.settings import DEFAULT_MAX_SIDE, DEFAULT_MAX_STEPS, GenerationSettings

    validate_request("a cat", DEFAULT_MAX_SIDE, 64, DEFAULT_MAX_STEPS, 0.5)
    with pytest.raises(UserError, match="max_side"):
        validate_request("a cat", DEFAULT_MAX_SIDE + 8, 64, 2, 0.5)
    with pytest.raises(UserError, match="max_steps"):
        validate_request("a cat", 64, 64, DEFAULT_MAX_STEPS + 1, 0.5)
    validate_request("a cat", 4096, 64, 2, 0.5, generation=GenerationSettings(max_side=4096))


# ----- recipes that travel -----

def test_a_recipe_keeps_absolute_reference_paths_and_its_profile(tiny_kit, tmp_path, monkeypatch, capsys) -> None:
    from PIL import Image

    from imgrag.records.provenance import file_sha256, read_provenance

    monkeypatch.setenv("IMGRAG_TINY_KIT_DIR", str(tiny_kit["generator"].parent))
    made, elsewhere = tmp_path / "made", tmp_path / "elsewhere"
    made.mkdir()
    elsewhere.mkdir()
    Image.new("RGB", (48, 48), (200, 30, 30)).save(made / "ref.png")
    monkeypatch.chdir(made)
    code, _, err = run_cli(capsys, "generate", "a red kettle", "--ref", "ref.png", "-o", "first.png",
                           "--profile", "tiny")
    assert code == 0, err
    doc = read_provenance(made / "first.png")
    assert doc["profile"] == "tiny"
    assert doc["references"][0]["path"] == str((made / "ref.png").resolve())  # as typed: "ref.png"
    assert doc["references"][0]["sha256"] == file_sha256(made / "ref.png")

    monkeypatch.chdir(elsewhere)  # another folder, no --profile: the recipe's own profile and reference
    code, out, err = run_cli(capsys, "generate", "--from-image", "../made/first.png", "-o", "again.png", "--json")
    assert code == 0, err
    assert json.loads(out)["profile"] == "tiny" and "from the picture's recipe" in err
    assert read_provenance(elsewhere / "again.png")["references"] == doc["references"]


# ----- say what happened -----

def test_the_policy_taking_over_is_said_once_per_run(settings, tmp_path, monkeypatch, capsys) -> None:
    from langchain_core.messages import AIMessage

    import agent.frontends.cli.run as cli_run
    from tests.fakes import ScriptedChatModel

    runner, models = make_runner(settings, tmp_path, [NO_CRADLE, MATCH])
    models["llm"] = ScriptedChatModel(messages=iter([AIMessage(content="lovely picture") for _ in range(40)]))

    def made(profile, config, store, out_dir, on_event, *rest):
        runner.on_event = on_event
        return runner, settings

    monkeypatch.setattr(cli_run, "_make_runner", made)
    code, _, err = run_cli(capsys, "run", "a retriever and a cradle", "--max-rounds", "3")
    assert code == 0, err
    text = " ".join(err.split())
    assert text.count("the fixed policy took them") == 1, err
    assert "unusable LLM steps in a row" in text


def test_a_missing_store_does_not_exist_and_hints_name_the_profile(tmp_path, capsys) -> None:
    typo = tmp_path / "stroe"
    code, _, err = run_cli(capsys, "search", "a cat", "--store", str(typo), "--profile", "tiny")
    text = " ".join(err.split())
    assert code == 1 and f"the store {typo} does not exist" in text
    assert f"imgrag index PATH --profile tiny --store {typo}" in text
    assert not typo.exists()


def test_search_json_keeps_captions_whole(tiny_settings, tmp_path, capsys) -> None:
    from PIL import Image

    pics = tmp_path / "pics"
    pics.mkdir()
    Image.new("RGB", (32, 32), (10, 200, 10)).save(pics / "leaf.png")
    caption = "a green leaf " * 40  # longer than the table shows
    (pics / "leaf.txt").write_text(caption, encoding="utf-8")
    code, _, err = run_cli(capsys, "index", str(pics), "--profile", "tiny")
    assert code == 0, err
    code, out, err = run_cli(capsys, "search", "a leaf", "--profile", "tiny", "--json")
    assert code == 0, err
    (hit,) = json.loads(out)["results"]
    assert hit["caption"] == caption.strip()


def test_serve_on_a_busy_port_names_the_flag_before_announcing_anything(tmp_path, capsys) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = run_cli(capsys, "serve", "--port", str(port), "--profile", "tiny")
    assert code == 1 and "http://" not in out
    assert f"cannot serve on 127.0.0.1:{port}: the port is already in use" in err and "--port N" in err
    assert "GRADIO_SERVER_PORT" not in err


# ----- Ctrl-C anywhere -----

def test_ctrl_c_while_indexing_says_what_was_kept_and_how_to_go_on(tmp_path, monkeypatch, capsys) -> None:
    from PIL import Image

    import agent.frontends.cli.store as cli_store

    pics = tmp_path / "pics"
    pics.mkdir()
    Image.new("RGB", (8, 8)).save(pics / "a.png")

    def pressed(settings):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_store, "_embedder", pressed)
    monkeypatch.setattr(cli_store, "prepare_models", lambda settings: None)
    code, _, err = run_cli(capsys, "index", str(pics))
    assert code == 130 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("interrupted: the pictures indexed so far are kept") and "imgrag index" in err


# ----- flags that do nothing, files and prompts a user writes -----

@pytest.mark.parametrize("extra", [["a cat"], ["--seed", "3"], ["--max-rounds", "2"], ["--planner", "agent"]])
def test_a_flag_beside_resume_is_refused(capsys, extra) -> None:
    code, _, err = run_cli(capsys, "run", "--resume", "20260101-000000-abcdef", *extra)
    assert code == 1 and "--resume continues run" in err and "drop" in err


def test_a_flag_that_does_nothing_and_a_prompt_longer_than_the_encoders_read_are_said(tmp_path, capsys) -> None:
    ref_less = ["generate", "a cat " * 400, "-o", str(tmp_path / "x.png"), "--ip-scale", "0.8"]
    code, _, err = run_cli(capsys, *ref_less)  # the default profile: stops at its missing checkpoint, after both
    text = " ".join(err.split())
    assert "warning: --ip-scale does nothing without --ref" in text
    assert "note: the prompt is 802 CLIP tokens; SDXL's text encoders and the CLIP scores read only the first 77" \
        in text
    assert "WARNING:" not in err


def test_a_prompt_file_in_another_encoding_is_told_to_be_saved_as_utf8(tmp_path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a cat\na caf\u00e9 au lait\n".encode("cp1252"))
    code, _, err = run_cli(capsys, "batch", str(prompts))
    text = " ".join(err.split())
    assert code == 1 and f"{prompts}:2: the prompt file is not UTF-8 text (byte 0xe9)" in text
    assert "re-save it as UTF-8" in text

"""A new user's second round, the kinds that round 2's file leaves to this one: text in another encoding in every
free-text argument, messages kept whole off a terminal, quiet model loading, help that names every preset, a
thread id that names nothing, and a PROMPT given beside a picture's recipe.

Through the real entry point (tests/cli.py) and, where models are needed, the tiny kit."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from PIL import Image

from imgrag.errors import UserError, check_text
from imgrag.presets import builtin_presets
from tests.cli import run_cli

REPO = Path(__file__).resolve().parents[1]
# "a café table" typed in a Latin-1 terminal reaches Python (PEP 383) with a lone surrogate for the byte 0xe9.
LATIN1 = "a caf\udce9 table"


def one_error_line(err: str) -> str:
    assert "Traceback" not in err and "tiny kit" not in err, err  # refused before any model (or kit) is touched
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def tiny_env(tiny_kit: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGRAG_TINY_KIT_DIR", str(tiny_kit["generator"].parent))
    monkeypatch.setenv("IMGRAG_PROFILE", "tiny")


# ----- text in another encoding -----

def test_check_text_names_the_byte_and_its_place() -> None:
    assert check_text("a plain kettle, ☕ and 猫") == "a plain kettle, ☕ and 猫"
    with pytest.raises(UserError, match=r"^--negative is not UTF-8 text \(byte 0xe9 at character 6\)"):
        check_text(LATIN1, "--negative")
    with pytest.raises(UserError, match=r"lone surrogate \(U\+D800 at character 2\)"):
        check_text("a\ud800")


@pytest.mark.parametrize("argv", [
    ("generate", LATIN1),
    ("generate", "a kettle", "--negative", LATIN1),
    ("generate", "a kettle", "--concept", LATIN1),
    ("run", LATIN1),
    ("run", "a kettle", "--negative", LATIN1),
    ("critique", "picture.png", LATIN1),
    ("search", LATIN1),
    ("memory", "forget", LATIN1),
], ids=["generate", "generate-negative", "generate-concept", "run", "run-negative", "critique", "search",
        "memory-forget"])
def test_every_free_text_argument_in_another_encoding_is_one_line_before_any_model(argv, capsys, tmp_path,
                                                                                     monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "picture.png")
    code, out, err = run_cli(capsys, *argv, "--profile", "tiny")
    line = one_error_line(err)
    assert code == 1 and out == ""
    # the whole message on its one line, though it is longer than 80 columns and stderr is no terminal
    assert "is not UTF-8 text (byte 0xe9 at character 6)" in line and line.endswith("uses another encoding)"), line
    assert len(line) > 80


def test_the_core_checks_a_prompt_too(tmp_path: Path) -> None:
    from agent.runner import Runner, open_checkpointer
    from imgrag.settings import load_settings
    from tests.fakes import FakeEmbedder, FakeGenerator, FakeManager, MemoryStore, ScriptedJudge

    settings = load_settings("default", environ={"IMGRAG_HOME": str(tmp_path / "home")})
    generator = FakeGenerator()
    models = {"generator": generator, "judge": ScriptedJudge([]), "embedder": FakeEmbedder()}
    (tmp_path / "refs").mkdir()
    runner = Runner(settings, manager=FakeManager(models), reference_store=MemoryStore(tmp_path / "refs"),
                    checkpointer=open_checkpointer(tmp_path / "threads.sqlite"))
    with pytest.raises(UserError, match="the prompt is not UTF-8 text"):
        runner.run(LATIN1, max_rounds=1)
    assert not list((tmp_path / "home").rglob("result.json")), "nothing was started"


# ----- quiet model loading -----

def test_building_siglip_prints_nothing(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    from imgrag.kits.tiny_scorers import build_siglip

    build_siglip(tmp_path / "siglip", seed=0)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err.strip() == "", captured  # its tokenizer trainer prints blank lines
    assert (tmp_path / "siglip" / "open_clip_config.json").exists()


def test_loading_dino_prints_no_bar_or_warning(tiny_kit: dict[str, Path], capfd: pytest.CaptureFixture) -> None:
    from imgrag.models.dino import DinoScorer

    capfd.readouterr()
    scorer = DinoScorer(str(tiny_kit["dino"]))
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == "", captured
    assert scorer.embed([Image.new("RGB", (32, 32))]).shape[0] == 1


# ----- help -----

def test_help_joins_a_paragraphs_lines_and_names_every_preset(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping of our own: a paragraph is one line
    code, out, _ = run_cli(capsys, "eval", "--help")
    assert code == 0
    assert "the prompt is a photo of a <class>" in out  # split across two source lines in the docstring
    code, out, _ = run_cli(capsys, "run", "--help")
    assert code == 0
    assert set(builtin_presets()) >= {"cpu", "fast-draft", "gpu-24gb", "gpu-80gb"}
    profile_line = next(line for line in out.splitlines() if "--profile" in line)
    for name in builtin_presets():
        assert name in profile_line, profile_line


def test_an_editable_install_is_one_path_entry() -> None:
    # package-dir "" = "." makes setuptools write a .pth line instead of an import hook that warns at install
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert config["tool"]["setuptools"]["package-dir"] == {"": "."}


# ----- a thread id that names nothing -----

def test_chat_thread_that_names_nothing_is_one_line(tiny_env, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("IMGRAG_HOME", str(tmp_path / "home"))
    code, out, err = run_cli(capsys, "chat", "--thread", "nosuch")
    assert code == 1 and "Traceback" not in err
    assert out == "", "the error comes before the chat's banner"
    assert err.startswith("error:"), "and before the tiny profile's warning"
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "nosuch" in lines[0], err
    assert "--thread nosuch --new" in lines[0], lines[0]


def test_chat_new_without_a_thread_name_is_refused(capsys) -> None:
    code, _, err = run_cli(capsys, "chat", "--new", "--profile", "tiny")
    assert code == 1 and "--thread NAME" in one_error_line(err)


# ----- a PROMPT beside a picture's recipe -----

def test_a_prompt_beside_from_image_says_it_replaces_the_recipes(tiny_env, tmp_path: Path, capsys) -> None:
    drawn = tmp_path / "drawn.png"
    code, _, err = run_cli(capsys, "generate", "a red kettle", "-o", str(drawn), "--steps", "1", "--size", "64x64")
    assert code == 0, err
    again = tmp_path / "again.png"
    code, out, err = run_cli(capsys, "generate", "a blue kettle", "--from-image", str(drawn), "-o", str(again),
                             "--json")
    assert code == 0, err
    assert "note: drawing the PROMPT given, not the recipe's own ('a red kettle')" in err
    assert json.loads(out)["prompt"] == "a blue kettle"
    code, out, err = run_cli(capsys, "generate", "a red kettle", "--from-image", str(drawn), "-o", str(again))
    assert code == 0 and "note: drawing the PROMPT" not in err  # the same prompt is no replacement


# ----- a resume goes on as the run began -----

class StopAfterFirstDrawing:
    def __call__(self, event: dict) -> None:
        if event["event"] == "tool_end" and event["tool"] == "generate" and event["ok"]:
            raise KeyboardInterrupt


def fake_runner(settings, tmp_path: Path, on_event=None):
    from agent.runner import Runner, open_checkpointer
    from tests.fakes import FakeEmbedder, FakeGenerator, FakeManager, FakeVerdict, MemoryStore, ScriptedJudge

    verdicts = [FakeVerdict(False, ["a wooden cradle"], "no cradle"), FakeVerdict(True, [], "all there")]
    models = {"generator": FakeGenerator(), "judge": ScriptedJudge(verdicts), "embedder": FakeEmbedder()}
    (tmp_path / "refs").mkdir(parents=True, exist_ok=True)
    return Runner(settings, manager=FakeManager(models), reference_store=MemoryStore(tmp_path / "refs"),
                  on_event=on_event, checkpointer=open_checkpointer(tmp_path / "threads.sqlite"))


def interrupted_run(settings, tmp_path: Path, run_id: str) -> None:
    from agent.runner import RunInterrupted

    with pytest.raises(RunInterrupted):
        fake_runner(settings, tmp_path, StopAfterFirstDrawing()).run("a retriever and a cradle", planner="fixed",
                                                                       max_rounds=3, run_id=run_id)


def test_a_resume_under_another_profile_is_refused_before_any_step(tiny_kit, tmp_path: Path) -> None:
    from imgrag.settings import load_settings

    environ = {"IMGRAG_HOME": str(tmp_path / "home"), "IMGRAG_TINY_KIT_DIR": str(tiny_kit["generator"].parent)}
    tiny, default = load_settings("tiny", environ=environ), load_settings("default", environ=environ)
    assert tiny.output_dir == default.output_dir and tiny.threads_db == default.threads_db  # one home, both see it
    interrupted_run(tiny, tmp_path, "20261207-010101-abcdef")
    trace = Path(tiny.output_dir) / "20261207-010101-abcdef" / "trace.jsonl"
    before = trace.read_bytes()
    with pytest.raises(UserError, match="started with the tiny profile.*resume it with --profile tiny"):
        fake_runner(default, tmp_path).resume("20261207-010101-abcdef")
    assert trace.read_bytes() == before, "nothing of the run was touched"
    # a unique start of the id is enough, under the run's own profile
    result = fake_runner(tiny, tmp_path).resume("20261207-0101")
    assert result["run_id"] == "20261207-010101-abcdef" and result["status"] != "interrupted"


def test_a_resume_id_that_names_no_run_lists_the_closest(tmp_path: Path) -> None:
    from imgrag.settings import load_settings

    settings = load_settings("default", environ={"IMGRAG_HOME": str(tmp_path / "home")})
    interrupted_run(settings, tmp_path, "20261207-010101-abcdef")
    interrupted_run(settings, tmp_path, "20261207-010102-fedcba")
    runner = fake_runner(settings, tmp_path)
    with pytest.raises(UserError, match=r"no run with thread id '20261207-010101-abcdeg'.*closest: 20261207-010101"):
        runner.resume("20261207-010101-abcdeg")
    with pytest.raises(UserError, match="matches 2 threads"):
        runner.resume("20261207-0101")


def test_run_resume_without_profile_takes_the_runs_own(tiny_env, tmp_path: Path, capsys, monkeypatch) -> None:
    from imgrag.settings import load_settings

    monkeypatch.setenv("IMGRAG_HOME", str(tmp_path / "home"))
    tiny = load_settings("tiny")
    interrupted_run(tiny, tmp_path / "home", "20261207-010101-abcdef")
    interrupted_run(tiny, tmp_path / "home", "20261207-020202-abcdef")
    monkeypatch.delenv("IMGRAG_PROFILE")  # a new shell: the default profile, whose models are not here
    code, _, err = run_cli(capsys, "run", "--resume", "20261207-020202-abcdef", "--profile", "default")
    assert code == 1 and "resume it with --profile tiny" in one_error_line(err)
    code, out, err = run_cli(capsys, "run", "--resume", "20261207-0101", "--json")
    assert code == 0, err
    assert "note: run 20261207-010101-abcdef started with the tiny profile; resuming with it" in err
    result = json.loads(out)
    assert result["run_id"] == "20261207-010101-abcdef" and result["status"] != "interrupted"


# ----- a recipe whose reference's name is not UTF-8 -----

def test_from_image_redraws_a_picture_guided_by_a_reference_whose_name_is_not_utf8(tiny_env, tmp_path: Path,
                                                                                  capsys, monkeypatch) -> None:
    import os

    refs = tmp_path / "refs"
    refs.mkdir()
    odd = Path(os.fsdecode(bytes(refs) + b"/caf\xe9.png"))  # Latin-1 "café.png", as an old camera names it
    Image.new("RGB", (32, 32), (200, 30, 30)).save(odd)
    drawn = tmp_path / "first" / "drawn.png"
    drawn.parent.mkdir()
    code, _, err = run_cli(capsys, "generate", "a red kettle", "--ref", str(odd), "-o", str(drawn), "--steps", "1",
                           "--size", "64x64")
    assert code == 0, err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = run_cli(capsys, "generate", "--from-image", str(drawn), "-o", "again.png", "--json")
    assert code == 0, err
    assert (elsewhere / "again.png").exists()
    # a recipe path that is not a string is still one line naming the field
    from imgrag.records.recipes import Recipe

    with pytest.raises(Exception, match=r"input should be a string \(a file.s path\), got a int"):
        Recipe.model_validate({"schema": "imgrag.records.provenance/1", "prompt": "x", "references": [{"path": 3}]})


# ----- an error in a flag's value names the flag -----

@pytest.mark.parametrize("argv, flag", [
    (["generate", "a cat", "--size", "16384x16384"], "--size"),
    (["generate", "a cat", "--size", "64x4096"], "--size"),
    (["generate", "a cat", "--steps", "100000"], "--steps"),
    (["generate", "a cat", "--ref", "picture.png", "--ip-scale", "2"], "--ip-scale"),
    (["run", "a cat", "--fast", "turbo"], "--fast"),
])
def test_a_bad_flag_value_names_the_flag(argv, flag, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "picture.png")
    code, _, err = run_cli(capsys, *argv, "--profile", "tiny", *(["-o", "x.png"] if argv[0] == "generate" else []))
    line = one_error_line(err)
    assert code == 1 and line.startswith(f"error: {flag}"), line


def test_a_batch_resumes_under_the_profile_it_started_with(tiny_env, tmp_path: Path, capsys, monkeypatch) -> None:
    from agent.runner import RunInterrupted
    from imgrag.settings import load_settings

    monkeypatch.setenv("IMGRAG_HOME", str(tmp_path / "home"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red kettle\na blue kettle\n", encoding="utf-8")
    tiny = load_settings("tiny")
    with pytest.raises(RunInterrupted):
        fake_runner(tiny, tmp_path / "home", StopAfterFirstDrawing()).batch(prompts, planner="fixed", max_rounds=2)
    batch_json = next((tmp_path / "home" / "runs").glob("batch-prompts-*/batch.json"))
    assert json.loads(batch_json.read_text(encoding="utf-8"))["profile"] == "tiny"
    monkeypatch.delenv("IMGRAG_PROFILE")
    default = load_settings("default")
    with pytest.raises(UserError, match="started with the tiny profile.*resume it with --profile tiny"):
        fake_runner(default, tmp_path / "home").batch(prompts, resume=True, planner="fixed", max_rounds=2)
    code, out, err = run_cli(capsys, "batch", str(prompts), "--resume", "--planner", "fixed", "--max-rounds", "2",
                             "--json")
    assert code == 0, err
    assert "started with the tiny profile; resuming with it" in err
    assert all(item["status"] in {"matched", "budget_exhausted"} for item in json.loads(out)["items"])


def test_a_resumed_batch_keeps_its_planner_and_budget(tmp_path: Path) -> None:
    from agent.runner import RunInterrupted
    from imgrag.settings import load_settings

    settings = load_settings("default", environ={"IMGRAG_HOME": str(tmp_path / "home")})
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red kettle\na blue kettle\n", encoding="utf-8")
    with pytest.raises(RunInterrupted):
        fake_runner(settings, tmp_path, StopAfterFirstDrawing()).batch(prompts, planner="fixed", max_rounds=2)
    with pytest.raises(UserError, match="started with --planner fixed"):
        fake_runner(settings, tmp_path).batch(prompts, resume=True, planner="agent")
    with pytest.raises(UserError, match="started with --max-rounds 2"):
        fake_runner(settings, tmp_path).batch(prompts, resume=True, max_rounds=5)
    summary = fake_runner(settings, tmp_path).batch(prompts, resume=True)  # no LLM in the fakes: fixed or fail
    assert all(item["status"] in {"matched", "budget_exhausted"} for item in summary["items"]), summary
    for item in summary["items"]:
        result = json.loads((Path(settings.output_dir) / item["run_id"] / "result.json").read_text("utf-8"))
        assert result["planner"] == "fixed" and result["rounds"] <= 2, result


@pytest.mark.parametrize("name, content", [("pictures.png", b"\x89PNG\r\n\x1a\n...."),
                                           ("prompts.json", b'[{"prompt": "a"}]'), ("prompts.csv", b"a,b\n")])
def test_a_prompt_file_of_another_kind_is_one_line(name, content, tmp_path: Path, capsys) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    code, _, err = run_cli(capsys, "batch", str(path), "--profile", "tiny")
    line = one_error_line(err)
    assert code == 1 and "a prompt file is .txt (one prompt a line) or .jsonl" in line, line


def test_batch_resume_with_no_earlier_batch_says_it_starts_one(tiny_env, tmp_path: Path, capsys,
                                                               monkeypatch) -> None:
    monkeypatch.setenv("IMGRAG_HOME", str(tmp_path / "home"))
    prompts = tmp_path / "fresh.txt"
    prompts.write_text("a red kettle\n", encoding="utf-8")
    code, _, err = run_cli(capsys, "batch", str(prompts), "--resume", "--planner", "fixed", "--max-rounds", "1")
    assert code == 0, err
    assert f"note: no earlier batch of {prompts}" in err and "starting a new one" in err


def test_run_resume_with_an_empty_id_asks_for_one(capsys) -> None:
    code, _, err = run_cli(capsys, "run", "--resume", " ", "--profile", "tiny")
    assert code == 1 and "--resume needs the run id" in one_error_line(err)


# ----- an output path that cannot be one -----

def test_an_output_folder_or_a_file_system_that_takes_no_files_is_one_line(tmp_path: Path) -> None:
    from imgrag.records.runs import ensure_writable_file

    with pytest.raises(UserError, match=r"is a directory; give a file name such as .*report\.html$"):
        ensure_writable_file(tmp_path, "report", example="report.html")
    if Path("/proc").is_dir():  # procfs: the folder exists, a file cannot be made in it
        with pytest.raises(UserError, match="the folder exists, but its file system does not take new files"):
            ensure_writable_file("/proc/out.png")

"""The edges a new user hits first: each ends in one clear line (exit 1), before any model loads, or in a
correct result. The default profile is used where no model should load: its checkpoints are not on this
machine, so a command that got as far as loading one would fail differently."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from PIL import Image

from tests.cli import run_cli
from tests.ports import free_port


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("IMGRAG_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 1, err
    assert "Traceback" not in err
    text = " ".join(err.split())  # Rich wraps long lines on narrow consoles
    assert text.startswith("error:"), err
    for needle in needles:
        assert needle in text, (needle, err)


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "plain-file"
    path.write_text("not a folder")
    return path


def test_outputs_that_cannot_be_written_fail_before_any_work(capsys, tmp_path: Path, a_file: Path) -> None:
    code, _, err = run_cli(capsys, "generate", "a cat", "-o", "/proc/none/x.png")
    one_line_error(code, err, "/proc/none", "cannot write")
    code, _, err = run_cli(capsys, "generate", "a cat", "-o", str(a_file / "x.png"))
    one_line_error(code, err, str(a_file))
    code, _, err = run_cli(capsys, "run", "a cat", "--out", str(a_file))
    one_line_error(code, err, str(a_file), "not a directory")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    code, _, err = run_cli(capsys, "batch", str(prompts), "--out", str(a_file / "sub"))
    one_line_error(code, err, str(a_file))
    code, _, err = run_cli(capsys, "eval", str(prompts), "--out", "/proc/none")
    one_line_error(code, err, "/proc/none")
    pics = tmp_path / "pics"
    pics.mkdir()
    Image.new("RGB", (8, 8)).save(pics / "a.png")
    code, _, err = run_cli(capsys, "index", str(pics), "--store", str(a_file))
    one_line_error(code, err, str(a_file), "store")
    code, _, err = run_cli(capsys, "models", "build-tiny", "/proc/none/kit")
    one_line_error(code, err, "/proc/none/kit")


def test_report_output_is_checked_before_the_page_is_built(capsys, tmp_path: Path, a_file: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "result.json").write_text(json.dumps({"run_id": "x", "status": "failed", "candidates": []}))
    (run_dir / "trace.jsonl").write_text("")
    code, _, err = run_cli(capsys, "report", str(run_dir), "-o", str(a_file / "r.html"))
    one_line_error(code, err, str(a_file))


@pytest.mark.parametrize("device", ["quantum", "cuda:7"])
def test_a_device_that_is_not_there_is_one_line_even_in_doctor(capsys, monkeypatch, device: str) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("IMGRAG_DEVICE", device)
    code, _, err = run_cli(capsys, "doctor")
    one_line_error(code, err, "device", device)


def test_doctor_says_why_cuda_is_absent_and_probes_the_services(capsys, monkeypatch) -> None:
    port = free_port()  # a port nobody listens on
    monkeypatch.setenv("IMGRAG_MODELS_LLM_BACKEND", "openai")
    monkeypatch.setenv("IMGRAG_MODELS_LLM_BASE_URL", f"http://127.0.0.1:{port}/v1")
    code, out, err = run_cli(capsys, "doctor", "--store", f"http://127.0.0.1:{port}", "--json")
    assert code == 1 and err.startswith("error: "), err  # the report first, then one line and exit 1
    report = json.loads(out)
    assert report["cuda"].startswith(("available", "absent: "))
    assert not report["checkpoints"]["llm"]["server"]["ok"]
    assert f"127.0.0.1:{port}" in report["checkpoints"]["llm"]["server"]["problem"]
    assert not report["store"]["server"]["ok"]


@pytest.mark.parametrize("command", [["generate", "a cat", "-o", "x.png"], ["run", "a cat"]])
def test_seeds_out_of_torch_range_fail_before_models_load(capsys, command: list[str]) -> None:
    code, _, err = run_cli(capsys, *command, "--seed", "36893488147419103232")
    one_line_error(code, err, "--seed out of range: 36893488147419103232")
    code, _, err = run_cli(capsys, *command, "--seed", "-1")
    one_line_error(code, err, "--seed out of range")


def test_seed_out_of_range_in_a_prompt_file_names_file_and_line(capsys, tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a cat", "seed": 3}\n{"prompt": "a dog", "seed": 36893488147419103232}\n')
    code, _, err = run_cli(capsys, "batch", str(prompts))
    one_line_error(code, err, f"{prompts}:2: seed out of range")


def test_check_seed_is_the_one_range_check() -> None:
    from imgrag.errors import SEED_MAX, UserError, check_seed

    assert check_seed(0) == 0 and check_seed(SEED_MAX) == SEED_MAX and check_seed("12") == 12
    for bad in (SEED_MAX + 1, -1, 1.5, "x", True, None):
        with pytest.raises(UserError, match="seed"):
            check_seed(bad)


def test_version(capsys) -> None:
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.startswith("imgrag ")


class _Runner:
    """Stands in for agent.runner.Runner where only the command line's handling is under test."""

    summary: dict = {}
    error: BaseException | None = None

    def __init__(self, settings, on_event=None, previews=False) -> None:
        pass

    def batch(self, *args, **kwargs) -> dict:
        if self.error is not None:
            raise self.error
        return self.summary


def test_prompts_and_paths_print_as_text_not_rich_markup(capsys, tmp_path: Path, monkeypatch) -> None:
    import agent.runner

    prompts = tmp_path / "p.txt"
    prompts.write_text("a [/] sign and [bold]x\n")
    item = {"index": 0, "prompt": "a [/] sign and [bold]x", "status": "failed", "error": "bad [red]thing[/]",
            "final_image": None}
    monkeypatch.setattr(_Runner, "summary", {"batch_dir": str(tmp_path / "[b]atch"), "items": [item],
                                             "model_loads": {}})
    monkeypatch.setattr(agent.runner, "Runner", _Runner)
    code, out, err = run_cli(capsys, "batch", str(prompts))
    assert code == 1 and "1 of 1 prompt(s) failed" in err, err  # the table first, then the exit code says it
    assert "a [/] sign and [bold]x" in out and "bad [red]thing[/]" in out and "[b]atch" in out


def test_an_oserror_mid_work_is_one_line_naming_the_path(capsys, tmp_path: Path, monkeypatch) -> None:
    """A full disk while a result is written: the path and the reason, not a traceback."""
    import errno

    import agent.runner

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "runs" / "result.json"))
    monkeypatch.setattr(_Runner, "error", full)
    monkeypatch.setattr(agent.runner, "Runner", _Runner)
    code, _, err = run_cli(capsys, "batch", str(prompts))
    one_line_error(code, err, "result.json: No space left on device")


# ----- files -----

def test_atomic_writes_follow_the_umask_and_fsync_the_folder(tmp_path: Path, monkeypatch) -> None:
    import imgrag.atomic_files as atomic_files

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(atomic_files.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    old = os.umask(0o022)
    try:
        atomic_files.write_json_atomic(tmp_path / "a.json", {"x": 1})
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
        os.umask(0o077)
        atomic_files.write_json_atomic(tmp_path / "b.json", {"x": 1})
        assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)
    assert len(synced) == 4  # the file and then its folder, for each write


def test_candidates_are_written_atomically(tmp_path: Path) -> None:
    from imgrag.records.runs import RunRecord

    record = RunRecord(tmp_path / "run")

    class Broken:
        def save(self, path) -> None:
            Path(path).write_bytes(b"half a png")
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        record.save_candidate("c0", Broken())
    assert list(record.candidates_dir.iterdir()) == []  # no half picture under any name
    path = record.save_candidate("c1", Image.new("RGB", (8, 8), (255, 0, 0)))
    assert Image.open(path).getpixel((0, 0)) == (255, 0, 0)

"""The command line's skeleton: every contract command is there, doctor runs, the wheel ships prompts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from agent.frontends.cli.app import main

REPO = Path(__file__).resolve().parents[1]
CONTRACT = ["index", "search", "generate", "critique", "run", "batch", "chat", "report", "eval", "models", "doctor"]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_lists_every_command_of_the_contract(capsys) -> None:
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for command in CONTRACT:
        assert f" {command} " in out, command


def test_doctor_json_on_cpu(capsys) -> None:
    code, out, _ = run_cli(["doctor", "--profile", "tiny", "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["profile"] == "tiny"
    assert set(report["checkpoints"]) == {"generator", "ip_adapter", "judge", "llm", "embedder"}
    assert report["store"]["kind"] == "embedded chroma"


def test_doctor_sees_a_built_kit(capsys, tiny_kit, monkeypatch) -> None:
    monkeypatch.setenv("IMGRAG_TINY_KIT_DIR", str(tiny_kit["generator"].parent))
    code, out, _ = run_cli(["doctor", "--profile", "tiny", "--json"], capsys)
    assert code == 0
    assert all(c["status"] == "local directory" for c in json.loads(out)["checkpoints"].values())


def test_bad_settings_are_one_line_errors(capsys, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[generation]\nsteps = 'x'\n")
    code, out, err = run_cli(["doctor", "--config", str(bad)], capsys)
    assert code == 1
    assert out == ""
    assert "generation.steps" in err and str(bad) in err.replace("\n", "")
    assert "Traceback" not in err
    code, _, err = run_cli(["doctor", "--profile", "nope"], capsys)
    assert code == 1 and "unknown profile 'nope'" in err


def test_build_tiny_reuses_a_current_kit(capsys, tiny_kit) -> None:
    kit_dir = tiny_kit["generator"].parent
    before = (kit_dir / "kit.json").stat().st_mtime_ns
    code, out, _ = run_cli(["models", "build-tiny", str(kit_dir), "--json"], capsys)
    assert code == 0
    assert json.loads(out)["models"]["judge"] == str(kit_dir / "qwen2.5-vl")
    assert (kit_dir / "kit.json").stat().st_mtime_ns == before


def test_built_wheel_contains_the_prompts_and_report_templates(tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", ".imgrag", "*.egg-info", "build",
                                                                  "__pycache__", ".pytest_cache", ".ruff_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("imgrag-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    prompt_files = sorted(Path(p.name) for p in (REPO / "prompts").glob("*.md"))
    assert prompt_files, "the repository has prompt files"
    for prompt in prompt_files:
        assert f"prompts/{prompt}" in names
    assert "agent/graph.py" in names and "tools/image_tools.py" in names and "imgrag/settings.py" in names
    templates = sorted((REPO / "imgrag" / "templates" / "report").iterdir())
    assert templates, "the repository has report templates"
    for template in templates:
        assert f"imgrag/templates/report/{template.name}" in names
    for preset in ("gpu-80gb", "gpu-24gb", "cpu"):  # the built-in hardware presets
        assert f"imgrag/profiles/{preset}.toml" in names
    assert "imgrag/profiles/fast-draft.toml" in names  # the few-step preset

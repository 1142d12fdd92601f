"""Settings: precedence of the four layers, and one-line errors naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgrag.settings import SettingsError, load_settings


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_point_at_real_checkpoints() -> None:
    s = load_settings(environ={})
    assert s.profile == "default"
    assert s.models.generator == "stabilityai/stable-diffusion-xl-base-1.0"
    assert s.models.judge == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert s.generation.width == 1024


def test_tiny_profile_points_at_the_kit(tmp_path: Path) -> None:
    s = load_settings("tiny", environ={"IMGRAG_HOME": str(tmp_path)})
    kit = tmp_path / "tiny-models"
    assert s.models.generator == str(kit / "sdxl")
    assert s.models.embedder == f"local-dir:{kit / 'open-clip'}"
    assert s.generation.width == 64
    assert s.store.endswith("store-tiny")  # never mixed with a real store


def test_precedence_toml_then_env_then_flags(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "c.toml", "device = 'cpu'\n[generation]\nsteps = 11\nwidth = 512\n[budget]\nmax_rounds = 5\n"
    )
    env = {"IMGRAG_GENERATION_STEPS": "12", "IMGRAG_BUDGET_MAX_ROUNDS": "6"}
    s = load_settings(config=cfg, environ=env, overrides={"budget": {"max_rounds": 7}, "store": None})
    assert s.device == "cpu"  # from the file
    assert s.generation.width == 512  # from the file
    assert s.generation.steps == 12  # env beats the file
    assert s.budget.max_rounds == 7  # flags beat env
    assert s.store  # a None flag does not clear the default


def test_profile_file_starts_from_a_named_profile(tmp_path: Path) -> None:
    prof = write(tmp_path / "mine.toml", "profile = 'tiny'\ngpu_memory_gb = 24\n[models]\njudge = '/models/vl'\n")
    s = load_settings(str(prof), environ={"IMGRAG_HOME": str(tmp_path)})
    assert s.profile == "tiny"
    assert s.gpu_memory_gb == 24.0
    assert s.models.judge == "/models/vl"
    assert s.models.generator == str(tmp_path / "tiny-models" / "sdxl")


def test_tiny_kit_dir_moves_every_tiny_checkpoint(tmp_path: Path) -> None:
    s = load_settings("tiny", environ={"IMGRAG_TINY_KIT_DIR": str(tmp_path / "kit")})
    assert s.models.llm == str(tmp_path / "kit" / "qwen2.5-instruct")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("device = 'cpu'\n[generation\nsteps = 3\n", "malformed TOML"),
        ("colour = 'red'\n", "unknown key 'colour'"),
        ("[generation]\nstep = 3\n", "unknown key 'generation.step'"),
        ("[generation]\nsteps = 'many'\n", "generation.steps: expected int"),
        ("generation = 3\n", "[generation] must be a table"),
        ("offload = 'disk'\n", "offload must be one of cpu, drop"),
    ],
)
def test_bad_files_give_one_line_errors_naming_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    cfg = write(tmp_path / "bad.toml", text)
    with pytest.raises(SettingsError) as info:
        load_settings(config=cfg, environ={})
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    if "must be one of" not in expected:
        assert str(cfg) in message


def test_unknown_profile_and_missing_file() -> None:
    with pytest.raises(SettingsError, match="unknown profile 'huge'"):
        load_settings("huge", environ={})
    with pytest.raises(SettingsError, match="settings file not found"):
        load_settings(config="/nonexistent/x.toml", environ={})


def test_unknown_environment_variable_is_named() -> None:
    with pytest.raises(SettingsError, match="IMGRAG_GENERATOIN_STEPS"):
        load_settings(environ={"IMGRAG_GENERATOIN_STEPS": "3"})


def test_env_value_of_wrong_type() -> None:
    with pytest.raises(SettingsError, match="environment: generation.steps"):
        load_settings(environ={"IMGRAG_GENERATION_STEPS": "lots"})

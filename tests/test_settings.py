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
        ("[generation]\nsteps = 'many'\n", "generation.steps: Input should be a valid integer"),
        ("generation = 3\n", "[generation] must be a table"),
        ("offload = 'disk'\n", "offload: Input should be 'cpu' or 'drop', got 'disk'"),
        ("[generation]\nip_scale = 1.5\n", "generation.ip_scale: Input should be less than or equal to 1"),
        ("[generation]\nwidth = 100\n", "generation.width: must be a multiple of 8"),
        ("[generation]\nseed = 36893488147419103232\n", "generation.seed: Input should be less than or equal"),
        ("[judge]\nmin_pixels = 2000\nmax_pixels = 1000\n", "judge: min_pixels (2000) must not exceed max_pixels"),
        ("[retrieval]\nk = 0\n", "retrieval.k: Input should be greater than or equal to 1"),
        ("[budget]\nmax_seconds = 0\n", "budget.max_seconds: Input should be greater than 0"),
        ("[budget]\nmax_llm_failures = -1\n", "budget.max_llm_failures: Input should be greater than or equal to 1"),
        ("device = 'quantum'\n", "device: unknown device 'quantum'"),
        ("dtype = 'float8'\n", "dtype: Input should be"),
    ],
)
def test_bad_files_give_one_line_errors_naming_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    cfg = write(tmp_path / "bad.toml", text)
    with pytest.raises(SettingsError) as info:
        load_settings(config=cfg, environ={})
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
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


def test_a_device_that_is_not_there_is_refused_when_read(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SettingsError, match="environment: device: device 'cuda:1' asked for, but CUDA is not"):
        load_settings(environ={"IMGRAG_DEVICE": "cuda:1"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SettingsError, match="this machine has 1 CUDA device"):
        load_settings(environ={"IMGRAG_DEVICE": "cuda:1"})
    assert load_settings(environ={"IMGRAG_DEVICE": "cuda:0"}).device == "cuda:0"


def test_flags_are_blamed_on_the_command_line() -> None:
    with pytest.raises(SettingsError, match="^command line: generation.steps: Input should be greater than or eq"):
        load_settings(environ={}, overrides={"generation": {"steps": 0}})


def test_settings_range_for_ip_scale_matches_the_tools() -> None:
    from agent.policy import next_step
    from imgrag.models.draw_checks import validate_request
    from imgrag.settings import MAX_IP_SCALE
    from tools.records import from_state

    # Many guided rounds push the policy's scale up; it stops at the limit the generator accepts.
    verdict = {"match": False, "missing": ["a hat"], "parsed": True}
    candidates = {f"c{i}": {"id": f"c{i}", "path": f"/x/c{i}.png", "round": i + 1, "reference_ids": ["r"],
                            "verdict": verdict}
                  for i in range(8)}
    state = {"prompt": "a cat", "seed": 0, "rounds": 8, "budget": {"max_rounds": 20}, "candidates": candidates,
             "references": {"r": {"path": "/x/r.png", "query": "a hat"}},
             "retrievals": [{"for": "c7", "reference_ids": ["r"]}]}
    name, args = next_step(from_state(state), 0.9)
    assert name == "regenerate" and args["ip_scale"] == MAX_IP_SCALE
    validate_request("a cat", 64, 64, 2, args["ip_scale"])
    from imgrag.errors import UserError

    with pytest.raises(UserError, match="ip_scale"):
        validate_request("a cat", 64, 64, 2, MAX_IP_SCALE + 0.5)


def test_env_keys_with_underscores_split_once_at_the_section() -> None:
    env = {"IMGRAG_GENERATION_MAX_SIDE": "4096", "IMGRAG_GENERATION_WIDTH": "4096", "IMGRAG_GPU_MEMORY_GB": "24",
           "IMGRAG_MODELS_LLM_API_KEY": "1234"}
    s = load_settings(environ=env)
    assert (s.generation.max_side, s.generation.width, s.gpu_memory_gb) == (4096, 4096, 24.0)
    assert s.models.llm_api_key == "1234"
    with pytest.raises(SettingsError, match="^environment: unknown key 'generation.max_sides'"):
        load_settings(environ={"IMGRAG_GENERATION_MAX_SIDES": "4096"})


def test_a_bad_table_entry_is_blamed_on_the_file_that_holds_it(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.toml", "[[models.loras]]\npath = 'x.safetensors'\nweight = 9\n")
    with pytest.raises(SettingsError, match="c.toml: models.loras.0.weight: Input should be less than or equal to 4"):
        load_settings(config=cfg, environ={})
    # A file's value is blamed on the file even when a profile below it set the same section.
    cfg = write(tmp_path / "d.toml", "[generation]\nfast_steps = 999\n")
    with pytest.raises(SettingsError, match=r"d.toml: generation: 999 steps is above generation.max_steps"):
        load_settings("tiny", config=cfg, environ={})


def test_a_folder_or_a_profile_file_of_an_unknown_profile_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read: Is a directory"):
        load_settings(config=tmp_path, environ={})
    prof = write(tmp_path / "p.toml", "profile = 'gpu-24gb'\n")
    with pytest.raises(SettingsError, match="profile must be one of default, tiny, got 'gpu-24gb'"):
        load_settings(str(prof), environ={})
    cfg = write(tmp_path / "q.toml", "profile = 'tiny'\n")
    with pytest.raises(SettingsError, match="'profile' in a --config file must match the chosen profile"):
        load_settings(config=cfg, environ={})
    assert load_settings("tiny", config=cfg, environ={"IMGRAG_HOME": str(tmp_path)}).profile == "tiny"

"""LoRAs on the tiny kit's real SDXL pipeline: the kit's two LoRAs (diffusers/PEFT and kohya layouts) load through
diffusers' own loader, change the drawing at their weights (weight 0 is the drawing without them), load once per
process and switch by adapter name beside the LCM-LoRA and the IP-Adapter; they are recorded in provenance and the
A1111 line, and a picture's recipe redraws with them. A missing file, a file that is not a LoRA and a LoRA for
another base model are each one line naming the file."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from imgrag.drawing.loras import LoraChoice, check_lora_file, merge_loras, parse_lora_arg
from imgrag.errors import ModelLoadError, UserError
from imgrag.kits.tiny_configs import SDXL_UNET
from imgrag.kits.tiny_loras import STYLE_LORA_NAME, SUBJECT_LORA_NAME, to_kohya, user_lora_state_dict
from imgrag.models.generator import Generator
from imgrag.records.provenance import PARAMETERS_KEY, read_provenance
from imgrag.settings import Settings, SettingsError, load_settings
from tests.cli import run_cli

RED = Image.new("RGB", (64, 64), (200, 30, 30))


@pytest.fixture(scope="module")
def settings(tiny_kit: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Settings:
    home = tmp_path_factory.mktemp("lora-home")
    return load_settings("tiny", environ={"IMGRAG_TINY_KIT_DIR": str(tiny_kit["generator"].parent),
                                          "IMGRAG_HOME": str(home)})


@pytest.fixture(scope="module")
def style(tiny_kit: dict[str, Path]) -> Path:
    return tiny_kit["loras"] / STYLE_LORA_NAME


@pytest.fixture(scope="module")
def subject(tiny_kit: dict[str, Path]) -> Path:
    return tiny_kit["loras"] / SUBJECT_LORA_NAME


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _save(state: dict[str, Any], path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture
def load_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The adapter name of every ``load_lora_weights`` call on any SDXL pipeline (the real method still runs)."""
    from diffusers import StableDiffusionXLPipeline

    calls: list[str] = []
    real = StableDiffusionXLPipeline.load_lora_weights

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("adapter_name"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "load_lora_weights", spy)
    return calls


# ----- the kit's files: one per layout -----

def test_the_kit_holds_a_lora_in_each_layout(style: Path, subject: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(style), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("unet.") and k.endswith(".lora_A.weight") for k in keys)
    assert any(k.startswith("text_encoder.text_model.") for k in keys)
    assert any(k.startswith("text_encoder_2.text_model.") for k in keys)
    with safe_open(str(subject), "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    assert any(k.startswith("lora_unet_input_blocks_") and k.endswith(".lora_down.weight") for k in keys)
    assert any(k.startswith("lora_unet_output_blocks_") for k in keys)
    assert any(k.startswith("lora_te1_text_model_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    assert any(k.endswith(".alpha") for k in keys)
    assert check_lora_file(style) == str(style.resolve()) and check_lora_file(subject) == str(subject.resolve())


# ----- the generator: drawing, weights, loading once, switching -----

def test_two_loras_change_the_drawing_weight_0_is_none_and_each_loads_once(
        settings: Settings, style: Path, subject: Path, load_calls: list[str]) -> None:
    gen = Generator.from_pretrained(settings)
    plain = _pixels(gen.generate("a cat", seed=1))
    loras = [LoraChoice(path=str(style), weight=0.8), LoraChoice(path=str(subject), weight=1.2)]
    both = _pixels(gen.generate("a cat", seed=1, loras=loras))
    assert np.abs(both - plain).max() > 20  # the LoRAs change the picture, not a rounding error's worth
    assert gen.pipe.get_active_adapters() == ["lora-style-diffusers", "lora-subject-kohya"]
    one = _pixels(gen.generate("a cat", seed=1, loras=loras[:1]))
    assert not np.array_equal(one, both) and not np.array_equal(one, plain)
    weaker = _pixels(gen.generate("a cat", seed=1, loras=[loras[0].model_copy(update={"weight": 0.3}), loras[1]]))
    assert not np.array_equal(weaker, both)  # the weight is the adapter's scale
    zero = _pixels(gen.generate("a cat", seed=1, loras=[c.model_copy(update={"weight": 0.0}) for c in loras]))
    assert np.array_equal(zero, plain), "weight 0 must be the drawing without the LoRA"
    assert np.array_equal(_pixels(gen.generate("a cat", seed=1, loras=loras)), both)  # switched back, same picture
    assert np.array_equal(_pixels(gen.generate("a cat", seed=1)), plain), "no LoRA: bit for bit the plain pipeline"
    assert load_calls == ["lora-style-diffusers", "lora-subject-kohya"]  # six drawings, each file read once
    assert gen.loras.load_calls == 2


def test_the_kohya_layout_draws_what_the_diffusers_layout_draws(settings: Settings, style: Path,
                                                                tmp_path: Path) -> None:
    from safetensors.torch import load_file

    kohya = _save(to_kohya(load_file(str(style))), tmp_path / "style-kohya.safetensors")
    gen = Generator.from_pretrained(settings)
    a = gen.generate("a dog", seed=3, loras=[LoraChoice(path=str(style), weight=0.7)])
    b = gen.generate("a dog", seed=3, loras=[LoraChoice(path=str(kohya), weight=0.7)])
    assert np.abs(_pixels(a) - _pixels(b)).max() <= 1  # diffusers converted the kohya keys and alphas


def test_loras_sit_beside_the_lcm_lora_and_the_ip_adapter(settings: Settings, style: Path) -> None:
    gen = Generator.from_pretrained(settings)
    lora = [LoraChoice(path=str(style))]
    fast = _pixels(gen.generate("a cat", seed=2, fast="lcm-lora"))
    fast_lora = _pixels(gen.generate("a cat", seed=2, fast="lcm-lora", loras=lora))
    assert gen.pipe.get_active_adapters() == ["lcm-lora", "lora-style-diffusers"]
    assert not np.array_equal(fast, fast_lora)
    assert np.array_equal(_pixels(gen.generate("a cat", seed=2, fast="lcm-lora")), fast)
    with_lora = _pixels(gen.generate("a cat", seed=2, loras=lora))
    guided = _pixels(gen.generate("a cat", seed=2, loras=lora, references=[RED], ip_scale=1.0))
    assert gen.adapter_loaded and not np.array_equal(with_lora, guided)  # the references still steer
    assert np.array_equal(_pixels(gen.generate("a cat", seed=2, loras=lora)), with_lora)
    # The other loading order (IP-Adapter first) draws the same pictures.
    other = Generator.from_pretrained(settings)
    other.generate("a cat", seed=2, references=[RED], ip_scale=1.0)
    assert np.array_equal(_pixels(other.generate("a cat", seed=2, loras=lora, references=[RED], ip_scale=1.0)),
                          guided)


def test_the_settings_loras_are_the_default_and_the_manager_counts_them(
        tiny_kit: dict[str, Path], style: Path, tmp_path: Path) -> None:
    from imgrag.management.engine import build_manager

    config = tmp_path / "loras.toml"
    config.write_text(f'[[models.loras]]\npath = "{style}"\nweight = 0.5\nname = "ink"\n', encoding="utf-8")
    settings = load_settings("tiny", config=config, environ={
        "IMGRAG_TINY_KIT_DIR": str(tiny_kit["generator"].parent), "IMGRAG_HOME": str(tmp_path / "home")})
    assert settings.models.loras[0].name == "ink" and settings.models.loras[0].weight == 0.5
    manager = build_manager(settings)
    asked: list[float] = []
    with manager.use("generator") as gen:
        real = gen.before_adapter_load  # the engine's hook: the manager makes room
        gen.before_adapter_load = lambda gib: (asked.append(gib), real(gib))
    sizes, active = [], []
    for loras in ([], None, None, []):  # none, the settings' (loads), the settings' again, none
        with manager.use("generator") as gen:
            gen.generate("a boat", seed=0, **({} if loras is None else {"loras": loras}))
            active.append(gen.loras.active)
        sizes.append(manager.stats()["generator"]["size_gb"])
    assert active == [(), (("lora-ink", 0.5),), (("lora-ink", 0.5),), ()]
    assert manager.load_counts()["generator"] == 1
    assert len(asked) == 1 and asked[0] > 0  # room asked once, for the LoRA's size from its header
    assert sizes[1] > sizes[0] and sizes[1:] == [sizes[1]] * 3  # the LoRA joins the generator once, never again


# ----- what is checked, in one line -----

def test_flags_and_files_are_checked_in_one_line(style: Path, tmp_path: Path) -> None:
    assert parse_lora_arg(f"{style}:0.8") == (str(style), 0.8)
    assert parse_lora_arg(f"{style}") == (str(style), None)
    assert parse_lora_arg("odd:name.safetensors") == ("odd:name.safetensors", None)  # a ':' not before a number
    assert parse_lora_arg("style:-1.5") == ("style", -1.5)
    for text, message in (("x.safetensors:9", "the weight must be a number from -4 to 4"),
                          (":0.5", "give the LoRA's file"), ("x.safetensors:nan", "the weight must be")):
        with pytest.raises(UserError, match=message) as info:
            parse_lora_arg(text)
        assert "\n" not in str(info.value)

    import torch

    folder = tmp_path / "folder"
    folder.mkdir()
    (tmp_path / "model.ckpt").write_bytes(b"not read")
    plain = _save({"model.diffusion_model.out.weight": torch.zeros(2, 2)}, tmp_path / "checkpoint.safetensors")
    loha = _save({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, tmp_path / "loha.safetensors")
    short = tmp_path / "short.safetensors"
    short.write_bytes(style.read_bytes()[:-100])
    for path, message in ((tmp_path / "nowhere.safetensors", "no such file"),
                          (folder, "is a folder; name the LoRA's .safetensors file"),
                          (tmp_path / "model.ckpt", "as .safetensors only (a pickled .ckpt"),
                          (plain, "holds no LoRA weights (its tensors are named like model.diffusion_model.out."),
                          (loha, "is a LyCORIS file (LoHa/LoKr)"),
                          (short, "truncated")):
        with pytest.raises(UserError, match=re.escape(message)) as info:
            check_lora_file(path, "--lora")
        assert str(info.value).startswith(f"--lora {path}") and "\n" not in str(info.value)


def test_merging_adds_reweights_by_file_or_name_and_clears(style: Path, subject: Path) -> None:
    base = (LoraChoice(path=str(style.resolve()), weight=0.5, name="ink"),)
    merged = merge_loras(base, [(str(subject), None), ("ink", 0.0)])
    assert [(c.label, c.weight) for c in merged] == [("ink", 0.0), ("subject-kohya", 1.0)]
    assert merge_loras(merged, [(str(style), 1.5)])[0].weight == 1.5  # the same file: its weight
    assert merge_loras(merged, [("none", None), (str(subject), 0.3)]) == (
        LoraChoice(path=str(subject.resolve()), weight=0.3),)
    with pytest.raises(UserError, match="--lora ink2: no such file"):
        merge_loras(base, [("ink2", 1.0)])


def test_bad_settings_entries_are_one_line(tmp_path: Path) -> None:
    for body, message in (('[[models.loras]]\npath = "a.safetensors"\nweight = 7\n', "models.loras.0.weight"),
                          ('[[models.loras]]\npath = "a.safetensors"\nname = "a:b"\n', "never ':'"),
                          ('[[models.loras]]\nfile = "a.safetensors"\n', "models.loras.0"),
                          ('[models]\nloras = "a.safetensors"\n', "models.loras")):
        config = tmp_path / "bad.toml"
        config.write_text(body, encoding="utf-8")
        with pytest.raises(SettingsError, match=message) as info:
            load_settings("default", config=config, environ={"IMGRAG_HOME": str(tmp_path)})
        assert "\n" not in str(info.value)


def test_a_lora_for_another_base_is_one_line_and_leaves_nothing_behind(
        settings: Settings, style: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    # Other widths (what a LoRA for another SDXL-like model, or SD 2's 1024-wide text, looks like to the UNet) ...
    wider = _save(user_lora_state_dict(5, unet_config={**SDXL_UNET, "cross_attention_dim": 96},
                                       text_widths=(40, 56)), tmp_path / "wider.safetensors")
    # ... only the text encoders' widths wrong (diffusers loads the UNet's part before it fails) ...
    text_only = _save({k: v for k, v in user_lora_state_dict(6, text_widths=(40, 56)).items()},
                      tmp_path / "text-widths.safetensors")
    # ... and SD 1.5's layout in kohya's names: an attention in the first down block, which this UNet has not.
    sd15_unet = {**SDXL_UNET, "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")}
    sd15 = _save(to_kohya(user_lora_state_dict(7, unet_config=sd15_unet)), tmp_path / "sd15.safetensors")
    gen = Generator.from_pretrained(settings)
    plain = _pixels(gen.generate("a cat", seed=1))
    capfd.readouterr()
    for path, message in ((wider, "its shape [4, 96], this generator's [4, 80]"),
                          (text_only, "its text-encoder layers have other widths"),
                          (sd15, "it adapts down_blocks.0.attentions.0")):
        with pytest.raises(ModelLoadError) as info:
            gen.generate("a cat", seed=1, loras=[LoraChoice(path=str(path))])
        text = str(info.value)
        assert text.startswith(f"LoRA {path.resolve()} does not fit this generator") and message in text, text
        assert "another base model" in text and "\n" not in text
        assert not any(gen.pipe.get_list_adapters().values())  # nothing of it stayed in the pipeline
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "Traceback" not in out + err
    assert np.array_equal(_pixels(gen.generate("a cat", seed=1)), plain)  # the pipeline draws as before
    assert not np.array_equal(_pixels(gen.generate("a cat", seed=1, loras=[LoraChoice(path=str(style))])), plain)


# ----- the command line: generate, provenance, the A1111 line, --from-image -----

def test_generate_records_the_loras_and_redraws_them_from_the_recipe(
        settings: Settings, style: Path, subject: Path, capsys: pytest.CaptureFixture, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from imgrag.records.provenance import checkpoint_sha256

    monkeypatch.setenv("IMGRAG_TINY_KIT_DIR", settings.tiny_kit_dir)
    out = tmp_path / "fox.png"
    code, stdout, err = run_cli(capsys, "generate", "a red fox", "-o", str(out), "--profile", "tiny", "--json",
                                "--lora", f"{style}:0.8", "--lora", f"{subject}:1.2")
    assert code == 0, err
    result = json.loads(stdout)
    assert [(c["name"], c["weight"]) for c in result["loras"]] == [("style-diffusers", 0.8), ("subject-kohya", 1.2)]
    doc = read_provenance(out)
    assert doc["loras"] == [
        {"path": str(style.resolve()), "sha256": checkpoint_sha256(style), "weight": 0.8, "name": "style-diffusers"},
        {"path": str(subject.resolve()), "sha256": checkpoint_sha256(subject), "weight": 1.2, "name": "subject-kohya"}]
    assert len(doc["loras"][0]["sha256"]) == 64
    with Image.open(out) as im:
        lines = im.info[PARAMETERS_KEY].split("\n")
    assert lines[0] == "a red fox <lora:style-diffusers:0.8> <lora:subject-kohya:1.2>"  # in the prompt, as A1111
    plain = tmp_path / "plain.png"
    assert run_cli(capsys, "generate", "a red fox", "-o", str(plain), "--profile", "tiny")[0] == 0
    assert not np.array_equal(_pixels(Image.open(out)), _pixels(Image.open(plain)))
    assert read_provenance(plain)["loras"] == [] and "<lora:" not in Image.open(plain).info[PARAMETERS_KEY]

    again = tmp_path / "again.png"
    code, stdout, err = run_cli(capsys, "generate", "-o", str(again), "--from-image", str(out), "--json")
    assert code == 0, err
    assert np.array_equal(_pixels(Image.open(out)), _pixels(Image.open(again)))
    assert read_provenance(again)["loras"] == doc["loras"]
    # A flag beside the picture reweights one of its LoRAs; --lora none drops them: the plain picture.
    code, stdout, err = run_cli(capsys, "generate", "-o", str(tmp_path / "half.png"), "--from-image", str(out),
                                "--lora", "subject-kohya:0", "--json")
    assert code == 0, err
    assert [c["weight"] for c in json.loads(stdout)["loras"]] == [0.8, 0.0]
    code, _, err = run_cli(capsys, "generate", "-o", str(tmp_path / "none.png"), "--from-image", str(out),
                           "--lora", "none")
    assert code == 0, err
    assert np.array_equal(_pixels(Image.open(tmp_path / "none.png")), _pixels(Image.open(plain)))


def test_a_recipes_lora_that_vanished_or_changed_is_one_line(
        settings: Settings, style: Path, capsys: pytest.CaptureFixture, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    monkeypatch.setenv("IMGRAG_TINY_KIT_DIR", settings.tiny_kit_dir)
    mine = tmp_path / "mine.safetensors"
    shutil.copy(style, mine)
    out = tmp_path / "fox.png"
    assert run_cli(capsys, "generate", "a fox", "-o", str(out), "--profile", "tiny", "--lora", str(mine))[0] == 0
    from safetensors.torch import load_file

    _save({k: v * 2 for k, v in load_file(str(mine)).items()}, mine)
    code, _, err = run_cli(capsys, "generate", "-o", str(tmp_path / "b.png"), "--from-image", str(out))
    assert code == 1 and f"{out}'s recipe: LoRA {mine} has changed since (sha256 differs)" in err
    mine.unlink()
    code, _, err = run_cli(capsys, "generate", "-o", str(tmp_path / "b.png"), "--from-image", str(out))
    assert code == 1 and f"{out}'s recipe: LoRA {mine}: no such file" in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1 and "Traceback" not in err


def test_a_missing_lora_is_one_line_before_any_model_loads(
        capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty_kit = tmp_path / "kit"  # the tiny profile builds its kit before loading anything: it must stay unbuilt
    monkeypatch.setenv("IMGRAG_TINY_KIT_DIR", str(empty_kit))
    monkeypatch.setenv("IMGRAG_HOME", str(tmp_path / "home"))
    missing = tmp_path / "gone.safetensors"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a fox", "loras": [{"path": "gone.safetensors", "weight": 0.5}]}\n',
                       encoding="utf-8")
    for argv, expected in (
            (["generate", "a fox", "-o", str(tmp_path / "x.png"), "--lora", f"{missing}:0.5"],
             f"error: --lora {missing}: no such file"),
            (["run", "a fox", "--planner", "fixed", "--lora", str(missing)], f"error: --lora {missing}: no such file"),
            (["batch", str(prompts), "--planner", "fixed"], f"error: {prompts}:1: LoRA {missing}: no such file"),
            (["generate", "a fox", "-o", str(tmp_path / "x.png"), "--lora", "x.safetensors:12"],
             "error: --lora x.safetensors:12: the weight must be a number from -4 to 4")):
        code, _, err = run_cli(capsys, *argv, "--profile", "tiny")
        assert code == 1 and expected in err and "Traceback" not in err, err
        assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
        assert not empty_kit.exists() or not any(empty_kit.iterdir())
    config = tmp_path / "loras.toml"
    config.write_text(f'[[models.loras]]\npath = "{missing}"\n', encoding="utf-8")
    code, _, err = run_cli(capsys, "generate", "a fox", "-o", str(tmp_path / "x.png"), "--profile", "tiny",
                           "--config", str(config))
    assert code == 1 and f"error: [[models.loras]]: LoRA {missing}: no such file" in err


# ----- runs, batch lines, the chat, the page -----

def test_a_run_draws_every_round_with_its_loras_each_loaded_once(
        settings: Settings, style: Path, subject: Path, capsys: pytest.CaptureFixture, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, load_calls: list[str]) -> None:
    monkeypatch.setenv("IMGRAG_TINY_KIT_DIR", settings.tiny_kit_dir)
    monkeypatch.setenv("IMGRAG_HOME", str(tmp_path / "home"))
    code, stdout, err = run_cli(capsys, "run", "a dog and a cradle", "--profile", "tiny", "--planner", "fixed",
                                "--max-rounds", "2", "--lora", f"{style}:0.6", "--lora", str(subject), "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert [(c["name"], c["weight"]) for c in result["drawing"]["loras"]] == [
        ("", 0.6), ("", 1.0)] and result["rounds"] == 2
    assert len(result["candidates"]) == 2 and result["model_loads"]["generator"] == 1
    for candidate in result["candidates"]:
        doc = read_provenance(candidate["path"])
        assert [(c["name"], c["weight"]) for c in doc["loras"]] == [("style-diffusers", 0.6), ("subject-kohya", 1.0)]
        assert candidate["loras"] == [{"name": "style-diffusers", "weight": 0.6},
                                      {"name": "subject-kohya", "weight": 1.0}]
    assert load_calls == ["lora-style-diffusers", "lora-subject-kohya"]  # two drawings, each file read once


def test_a_run_with_a_lora_for_another_base_stops_in_one_line_before_drawing(
        settings: Settings, capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGRAG_TINY_KIT_DIR", settings.tiny_kit_dir)
    monkeypatch.setenv("IMGRAG_HOME", str(tmp_path / "home"))
    wider = _save(user_lora_state_dict(5, unet_config={**SDXL_UNET, "cross_attention_dim": 96}),
                  tmp_path / "wider.safetensors")
    code, _, err = run_cli(capsys, "run", "a fox", "--profile", "tiny", "--planner", "fixed", "--lora", str(wider))
    assert code == 1 and f"error: LoRA {wider} does not fit this generator" in err and "Traceback" not in err, err
    assert not (tmp_path / "home" / "runs").exists() or not any((tmp_path / "home" / "runs").iterdir())


def test_batch_lines_add_their_loras_relative_to_the_file(style: Path, subject: Path, tmp_path: Path) -> None:
    import shutil

    from agent.batch import line_options, read_prompt_file
    from imgrag.drawing.draw_options import DrawOptions

    shutil.copy(subject, tmp_path / "mine.safetensors")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a fox"}\n'
                       '{"prompt": "a cat", "loras": [{"path": "mine.safetensors", "weight": 0.4}]}\n'
                       f'{{"prompt": "a dog", "loras": [{{"path": "{style}", "weight": 0}}]}}\n', encoding="utf-8")
    items = read_prompt_file(prompts)
    base = DrawOptions(loras=(LoraChoice(path=str(style), weight=0.9),))
    got = [[(c.label, c.weight) for c in line_options(base, item).loras] for item in items]
    assert got == [[("style-diffusers", 0.9)], [("style-diffusers", 0.9), ("mine", 0.4)], [("style-diffusers", 0.0)]]
    for line, message in (('{"prompt": "a", "loras": "x.safetensors"}', '"loras" must be a list'),
                          ('{"prompt": "a", "loras": [{"file": "x"}]}', "LoRA 1 must be an object"),
                          (f'{{"prompt": "a", "loras": [{{"path": "{style}", "weight": 5}}]}}', "LoRA 1's weight")):
        prompts.write_text(line + "\n", encoding="utf-8")
        with pytest.raises(UserError, match=message) as info:
            read_prompt_file(prompts)
        assert str(info.value).startswith(f"{prompts}:1: ")


def test_the_chat_and_the_page_set_loras_for_the_next_requests(style: Path, subject: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.frontends.cli.chat import ChatRepl
    from agent.frontends.web import page_drawing

    monkeypatch.setenv("IMGRAG_HOME", str(tmp_path / "home"))
    repl = ChatRepl(load_settings("default", environ={"IMGRAG_HOME": str(tmp_path / "home")}), "fixed", 1)
    repl.handle(f"/lora {style}:0.7")
    repl.handle(f"/lora {subject}")
    repl.handle("/lora style-diffusers:0")
    assert [(c.label, c.weight) for c in repl.session.drawing_options().loras] == [
        ("style-diffusers", 0.0), ("subject-kohya", 1.0)]
    shown = capsys.readouterr().out
    assert "LoRAs: style-diffusers:0.7" in shown and "subject-kohya:1" in shown
    repl.guard(lambda: repl.handle(f"/lora {tmp_path / 'nope.safetensors'}"))
    err = capsys.readouterr().err
    assert f"error: /lora {tmp_path / 'nope.safetensors'}: no such file" in err and "Traceback" not in err
    assert len(repl.session.drawing_options().loras) == 2  # the mistake changed nothing
    repl.handle("/lora off")
    assert repl.session.drawing_options().loras == () and "no LoRA" in capsys.readouterr().out

    settings = load_settings("default", environ={"IMGRAG_HOME": str(tmp_path / "home")})
    assert "loras" not in page_drawing(settings, "", None, None, None, "")  # the field as it started: no override
    drawing = page_drawing(settings, "", None, None, None, f"{style}:0.5\n\n{subject}\n")
    assert [(c["path"], c["weight"]) for c in drawing["loras"]] == [(str(style.resolve()), 0.5),
                                                                    (str(subject.resolve()), 1.0)]
    with pytest.raises(UserError, match="LoRA nope.safetensors: no such file"):
        page_drawing(settings, "", None, None, None, "nope.safetensors")

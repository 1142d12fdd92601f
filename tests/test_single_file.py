"""Single-file SDXL checkpoints (the A1111/ComfyUI layout) through the real loader, doctor and download.

The tiny kit writes its SDXL also as one file in the original key layout (sdxl-single/); loaded with diffusers'
``from_single_file`` and a configuration-only folder, it must be the folder form weight for weight and draw its
pictures pixel for pixel, with every drawing option. Files that are not SDXL base checkpoints are one line each.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from imgrag.errors import ModelLoadError, UserError
from imgrag.kits.tiny_configs import SDXL_SINGLE_FILE_NAME
from imgrag.models.generator import Generator
from imgrag.models.sdxl_loader import load_sdxl_pipeline
from imgrag.records.provenance import file_sha256, read_provenance
from imgrag.settings import Settings, load_settings
from imgrag.weights import hub_layouts
from imgrag.weights.model_files import check_role
from imgrag.weights.roles import select_files
from imgrag.weights.single_file import (
    CLIP_L_PREFIX,
    CONFIG_PATTERNS,
    OPEN_CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    checkpoint_problem,
    find_single_file,
    header_shapes,
    missing_config_files,
)
from tests.cli import run_cli

RED = Image.new("RGB", (100, 80), (200, 30, 30))
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _config_only(folder: Path, dest: Path) -> Path:
    """A copy of a diffusers SDXL folder's configuration alone (what `imgrag models download` fetches: no weights)."""
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".txt"):
            target = dest / path.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    return dest


@pytest.fixture(scope="module")
def settings(tiny_kit: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Settings:
    home = tmp_path_factory.mktemp("single-home")
    return load_settings("tiny", environ={"IMGRAG_TINY_KIT_DIR": str(tiny_kit["generator"].parent),
                                          "IMGRAG_HOME": str(home)})


@pytest.fixture(scope="module")
def config_only(tiny_kit: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _config_only(tiny_kit["generator"], tmp_path_factory.mktemp("sdxl-config"))


@pytest.fixture(scope="module")
def single_settings(settings: Settings, tiny_kit: dict[str, Path], config_only: Path) -> Settings:
    """The tiny profile with models.generator the kit's single file, configured by a folder without weights."""
    file = tiny_kit["generator_single_file"] / SDXL_SINGLE_FILE_NAME
    return replace(settings, models=replace(settings.models, generator=str(file), generator_config=str(config_only)))


def _with(settings: Settings, **models: str) -> Settings:
    return replace(settings, models=replace(settings.models, **models))


# ----- the file the kit writes -----


def test_the_kits_single_file_has_the_original_layout_and_is_sdxl(tiny_kit: dict[str, Path]) -> None:
    file = tiny_kit["generator_single_file"] / SDXL_SINGLE_FILE_NAME
    keys = header_shapes(file)
    for prefix in (UNET_PREFIX, VAE_PREFIX, CLIP_L_PREFIX, OPEN_CLIP_PREFIX):
        assert any(k.startswith(prefix) for k in keys), prefix
    # names A1111 and diffusers' converter read: the numbered LDM blocks, fused OpenCLIP attention, 1x1 VAE convs
    assert UNET_PREFIX + "label_emb.0.0.weight" in keys and UNET_PREFIX + "middle_block.1.proj_in.weight" in keys
    assert OPEN_CLIP_PREFIX + "transformer.resblocks.0.attn.in_proj_weight" in keys
    assert len(keys[VAE_PREFIX + "decoder.mid.attn_1.q.weight"]) == 4
    assert checkpoint_problem(file) is None
    assert find_single_file(str(tiny_kit["generator_single_file"])) == file  # the folder form: the one file in it


def test_from_single_file_gives_the_folder_forms_weights_exactly(settings: Settings,
                                                                 single_settings: Settings) -> None:
    folder = load_sdxl_pipeline(settings)
    single = load_sdxl_pipeline(single_settings)  # its configuration folder holds no weights: all come from the file
    assert not list(Path(single_settings.models.generator_config).rglob("*.safetensors"))
    assert type(single) is type(folder)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(folder, name).state_dict(), getattr(single, name).state_dict()
        assert set(a) == set(b), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert single.scheduler.config == folder.scheduler.config


def test_the_single_file_loads_in_the_profiles_dtype(single_settings: Settings) -> None:
    """An fp16 profile (a GPU's "auto") gets an fp16 pipeline from the float32 file, as the folder form does."""
    pipe = load_sdxl_pipeline(replace(single_settings, dtype="float16"))
    assert {getattr(pipe, n).dtype for n in ("unet", "vae", "text_encoder", "text_encoder_2")} == {torch.float16}


# ----- the same pictures, with every drawing option -----


@pytest.fixture(scope="module")
def both(settings: Settings, single_settings: Settings) -> tuple[Generator, Generator]:
    return Generator.from_pretrained(settings), Generator.from_pretrained(single_settings)


@pytest.mark.parametrize("options", [
    {},
    {"references": [RED], "ip_scale": 1.0},
    {"fast": "lcm-lora"},
    {"fast": "lcm-lora", "references": [RED], "ip_scale": 0.8},
    {"scheduler": "DPM++ 2M Karras", "negative_prompt": "blurry", "guidance": 7.0},
    {"scheduler": "Euler a"},
], ids=["plain", "ip-adapter", "lcm-lora", "lcm-lora+ip-adapter", "dpm++-negative-guidance", "euler-a"])
def test_the_single_file_draws_the_folders_pictures(both: tuple[Generator, Generator], options: dict) -> None:
    folder, single = both
    a = folder.generate("a cat on a chair", seed=7, **options)
    b = single.generate("a cat on a chair", seed=7, **options)
    assert np.allclose(_pixels(a), _pixels(b), atol=1)
    assert folder.last_scheduler == single.last_scheduler


def test_rounds_of_several_and_previews_work_on_the_single_file(both: tuple[Generator, Generator]) -> None:
    folder, single = both
    seen: dict[str, list] = {"folder": [], "single": []}
    pictures = {}
    for name, gen in (("folder", folder), ("single", single)):
        pictures[name] = gen.generate_batch("a dog", seeds=[1, 2, 3], preview_every=1,
                                            on_preview=lambda done, total, images, n=name: seen[n].append(
                                                (done, total, len(images))))
    assert seen["single"] == seen["folder"] and seen["single"][0] == (1, 2, 3)  # a preview of each of the three
    for a, b in zip(pictures["folder"], pictures["single"], strict=True):
        assert np.allclose(_pixels(a), _pixels(b), atol=1)


# ----- the command line: generate, provenance, --from-image -----


def _error_lines(err: str) -> list[str]:
    """The command's error lines (stderr also carries the tiny profile's warning and notes)."""
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


def _tiny_env(monkeypatch: pytest.MonkeyPatch, tiny_kit: dict[str, Path]) -> None:
    monkeypatch.setenv("IMGRAG_TINY_KIT_DIR", str(tiny_kit["generator"].parent))


def test_generate_with_a_single_file_records_it_and_from_image_redraws_with_it(
        capsys, tiny_kit: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tiny_env(monkeypatch, tiny_kit)
    own = tmp_path / "models" / "my-sdxl.safetensors"  # a user's file somewhere, with its config the kit's folder
    own.parent.mkdir()
    shutil.copy(tiny_kit["generator_single_file"] / SDXL_SINGLE_FILE_NAME, own)
    code, _, err = run_cli(capsys, "generate", "a red boat", "--profile", "tiny", "--seed", "4", "-o",
                           str(tmp_path / "folder.png"))
    assert code == 0, err
    monkeypatch.setenv("IMGRAG_MODELS_GENERATOR", str(own.parent))  # the folder holding one file
    code, out, err = run_cli(capsys, "generate", "a red boat", "--profile", "tiny", "--seed", "4", "-o",
                             str(tmp_path / "single.png"), "--json")
    assert code == 0, err
    assert np.allclose(_pixels(Image.open(tmp_path / "folder.png")), _pixels(Image.open(tmp_path / "single.png")),
                       atol=1)
    doc = read_provenance(tmp_path / "single.png")
    assert doc["models"]["generator"] == str(own.resolve())
    assert doc["generator_file"] == {"path": str(own.resolve()), "sha256": file_sha256(own),
                                     "config": str(tiny_kit["generator"])}
    parameters = Image.open(tmp_path / "single.png").info["parameters"]
    assert f"Model: {own.resolve()}" in parameters and f"Model hash: {file_sha256(own)[:10]}" in parameters

    # The profile no longer names the file: the recipe does, and the redraw uses it.
    monkeypatch.delenv("IMGRAG_MODELS_GENERATOR")
    code, _, err = run_cli(capsys, "generate", "--from-image", str(tmp_path / "single.png"), "-o",
                           str(tmp_path / "again.png"))
    assert code == 0, err
    assert read_provenance(tmp_path / "again.png")["generator_file"]["path"] == str(own.resolve())
    assert np.array_equal(_pixels(Image.open(tmp_path / "single.png")), _pixels(Image.open(tmp_path / "again.png")))

    # A file changed since, or gone, is one line naming the recipe.
    with open(own, "ab") as fh:
        fh.write(b"\0")
    code, _, err = run_cli(capsys, "generate", "--from-image", str(tmp_path / "single.png"), "-o",
                           str(tmp_path / "x.png"))
    assert code == 1 and len(_error_lines(err)) == 1
    assert "recipe" in err and "changed since (sha256 differs)" in err
    own.unlink()
    code, _, err = run_cli(capsys, "generate", "--from-image", str(tmp_path / "single.png"), "-o",
                           str(tmp_path / "x.png"))
    assert code == 1 and "no longer there" in err and len(_error_lines(err)) == 1


# ----- files that are not SDXL base checkpoints: one line each -----


def _fake(path: Path, keys: dict[str, list[int]]) -> Path:
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path))
    return path


FULL = {UNET_PREFIX + "label_emb.0.0.weight": [4, 4], UNET_PREFIX + "input_blocks.0.0.weight": [4, 4, 3, 3],
        VAE_PREFIX + "encoder.conv_in.weight": [2, 3, 3, 3],
        CLIP_L_PREFIX + "text_model.embeddings.position_embedding.weight": [2, 2],
        OPEN_CLIP_PREFIX + "positional_embedding": [2, 2]}


@pytest.mark.parametrize(("keys", "message"), [
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": [2, 2]}, "a LoRA, not a whole checkpoint"),
    ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": [2, 2]}, "a LoRA"),
    ({UNET_PREFIX + "input_blocks.0.0.weight": [4, 4, 3, 3],
      "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": [2, 2]}, "an SD 1.x checkpoint"),
    ({UNET_PREFIX + "input_blocks.0.0.weight": [4, 4, 3, 3], "cond_stage_model.model.positional_embedding": [2, 2]},
     "an SD 2.x checkpoint"),
    ({**FULL, "conditioner.embedders.0.model.positional_embedding": [2, 2]}, "an SDXL refiner"),
    ({**FULL, UNET_PREFIX + "input_blocks.0.0.weight": [4, 9, 3, 3]}, "9 input channels"),
    ({k: v for k, v in FULL.items() if not k.startswith(VAE_PREFIX)}, "without the VAE"),
    ({"down_blocks.0.resnets.0.conv1.weight": [2, 2], "add_embedding.linear_1.weight": [2, 2]},
     "a diffusers UNet saved alone"),
    ({"decoder.conv_in.weight": [2, 2]}, "a VAE alone"),
    ({"double_blocks.0.img_attn.norm.key_norm.scale": [2]}, "another architecture"),
    ({"something.else": [2]}, "no SDXL keys"),
], ids=["kohya-lora", "diffusers-lora", "sd15", "sd2", "refiner", "inpainting", "no-vae", "diffusers-unet", "vae",
        "flux", "other"])
def test_what_a_file_is_instead_of_sdxl(tmp_path: Path, keys: dict, message: str) -> None:
    assert message in checkpoint_problem(_fake(tmp_path / "model.safetensors", keys))
    assert checkpoint_problem(_fake(tmp_path / "ok.safetensors", FULL)) is None


def test_a_lora_or_sd15_file_as_the_generator_is_one_line(capsys, tiny_kit: dict[str, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _tiny_env(monkeypatch, tiny_kit)
    sd15 = _fake(tmp_path / "sd15.safetensors", {
        UNET_PREFIX + "input_blocks.0.0.weight": [4, 4, 3, 3],
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": [2, 2]})
    lora = tiny_kit["lcm_lora"] / "pytorch_lora_weights.safetensors"
    for file, message in ((lora, "a LoRA, not a whole checkpoint"), (sd15, "an SD 1.x checkpoint")):
        monkeypatch.setenv("IMGRAG_MODELS_GENERATOR", str(file))
        code, _, err = run_cli(capsys, "generate", "a cat", "--profile", "tiny", "-o", str(tmp_path / "x.png"))
        lines = _error_lines(err)
        assert code == 1 and len(lines) == 1 and message in lines[0] and str(file) in lines[0], err
    assert not (tmp_path / "x.png").exists()


def test_a_folder_of_several_files_and_a_missing_file_are_one_line(settings: Settings, tmp_path: Path) -> None:
    for name in ("a.safetensors", "b.safetensors"):
        _fake(tmp_path / name, FULL)
    with pytest.raises(UserError, match="holds 2 .safetensors files") as info:
        load_sdxl_pipeline(_with(settings, generator=str(tmp_path)))
    assert "\n" not in str(info.value)
    with pytest.raises(ModelLoadError, match="generator checkpoint not found"):
        load_sdxl_pipeline(_with(settings, generator=str(tmp_path / "gone.safetensors")))


def test_a_missing_or_incomplete_configuration_is_one_line_naming_it(single_settings: Settings,
                                                                      config_only: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no such folder") as info:
        load_sdxl_pipeline(_with(single_settings, generator_config=str(tmp_path / "nowhere")))
    assert "models.generator_config" in str(info.value)
    partial = shutil.copytree(config_only, tmp_path / "partial")
    (partial / "unet" / "config.json").unlink()
    assert missing_config_files(partial) == ["unet/config.json"]
    with pytest.raises(ModelLoadError, match=r"lacks unet/config.json"):
        load_sdxl_pipeline(_with(single_settings, generator_config=str(partial)))
    with pytest.raises(ModelLoadError, match=r"is not in the local Hugging Face cache: `imgrag models download "
                                             r"--role generator`"):
        load_sdxl_pipeline(_with(single_settings, generator_config=SDXL_BASE))
    omnigen = _with(single_settings, generator_config=str(Path(single_settings.models.omnigen)))
    with pytest.raises(ModelLoadError, match="OmniGenPipeline's configuration, not StableDiffusionXLPipeline's"):
        load_sdxl_pipeline(omnigen)


# ----- doctor -----


def _doctor(capsys, monkeypatch: pytest.MonkeyPatch, **env: str) -> tuple[int, dict]:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code, out, _ = run_cli(capsys, "doctor", "--profile", "tiny", "--json")
    return code, json.loads(out)


def test_doctor_on_a_good_single_file(capsys, tiny_kit: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    _tiny_env(monkeypatch, tiny_kit)
    file = tiny_kit["generator_single_file"] / SDXL_SINGLE_FILE_NAME
    code, report = _doctor(capsys, monkeypatch, IMGRAG_MODELS_GENERATOR=str(file))
    info = report["checkpoints"]["generator"]
    assert code == 0 and info["ok"], info
    assert info["status"] == "single-file checkpoint, its configuration here"
    assert info["files"] > 8 and not info["missing"] and not info["problems"]
    assert any("single-file SDXL checkpoint" in note for note in info["notes"])


def test_doctor_on_a_truncated_file_a_lora_and_a_missing_configuration(
        capsys, tiny_kit: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tiny_env(monkeypatch, tiny_kit)
    good = (tiny_kit["generator_single_file"] / SDXL_SINGLE_FILE_NAME).read_bytes()
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(good[: len(good) // 2])
    code, report = _doctor(capsys, monkeypatch, IMGRAG_MODELS_GENERATOR=str(truncated))
    info = report["checkpoints"]["generator"]
    assert code == 1 and not info["ok"]
    assert len(info["problems"]) == 1 and "truncated: its header needs" in info["problems"][0]
    assert any(p.startswith("generator: ") and "truncated" in p for p in report["problems"])

    code, report = _doctor(capsys, monkeypatch, IMGRAG_MODELS_GENERATOR=str(tiny_kit["lcm_lora"]))  # one file in it
    assert code == 1 and "a LoRA, not a whole checkpoint" in report["checkpoints"]["generator"]["problems"][0]

    file = tiny_kit["generator_single_file"] / SDXL_SINGLE_FILE_NAME
    code, report = _doctor(capsys, monkeypatch, IMGRAG_MODELS_GENERATOR=str(file),
                           IMGRAG_MODELS_GENERATOR_CONFIG=str(tmp_path / "no-config"))
    info = report["checkpoints"]["generator"]
    assert code == 1 and f"no such folder: {tmp_path / 'no-config'} (models.generator_config)" in info["problems"]

    code, report = _doctor(capsys, monkeypatch, IMGRAG_MODELS_GENERATOR_CONFIG=SDXL_BASE)  # not in the cache
    info = report["checkpoints"]["generator"]
    assert code == 1 and not info["ok"]
    assert info["status"] == (f"its configuration ({SDXL_BASE}) is not downloaded: `imgrag models download "
                              "--profile tiny --role generator`")
    assert f"{SDXL_BASE}:unet/config.json" in info["missing"] and str(file) not in info["missing"]
    assert 0 < info["to_fetch_bytes"] < 5e6  # configuration and tokenizers: no weights


# ----- models download: the configuration, never weights -----


def test_the_configuration_patterns_select_no_weights() -> None:
    chosen = [f.path for f in select_files(hub_layouts.LAYOUTS[SDXL_BASE], CONFIG_PATTERNS)]
    assert "model_index.json" in chosen and "unet/config.json" in chosen and "tokenizer_2/vocab.json" in chosen
    assert not [p for p in chosen if p.endswith((".safetensors", ".bin", ".ckpt", ".onnx", ".msgpack"))]


def test_models_download_fetches_the_configuration_then_the_file_loads_from_the_cache(
        capsys, tiny_kit: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub is faked at its one boundary, snapshot_download, which writes the tiny kit's real configuration
    files under the base SDXL's recorded names into a Hugging Face cache of our own; everything after is real."""
    import huggingface_hub
    from huggingface_hub import constants

    _tiny_env(monkeypatch, tiny_kit)
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    kit_sdxl = tiny_kit["generator"]
    vocab = json.loads((kit_sdxl / "tokenizer" / "tokenizer.json").read_text())["model"]
    real_snapshot = huggingface_hub.snapshot_download
    calls: list[tuple[str, list[str]]] = []

    def content(path: str) -> bytes:
        name = path.rsplit("/", 1)[-1]
        if name == "vocab.json":
            return json.dumps(vocab["vocab"]).encode()
        if name == "merges.txt":
            return ("#version: 0.2\n" + "\n".join(" ".join(m) if isinstance(m, list) else m
                                                  for m in vocab["merges"]) + "\n").encode()
        if name == "special_tokens_map.json":
            return b"{}"
        return (kit_sdxl / path).read_bytes()

    def fake_snapshot_download(repo_id: str, allow_patterns=None, local_files_only: bool = False, **kwargs):
        if local_files_only:
            return real_snapshot(repo_id, local_files_only=True, **kwargs)
        calls.append((repo_id, list(allow_patterns)))
        commit = "0" * 40
        root = cache / f"models--{repo_id.replace('/', '--')}"
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(commit)
        for f in select_files(hub_layouts.LAYOUTS[repo_id], allow_patterns):
            target = root / "snapshots" / commit / f.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content(f.path))
        return str(root / "snapshots" / commit)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    file = tiny_kit["generator_single_file"] / SDXL_SINGLE_FILE_NAME
    monkeypatch.setenv("IMGRAG_MODELS_GENERATOR", str(file))
    monkeypatch.setenv("IMGRAG_MODELS_GENERATOR_CONFIG", SDXL_BASE)
    code, out, err = run_cli(capsys, "models", "download", "--profile", "tiny", "--role", "generator")
    assert code == 0 and "done" in err, err
    assert calls == [(SDXL_BASE, CONFIG_PATTERNS)]
    assert f"configuration from {SDXL_BASE}" in out
    code, _, err = run_cli(capsys, "models", "download", "--profile", "tiny", "--role", "generator")
    assert code == 0 and "nothing to download" in err and len(calls) == 1

    settings = load_settings("tiny")
    info = check_role("generator", settings)
    assert info.ok, (info.problems, [f.path for f in info.missing])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # a run never downloads
    code, _, err = run_cli(capsys, "generate", "a cat", "--profile", "tiny", "--seed", "2", "-o",
                           str(tmp_path / "cached.png"))
    assert code == 0, err
    monkeypatch.delenv("IMGRAG_MODELS_GENERATOR")
    monkeypatch.delenv("IMGRAG_MODELS_GENERATOR_CONFIG")
    code, _, err = run_cli(capsys, "generate", "a cat", "--profile", "tiny", "--seed", "2", "-o",
                           str(tmp_path / "folder.png"))
    assert code == 0, err
    assert np.allclose(_pixels(Image.open(tmp_path / "cached.png")), _pixels(Image.open(tmp_path / "folder.png")),
                       atol=1)


# ----- the real SDXL architecture: names only (meta tensors, no memory) -----


def test_the_real_sdxl_architecture_maps_to_the_names_real_checkpoints_use_and_back() -> None:
    """The inverse mapping is written for any block count; on the real SDXL configs (3 UNet blocks of 2 layers, up
    to 10 transformer layers, a 4-block VAE, CLIP-L and the 32-layer OpenCLIP-bigG) it must give the names real
    single-file checkpoints use, and diffusers' own converters must map those back onto every weight, same shape."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        CHECKPOINT_KEY_NAMES,
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
        infer_diffusers_model_type,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from imgrag.kits import full_configs as F
    from imgrag.weights.single_file import original_layout

    with torch.device("meta"):
        pipe = SimpleNamespace(unet=UNet2DConditionModel(**F.SDXL_UNET), vae=AutoencoderKL(**F.SDXL_VAE),
                               text_encoder=CLIPTextModel(CLIPTextConfig(**F.SDXL_TEXT_ENCODER)),
                               text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**F.SDXL_TEXT_ENCODER_2)))
    state = original_layout(pipe)
    for key in (CHECKPOINT_KEY_NAMES["xl_base"], CHECKPOINT_KEY_NAMES["clip_sdxl"],
                CHECKPOINT_KEY_NAMES["open_clip_sdxl"], UNET_PREFIX + "output_blocks.2.2.conv.weight",
                UNET_PREFIX + "output_blocks.5.2.conv.weight", UNET_PREFIX + "input_blocks.6.0.op.weight",
                UNET_PREFIX + "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight",
                UNET_PREFIX + "middle_block.2.out_layers.3.weight", VAE_PREFIX + "decoder.up.3.upsample.conv.weight",
                VAE_PREFIX + "encoder.mid.attn_1.proj_out.weight", OPEN_CLIP_PREFIX + "text_projection",
                OPEN_CLIP_PREFIX + "transformer.resblocks.31.attn.in_proj_weight"):
        assert key in state, key
    assert not [k for k in state if "output_blocks.8.2" in k or "output_blocks.8.1.conv" in k]  # no last upsampler
    assert infer_diffusers_model_type(state) == "xl_base"

    def same(model: torch.nn.Module, converted: dict) -> None:
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in converted.items()} == expected

    same(pipe.unet, convert_ldm_unet_checkpoint(state, dict(pipe.unet.config)))
    same(pipe.vae, convert_ldm_vae_checkpoint(state, dict(pipe.vae.config)))
    same(pipe.text_encoder, {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(state).items()})
    same(pipe.text_encoder_2, convert_open_clip_checkpoint(pipe.text_encoder_2, state, prefix=OPEN_CLIP_PREFIX))

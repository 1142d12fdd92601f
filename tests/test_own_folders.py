"""Bring your own folders: a TinyIMGRAG user's model files load as they are.

TinyIMGRAG keeps the "plus" SDXL IP-Adapter (``ip-adapter-plus_sdxl_vit-h.safetensors``: a Resampler image
projection, other keys than the plain adapter) and OpenAI's CLIP checkpoint ``ViT-B-32.pt`` (a TorchScript
archive). Both are built here in tiny form, in those exact on-disk formats, and go through imgrag's loaders.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgrag.errors import ModelLoadError
from imgrag.kits.tiny_builders import ip_adapter_attention_weights
from imgrag.kits.tiny_configs import IP_IMAGE_ENCODER, SDXL_UNET
from imgrag.models.generator import Generator
from imgrag.settings import Settings, load_settings
from imgrag.weights.adapters import inspect_adapter, resolve_ip_adapter
from imgrag.weights.model_files import check_role, is_torchscript_archive
from tests.cli import run_cli

PLUS = "ip-adapter-plus_sdxl_vit-h.safetensors"
RED = Image.new("RGB", (100, 80), (200, 30, 30))


def _plus_adapter_state(seed: int, embed_dims: int) -> dict[str, torch.Tensor]:
    """A tiny IP-Adapter *plus* in the original (h94) key layout, for the tiny kit's UNet.

    The Resampler is built with diffusers' own class for its shapes, then its keys are written back the
    way h94's files name them (``layers.N.0.to_kv`` = to_k and to_v stacked, ``layers.N.1.{0,1,3}`` the
    feed-forward), the inverse of diffusers' ``_convert_ip_adapter_image_proj_to_diffusers``. Depth 4 and
    feed-forward ratio 4 as in the real one: diffusers rebuilds the Resampler with those defaults.
    """
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    torch.manual_seed(seed)
    cross = SDXL_UNET["cross_attention_dim"]
    resampler = IPAdapterPlusImageProjection(embed_dims=embed_dims, output_dims=cross, hidden_dims=64, depth=4,
                                             dim_head=64, heads=1, num_queries=4, ffn_ratio=4)
    diff = {k: v.detach().clone() for k, v in resampler.state_dict().items()}
    for value in diff.values():
        if value.dim() > 1:
            value.normal_(0, 0.05)
    state: dict[str, torch.Tensor] = {}
    for key, value in diff.items():
        parts = key.split(".")
        if parts[0] != "layers":
            state[f"image_proj.{key}"] = value
            continue
        i, rest = parts[1], ".".join(parts[2:])
        renames = {"ln0.weight": "0.norm1.weight", "ln0.bias": "0.norm1.bias", "ln1.weight": "0.norm2.weight",
                   "ln1.bias": "0.norm2.bias", "attn.to_q.weight": "0.to_q.weight",
                   "attn.to_out.0.weight": "0.to_out.weight", "ff.0.weight": "1.0.weight", "ff.0.bias": "1.0.bias",
                   "ff.1.net.0.proj.weight": "1.1.weight", "ff.1.net.2.weight": "1.3.weight"}
        if rest == "attn.to_k.weight":
            state[f"image_proj.layers.{i}.0.to_kv.weight"] = torch.cat([value, diff[f"layers.{i}.attn.to_v.weight"]])
        elif rest != "attn.to_v.weight":
            state[f"image_proj.layers.{i}.{renames[rest]}"] = value
    state.update(ip_adapter_attention_weights(scale=0.05))
    return {k: v.contiguous() for k, v in state.items()}


@pytest.fixture(scope="module")
def tinyimgrag_adapter(tiny_kit: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An IP-Adapter folder as TinyIMGRAG keeps it: only the plus weights, with the ViT-H encoder folder."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tinyimgrag") / "IP-Adapter"
    shutil.copytree(tiny_kit["ip_adapter"] / "models", folder / "models")
    (folder / "sdxl_models").mkdir()
    save_file(_plus_adapter_state(0, IP_IMAGE_ENCODER["hidden_size"]), str(folder / "sdxl_models" / PLUS))
    return folder


@pytest.fixture(scope="module")
def settings(tiny_kit: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Settings:
    home = tmp_path_factory.mktemp("own-home")
    return load_settings("tiny", environ={"IMGRAG_TINY_KIT_DIR": str(tiny_kit["generator"].parent),
                                          "IMGRAG_HOME": str(home)})


def _with_adapter(settings: Settings, folder: Path, **models: str) -> Settings:
    return replace(settings, models=replace(settings.models, ip_adapter=str(folder), **models))


def test_the_plus_adapter_is_detected_and_draws(settings: Settings, tinyimgrag_adapter: Path) -> None:
    info = inspect_adapter(tinyimgrag_adapter / "sdxl_models" / PLUS)
    assert info is not None and info.kind == "plus" and info.input_dim == IP_IMAGE_ENCODER["hidden_size"]
    own = _with_adapter(settings, tinyimgrag_adapter)
    assert own.models.ip_adapter_weight == "ip-adapter_sdxl_vit-h.safetensors"  # the default names the plain one
    resolved = resolve_ip_adapter(own)
    assert resolved.weight == PLUS and resolved.kind == "plus" and PLUS in resolved.note

    generator = Generator.from_pretrained(own)
    assert generator.adapter is not None and generator.adapter.weight == PLUS  # checked before any drawing
    plain = np.asarray(generator.generate("a cat", seed=1))
    guided = generator.generate("a cat", seed=1, references=[RED], ip_scale=1.0)
    assert guided.size == (64, 64) and not np.array_equal(plain, np.asarray(guided))
    # Plain drawing after a guided one (scale 0, zero embeddings of the plus adapter's hidden-state shape).
    assert np.array_equal(plain, np.asarray(generator.generate("a cat", seed=1)))

    row = check_role("ip_adapter", own)
    assert row.ok and any(PLUS in note for note in row.notes)


def test_an_ambiguous_or_mismatched_adapter_fails_before_the_first_drawing(
        settings: Settings, tinyimgrag_adapter: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    two = tmp_path / "two"
    shutil.copytree(tinyimgrag_adapter, two)
    shutil.copy(two / "sdxl_models" / PLUS, two / "sdxl_models" / "ip-adapter-plus-face_sdxl_vit-h.safetensors")
    with pytest.raises(ModelLoadError, match="models.ip_adapter_weight") as info:
        Generator.from_pretrained(_with_adapter(settings, two))
    assert PLUS in str(info.value) and "\n" not in str(info.value)

    # An adapter trained for another encoder width (a bigG adapter next to the ViT-H encoder, say).
    wrong = tmp_path / "wrong"
    shutil.copytree(tinyimgrag_adapter, wrong)
    save_file(_plus_adapter_state(1, IP_IMAGE_ENCODER["hidden_size"] * 2), str(wrong / "sdxl_models" / PLUS))
    with pytest.raises(ModelLoadError, match="models.ip_adapter_image_encoder"):
        Generator.from_pretrained(_with_adapter(settings, wrong))
    assert "models.ip_adapter_image_encoder" in check_role("ip_adapter", _with_adapter(settings, wrong)).problems[0]

    # Not an adapter at all: named as such.
    junk = tmp_path / "junk"
    shutil.copytree(tinyimgrag_adapter, junk)
    save_file({"weight": torch.zeros(2)}, str(junk / "sdxl_models" / PLUS))
    with pytest.raises(ModelLoadError, match="IP-Adapter files there: none"):
        resolve_ip_adapter(_with_adapter(settings, junk))


def test_doctor_names_the_adapter_it_found(capsys, settings: Settings, tinyimgrag_adapter: Path,
                                           tiny_kit: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGRAG_TINY_KIT_DIR", str(tiny_kit["generator"].parent))
    monkeypatch.setenv("IMGRAG_MODELS_IP_ADAPTER", str(tinyimgrag_adapter))
    code, out, _ = run_cli(capsys, "doctor", "--profile", "tiny", "--json")
    row = json.loads(out)["checkpoints"]["ip_adapter"]
    assert code == 0 and row["ok"] and any(PLUS in n for n in row["notes"])


# ----- OpenAI CLIP's TorchScript checkpoint -----

TINY_OPENAI_CFG = {"embed_dim": 32, "quick_gelu": True,
                   "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
                   "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}}


@pytest.fixture(scope="module")
def openai_archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A tiny CLIP saved as OpenAI ships ``ViT-B-32.pt``: a traced TorchScript archive (widths of 64 so that
    open_clip's OpenAI loader, which takes heads = width // 64, rebuilds the same shapes)."""
    import open_clip

    root = tmp_path_factory.mktemp("openai-clip")
    (root / "configs").mkdir()
    (root / "configs" / "tiny-openai-ViT.json").write_text(json.dumps(TINY_OPENAI_CFG))
    open_clip.add_model_config(root / "configs")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-openai-ViT").eval()
    image, text = torch.ones(1, 3, 32, 32), torch.zeros(1, 77, dtype=torch.int)
    with warnings.catch_warnings():  # tracing's deprecation and "might not generalize" notes: not our concern
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(model, {"forward": (image, text), "encode_image": (image,),
                                                "encode_text": (text,)})
    path = root / "ViT-B-32.pt"
    traced.save(str(path))
    return path, model


def test_openai_torchscript_clip_loads_without_unpickling(openai_archive, settings: Settings,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from imgrag.models.embedder import Embedder

    path, original = openai_archive
    assert is_torchscript_archive(path)
    with pytest.raises(Exception, match="weights_only"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.load(str(path), weights_only=True)  # what open_clip's file loader did with it

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load (pickle) must not be used for a TorchScript archive")

    monkeypatch.setattr(torch, "load", no_pickle)
    own = replace(settings, models=replace(settings.models, embedder="tiny-openai-ViT", embedder_pretrained=str(path)))
    embedder = Embedder.from_pretrained(own, device="cpu")
    vectors = embedder.embed_images([RED])
    with torch.inference_mode():
        expected = original.encode_image(embedder.preprocess(RED)[None], normalize=True).numpy()
    # OpenAI's checkpoints are fp16: the loader rounds through fp16 as open_clip's does.
    assert vectors.shape == (1, 32) and np.allclose(vectors, expected, atol=1e-3)
    assert embedder.embed_texts(["a red square"]).shape == (1, 32)
    assert embedder.model_id.startswith("tiny-openai-ViT@ViT-B-32.pt@")

    # The archive is not the architecture the setting names: one line saying so, not a shape traceback.
    other = replace(own, models=replace(own.models, embedder="ViT-B-32"))
    with pytest.raises(ModelLoadError, match="not ViT-B-32"):
        Embedder.from_pretrained(other, device="cpu")


def test_doctor_checks_the_weights_file_not_the_hub(capsys, openai_archive, tiny_kit: dict[str, Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = openai_archive
    monkeypatch.setenv("IMGRAG_TINY_KIT_DIR", str(tiny_kit["generator"].parent))
    monkeypatch.setenv("IMGRAG_MODELS_EMBEDDER", "ViT-B-32")
    monkeypatch.setenv("IMGRAG_MODELS_EMBEDDER_PRETRAINED", str(path))
    code, out, _ = run_cli(capsys, "doctor", "--profile", "tiny", "--json")
    row = json.loads(out)["checkpoints"]["embedder"]
    assert code == 0 and row["ok"] and row["status"] == "local file" and "download" not in row["status"]
    assert any("TorchScript" in n for n in row["notes"])
    monkeypatch.setenv("IMGRAG_MODELS_EMBEDDER_PRETRAINED", str(path.parent / "nothing.pt"))
    code, out, _ = run_cli(capsys, "doctor", "--profile", "tiny", "--json")
    row = json.loads(out)["checkpoints"]["embedder"]
    assert not row["ok"] and row["missing"] == [str(path.parent / "nothing.pt")]

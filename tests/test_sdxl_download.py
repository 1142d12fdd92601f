"""What `imgrag models download` fetches for SDXL is everything diffusers' own download step checks for.

diffusers' ``DiffusionPipeline.download`` (called by every ``from_pretrained`` of a hub id) lists the repository,
works out the files a cached pipeline of the asked variant must hold, and downloads whatever of them the cache
lacks. Here it runs for real over the repository as recorded in imgrag.weights.hub_layouts (the hub's listing and
``model_index.json`` answered from the record, no network): after imgrag's patterns "downloaded" their files, it
must find the pipeline cached and download nothing."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from imgrag.settings import load_settings
from imgrag.weights import hub_layouts
from imgrag.weights.roles import SDXL_EXTRA_WEIGHTS, hub_patterns, select_files

# stabilityai/stable-diffusion-xl-base-1.0's model_index.json (its components; the versions do not matter here).
SDXL_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0.dev0",
    "force_zeros_for_empty_prompt": True, "add_watermarker": None,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def diffusers_download(monkeypatch: pytest.MonkeyPatch, snapshot: Path, listing: list[str]) -> list[list[str]]:
    """Run diffusers' download of SDXL (fp16, safetensors) against ``snapshot`` as the cache; the allow patterns of
    every download it would start (none when the cache holds all it checks for)."""
    import diffusers.pipelines.pipeline_utils as pipeline_utils
    from diffusers import DiffusionPipeline

    started: list[list[str]] = []

    def snapshot_download(repo, *, allow_patterns=None, **_):
        started.append(list(allow_patterns or []))
        return str(snapshot)

    monkeypatch.setattr(pipeline_utils, "_resolve_revision", lambda *a, **k: "main")
    monkeypatch.setattr(pipeline_utils, "model_info", lambda *a, **k: SimpleNamespace(
        siblings=[SimpleNamespace(rfilename=name) for name in listing], sha="0" * 40))
    monkeypatch.setattr(pipeline_utils, "hf_hub_download", lambda repo, name, **k: str(snapshot / name))
    monkeypatch.setattr(pipeline_utils, "snapshot_download", snapshot_download)
    DiffusionPipeline.download(hub_layouts.SDXL_BASE, variant="fp16", use_safetensors=True, local_files_only=False)
    return started


def fake_snapshot(folder: Path, files: list[str]) -> Path:
    for name in files:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(SDXL_MODEL_INDEX) if name == "model_index.json" else "x", encoding="utf-8")
    return folder


def test_diffusers_finds_everything_it_checks_for_in_what_imgrag_downloads(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    layout = hub_layouts.LAYOUTS[hub_layouts.SDXL_BASE]
    fetched = [f.path for f in select_files(layout, hub_patterns("generator", load_settings("default")))]
    assert set(SDXL_EXTRA_WEIGHTS) <= set(fetched)
    snapshot = fake_snapshot(tmp_path / "snapshot", fetched)
    assert diffusers_download(monkeypatch, snapshot, [f.path for f in layout]) == []


def test_without_the_vae_1_0_file_diffusers_would_download_it_mid_run(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The kind as found: the fp16 patterns without vae_1_0's file leave a cache diffusers does not accept."""
    layout = hub_layouts.LAYOUTS[hub_layouts.SDXL_BASE]
    fetched = [f.path for f in select_files(layout, hub_patterns("generator", load_settings("default")))
               if f.path not in SDXL_EXTRA_WEIGHTS]
    started = diffusers_download(monkeypatch, fake_snapshot(tmp_path / "snapshot", fetched), [f.path for f in layout])
    assert started and "vae_1_0/diffusion_pytorch_model.fp16.safetensors" in started[0]

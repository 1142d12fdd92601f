"""The tiny-model kit: miniature, randomly initialised copies of every model imgrag runs.

No machine of this project can download real checkpoints, so the ``tiny`` settings profile points at
this kit instead. Each model here has the REAL architecture and is saved in the REAL on-disk format
(``save_pretrained`` folders, the h94/IP-Adapter repository layout, open_clip's ``local-dir:``
schema), so imgrag's real loading code runs on it unchanged. The weights are random: every image
drawn is noise, every judgement and every chat answer is gibberish. The kit only proves that the
plumbing (loading, shapes, prompts, chat templates, generation calls) works.

Layout under ``out_dir``::

    sdxl/                  StableDiffusionXLPipeline.save_pretrained (AutoPipelineForText2Image loads it)
    sdxl-single/           the same SDXL as one file, tiny-sdxl.safetensors, in the original A1111/ComfyUI key
                           layout (from_single_file loads it, configured by sdxl/; imgrag.weights.single_file)
    ip-adapter/            like h94/IP-Adapter: sdxl_models/ip-adapter_sdxl_vit-h.safetensors
                           + models/image_encoder/ (CLIPVisionModelWithProjection)
    qwen2.5-vl/            Qwen2_5_VLForConditionalGeneration + Qwen2_5_VLProcessor
    qwen2.5-instruct/      Qwen2ForCausalLM + Qwen2.5-Instruct tokenizer (tool-calling chat template)
    open-clip/             open_clip_config.json + open_clip_model.safetensors ("local-dir:<dir>")
    lcm-lora/              like latent-consistency/lcm-lora-sdxl: pytorch_lora_weights.safetensors (PEFT LoRA keys)
    loras/                 two LoRAs for the SDXL, as people download them: style-diffusers.safetensors (diffusers/
                           PEFT keys, UNet and both text encoders) and subject-kohya.safetensors (kohya keys, .alpha)
    dino/                  ViTModel + ViTImageProcessor, the layout of facebook/dino-vits16 (eval's DINO score)
    siglip/                open_clip local-dir SigLIP (timm "map"-pooled ViT, HF tokenizer) for eval's SigLIP score
    omnigen/               OmniGenPipeline.save_pretrained, like Shitao/OmniGen-v1-diffusers (transformer, its own
                           8x-downsampling VAE, a Llama BPE tokenizer with Phi-3's chat markers, scheduler)
    kit.json               marker, written last: {"version", "seed", "models"}

Builds are seeded and deterministic (same seed, same bytes), write only safetensors, and take a
few seconds on a 2-core CPU. Each model is built in a temporary sibling folder and renamed into
place; the marker is removed first and written last (atomically), so an interrupted build is
detected and redone by :func:`ensure_tiny_kit`.

The kit is five modules, one subject each: this one builds and marks the kit (the public API), on
:mod:`imgrag.kits.tiny_configs` (folder names and every model's configuration, also the template of
:mod:`imgrag.kits.full_scale`), :mod:`imgrag.kits.tiny_tokenizers`, :mod:`imgrag.kits.tiny_builders` (one builder per
model) and :mod:`imgrag.kits.tiny_loras` (the LCM-LoRA and the user LoRAs); eval's scorers are
:mod:`imgrag.kits.tiny_scorers`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock

from imgrag.atomic_files import write_json_atomic
from imgrag.kits.tiny_builders import (
    build_ip_adapter,
    build_omnigen,
    build_open_clip,
    build_qwen_llm,
    build_qwen_vl,
    build_sdxl,
    build_sdxl_single_file,
)
from imgrag.kits.tiny_configs import DEFAULT_SEED, KIT_VERSION, LOCK_NAME, MARKER_NAME, MODEL_DIRS
from imgrag.kits.tiny_loras import build_tiny_lcm_lora, build_user_loras
from imgrag.kits.tiny_scorers import build_dino, build_siglip

# The builder of each model, keyed like MODEL_DIRS, in build order: ``builder(dest, seed)`` fills the empty folder
# ``dest``. A dict, so that a test can swap one builder for one that fails.
BUILDERS: dict[str, Callable[[Path, int], None]] = {
    "generator": build_sdxl,
    "generator_single_file": build_sdxl_single_file,
    "ip_adapter": build_ip_adapter,
    "judge": build_qwen_vl,
    "llm": build_qwen_llm,
    "embedder": build_open_clip,
    "lcm_lora": build_tiny_lcm_lora,
    "loras": build_user_loras,
    "dino": build_dino,
    "siglip": build_siglip,
    "omnigen": build_omnigen,
}
# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def tiny_kit_paths(out_dir: Path) -> dict[str, Path]:
    """Where each model of the kit lives under ``out_dir`` (nothing is built or checked)."""
    out_dir = Path(out_dir)
    return {key: out_dir / name for key, name in MODEL_DIRS.items()}


def build_tiny_kit(
    out_dir: Path,
    *,
    seed: int = DEFAULT_SEED,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Build the whole kit into ``out_dir`` and return :func:`tiny_kit_paths`. The same layout at the real models'
    sizes is :func:`imgrag.kits.full_scale.build_kit` with ``scale="full"``.

    Without ``force``, a kit already there with a current marker and the same seed is kept as is.
    ``progress`` is called once per model with its folder name ("sdxl", "ip-adapter", ...).
    Only the kit's own folders under ``out_dir`` are replaced; other files there are left alone.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _kit_lock(out_dir):
        marker = read_kit_marker(out_dir)
        if not force and marker is not None and marker.get("seed") == seed:
            return tiny_kit_paths(out_dir)
        return _build_locked(out_dir, seed, progress)


def ensure_tiny_kit(out_dir: Path, progress: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Return the kit's paths, building it (DEFAULT_SEED) only when the marker is missing or stale.

    A current kit of any seed is kept. Concurrent callers wait on a file lock; one of them builds.
    """
    out_dir = Path(out_dir)
    if read_kit_marker(out_dir) is not None:
        return tiny_kit_paths(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _kit_lock(out_dir):
        if read_kit_marker(out_dir) is not None:  # another process built it while we waited
            return tiny_kit_paths(out_dir)
        return _build_locked(out_dir, DEFAULT_SEED, progress)


# ----------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------


def _kit_lock(out_dir: Path) -> FileLock:
    return FileLock(str(out_dir / LOCK_NAME))


def read_kit_marker(out_dir: Path) -> dict[str, Any] | None:
    """The kit marker of ``out_dir`` (a dict) if it is current (this KIT_VERSION, every model folder present), else
    None: whether the kit is built, as ensure_tiny_kit and doctor decide it."""
    try:
        marker = json.loads((out_dir / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("version") != KIT_VERSION:
        return None
    if not all(path.is_dir() for path in tiny_kit_paths(out_dir).values()):
        return None
    return marker


def _build_locked(out_dir: Path, seed: int, progress: Callable[[str], None] | None) -> dict[str, Path]:
    (out_dir / MARKER_NAME).unlink(missing_ok=True)  # an interrupted build must look unbuilt
    paths = tiny_kit_paths(out_dir)
    with _quiet_progress_bars():
        for key, builder in BUILDERS.items():
            if progress is not None:
                progress(MODEL_DIRS[key])
            _build_into(paths[key], lambda tmp, builder=builder: builder(tmp, seed))
    _write_marker(out_dir, seed)
    return paths


@contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Silence transformers' "Writing model shards" bars (the caller has ``progress``), then restore them.
    transformers is imported here, not at the top: it takes seconds, and the ``imgrag`` command imports this module."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _build_into(final: Path, build: Callable[[Path], None]) -> None:
    """Run ``build`` on a temporary sibling folder of ``final``, then swap it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the kit is ordinary readable files
        build(tmp)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_marker(out_dir: Path, seed: int) -> None:
    marker = {"version": KIT_VERSION, "seed": seed, "models": dict(MODEL_DIRS)}
    write_json_atomic(out_dir / MARKER_NAME, marker)


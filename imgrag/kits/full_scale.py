"""Full-size, shape-true random-weight models: the kit of :mod:`imgrag.kits.tiny_kit` at the real sizes.

``imgrag models build-tiny --scale full DIR`` writes every model imgrag runs with the REAL
configuration of its checkpoint (layer counts, widths, heads, vocabularies) and random weights, in
the same layout as the tiny kit, so a profile pointing at DIR loads them through the real loading
code. They exist to measure speed and memory on a GPU without downloading ~40 GB of checkpoints:
seconds per 1024x1024 generation, per judge call, per model swap (``benchmarks/bench_gpu.py``).
Their pictures are noise and their answers gibberish, exactly like the tiny kit's, and a random
model never stops generating early, so token-generation times are for the full ``max_new_tokens``.

The configurations (:mod:`imgrag.kits.full_configs`) are copied from the published ``config.json`` files named
beside each one; :mod:`imgrag.kits.full_builders` builds one model each.
Tokenizers, processors and the scheduler come from the tiny kit (built first, in ``DIR/.tiny-source``):
the real ones are data files that cannot be downloaded here, and only the embedding tables, whose
sizes are the real vocabularies below, cost memory and time. Token ids beyond the small tokenizers'
vocabularies decode to nothing, as the real models' padding rows do.

Sizes in float16: SDXL 6.9 GB (UNet 2.6 B parameters, CLIP-L and OpenCLIP-bigG text encoders, VAE),
IP-Adapter 0.7 GB plus its ViT-H image encoder 1.3 GB, Qwen2.5-VL-3B 7.5 GB, Qwen2.5-7B 15.2 GB, OmniGen-v1
7.75 GB (bfloat16, as it ships) plus its VAE; CLIP ViT-B-32 0.6 GB in float32 (as laion ships it): ~40 GB in all.
Build it on a GPU: models are initialised on the device in float16 (about a minute on an H100, most of it
writing files). On a CPU it works but needs ~64 GB of RAM and a long time.

Why it ships in the runtime package, not beside the benchmarks: the installed CLI builds it
(``imgrag models build-tiny --scale full``, through :func:`build_kit`), so a user
can measure their own GPU without a checkout of the repository; the benchmarks only import it. Importing it
costs nothing: torch and the model libraries load inside :func:`build_full_kit` and the builders.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from imgrag.atomic_files import write_json_atomic
from imgrag.kits.full_builders import (
    build_full_ip_adapter,
    build_full_lcm_lora,
    build_full_omnigen,
    build_full_open_clip,
    build_full_qwen_llm,
    build_full_qwen_vl,
    build_full_sdxl,
    build_full_user_loras,
)
from imgrag.kits.full_configs import FULL, KitConfigs
from imgrag.kits.tiny_configs import KIT_VERSION, MARKER_NAME, MODEL_DIRS
from imgrag.kits.tiny_kit import build_tiny_kit, tiny_kit_paths

SCALES = ("tiny", "full")
TINY_SOURCE = ".tiny-source"


def build_kit(out_dir: Path, *, scale: str = "tiny", seed: int = 0, force: bool = False,
              progress: Callable[[str], None] | None = None) -> dict[str, Path]:
    """The kit at ``scale``: ``"tiny"`` (:func:`imgrag.kits.tiny_kit.build_tiny_kit`, tests and the demo) or ``"full"``
    (:func:`build_full_kit`, ~40 GB, for GPU benchmarks), both in the same layout; returns its paths. Here, above
    both builders, so that the tiny kit never imports this module. ValueError for another scale."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if scale == "tiny":
        return build_tiny_kit(Path(out_dir), seed=seed, force=force, progress=progress)
    return build_full_kit(Path(out_dir), seed=seed, force=force, progress=progress)


def build_full_kit(out_dir: Path, *, seed: int = 0, force: bool = False,
                   progress: Callable[[str], None] | None = None, device: str | None = None,
                   dtype: str | None = None, configs: KitConfigs = FULL) -> dict[str, Path]:
    """Build every model at full size into ``out_dir`` (the tiny kit's layout); return the paths.

    ``device`` defaults to cuda when present; ``dtype`` to float16 on cuda and float32 on a CPU. The
    marker ``kit.json`` (written last) records the scale, the seed and each model's parameter count.
    An existing full kit with the same seed is kept unless ``force``.
    """
    import torch  # here, not at the top: seconds to import, and the ``imgrag`` command imports this module

    out_dir = Path(out_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("float16" if device.startswith("cuda") else "float32")
    torch_dtype = getattr(torch, dtype)
    marker_path = out_dir / MARKER_NAME
    if not force and marker_path.is_file():
        try:
            marker = json.loads(marker_path.read_text(encoding="utf-8"))
        except ValueError:
            marker = {}
        if marker.get("scale") == "full" and marker.get("seed") == seed and all(
                p.is_dir() for p in tiny_kit_paths(out_dir).values()):
            return tiny_kit_paths(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker_path.unlink(missing_ok=True)  # an interrupted build must look unbuilt
    say = progress or (lambda message: None)
    say("tokenizers and processors (a tiny kit)")
    source = build_tiny_kit(out_dir / TINY_SOURCE, seed=seed)
    paths = tiny_kit_paths(out_dir)
    params: dict[str, int] = {}
    builders = [("generator", build_full_sdxl), ("ip_adapter", build_full_ip_adapter),
                ("judge", build_full_qwen_vl), ("llm", build_full_qwen_llm), ("embedder", build_full_open_clip),
                ("lcm_lora", build_full_lcm_lora), ("loras", build_full_user_loras), ("omnigen", build_full_omnigen)]
    for key, builder in builders:
        say(f"{MODEL_DIRS[key]} (full size)")
        torch.manual_seed(seed)
        dest = paths[key]
        # Not the tiny kit's build-then-swap, which keeps the old folder until the new one is in place: at full size
        # that would need up to 15 GB more disk; the marker is already gone, so a half-built kit looks unbuilt.
        if dest.exists():
            shutil.rmtree(dest)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        params.update(builder(tmp, source[key], configs, device, torch_dtype))
        os.replace(tmp, dest)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    # eval's scorers stay tiny (benchmarks skip them), and so does the single-file SDXL (configured by the tiny sdxl)
    for key in set(MODEL_DIRS) - {key for key, _ in builders}:
        shutil.rmtree(paths[key], ignore_errors=True)
        shutil.copytree(source[key], paths[key])
    marker = {"version": KIT_VERSION, "seed": seed, "scale": "full", "models": dict(MODEL_DIRS), "dtype": dtype,
              "parameters": params}
    write_json_atomic(marker_path, marker)
    return paths

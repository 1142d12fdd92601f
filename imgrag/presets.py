"""The profiles settings start from: ``default`` (the schema's own defaults, the real checkpoints), ``tiny`` (the
offline kit ``imgrag models build-tiny`` makes) and the built-in hardware presets (TOML files in
``imgrag/profiles/``, each naming the profile it starts from). imgrag/settings.py layers them under the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PROFILES = ("default", "tiny")
# Built-in presets: documented TOML files shipped in the package, named by their stem (cpu, fast-draft, ...).
PRESETS_DIR = Path(__file__).parent / "profiles"
# The tiny profile's paths hold it until every layer is applied; then it becomes the final tiny_kit_dir.
TINY_KIT_PLACEHOLDER = "{tiny_kit}"


def builtin_presets() -> dict[str, Path]:
    """The built-in hardware presets: name -> its TOML file (each starts from the default profile)."""
    return {path.stem: path for path in sorted(PRESETS_DIR.glob("*.toml"))}


def tiny_profile() -> dict[str, Any]:
    """The tiny profile's values, TOML-shaped (section -> key -> value), over the defaults; model paths hold
    ``TINY_KIT_PLACEHOLDER``. A new dict each call, so a caller may change it."""
    kit = TINY_KIT_PLACEHOLDER
    return {
        "models": {
            "generator": f"{kit}/sdxl",
            "generator_config": f"{kit}/sdxl",
            "ip_adapter": f"{kit}/ip-adapter",
            "judge": f"{kit}/qwen2.5-vl",
            "llm": f"{kit}/qwen2.5-instruct",
            "embedder": f"local-dir:{kit}/open-clip",
            "lcm_lora": f"{kit}/lcm-lora",
            "dino": f"{kit}/dino",
            "siglip": f"local-dir:{kit}/siglip",
            "omnigen": f"{kit}/omnigen",
        },
        # Small enough that a CPU finishes a whole run in seconds.
        # A preview at every step: the tiny drawings have only two.
        "generation": {"width": 64, "height": 64, "steps": 2, "guidance": 5.0, "preview_every": 1},
        "omnigen": {"steps": 2, "max_input_image_size": 64},
        "judge": {"min_pixels": 4 * 28 * 28, "max_pixels": 16 * 28 * 28, "max_new_tokens": 24},
        "llm": {"max_new_tokens": 32},
        "eval": {"gold_per_class": 2},
    }

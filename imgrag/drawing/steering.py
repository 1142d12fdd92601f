"""Steering the references: a weight and a mode (style, content or both) per reference picture.

A **weight** multiplies the drawing's adapter scale for that one reference (``ip_scale x weight``), so one photo can
steer more than another. A **mode** says what to take from it, the way InstantStyle (Wang et al. 2024, "InstantStyle:
Free Lunch towards Style-Preserving in Text-to-Image Generation"; diffusers PR #7668 and its IP-Adapter guide) does:
the IP-Adapter is switched on only in the UNet block that carries style, or only in the one that carries layout.

- ``both``: every cross-attention block (the plain IP-Adapter: the reference's subject and look);
- ``style``: only the middle attention of the first (lowest-resolution) up block, ``up_blocks.0.attentions.1``
  in SDXL, written ``{"up": {"block_0": [0.0, 1.0, 0.0]}}`` in diffusers' ``set_ip_adapter_scale`` dict form;
- ``content``: only the last attention of the deepest down block with attention, ``down_blocks.2.attentions.1``
  in SDXL (InstantStyle's layout block), ``{"down": {"block_2": [0.0, 1.0]}}``.

The blocks are found from the UNet's own config by that rule, so a smaller UNet (the tiny kit's) gets the blocks at
the same places; :func:`instantstyle_scale` returns the dict diffusers expands per attention processor.

How several references with different weights are drawn, and why: one adapter, several images (``[[r1, r2]]``),
each image attended on its own and added with its own scale. diffusers' IP-Adapter attention processor does exactly
that when it is given an ``ip_adapter_masks`` entry (one mask per image; here all ones, so no region is left out)
and a list of scales per image. The alternative, one adapter loaded per reference with
``set_ip_adapter_scale([w1, w2])``, computes the same sum but holds a copy of the adapter (0.35 B parameters for
SDXL) per reference. Attending each reference separately is also what makes a weight mean something: in the joint
path all references share one softmax and compete for the same attention, so no scale can favour one of them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from imgrag.errors import UserError

Mode = Literal["both", "style", "content"]
MODES: tuple[str, ...] = ("both", "style", "content")
MAX_WEIGHT = 2.0  # a weight multiplies the adapter scale; twice the scale is already far past what SDXL draws well
POLICY_MIN_WEIGHT = 0.5  # see policy_weights


@dataclass(frozen=True)
class ReferenceSteer:
    """How one reference steers a drawing: ``weight`` (0..2, multiplies the adapter scale) and ``mode``."""

    weight: float = 1.0
    mode: str = "both"

    def __post_init__(self) -> None:
        check_weight(self.weight)
        check_mode(self.mode)


def check_weight(weight: Any, where: str = "weight") -> float:
    """``weight`` as a float within 0..:data:`MAX_WEIGHT`; a UserError naming ``where`` otherwise."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(float(weight)):
        raise UserError(f"{where} must be a number within 0..{MAX_WEIGHT:g}, got {weight!r}")
    if not 0.0 <= float(weight) <= MAX_WEIGHT:
        raise UserError(f"{where} must be within 0..{MAX_WEIGHT:g}, got {weight:g}")
    return float(weight)


def check_mode(mode: Any, where: str = "mode") -> str:
    """``mode`` if it is one of :data:`MODES`; a UserError naming ``where`` otherwise."""
    if mode not in MODES:
        raise UserError(f"{where} must be one of {', '.join(MODES)}, got {mode!r}")
    return str(mode)


_SUFFIX = re.compile(r"^(?P<path>.+?)(?::(?P<weight>[0-9]*\.?[0-9]+))?(?::(?P<mode>both|style|content))?$")


def parse_ref_arg(text: str) -> tuple[Path, ReferenceSteer]:
    """``--ref PATH[:WEIGHT][:MODE]`` -> (path, steer): ``cat.png``, ``cat.png:0.7``, ``cat.png:0.7:style``,
    ``cat.png:content``. A path that itself ends in ``:<number>`` is read as a weight; such a path can be given as
    ``PATH:1``. Raises UserError for a bad weight (the path is checked by the caller)."""
    m = _SUFFIX.match(text.strip())
    if m is None or not m.group("path"):
        raise UserError(f"--ref must look like PATH[:WEIGHT][:MODE], got {text!r}")
    weight = check_weight(float(m.group("weight")), f"--ref {text}: weight") if m.group("weight") else 1.0
    return Path(m.group("path")), ReferenceSteer(weight, m.group("mode") or "both")


def _attention_blocks(config: Any) -> tuple[list[int], list[int], list[int], list[int]]:
    """Indices of the down and up blocks that have cross-attention, and how many attentions each has."""
    layers = config.layers_per_block
    down_types, up_types = list(config.down_block_types), list(config.up_block_types)
    per_down = [layers] * len(down_types) if isinstance(layers, int) else list(layers)
    per_up = [n + 1 for n in reversed(per_down)]  # each up block has one more resnet/attention than its down block
    down = [i for i, t in enumerate(down_types) if "CrossAttn" in t]
    up = [i for i, t in enumerate(up_types) if "CrossAttn" in t]
    return down, [per_down[i] for i in down], up, [per_up[i] for i in up]


def instantstyle_scale(unet_config: Any, mode: str) -> float | dict[str, Any]:
    """The ``set_ip_adapter_scale`` config of ``mode`` for a UNet of this config (see the module docstring):
    1.0 for ``both``; for ``style`` the middle attention of the first up block with attention; for ``content`` the
    last attention of the deepest down block with attention. Raises UserError for a UNet without such a block."""
    check_mode(mode)
    if mode == "both":
        return 1.0
    down, per_down, up, per_up = _attention_blocks(unet_config)
    if mode == "style":
        if not up:
            raise UserError("this UNet has no up block with attention: style-only guidance needs one")
        n = per_up[0]
        return {"up": {f"block_{up[0]}": [1.0 if j == min(1, n - 1) else 0.0 for j in range(n)]}}
    if not down:
        raise UserError("this UNet has no down block with attention: content-only guidance needs one")
    n = per_down[-1]
    return {"down": {f"block_{down[-1]}": [1.0 if j == n - 1 else 0.0 for j in range(n)]}}


def instantstyle_blocks(unet_config: Any, mode: str) -> list[str]:
    """The UNet module names (``up_blocks.0.attentions.1``...) a mode switches the adapter on in; all for ``both``."""
    down, per_down, up, per_up = _attention_blocks(unet_config)
    config = instantstyle_scale(unet_config, mode)
    if not isinstance(config, dict):
        downs = [f"down_blocks.{b}.attentions.{j}" for b, n in zip(down, per_down, strict=True) for j in range(n)]
        ups = [f"up_blocks.{b}.attentions.{j}" for b, n in zip(up, per_up, strict=True) for j in range(n)]
        return [*downs, *ups, "mid_block"]
    names = []
    for side, blocks in config.items():
        for block, scales in blocks.items():
            names += [f"{side}_blocks.{block.split('_')[1]}.attentions.{j}" for j, s in enumerate(scales) if s]
    return names


def policy_weights(scores: list[float]) -> list[float]:
    """The fixed policy's weights from retrieval scores (cosine similarity of reference and query): the best
    reference weighs 1.0, each other its score relative to the best one's, never below :data:`POLICY_MIN_WEIGHT`
    (a retrieved reference was judged relevant enough to keep; it should not vanish). With no positive best score
    (an unusual store, or the tiny kit's random embeddings) every reference weighs 1.0. Rounded to 2 decimals."""
    if not scores:
        return []
    best = max(scores)
    if not best > 0:
        return [1.0] * len(scores)
    return [round(max(POLICY_MIN_WEIGHT, min(1.0, s / best)), 2) for s in scores]


def mode_for_verdict(verdict: dict[str, Any] | None) -> str:
    """The mode the fixed policy repairs with: ``style`` when the judge names nothing missing but says the style
    or look is wrong (a reference of the right look, not of its subject), ``both`` otherwise (a missing object
    needs the reference's subject; its look comes along, as ImageRAG draws)."""
    verdict = verdict or {}
    missing = [m for m in verdict.get("missing") or [] if isinstance(m, str) and m.strip()]
    reason = str(verdict.get("reason") or "").lower()
    if verdict.get("parsed") and not missing and re.search(r"\b(style|look|colou?rs?|palette|texture)\b", reason):
        return "style"
    return "both"

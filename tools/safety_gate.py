"""The safety gate in the agent's tools (the check itself is imgrag/safety.py).

- References: what ``retrieve`` and ``consider_photos`` find is checked on the store's own embeddings before
  the planner sees it; a picture in an excluded folder or flagged is dropped with a ``safety`` line in the trace.
  Every drawing checks its references once more (files a chat user named, references of an older thread), on
  the embedder's vectors of the opened pictures, so a flagged reference never guides a drawing.
- Outputs: a drawing's CLIP image vector (computed anyway for its score) is checked; a flagged candidate is kept
  on disk and in the record (``flagged``), and unless ``safety.allow_flagged`` it is never the answer
  (``answer_blocked``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from imgrag.safety import SafetyGate
from tools.context import ToolContext

# Concept text vectors per (manager, embedder, concepts): embedded once per process, not per call.
_GATES: dict[tuple, SafetyGate] = {}


def gate_for(ctx: ToolContext, embedder: Any) -> SafetyGate:
    """The run's :class:`SafetyGate` over ``embedder`` (anything with ``embed_texts`` and ``model_id``)."""
    s = ctx.settings.safety
    key = (id(ctx.manager), getattr(embedder, "model_id", None), tuple(s.concepts), s.threshold, s.enabled,
           tuple(s.exclude))
    gate = _GATES.get(key)
    if gate is None:
        gate = _GATES[key] = SafetyGate(s, embedder)
    return gate


def _reason(flag: Any) -> str:
    return f"flagged as unsafe: {flag.concept} (similarity {flag.score:.3f})"


def screen_references(ctx: ToolContext, store: Any, embedder: Any, found: list[Any], tool: str) -> list[Any]:
    """``found`` (store References) without the excluded and flagged ones; each dropped one gets a trace line."""
    gate = gate_for(ctx, embedder)
    reasons: dict[str, str] = {}
    for ref in found:
        pattern = gate.excluded(ref.path)
        if pattern:
            reasons[ref.id] = f"excluded by safety.exclude {pattern!r}"
    if gate.enabled:
        rest = [ref for ref in found if ref.id not in reasons]
        vectors = store.embeddings([ref.id for ref in rest]) if rest else {}
        checked = [ref for ref in rest if ref.id in vectors]
        if checked:
            for ref, flag in zip(checked, gate.check(np.stack([vectors[r.id] for r in checked])), strict=True):
                if flag is not None:
                    reasons[ref.id] = _reason(flag)
    for ref in found:
        if ref.id in reasons:
            ctx.record.append_step({"event": "safety", "tool": tool, "dropped": ref.id, "path": ref.path,
                                    "reason": reasons[ref.id]})
    return [ref for ref in found if ref.id not in reasons]


def screen_drawing_references(ctx: ToolContext, references: list[dict], images: list[Any]) -> tuple[list, list]:
    """The references (records) and opened pictures a drawing may use: excluded and flagged ones dropped, each
    with a trace line. Checked on the embedder's vectors of the pictures themselves."""
    if not references:
        return references, images
    embedder = _Embedder(ctx)
    gate = gate_for(ctx, embedder)
    reasons = [gate.excluded(ref["path"]) for ref in references]
    reasons = [f"excluded by safety.exclude {r!r}" if r else None for r in reasons]
    if gate.enabled:
        for n, flag in enumerate(gate.check(embedder.embed_images(images))):
            if flag is not None and reasons[n] is None:
                reasons[n] = _reason(flag)
    for ref, reason in zip(references, reasons, strict=True):
        if reason:
            ctx.record.append_step({"event": "safety", "tool": "draw", "dropped": ref.get("id"), "path": ref["path"],
                                    "reason": reason})
    kept = [n for n, reason in enumerate(reasons) if reason is None]
    return [references[n] for n in kept], [images[n] for n in kept]


def check_output(ctx: ToolContext, image_vector: np.ndarray) -> dict[str, Any]:
    """Fields for a drawn candidate's record: ``flagged`` ({concept, score} or None) and ``answer_blocked``."""
    gate = gate_for(ctx, _Embedder(ctx))
    flag = gate.check(np.atleast_2d(image_vector))[0]
    if flag is None:
        return {"flagged": None, "answer_blocked": False}
    return {"flagged": flag.to_dict(), "answer_blocked": not ctx.settings.safety.allow_flagged}


class _Embedder:
    """The manager's embedder, each call on the model thread (no store needed, unlike ManagedEmbedder's id check)."""

    def __init__(self, ctx: ToolContext) -> None:
        self.manager = ctx.manager
        self.model_id = "embedder"

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self.manager.run("embedder", lambda e: e.embed_texts(texts))

    def embed_images(self, images: list[Any]) -> np.ndarray:
        return self.manager.run("embedder", lambda e: e.embed_images(images))

"""The safety gate in the agent's tools (the check itself is imgrag/models/safety.py).

- References: what ``retrieve`` and ``consider_photos`` find is checked on the store's own embeddings before
  the planner sees it; a picture in an excluded folder or flagged is dropped with a ``safety`` line in the trace.
  Every drawing checks its references once more (files a chat user named, references of an older thread), on
  the embedder's vectors of the opened pictures, so a flagged reference never guides a drawing.
- Outputs: a drawing's CLIP image vector (computed anyway for its score) is checked; a flagged candidate is kept
  on disk and in the record (``flagged``), and unless ``safety.allow_flagged`` it is never the answer
  (``answer_blocked``).

With the concept check off (:func:`imgrag.models.safety.concept_check_on`), none of this builds a gate, embeds a concept
or checks a vector: only ``safety.exclude`` is applied. With it on, the gate (and its concepts' text vectors) is
built once per run and kept in the run's context (:meth:`tools.context.ToolContext.once`), so it goes with the run.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from imgrag.models.safety import SafetyGate, concept_check_on, excluded_by
from tools.context import ToolContext


def gate_for(ctx: ToolContext, embedder: Any) -> SafetyGate:
    """The run's :class:`SafetyGate` over ``embedder`` (anything with ``embed_texts`` and ``model_id``): built on the
    run's first check and kept in its context, so the concepts are embedded once per run and per embedder."""
    return ctx.once(("safety_gate", getattr(embedder, "model_id", None)),
                    lambda: SafetyGate(ctx.settings.safety, embedder))


def _excluded(ctx: ToolContext, path: str) -> str | None:
    pattern = excluded_by(path, ctx.settings.safety.exclude)
    return f"excluded by safety.exclude {pattern!r}" if pattern else None


def _reason(flag: Any) -> str:
    return f"flagged as unsafe: {flag.concept} (similarity {flag.score:.3f})"


def screen_references(ctx: ToolContext, store: Any, embedder: Any, found: list[Any], tool: str) -> list[Any]:
    """``found`` (store References) without the excluded and flagged ones; each dropped one gets a trace line."""
    reasons = {ref.id: reason for ref in found if (reason := _excluded(ctx, ref.path))}
    if concept_check_on(ctx.settings.safety):
        gate = gate_for(ctx, embedder)
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
    reasons = [_excluded(ctx, ref["path"]) for ref in references]
    if concept_check_on(ctx.settings.safety):
        embedder = _Embedder(ctx)
        for n, flag in enumerate(gate_for(ctx, embedder).check(embedder.embed_images(images))):
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
    if not concept_check_on(ctx.settings.safety):
        return {"flagged": None, "answer_blocked": False}
    flag = gate_for(ctx, _Embedder(ctx)).check(np.atleast_2d(image_vector))[0]
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

"""After a fast run: redraw the matched candidate at full steps, with its seed, prompt and references.

Asked for with ``generation.fast_final_redraw = true`` (settings or ``IMGRAG_GENERATION_FAST_FINAL_REDRAW``).
The few-step drafts (``generation.fast``, :mod:`imgrag.models.fast`) find a composition the judge accepts in
seconds per round; this one extra drawing with the checkpoint's own scheduler and ``generation.steps``
gives the quality picture of that composition. It is not judged again: the same seed and references
keep the composition, and the judge already accepted it. The runner calls it once a run has ended
matched; it is not a tool of the agent and claims no round.
"""

from __future__ import annotations

import time
from typing import Any

from imgrag.drawing.draw_options import options_of
from imgrag.errors import UserError
from imgrag.images import open_image
from imgrag.records.provenance import for_drawing, save_image
from tools.context import ToolContext
from tools.failures import step_failure

FINAL_FULL_NAME = "final-full.png"


def redraw_final_full(ctx: ToolContext, state: dict[str, Any]) -> dict[str, Any] | None:
    """Redraw the run's matched final candidate at full steps when the settings ask for it; else None.

    Returns ``{"path", "candidate_id", "steps", "seconds"}`` or, when drawing failed, ``{"candidate_id", "error"}``:
    it catches what a tool catches (:func:`tools.failures.step_failure`: a user's mistake, a vanished reference, a
    generator or model error, out of memory), so no error here ends a run, and the trace gets a step either way. Only
    a full disk is raised: nothing can be written until space is freed, and the runner, which calls this inside its
    own error handling, closes the record for it (one line, a resume hint).
    """
    g = ctx.settings.generation
    if g.fast == "off" or not g.fast_final_redraw or state.get("status") != "matched":
        return None
    candidate = (state.get("candidates") or {}).get(state.get("final_candidate") or "")
    if candidate is None or candidate.source == "retrieved":  # a photo of the collection: nothing to redraw
        return None
    if candidate.backbone == "omnigen":  # few-step modes are SDXL's: OmniGen drew it at its full steps
        return None
    known = state.get("references") or {}
    options = options_of(state, ctx.settings)  # the run's drawing options (LoRAs too), as its drafts had
    args = {"candidate_id": candidate.id, "seed": candidate.seed, "steps": g.steps,
            "reference_ids": list(candidate.reference_ids)}
    drawing = {"negative_prompt": options.negative_prompt, "scheduler": options.scheduler,
               "guidance": options.guidance, "loras": options.loras}
    ctx.on_event({"event": "tool_start", "tool": "final_redraw", "args": args, "round": state.get("rounds", 0)})
    start = time.perf_counter()
    step_extra: dict[str, Any] = {}
    try:
        lost = [ref_id for ref_id in candidate.reference_ids if ref_id not in known]
        if lost:  # the run's record lost them: the user's to know, not a bug
            raise UserError(f"reference(s) {', '.join(lost)} of {candidate.id} are no longer in the run's state")
        images = [open_image(known[ref_id].path) for ref_id in candidate.reference_ids]
        image, sampler = ctx.manager.run("generator", lambda generator: (generator.generate(
            candidate.prompt, seed=candidate.seed, references=images or None,
            ip_scale=candidate.ip_scale, fast="off", **drawing), generator.last_scheduler))
        path = ctx.record.dir / FINAL_FULL_NAME
        provenance = for_drawing(ctx.settings, prompt=candidate.prompt, seed=candidate.seed,
                                 references=[known[r].model_dump() for r in candidate.reference_ids],
                                 ip_scale=candidate.ip_scale, run_id=ctx.record.dir.name,
                                 candidate_id=candidate.id, fast="off", sampler=sampler, **drawing)
        save_image(image, path, provenance)  # atomic: never half a PNG on disk
        outcome: dict[str, Any] = {"path": str(path), "candidate_id": candidate.id, "steps": g.steps}
        message = f"redrew {candidate.id} at {g.steps} steps: {path}"
    except Exception as exc:  # what a tool catches (tools/failures.py): the matched draft stays the answer
        failure = step_failure("final_redraw", exc)  # a full disk is raised again: the runner closes the record
        outcome = {"candidate_id": candidate.id, "error": failure.text.removeprefix("Error: ")}
        message = failure.text
        step_extra = failure.trace
    seconds = round(time.perf_counter() - start, 3)
    outcome["seconds"] = seconds
    ok = "error" not in outcome
    ctx.record.append_step({"tool": "final_redraw", "args": args, "ok": ok, "seconds": seconds,
                            "round": state.get("rounds", 0), "message": message, **step_extra})
    ctx.on_event({"event": "tool_end", "tool": "final_redraw", "ok": ok, "seconds": seconds, "message": message})
    return outcome

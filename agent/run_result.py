"""What a run leaves in result.json and says at its end: the result built from the state, the tool calls that
finished after the last checkpoint merged in, and what a front-end must say beside the answer (every drawing blocked,
the fixed policy standing in for the LLM).
"""

from __future__ import annotations

from typing import Any

from langchain_core.messages import AIMessage, ToolMessage

from agent.state import from_state, merge_candidates, merge_references
from imgrag.candidate_ids import candidate_number
from imgrag.drawing.draw_options import options_of
from imgrag.records.runs import RunRecord
from imgrag.settings import TINY_WARNING, Settings
from tools.records import Candidate

# What the run_end event carries for a front end to say (result.json holds them too).
RUN_END_KEYS = ("run_id", "status", "stop_reason", "final_image", "blocked", "fallback_steps", "fallback_reason",
                "final_full")


def finished_calls(values: dict[str, Any], record: RunRecord) -> dict[str, Any]:
    """``values`` with the results of the tool calls that finished after the last checkpoint (their trace steps
    kept them, see tools.image_tools) merged in: what a run stopped between a tool's end and its checkpoint had
    really drawn, so its partial result names those candidates too."""
    messages = values.get("messages") or []
    answered = {m.tool_call_id for m in messages if isinstance(m, ToolMessage)}
    last_ai = next((m for m in reversed(messages) if isinstance(m, AIMessage)), None)
    pending = {c["id"] for c in (last_ai.tool_calls if last_ai else []) if c["id"] not in answered}
    merged = from_state(values)  # the values may be a run's starting input, not yet reduced to records
    if not pending:
        return merged
    for step in record.read_steps():
        if step.get("call_id") in pending and step.get("ok") and isinstance(step.get("replay"), dict):
            update = step["replay"].get("update") or {}  # plain dicts, as the trace keeps them
            merged["candidates"] = merge_candidates(merged.get("candidates"), update.get("candidates"))
            merged["references"] = merge_references(merged.get("references"), update.get("references"))
            merged["rounds"] = int(merged.get("rounds") or 0) + int(update.get("rounds") or 0)
    return merged


def what_happened(state: dict[str, Any], candidates: list[Candidate], final: Candidate | None,
                  record: RunRecord) -> dict[str, Any]:
    """What a front end must say beside the answer: ``blocked`` when every drawing was flagged by the safety gate
    (so there is no answer, and why), and ``fallback_reason`` when the fixed policy took steps of an agent run."""
    extra: dict[str, Any] = {"blocked": None, "fallback_reason": None}
    flagged = [c for c in candidates if c.answer_blocked]
    if final is None and flagged:
        concepts = sorted({str((c.flagged or {}).get("concept")) for c in flagged})
        extra["blocked"] = (f"every drawing ({len(flagged)}) was flagged by the safety gate (safety.enabled; "
                            f"flagged as {', '.join(concepts)}), so none may be the answer; they are kept in "
                            f"{record.candidates_dir}; --allow-flagged lets one be the answer")
    if state.get("fallback_steps"):
        reasons = [s.get("reason") for s in record.read_steps() if s.get("planner") == "policy" and s.get("reason")]
        extra["fallback_reason"] = reasons[-1] if reasons else None
    return extra


def build_result(state: dict[str, Any], record: RunRecord, settings: Settings, model_stats: dict[str, dict],
                 model_loads: dict[str, int] | None = None) -> dict[str, Any]:
    """result.json, following DESIGN.md's contract (plus candidates and references for reports), from the run's
    state (records or the plain dicts of a cut-off run), its record and its settings.

    ``model_stats`` is the manager's :meth:`stats`; ``model_loads`` is what this run loaded (default: what its
    record already says)."""
    if model_loads is None:
        model_loads = (record.read_result() or {}).get("model_loads") or {}
    state = from_state(state)  # a cut-off run's values may be its starting input, not yet reduced to records
    candidates = sorted((state.get("candidates") or {}).values(), key=lambda c: candidate_number(c.id))
    final = (state.get("candidates") or {}).get(state.get("final_candidate") or "")
    traced = [s for s in record.read_steps() if "tool" in s and "args" in s]
    steps = [{k: s.get(k) for k in ("tool", "args", "ok", "seconds")} for s in traced]
    result = {
        "run_id": state["run_id"],
        "status": state.get("status") or "failed",
        "final_image": final.path if final else None,
        "final_candidate": state.get("final_candidate"),
        "final_source": (final.source or "drawn") if final else None,  # "retrieved": a photo, not a drawing
        "prompt": state["prompt"],
        "rounds": state.get("rounds", 0),
        "stop_reason": state.get("stop_reason"),
        "planner": state["planner"],
        "fallback_steps": state.get("fallback_steps", 0),
        "steps": steps,
        "model_loads": model_loads,
        "model_stats": model_stats,
        "seconds": round(float(state.get("seconds") or 0.0), 3),
        "candidates": [c.model_dump() for c in candidates],  # records on disk are the plain dicts they dump
        "references": {rid: ref.model_dump() for rid, ref in (state.get("references") or {}).items()},
        "run_dir": str(record.dir),
        "profile": settings.profile,
        "fast": settings.generation.fast,  # few-step drawing mode of this run's pictures (imgrag.models.fast)
        # negative prompt, guidance, scheduler and drawings per round of this run (imgrag.drawing.draw_options)
        "drawing": options_of(state, settings).to_state(),
        # Forward passes of the IP-Adapter's image encoder, and references read from the embedding cache instead.
        "image_encoder": {"calls": sum(int(s.get("image_encoder_calls") or 0) for s in traced),
                          "cached_embeddings": sum(int(s.get("embeddings_cached") or 0) for s in traced)},
        "start_guidance": state.get("start_guidance"),
    }
    result.update(what_happened(state, candidates, final, record))
    if settings.is_tiny:
        result["note"] = TINY_WARNING
    return result

"""The deterministic policy: ImageRAG's pipeline as a function of the state.

generate → critique → retrieve (one query per missing concept, avoiding the failed candidate) →
regenerate with the references → critique → ... It drives `--planner fixed` on its own, and takes
the next step whenever the LLM fails to produce a usable tool call.
"""

from __future__ import annotations

from typing import Any

# Each guided round that still misses something pushes the references harder.
IP_SCALE_STEP = 0.15
MAX_IP_SCALE = 1.0
MAX_REFERENCES = 4


def latest_candidate(state: dict[str, Any]) -> dict[str, Any] | None:
    candidates = list((state.get("candidates") or {}).values())
    return max(candidates, key=lambda c: (c["round"], int(c["id"][1:]))) if candidates else None


def retrieval_for(state: dict[str, Any], candidate_id: str) -> dict[str, Any] | None:
    """The last retrieval made to repair this candidate."""
    for retrieval in reversed(state.get("retrievals") or []):
        if retrieval.get("for") == candidate_id:
            return retrieval
    return None


def repair_queries(state: dict[str, Any], verdict: dict[str, Any]) -> list[str]:
    """What to retrieve for: the missing concepts, or the prompt itself when the judge's answer was
    unparseable or named nothing (ImageRAG's own fallback)."""
    missing = [m for m in verdict.get("missing") or [] if isinstance(m, str) and m.strip()]
    return missing if verdict.get("parsed") and missing else [state["prompt"]]


def next_step(state: dict[str, Any], base_ip_scale: float) -> tuple[str, dict[str, Any]] | None:
    """The next tool call (name, arguments), or None when the policy has nothing left to do."""
    prompt, seed = state["prompt"], state.get("seed", 0)
    rounds = state.get("rounds", 0)
    latest = latest_candidate(state)
    if latest is None:
        return "generate", {"prompt": prompt, "seed": seed}
    verdict = latest.get("verdict")
    if verdict is None:
        return "critique", {"candidate_id": latest["id"]}
    if verdict.get("match"):
        return "finish", {"candidate_id": latest["id"], "reason": "the judge reports a match"}
    if rounds >= state.get("budget", {}).get("max_rounds", rounds + 1):
        return None
    retrieval = retrieval_for(state, latest["id"])
    if retrieval is None:
        return "retrieve", {"queries": repair_queries(state, verdict), "avoid_candidate_id": latest["id"]}
    # Keep references whose concept the judge no longer misses: they helped.
    references = state.get("references") or {}
    still_missing = set(verdict.get("missing") or [])
    kept = [rid for rid in latest.get("reference_ids") or []
            if rid in references and references[rid].get("query") not in still_missing]
    chosen = list(dict.fromkeys(retrieval["reference_ids"] + kept))[:MAX_REFERENCES]
    next_seed = seed + rounds
    if not chosen:
        return "generate", {"prompt": prompt, "seed": next_seed}
    guided_so_far = sum(1 for c in (state.get("candidates") or {}).values() if c.get("reference_ids"))
    scale = min(MAX_IP_SCALE, base_ip_scale + IP_SCALE_STEP * guided_so_far)
    return "regenerate", {"prompt": prompt, "reference_ids": chosen, "ip_scale": round(scale, 2), "seed": next_seed}

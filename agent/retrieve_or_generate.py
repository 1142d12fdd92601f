"""Retrieve or generate, as the planner sees it (TIGeR, arXiv 2406.05814; the tool is tools/retrieved_tools.py).

The fixed planner takes one step before the first drawing: ``consider_photos``, then a critique of each photo
found, then ``finish`` with a matched one. When none matched it draws as before, the photos set aside
(:func:`drawings_only`), so the ImageRAG pipeline repairs drawings, never a photo. :func:`answer_rank` keeps an
unmatched photo from ever being a run's answer.
"""

from __future__ import annotations

from typing import Any

from imgrag.candidate_ids import candidate_number
from tools.retrieved_tools import SOURCE_RETRIEVED


def is_photo(candidate: dict[str, Any]) -> bool:
    """Whether a candidate is a retrieved photo rather than a drawing."""
    return candidate.get("source") == SOURCE_RETRIEVED


def drawings_only(state: dict[str, Any]) -> dict[str, Any]:
    """What the drawing policy reads: the state with its retrieved photos set aside, and a drawing the safety gate
    blocked as an answer shown as not matched (so the policy draws again rather than finishing with it)."""
    candidates = state.get("candidates") or {}
    if not any(is_photo(c) or c.get("answer_blocked") for c in candidates.values()):
        return state
    shown = {}
    for cid, c in candidates.items():
        if is_photo(c):
            continue
        if c.get("answer_blocked") and c.get("verdict"):
            c = {**c, "verdict": {**c["verdict"], "match": False}}
        shown[cid] = c
    return {**state, "candidates": shown}


def _considered(state: dict[str, Any]) -> bool:
    return (any(is_photo(c) for c in (state.get("candidates") or {}).values())
            or any(f.get("tool") == "consider_photos" for f in state.get("failed_steps") or [])
            or any(getattr(m, "name", None) == "consider_photos" for m in state.get("messages") or []))


def photo_step(state: dict[str, Any], allowed: bool) -> tuple[str, dict[str, Any]] | None:
    """The fixed planner's retrieve-or-generate step, or None to draw (the drawing policy's turn).

    ``allowed`` is ``retrieval.allow_retrieved``. Photos are considered once, before anything is drawn."""
    candidates = state.get("candidates") or {}
    drawn = any(not is_photo(c) for c in candidates.values())
    if allowed and not drawn and not state.get("retrieval_off") and not _considered(state):
        return "consider_photos", {}
    photos = sorted((c for c in candidates.values() if is_photo(c)), key=lambda c: candidate_number(c["id"]))
    for photo in photos:
        if (photo.get("verdict") or {}).get("match"):
            return "finish", {"candidate_id": photo["id"], "reason": "a photo of the collection shows the prompt"}
    if drawn:
        return None
    for photo in photos:
        critiqued = any(f.get("tool") == "critique" and f.get("target") == photo["id"]
                        for f in state.get("failed_steps") or [])
        if photo.get("verdict") is None and not critiqued:
            return "critique", {"candidate_id": photo["id"]}
    return None


def answer_rank(candidate: dict[str, Any]) -> bool:
    """False for a candidate that must not be a run's answer unless nothing else exists: a photo the judge did
    not match (a run answers with a photo only when it shows the prompt), or a drawing the safety gate flagged
    (``answer_blocked``, unless ``safety.allow_flagged``). The first key of the answer's rank."""
    if candidate.get("answer_blocked"):
        return False
    return not is_photo(candidate) or bool((candidate.get("verdict") or {}).get("match"))

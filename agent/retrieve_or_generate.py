"""Retrieve or generate, as the planner sees it (TIGeR, arXiv 2406.05814; the tool is tools/retrieved_tools.py).

The fixed planner takes one step before the first drawing: ``consider_photos``, then a critique of each photo
found, then ``finish`` with a matched one. When none matched it draws as before, the photos set aside
(:func:`drawings_only`), so the ImageRAG pipeline repairs drawings, never a photo. Whether a candidate may be the
answer (never an unmatched photo) is tools/answers.py's rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from imgrag.candidate_ids import candidate_number
from tools.answers import can_answer, can_finish, is_photo


def drawings_only(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """What the drawing policy reads: the state with its retrieved photos set aside, and a drawing that may not be
    the answer (:func:`tools.answers.can_answer`: the safety gate blocked it) shown as not matched, so the policy
    draws again rather than finishing with it."""
    candidates = state.get("candidates") or {}
    if not any(is_photo(c) or not can_answer(c) for c in candidates.values()):
        return state
    shown = {}
    for cid, c in candidates.items():
        if is_photo(c):
            continue
        if not can_answer(c) and c.verdict is not None:
            c = c.replace(verdict=c.verdict.replace(match=False))
        shown[cid] = c
    return {**state, "candidates": shown}


def _considered(state: Mapping[str, Any]) -> bool:
    return (any(is_photo(c) for c in (state.get("candidates") or {}).values())
            or any(f.tool == "consider_photos" for f in state.get("failed_steps") or [])
            or any(getattr(m, "name", None) == "consider_photos" for m in state.get("messages") or []))


def photo_step(state: Mapping[str, Any], allowed: bool) -> tuple[str, dict[str, Any]] | None:
    """The fixed planner's retrieve-or-generate step, or None to draw (the drawing policy's turn).

    ``allowed`` is ``retrieval.allow_retrieved``. Photos are considered once, before anything is drawn."""
    candidates = state.get("candidates") or {}
    drawn = any(not is_photo(c) for c in candidates.values())
    if allowed and not drawn and not state.get("retrieval_off") and not _considered(state):
        return "consider_photos", {}
    photos = sorted((c for c in candidates.values() if is_photo(c)), key=lambda c: candidate_number(c.id))
    for photo in photos:
        if can_finish(photo):
            return "finish", {"candidate_id": photo.id, "reason": "a photo of the collection shows the prompt"}
    if drawn:
        return None
    for photo in photos:
        critiqued = any(f.tool == "critique" and f.target == photo.id for f in state.get("failed_steps") or [])
        if photo.verdict is None and not critiqued:
            return "critique", {"candidate_id": photo.id}
    return None

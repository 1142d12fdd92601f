"""Retrieve or generate (TIGeR, arXiv 2406.05814): a photo from the user's collection as a candidate answer.

When the user allows it (``retrieval.allow_retrieved``, ``--allow-retrieved``), the agent gets one more tool,
``consider_photos``: the store's best matches for the *whole* prompt become candidates of the run, marked
``"source": "retrieved"`` with the photo's own path (nothing is copied or drawn). The judge critiques them like
drawings; a matched photo can be finished with, and is then the run's answer. A photo the judge does not match
never becomes the answer (:func:`tools.answers.answer_refusal`), so a run without a matching photo
goes on drawing as before.

Its CLIP score is the store's cosine similarity of the prompt's text embedding and the photo's image embedding:
the same yardstick as a drawing's ``clip_score``.
"""

from __future__ import annotations

import json
from typing import Any

from langchain_core.tools import BaseTool, tool
from langgraph.prebuilt import ToolRuntime
from langgraph.types import Command

from imgrag.management.engine import ManagedEmbedder
from tools.answers import SOURCE_RETRIEVED
from tools.context import ToolContext
from tools.failures import ToolArgumentError
from tools.records import Candidate, Reference, from_state
from tools.safety_gate import screen_references
from tools.tool_calls import run_tool_call

RETRIEVED_TOOL_NAMES = ("consider_photos",)


def photo_candidate(candidate_id: str, reference: Reference, prompt: str, round_no: int,
                    chosen_by: str = "agent") -> Candidate:
    """A candidate record for a photo of the store: the same keys as a drawn candidate, plus ``source``,
    ``reference_id`` and ``chosen_by``. ``round`` is the number of pictures drawn before it (a photo draws none)."""
    return Candidate(id=candidate_id, path=reference.path, prompt=prompt, seed=None, reference_ids=[], ip_scale=None,
                     round=round_no, clip_score=round(float(reference.score or 0.0), 4), verdict=None,
                     source=SOURCE_RETRIEVED, reference_id=reference.id, chosen_by=chosen_by)


@tool
def consider_photos(*, runtime: ToolRuntime[Any, dict]) -> Command:
    """Look in the user's own collection for photos that may already show everything the prompt asks for.
    Each becomes a candidate (drawn by nobody) to critique; a matched one can be finished with instead of
    drawing. Use it once, before the first drawing."""
    ctx: ToolContext = runtime.context
    state, tool_call_id = from_state(runtime.state), runtime.tool_call_id

    def body(_: int):
        if not ctx.settings.retrieval.allow_retrieved:
            raise ToolArgumentError("a photo as the answer is not allowed in this run (--allow-retrieved); draw "
                                    "instead (generate)")
        if state.get("retrieval_off"):
            raise ToolArgumentError(f"the collection is unavailable in this run ({state['retrieval_off']}); "
                                    "draw instead (generate)")
        if any(c.source == SOURCE_RETRIEVED for c in (state.get("candidates") or {}).values()):
            raise ToolArgumentError("the collection's photos were already considered; draw instead (generate)")
        embedder = ManagedEmbedder(ctx.manager)
        store = ctx.store(embedder)
        found = [] if store.count() == 0 else store.search_text(
            embedder, state["prompt"], k=ctx.settings.retrieval.photo_candidates)
        found = [ref for ref in found if ref.score >= ctx.settings.retrieval.min_score]
        found = screen_references(ctx, store, embedder, found, "consider_photos")
        candidates, references = {}, {}
        for ref in found:
            cid = ctx.allocate_candidate_id({**(state.get("candidates") or {}), **candidates})
            record = Reference.of({**ref.to_dict(), "query": state["prompt"]})
            references[ref.id] = record
            candidates[cid] = photo_candidate(cid, record, state["prompt"], state.get("rounds", 0))
        if not candidates:
            return "No photo in the collection matches the prompt; draw it (generate).", {}
        listing = [{"candidate_id": cid, "photo": c.path, "clip_score": c.clip_score}
                   for cid, c in candidates.items()]
        text = json.dumps(listing) + " Critique them; finish with one the judge matches, or draw."
        return text, {"candidates": candidates, "references": references}, {"photos": listing}

    return run_tool_call(ctx, "consider_photos", {}, tool_call_id, state, body)


def make_retrieved_tools() -> list[BaseTool]:
    """``[consider_photos]``. The graph offers it to the LLM only when a retrieved answer is allowed
    (``retrieval.allow_retrieved``), and it refuses when called without that."""
    return [consider_photos]

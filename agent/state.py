"""The graph's state: ids, paths, numbers and strings only, never pixels, so every step checkpoints.

Keys that tools update carry a reducer, because the LLM may call several tools in one turn and
LangGraph runs them in parallel threads; their updates are merged, not overwritten.
"""

from __future__ import annotations

import operator
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AnyMessage
from langgraph.graph.message import add_messages


def merge_records(left: dict[str, Any] | None, right: dict[str, Any] | None) -> dict[str, Any]:
    """Merge id -> record maps; a record written later replaces the earlier one with the same id."""
    return {**(left or {}), **(right or {})}


def first_finish(left: dict | None, right: dict | None) -> dict | None:
    """Two ``finish`` calls in one turn: the first one stands (the later is not an error). None resets
    (a chat follow-up starts a new request)."""
    if right is None or left is None:
        return right
    return left


class AgentState(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], add_messages]
    prompt: str  # what the user asked for; the judge always checks against this
    seed: int
    run_id: str
    run_dir: str
    planner: str  # "agent" (the LLM chooses) or "fixed" (the deterministic policy alone)
    budget: dict[str, float]  # max_rounds, max_tool_calls, max_seconds for this run
    # negative_prompt, guidance, scheduler, per_round (imgrag.drawing.draw_options.DrawOptions); None: the settings'
    drawing: dict[str, Any] | None
    candidates: Annotated[dict[str, dict], merge_records]  # "c0" -> {path, prompt, seed, verdict, clip_score, ...}
    references: Annotated[dict[str, dict], merge_records]  # store id -> {path, caption, score, query}
    retrievals: Annotated[list[dict], operator.add]  # {for: candidate id, queries, reference_ids}
    rounds: Annotated[int, operator.add]  # pictures drawn
    tool_calls: Annotated[int, operator.add]
    failures: int  # planner steps in a row that produced nothing usable
    fallback_steps: Annotated[int, operator.add]  # steps the fixed policy took for a failing LLM
    seconds: float  # wall time spent, kept across resumes
    finished: Annotated[dict | None, first_finish]  # set by the finish tool: {candidate_id, reason}
    failed_steps: Annotated[list[dict], operator.add]  # {tool, args, error} of every call that failed
    retrieval_off: str | None  # why retrieval cannot work in this run (checked once at its start), or None
    # References round 1 is drawn with (a batch line's own, remembered ones): {reference_ids, concepts, source}.
    start_guidance: dict | None
    status: str | None  # matched | budget_exhausted | failed, once the run ends; interrupted: a request cut off
    stop_reason: str | None
    final_candidate: str | None
    # The terminal chat (agent/chat/) sets these; a plain run leaves them at their defaults.
    approve: bool  # pause before each regenerate so the user reviews its references (interrupt in ``review``)
    continue_from: dict | None  # {candidate_id, rounds, retrievals_from?}: a follow-up repairs the best; see graph

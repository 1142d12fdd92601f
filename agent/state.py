"""The graph's state: ids, paths, numbers, strings and the records of tools/records.py, never pixels, so every step
checkpoints.

Keys that tools update carry a reducer, because the LLM may call several tools in one turn and
LangGraph runs them in parallel threads; their updates are merged, not overwritten. The reducers take records or
plain dicts (a replayed result, a chat follow-up's update) and keep records; :func:`from_state` does the same for a
whole state read back from a thread database written before the records existed.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AnyMessage
from langgraph.graph.message import add_messages

from tools.records import (
    Candidate,
    FailedStep,
    Finished,
    Reference,
    Retrieval,
    candidates_of,
    from_state,
    records_of,
    references_of,
)

__all__ = ["AgentState", "Budget", "ContinueFrom", "StartGuidance", "from_state", "merge_candidates",
           "merge_references"]


def merge_candidates(left: Mapping[str, Any] | None, right: Mapping[str, Any] | None) -> dict[str, Candidate]:
    """Merge id -> candidate maps; a record written later replaces the earlier one with the same id."""
    return {**candidates_of(left), **candidates_of(right)}


def merge_references(left: Mapping[str, Any] | None, right: Mapping[str, Any] | None) -> dict[str, Reference]:
    """Merge id -> reference maps; a record written later replaces the earlier one with the same id."""
    return {**references_of(left), **references_of(right)}


def add_retrievals(left: list[Any] | None, right: list[Any] | None) -> list[Retrieval]:
    """Append retrievals (records or plain dicts) in call order."""
    return records_of(Retrieval, left) + records_of(Retrieval, right)


def add_failed_steps(left: list[Any] | None, right: list[Any] | None) -> list[FailedStep]:
    """Append failed steps (records or plain dicts) in call order."""
    return records_of(FailedStep, left) + records_of(FailedStep, right)


def first_finish(left: Finished | Mapping[str, Any] | None,
                 right: Finished | Mapping[str, Any] | None) -> Finished | None:
    """Two ``finish`` calls in one turn: the first one stands (the later is not an error). None resets
    (a chat follow-up starts a new request)."""
    if right is None or left is None:
        return None if right is None else Finished.of(right)
    return Finished.of(left)


class Budget(TypedDict):
    """A run's limits (tools/budget.py): the rounds (drawings' rounds), tool calls and wall seconds it may spend."""

    max_rounds: float
    max_tool_calls: float
    max_seconds: float


class StartGuidance(TypedDict, total=False):
    """The references round 1 is drawn with (agent/memory_guide.py): their ids, the concepts they fixed before,
    and where they came from ("memory", "user")."""

    reference_ids: list[str]
    concepts: list[str]
    source: str


class ContinueFrom(TypedDict, total=False):
    """A chat follow-up's starting point: the thread's best candidate, the rounds drawn before the follow-up, and,
    when the prompt changed, the first retrieval made for the new prompt (the earlier ones are set aside)."""

    candidate_id: str
    rounds: int
    retrievals_from: int


class AgentState(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], add_messages]
    prompt: str  # what the user asked for; the judge always checks against this
    seed: int
    run_id: str
    run_dir: str
    planner: str  # "agent" (the LLM chooses) or "fixed" (the deterministic policy alone)
    budget: Budget  # max_rounds, max_tool_calls, max_seconds for this run
    # negative_prompt, guidance, scheduler, per_round (imgrag.drawing.draw_options.DrawOptions.to_state()); None: the
    # settings'
    drawing: dict[str, Any] | None
    candidates: Annotated[dict[str, Candidate], merge_candidates]  # "c0" -> the candidate
    references: Annotated[dict[str, Reference], merge_references]  # store id (or mem-/user- id) -> the reference
    retrievals: Annotated[list[Retrieval], add_retrievals]
    rounds: Annotated[int, operator.add]  # pictures drawn
    tool_calls: Annotated[int, operator.add]
    failures: int  # planner steps in a row that produced nothing usable
    fallback_steps: Annotated[int, operator.add]  # steps the fixed policy took for a failing LLM
    seconds: float  # wall time spent, kept across resumes
    finished: Annotated[Finished | None, first_finish]  # set by the finish tool
    failed_steps: Annotated[list[FailedStep], add_failed_steps]  # every call that failed
    retrieval_off: str | None  # why retrieval cannot work in this run (checked once at its start), or None
    start_guidance: StartGuidance | None  # the references round 1 is drawn with (a batch line's own, remembered ones)
    status: str | None  # matched | budget_exhausted | failed, once the run ends; interrupted: a request cut off
    stop_reason: str | None
    final_candidate: str | None
    # The terminal chat (agent/chat/) sets these; a plain run leaves them at their defaults.
    approve: bool  # pause before each regenerate so the user reviews its references (interrupt in ``review``)
    continue_from: ContinueFrom | None  # a follow-up repairs the thread's best; see agent/nodes.py's working_view

"""How one tool call runs: its budget claimed, its body timed and traced, its outcome a ToolMessage and a state
update, and a call that finished before an interruption answered from its trace instead of run again.

Every tool of the agent (tools/image_tools.py, tools/retrieved_tools.py) runs its body through
:func:`run_tool_call`; a body's failure becomes an error the planner can act on (:func:`tools.failures.step_failure`).
"""

from __future__ import annotations

import time
from typing import Any

from langchain_core.messages import ToolMessage
from langgraph.types import Command

from imgrag.candidate_ids import candidate_number
from imgrag.records.runs import is_disk_full
from tools.answers import can_finish
from tools.context import ToolContext
from tools.failures import step_failure
from tools.records import FailedStep, to_plain

# The checkpointer (msgpack) stores integers of 64 bits at most; an LLM writes any number.
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


def checkpoint_safe(value: Any) -> Any:
    """``value`` with every integer the checkpointer cannot store written as text (lists and dicts walked)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and not _INT_MIN <= value <= _INT_MAX:
        return str(value)
    if isinstance(value, dict):
        return {k: checkpoint_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [checkpoint_safe(v) for v in value]
    return value


def run_tool_call(ctx: ToolContext, name: str, args: dict, tool_call_id: str, state: dict, body, *,
         draws: bool = False) -> Command:
    """Run one tool body, time it, trace it, and turn its outcome into a ToolMessage + state update.

    The call first claims its share of the budget (:meth:`ToolContext.claim`); a call past it is refused
    and costs nothing. ``body(round_no)`` gets the round a drawing claimed. Whatever the body raises
    becomes an error message the planner can act on and a failed step in the trace and the state
    (``failed_steps``, which the fixed policy reads so it never repeats a step that failed)."""
    args = checkpoint_safe(args)  # recorded in the trace and the state
    kept = ctx.finished_call(tool_call_id, name, args, state)
    if kept is not None:
        return replay_call(ctx, name, tool_call_id, state, kept, draws)
    finishing = finishing_with(state) if name != "finish" else None
    if finishing:  # a valid finish in the same turn ends the run: the calls beside it would be wasted work
        round_no, refusal = 0, f"this turn also finished the run with {finishing}"
    else:
        round_no, refusal = ctx.claim(state, draws=draws)
    if refusal is not None:
        ctx.record.append_step({"tool": name, "args": args, "ok": False, "seconds": 0.0, "refused": True,
                                "round": state.get("rounds", 0), "message": f"Not run: {refusal}"})
        message = ToolMessage(f"Error: not run: {refusal}.", tool_call_id=tool_call_id, name=name, status="error")
        return Command(update={"messages": [message]})
    ctx.on_event({"event": "tool_start", "tool": name, "args": args, "round": state.get("rounds", 0)})
    start = time.perf_counter()
    step: dict[str, Any] = {}  # more fields for the trace: a body may return them third (the judge's tokens)
    try:
        text, update, *more = body(round_no)
        step.update(more[0] if more else {})
        ok = True
    except Exception as exc:  # what a step catches (tools/failures.py): the run goes on without this step
        if draws and is_disk_full(exc):  # raised again below: the round it claimed is given back first
            ctx.release_round(state)
        failure = step_failure(name, exc)
        text, update, ok = failure.text, {}, False
        step.update(failure.trace)
        if failure.kind == "argument":
            step["kind"] = "argument"
    if not ok:
        if draws:
            ctx.release_round(state)
        # The candidate the call was for: named in its arguments, else the latest drawn (None before any).
        candidates = state.get("candidates") or {}
        target = args.get("candidate_id") or args.get("avoid_candidate_id") or max(
            candidates, key=candidate_number, default=None)
        update = {"failed_steps": [FailedStep(tool=name, target=target, args=args, error=text[:300],
                                              kind=step.get("kind", "error"))]}
    seconds = round(time.perf_counter() - start, 3)
    if ok:  # the step's result, durable before the checkpoint that records it: a resume replays it (below)
        step["replay"] = {"text": text, "update": to_plain(update)}  # read back as dicts: the reducers convert
    ctx.record.append_step({"tool": name, "args": args, "ok": ok, "seconds": seconds, "call_id": tool_call_id,
                            "round": round_no or state.get("rounds", 0), "message": text[:2000], **step})
    ctx.on_event({"event": "tool_end", "tool": name, "ok": ok, "seconds": seconds, "message": text[:300]})
    message = ToolMessage(text, tool_call_id=tool_call_id, name=name, status="success" if ok else "error")
    return Command(update={"messages": [message], "tool_calls": 1, **update})


def replay_call(ctx: ToolContext, name: str, tool_call_id: str, state: dict, kept: dict, draws: bool) -> Command:
    """Answer a call that already finished in an earlier process with the result its trace step kept.

    A run stopped after a tool finished but before LangGraph checkpointed its result (Ctrl-C, a kill, a full
    disk) runs that tool call again on resume; drawing it again would make a second candidate of the same
    round and seed and orphan the first. The call's share of the budget is claimed as the first time."""
    ctx.claim(state, draws=draws)
    ctx.on_event({"event": "tool_start", "tool": name, "args": kept.get("args") or {}, "round": state.get("rounds", 0)})
    text, update = kept["replay"]["text"], kept["replay"]["update"]
    ctx.record.append_step({"event": "replayed", "tool": name, "call_id": tool_call_id,
                            "note": "finished before the interruption; its result is reused, not redone"})
    ctx.on_event({"event": "tool_end", "tool": name, "ok": True, "seconds": 0.0,
                  "message": f"kept from before the interruption: {text[:250]}"})
    message = ToolMessage(text, tool_call_id=tool_call_id, name=name, status="success")
    return Command(update={"messages": [message], "tool_calls": 1, **update})


def finishing_with(state: dict) -> str | None:
    """The candidate a ``finish`` call of the current turn ends the run with, when that call will succeed (the same
    rule as ``finish``: :func:`tools.answers.can_finish`)."""
    messages = state.get("messages") or []
    candidates = state.get("candidates") or {}
    for call in getattr(messages[-1], "tool_calls", None) or [] if messages else []:
        cid = (call.get("args") or {}).get("candidate_id")
        if call.get("name") == "finish" and can_finish(candidates.get(cid)):
            return cid
    return None

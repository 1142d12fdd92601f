"""The agent's nodes (plan, review, finalize), the route after plan, and the stop rules they share.

Each node is a plain function of the state and the run's :class:`agent.context.RunContext` (LangGraph's
``Runtime[RunContext]``), so it can be imported and called alone; agent/graph.py wires them together. ``plan``
chooses the next step: stop (:func:`stop_reason`), a tool call from the LLM (:func:`ask_llm`, shown what
agent/llm_view.py builds), or the fixed policy's step (:func:`policy_message`) when the planner is ``fixed`` or
the LLM failed. ``review`` pauses before a redraw for the chat's ``/approve on``; ``finalize`` writes the answer.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any, Literal

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.tools import BaseTool
from langgraph.runtime import Runtime
from langgraph.types import interrupt

from agent.context import RunContext
from agent.llm_view import check_reply, last_tools_failed, llm_messages
from agent.policy import latest_candidate, next_step
from agent.retrieve_or_generate import drawings_only, photo_step
from agent.state import AgentState
from imgrag.drawing.draw_options import options_of
from imgrag.models.chat_model import QwenChatModel, read_reply
from imgrag.models.concepts import caption_concepts
from imgrag.text import describe_error
from tools.answers import best_answer, can_finish, is_matched
from tools.budget import spent
from tools.image_tools import make_tools
from tools.records import Candidate, from_state
from tools.retrieved_tools import RETRIEVED_TOOL_NAMES, make_retrieved_tools
from tools.tool_calls import checkpoint_safe

# Every tool the tool node can run; the LLM is offered those the run allows (:func:`offered_tools`).
EVERY_TOOL: list[BaseTool] = [*make_tools(), *make_retrieved_tools()]


# ----- the stop rules and the answer -----

def best_candidate(state: Mapping[str, Any]) -> Candidate | None:
    """The run's answer (:func:`tools.answers.best_answer`): the candidate named by finish, else a judge match,
    else the best CLIP score, among the candidates that may be the answer (never one the safety gate blocked, never
    an unmatched photo); candidates judged only against an earlier prompt of a chat thread come last."""
    finished = state.get("finished")
    return best_answer((state.get("candidates") or {}).values(), finished.candidate_id if finished else None)


def outcome(state: Mapping[str, Any]) -> dict[str, Any]:
    """The run's status and answer as finalize writes them: matched, budget_exhausted, or failed (nothing drawn)."""
    best = best_candidate(state)
    if best is None:
        status = "failed"
    elif is_matched(best):
        status = "matched"
    else:
        status = "budget_exhausted"
    return {"status": status, "final_candidate": best.id if best else None}


def working_view(state: Mapping[str, Any]) -> dict[str, Any]:
    """The state as the stop rules and the fixed policy read it.

    A chat follow-up continues from the thread's best candidate (``continue_from``), which need not be the last
    one drawn: the candidates drawn after it in earlier requests are set aside here, so the next step repairs
    the best picture. When the follow-up changed the prompt, the retrievals made for the old prompt are set
    aside too (``retrievals_from``), so the repair retrieves for what the judge now misses. Everything stays in
    the state, on disk, and in what the LLM is shown.

    Only the fixed policy reads this view; the stop rules (:func:`stop_reason`) read the state's own counters and
    take from the view only which candidate the run works on (its latest).
    """
    focus = state.get("continue_from") or {}
    candidates = state.get("candidates") or {}
    view = dict(state)
    if focus.get("candidate_id") in candidates:
        low, high = candidates[focus["candidate_id"]].round, focus["rounds"]
        # The best's round-mates (a round of several drawings) are set aside too: the repair starts from the best.
        view["candidates"] = {cid: c for cid, c in candidates.items()
                              if not low < c.round <= high and (c.round != low or cid == focus["candidate_id"])}
    if focus.get("retrievals_from") is not None:
        view["retrievals"] = (state.get("retrievals") or [])[focus["retrievals_from"]:]
    return view


def stop_reason(state: Mapping[str, Any], elapsed: float, latest: Candidate | None) -> str | None:
    """Why the run must stop now, or None to go on. ``latest`` is the candidate the run works on (the latest of
    :func:`working_view`); the budgets are :func:`tools.budget.spent`'s."""
    if state.get("finished"):
        return "finished"
    if can_finish(latest):  # a match that may be the answer (a blocked drawing is no match)
        return "matched"
    return spent(state, elapsed, latest)


# ----- plan -----

def offered_tools(ctx: RunContext) -> list[BaseTool]:
    """The tools the LLM is offered in this run: consider_photos only when the run's settings allow a retrieved
    answer (``retrieval.allow_retrieved``); the tool node knows them all, and that tool refuses when not allowed."""
    allowed = ctx.settings.retrieval.allow_retrieved
    return [t for t in EVERY_TOOL if allowed or t.name not in RETRIEVED_TOOL_NAMES]

def plan(state: AgentState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    """Choose the next step: stop, an LLM tool call, or the policy's step."""
    state = from_state(state)
    ctx = runtime.context
    elapsed = ctx.clock.elapsed()
    view = working_view(state)
    reason = stop_reason(state, elapsed, latest_candidate(view))
    if reason:
        return {"stop_reason": reason, "seconds": elapsed}
    failures = state.get("failures", 0) + 1 if last_tools_failed(state.get("messages", [])) else 0
    limit = ctx.settings.budget.max_llm_failures
    if state["planner"] == "agent" and failures < limit and ctx.llm_down is None:
        reply, failures = ask_llm(ctx, state, failures, limit)
        if reply is not None:
            return {"messages": [reply], "failures": failures, "seconds": ctx.clock.elapsed()}
    message = policy_message(view, ctx)
    if message is None:
        failed = (state.get("failed_steps") or [])[-1:]
        why = f" ({failed[0].tool} failed: {failed[0].error[:200]})" if failed else ""
        return {"stop_reason": f"the policy has no step left{why}", "seconds": ctx.clock.elapsed()}
    if state["planner"] == "agent":
        why = (f"the LLM failed: {ctx.llm_down}" if ctx.llm_down
               else f"{failures} unusable LLM steps in a row")
        ctx.record.append_step({"planner": "policy", "reason": why,
                                "tool": message.tool_calls[0]["name"], "ok": True, "seconds": 0.0})
    return {"messages": [message], "failures": 0, "seconds": ctx.clock.elapsed(),
            "fallback_steps": 1 if state["planner"] == "agent" else 0}

def ask_llm(ctx: RunContext, state: AgentState, failures: int, limit: int) -> tuple[AIMessage | None, int]:
    """Ask the LLM; an unusable reply goes back to it as an error until ``limit`` failures in a row.

    It sees the status summary and a bounded window of the thread (:func:`context_window`). A call that
    raises (a server down, out of memory) hands this process's remaining steps to the policy, said once."""
    asked = llm_messages(state)
    tools = offered_tools(ctx)  # the same for every attempt of this step
    names = tuple(t.name for t in tools)
    feedback: list[BaseMessage] = []
    while failures < limit and ctx.llm_down is None:
        ctx.on_event({"event": "llm_start", "attempt": failures + 1})
        start = time.perf_counter()
        try:
            reply = invoke_llm(ctx, tools, [*asked, *feedback], state)
        except Exception as exc:  # the planner must go on: the fixed policy takes the remaining steps
            reason = describe_error(exc)
            ctx.llm_down = reason
            ctx.record.append_step({"planner": "llm", "ok": False, "seconds": round(time.perf_counter() - start, 3),
                                    "tool": None, "error": f"the LLM call failed: {reason}"})
            ctx.on_event({"event": "note", "text": f"the agent LLM failed ({reason}); the fixed policy takes "
                                                   "the remaining steps"})
            return None, limit
        problem = check_reply(reply, names)
        seconds = round(time.perf_counter() - start, 3)
        ctx.record.append_step({"planner": "llm", "ok": problem is None, "seconds": seconds,
                                "tool": ",".join(c["name"] for c in reply.tool_calls) or None,
                                "error": problem, "raw": str(reply.response_metadata.get("raw")
                                                             or reply.content)[:500],
                                "tokens": reply.usage_metadata})
        if problem is None:
            # Arguments go into the checkpoint: a seed of 2**70 must not break it (the tool refuses it).
            calls = [{**c, "args": checkpoint_safe(c["args"])} for c in reply.tool_calls]
            return reply.model_copy(update={"tool_calls": calls}), failures
        failures += 1
        feedback += [AIMessage(content=str(reply.content)[:2000]),
                     HumanMessage(f"Error: your reply had {problem}. Answer with exactly one tool call, "
                                  f"<tool_call>{{\"name\": ..., \"arguments\": {{...}}}}</tool_call>, using one "
                                  f"of: {', '.join(names)}.")]
    return None, failures

def invoke_llm(ctx: RunContext, tools: list[Any], messages: list[BaseMessage], state: AgentState) -> AIMessage:
    """One LLM call through the manager: a local model on the device's model thread, stopping at the run's
    deadline; a remote one (an OpenAI-compatible server, registered on the host) in this thread, holding no
    GPU lock."""
    deadline = ctx.clock.deadline(float(state["budget"]["max_seconds"]))

    def call(llm: Any, msgs: list[BaseMessage]) -> AIMessage:
        limits = {"deadline": deadline} if isinstance(llm, QwenChatModel) else {}
        return llm.bind_tools(tools).invoke(msgs, **limits)

    return read_reply(ctx.manager.run(ctx.llm_name, call, messages))


def policy_message(state: dict[str, Any], ctx: RunContext) -> AIMessage | None:
    """The fixed policy's next step as a tool call (a photo that already answers comes first, then the drawing
    policy: :func:`agent.policy.next_step`), or None when it has no step left. A retrieval of missing concepts gets
    the caption step first when ``retrieval.rewrite_queries`` is on (:func:`caption_queries`)."""
    settings = ctx.settings
    per_round = options_of(state, settings).per_round
    step = (photo_step(state, settings.retrieval.allow_retrieved)
            or next_step(drawings_only(state), settings.generation.ip_scale, settings.generation.repair_with,
                         per_round))
    if step is None:
        return None
    name, args = step
    if name == "retrieve" and ctx.settings.retrieval.rewrite_queries and args["queries"] != [state["prompt"]]:
        args = {**args, "queries": caption_queries(state, ctx, args["queries"])}
    call = {"name": name, "args": args, "id": f"policy-{uuid.uuid4().hex[:12]}", "type": "tool_call"}
    return AIMessage(content="", tool_calls=[call], name="policy")


def caption_queries(state: dict[str, Any], ctx: RunContext, missing: list[str]) -> list[str]:
    """ImageRAG's caption step (``retrieval.rewrite_queries``): the LLM writes one descriptive retrieval caption
    per missing concept (imgrag/models/concepts.py); the phrases themselves when it cannot. A remote LLM is called
    outside the GPU lock."""
    try:  # the manager runs a local LLM on the model thread, a remote one here without the GPU lock
        captions = ctx.manager.run(ctx.llm_name, caption_concepts, state["prompt"], missing)
    except Exception as exc:  # the LLM cannot load: retrieve with the phrases, as without the step
        ctx.record.append_step({"event": "captions", "ok": False, "error": describe_error(exc)})
        return missing
    ctx.record.append_step({"event": "captions", "ok": not captions.fallback, "concepts": missing,
                            "captions": captions.captions, "notes": captions.notes})
    return captions.captions or missing


# ----- route, review, finalize -----

def route(state: AgentState) -> Literal["tools", "review", "finalize"]:
    """After plan: run the tool calls it produced (through review when the user approves redraws), or
    finish when it produced none."""
    last = state["messages"][-1] if state.get("messages") else None
    if state.get("stop_reason") or not isinstance(last, AIMessage) or not last.tool_calls:
        return "finalize"
    if state.get("approve") and any(c["name"] == "regenerate" for c in last.tool_calls):
        return "review"
    return "tools"

def review(state: AgentState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    """Human in the loop: pause before each regenerate with ``interrupt()`` and draw with the references the
    user approves. The answer (``Command(resume=...)``) is ``{"reference_ids": [...], "references": {id:
    record}}``: the ids to draw with, plus records for files the user named; no ids left turns the call into
    a plain generate. The node re-runs from the top on resume, so it changes nothing before the last pause."""
    last = state["messages"][-1]
    calls, added, approved = [], {}, []
    for call in last.tool_calls:
        if call["name"] != "regenerate":
            calls.append(call)
            continue
        args = call["args"]
        proposed = list(args.get("reference_ids") or [])
        answer = interrupt({"tool_call_id": call["id"], "prompt": args.get("prompt"),
                            "ip_scale": args.get("ip_scale"), "reference_ids": proposed})
        answer = answer if isinstance(answer, dict) else {}
        added.update(answer.get("references") or {})
        ids = list(answer.get("reference_ids", proposed))
        approved.append({"proposed": proposed, "approved": ids})
        if ids:
            # Weights and modes are aligned with the proposed ids; for other ids each reference's record says.
            kept = {k: v for k, v in args.items() if ids == proposed or k not in ("weights", "modes")}
            if args.get("concepts"):  # a concept keeps only the references the user approved
                kept["concepts"] = [{**c, "reference_ids": [i for i in c.get("reference_ids") or [] if i in ids]}
                                    for c in args["concepts"]]
            calls.append({**call, "args": {**kept, "reference_ids": ids}})
        else:
            plain = {"prompt": args.get("prompt"), "seed": args.get("seed")}
            calls.append({**call, "name": "generate", "args": plain})
    runtime.context.record.append_step({"event": "review", "calls": approved})
    # Same message id: add_messages replaces the planner's message, so the tools run the approved calls.
    return {"messages": [last.model_copy(update={"tool_calls": calls})], "references": added}

def finalize(state: AgentState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    """Pick the answer and the status: matched, budget_exhausted, or failed (nothing drawn)."""
    return {**outcome(from_state(state)), "seconds": runtime.context.clock.elapsed()}

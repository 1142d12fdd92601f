"""The agent's graph, top to bottom:

    START → plan ──(a tool call)──► tools ──► plan ...
              ├──(a regenerate, with approve on)──► review ──► tools
              └──(match, finish or budget)──► finalize → END

``plan`` asks the LLM for the next tool call (or, with ``--planner fixed`` and whenever the LLM
fails repeatedly, the deterministic policy); ``tools`` runs the call(s); ``finalize`` picks the
best candidate. Budgets are counters in the state, checked by ``plan`` before every step.
``review`` exists for the terminal chat's ``/approve on``: it pauses the thread with ``interrupt()``
so the user accepts, drops or replaces a redraw's references; a plain run never goes there.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langgraph.graph import END, START, StateGraph
from langgraph.prebuilt import ToolNode
from langgraph.runtime import Runtime
from langgraph.types import interrupt

import prompts
from agent.policy import latest_candidate, next_step
from agent.retrieve_or_generate import drawings_only, photo_step
from agent.state import AgentState
from imgrag.candidate_ids import candidate_number
from imgrag.drawing.draw_options import options_of
from imgrag.models.chat_model import QwenChatModel, content_text, read_reply
from imgrag.models.concepts import caption_concepts
from imgrag.text import describe_error, shorten
from tools.answers import best_answer, can_finish, is_matched, is_stale
from tools.budget import Clock, spent
from tools.context import ToolContext
from tools.image_tools import TOOL_NAMES, checkpoint_safe, make_tools
from tools.records import Candidate, from_state
from tools.retrieved_tools import RETRIEVED_TOOL_NAMES, make_retrieved_tools


@dataclass
class RunContext(ToolContext):
    """The graph's LangGraph runtime context (``context_schema``): one run's tool context plus what the nodes need
    beyond the state. Passed at invoke time, so one compiled graph serves every run of a process; never checkpointed."""

    clock: Clock = field(default_factory=Clock)  # the run's wall clock across its processes
    llm_down: str | None = None  # why the LLM cannot be asked any more in this process (a failed call)


# ----- helpers the nodes share -----

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


# What the LLM is shown each step: the status summary plus a bounded window of the thread (see context_window).
WINDOW_MESSAGES = 12
MESSAGE_CHARS = 800
SUMMARY_ITEMS = 8  # candidates, references and failures listed in the status summary


def _status_summary(state: Mapping[str, Any]) -> str:
    """The run so far in a few lines, so the LLM does not repeat a failed step blindly.

    Bounded: the latest ``SUMMARY_ITEMS`` candidates (plus the one a follow-up continues from), references
    and failed steps; a long chat thread does not make it grow."""
    budget = state["budget"]
    lines = [f"Rounds used: {state.get('rounds', 0)} of {budget['max_rounds']}; "
             f"tool calls: {state.get('tool_calls', 0)} of {budget['max_tool_calls']}."]
    if state.get("retrieval_off"):
        lines.append(f"Retrieval is unavailable in this run ({state['retrieval_off'][:200]}); draw without references.")
    ordered = sorted((state.get("candidates") or {}).items(), key=lambda kv: candidate_number(kv[0]))
    focus = (state.get("continue_from") or {}).get("candidate_id")
    shown = [kv for n, kv in enumerate(ordered) if n >= len(ordered) - SUMMARY_ITEMS or kv[0] == focus]
    if len(shown) < len(ordered):
        lines.append(f"({len(ordered) - len(shown)} earlier candidates not listed.)")
    for cid, c in shown:
        v = c.verdict
        verdict = "not critiqued" if v is None else ("MATCH" if v.match else f"missing {v.missing}")
        if is_stale(c):
            verdict = "not critiqued against the current prompt"
        refs = f", references {c.reference_ids} at scale {c.ip_scale}" if c.reference_ids else ""
        steered = {rid: f"{w:g}:{(c.reference_modes or {}).get(rid, 'both')}"
                   for rid, w in (c.reference_weights or {}).items()}
        if any(v != "1:both" for v in steered.values()):
            refs += f" (weight:mode {steered})"
        if "memory" in (c.guided_by or []):
            refs += " (remembered references)"
        if c.reference_ids and c.backbone == "omnigen":
            refs = ", OmniGen with " + "; ".join(f"{shorten(m['concept'], 60)}: {m['reference_ids']}"
                                                 for m in c.concepts or [])
        batch = c.batch or {}
        drawn = f" (round {c.round}, drawing {batch['index'] + 1} of {batch['size']})" if batch else ""
        lines.append(f"- {cid}: seed {c.seed}{drawn}{refs}; clip {c.clip_score}; {verdict}")
    if focus in (state.get("candidates") or {}):
        lines.append(f"Best so far: {focus}; continue from it.")
    start = state.get("start_guidance") or {}
    if start.get("reference_ids") and not state.get("candidates"):
        about = f" for {', '.join(start['concepts'])} (concept memory: they fixed it in an earlier run)" \
            if start.get("concepts") else ""
        lines.append(f"Start guided: regenerate with references {start['reference_ids']}{about} "
                     "instead of a plain first drawing.")
    refs = list((state.get("references") or {}).items())
    if refs:  # numbered as the chat's /refs numbers them, so "use the second reference" means the same here
        listed = [(n, rid, r) for n, (rid, r) in enumerate(refs, 1)][-SUMMARY_ITEMS:]
        lines.append("References retrieved: " + "; ".join(
            f"[{n}] {rid} ({shorten(r.caption or r.query or '', 80)})" for n, rid, r in listed))
    failed = (state.get("failed_steps") or [])[-3:]
    if failed:
        lines.append("Recent failed steps (do not repeat them as they were): " + "; ".join(
            f"{f.tool} for {f.target or 'the run'}: {shorten(f.error, 120)}" for f in failed))
    return "\n".join(lines)


def context_window(messages: list[BaseMessage], max_messages: int = WINDOW_MESSAGES,
                   max_chars: int = MESSAGE_CHARS) -> list[BaseMessage]:
    """The part of the thread the LLM sees beside the status summary: the latest ``max_messages`` messages (a few
    more when the cut falls among one turn's results, never a tool result cut from its call), plus the current request
    when it is older; each message's text cut to ``max_chars``. Older steps live in the status summary, so
    the prompt of a long chat thread stops growing."""
    if not messages:
        return []
    start = max(0, len(messages) - max_messages)
    while start > 0 and isinstance(messages[start], ToolMessage):
        start -= 1  # back to the LLM turn that made the call: a result without its call confuses templates and APIs
    window = list(messages[start:])
    requests = [i for i, m in enumerate(messages) if isinstance(m, HumanMessage)]
    if requests and requests[-1] < start:
        window.insert(0, messages[requests[-1]])
    return [m if len(content_text(m.content)) <= max_chars
            else m.model_copy(update={"content": shorten(content_text(m.content), max_chars) + " (cut)"})
            for m in window]


def _tool_failures(messages: list[BaseMessage]) -> bool:
    """Whether the last batch of tool results were all errors (a failed step by the planner)."""
    trailing = []
    for message in reversed(messages):
        if not isinstance(message, ToolMessage):
            break
        trailing.append(message)
    return bool(trailing) and all(m.status == "error" for m in trailing)


def llm_messages(state: Mapping[str, Any]) -> list[BaseMessage]:
    """What the LLM is sent for one step: the system prompt with the status summary, then the bounded window of
    the thread (:func:`context_window`)."""
    system = SystemMessage(prompts.render(
        "agent_system", prompt=state["prompt"], max_rounds=str(state["budget"]["max_rounds"]),
        status=_status_summary(state)))
    return [system, *context_window(state.get("messages") or [])]


def _check_reply(reply: AIMessage, names: tuple[str, ...] = TOOL_NAMES) -> str | None:
    """Why an LLM reply is unusable as a step, or None if it is a valid set of tool calls (of ``names``)."""
    if reply.invalid_tool_calls:
        bad = reply.invalid_tool_calls[0]
        return f"a malformed tool call ({bad.get('error') or bad.get('args')!s:.200})"
    if not reply.tool_calls:
        return "no tool call"
    unknown = [c["name"] for c in reply.tool_calls if c["name"] not in names]
    if unknown:
        return f"unknown tool {unknown[0]!r} (tools: {', '.join(names)})"
    return None


def _policy_message(state: dict[str, Any], ctx: RunContext, chat_model_name: str = "llm") -> AIMessage | None:
    settings = ctx.settings  # a photo that already answers comes first, then the drawing policy
    per_round = options_of(state, settings).per_round
    step = (photo_step(state, settings.retrieval.allow_retrieved)
            or next_step(drawings_only(state), settings.generation.ip_scale, settings.generation.repair_with,
                         per_round))
    if step is None:
        return None
    name, args = step
    if name == "retrieve" and ctx.settings.retrieval.rewrite_queries and args["queries"] != [state["prompt"]]:
        args = {**args, "queries": _caption_queries(state, ctx, args["queries"], chat_model_name)}
    call = {"name": name, "args": args, "id": f"policy-{uuid.uuid4().hex[:12]}", "type": "tool_call"}
    return AIMessage(content="", tool_calls=[call], name="policy")


def _caption_queries(state: dict[str, Any], ctx: RunContext, missing: list[str], chat_model_name: str) -> list[str]:
    """ImageRAG's caption step (``retrieval.rewrite_queries``): the LLM writes one descriptive retrieval caption
    per missing concept (imgrag/models/concepts.py); the phrases themselves when it cannot. A remote LLM is called
    outside the GPU lock."""
    try:  # the manager runs a local LLM on the model thread, a remote one here without the GPU lock
        captions = ctx.manager.run(chat_model_name, caption_concepts, state["prompt"], missing)
    except Exception as exc:  # the LLM cannot load: retrieve with the phrases, as without the step
        ctx.record.append_step({"event": "captions", "ok": False, "error": describe_error(exc)})
        return missing
    ctx.record.append_step({"event": "captions", "ok": not captions.fallback, "concepts": missing,
                            "captions": captions.captions, "notes": captions.notes})
    return captions.captions or missing


# ----- the graph -----

def build_graph(chat_model_name: str = "llm") -> StateGraph:
    """The agent as a StateGraph over AgentState with a :class:`RunContext` runtime context; compile it once with a
    checkpointer, and give each run its context at invoke time (``graph.stream(..., context=ctx)``)."""
    every_tool = make_tools() + make_retrieved_tools()

    def offered(ctx: RunContext) -> list[Any]:
        """The tools the LLM is offered in this run: consider_photos only when the run's settings allow a retrieved
        answer (``retrieval.allow_retrieved``); the tool node knows them all, and that tool refuses when not allowed."""
        allowed = ctx.settings.retrieval.allow_retrieved
        return [t for t in every_tool if allowed or t.name not in RETRIEVED_TOOL_NAMES]

    def plan(state: AgentState, runtime: Runtime[RunContext]) -> dict[str, Any]:
        """Choose the next step: stop, an LLM tool call, or the policy's step."""
        state = from_state(state)
        ctx = runtime.context
        elapsed = ctx.clock.elapsed()
        view = working_view(state)
        reason = stop_reason(state, elapsed, latest_candidate(view))
        if reason:
            return {"stop_reason": reason, "seconds": elapsed}
        failures = state.get("failures", 0) + 1 if _tool_failures(state.get("messages", [])) else 0
        limit = ctx.settings.budget.max_llm_failures
        if state["planner"] == "agent" and failures < limit and ctx.llm_down is None:
            reply, failures = _ask_llm(ctx, state, failures, limit)
            if reply is not None:
                return {"messages": [reply], "failures": failures, "seconds": ctx.clock.elapsed()}
        message = _policy_message(view, ctx, chat_model_name)
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

    def _ask_llm(ctx: RunContext, state: AgentState, failures: int, limit: int) -> tuple[AIMessage | None, int]:
        """Ask the LLM; an unusable reply goes back to it as an error until ``limit`` failures in a row.

        It sees the status summary and a bounded window of the thread (:func:`context_window`). A call that
        raises (a server down, out of memory) hands this process's remaining steps to the policy, said once."""
        asked = llm_messages(state)
        tools = offered(ctx)  # the same for every attempt of this step
        names = tuple(t.name for t in tools)
        feedback: list[BaseMessage] = []
        while failures < limit and ctx.llm_down is None:
            ctx.on_event({"event": "llm_start", "attempt": failures + 1})
            start = time.perf_counter()
            try:
                reply = _invoke_llm(ctx, tools, [*asked, *feedback], state)
            except Exception as exc:  # the planner must go on: the fixed policy takes the remaining steps
                reason = describe_error(exc)
                ctx.llm_down = reason
                ctx.record.append_step({"planner": "llm", "ok": False, "seconds": round(time.perf_counter() - start, 3),
                                        "tool": None, "error": f"the LLM call failed: {reason}"})
                ctx.on_event({"event": "note", "text": f"the agent LLM failed ({reason}); the fixed policy takes "
                                                       "the remaining steps"})
                return None, limit
            problem = _check_reply(reply, names)
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

    def _invoke_llm(ctx: RunContext, tools: list[Any], messages: list[BaseMessage], state: AgentState) -> AIMessage:
        """One LLM call through the manager: a local model on the device's model thread, stopping at the run's
        deadline; a remote one (an OpenAI-compatible server, registered on the host) in this thread, holding no
        GPU lock."""
        deadline = ctx.clock.deadline(float(state["budget"]["max_seconds"]))

        def call(llm: Any, msgs: list[BaseMessage]) -> AIMessage:
            limits = {"deadline": deadline} if isinstance(llm, QwenChatModel) else {}
            return llm.bind_tools(tools).invoke(msgs, **limits)

        return read_reply(ctx.manager.run(chat_model_name, call, messages))

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

    graph = StateGraph(AgentState, context_schema=RunContext)
    graph.add_node("plan", plan)
    graph.add_node("review", review)
    graph.add_node("tools", ToolNode(every_tool))
    graph.add_node("finalize", finalize)
    graph.add_edge(START, "plan")
    graph.add_conditional_edges("plan", route)
    graph.add_edge("review", "tools")
    graph.add_edge("tools", "plan")
    graph.add_edge("finalize", END)
    return graph


def initial_state(prompt: str, *, seed: int, run_id: str, run_dir: str, planner: str,
                  budget: dict[str, float], approve: bool = False, retrieval_off: str | None = None,
                  references: dict[str, dict] | None = None, start_guidance: dict | None = None,
                  drawing: dict[str, Any] | None = None) -> dict[str, Any]:
    """A new run's state; ``retrieval_off`` says why retrieval cannot work in it (checked when the run starts);
    ``references`` and ``start_guidance`` are what round 1 is guided by (agent/memory_guide.py), if anything;
    ``drawing`` its drawing options (:class:`imgrag.drawing.draw_options.DrawOptions`, as a dict; None: the
    settings')."""
    return {"messages": [HumanMessage(prompt)], "prompt": prompt, "seed": seed, "run_id": run_id, "drawing": drawing,
            "run_dir": run_dir, "planner": planner, "budget": budget, "candidates": {},
            "references": dict(references or {}), "start_guidance": start_guidance,
            "retrievals": [], "rounds": 0, "tool_calls": 0, "failures": 0, "fallback_steps": 0, "seconds": 0.0,
            "finished": None, "status": None, "stop_reason": None, "final_candidate": None,
            "approve": approve, "continue_from": None, "failed_steps": [], "retrieval_off": retrieval_off}



"""What the planner LLM is shown at each step, and how its reply is checked.

The LLM sees a system prompt holding a status summary of the run (:func:`status_summary`: budgets, candidates and
their verdicts, references, recent failures; bounded however long the thread) and a bounded window of the thread
(:func:`context_window`), so the prompt of a long chat thread stops growing. Its reply must be tool calls of the
tools offered (:func:`check_reply`); anything else goes back to it as an error (``agent.nodes.ask_llm``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage

import prompts
from imgrag.candidate_ids import candidate_number
from imgrag.models.chat_model import content_text
from imgrag.text import shorten
from tools.answers import is_stale
from tools.image_tools import TOOL_NAMES

# What the LLM is shown each step: the status summary plus a bounded window of the thread (see context_window).
WINDOW_MESSAGES = 12
MESSAGE_CHARS = 800
SUMMARY_ITEMS = 8  # candidates, references and failures listed in the status summary


def status_summary(state: Mapping[str, Any]) -> str:
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


def last_tools_failed(messages: list[BaseMessage]) -> bool:
    """Whether the thread ends with a batch of tool results that were all errors (a failed step by the planner)."""
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
        status=status_summary(state)))
    return [system, *context_window(state.get("messages") or [])]


def check_reply(reply: AIMessage, names: tuple[str, ...] = TOOL_NAMES) -> str | None:
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

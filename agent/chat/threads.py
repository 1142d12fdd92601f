"""The chat's threads in the checkpointer: which there are, and what each asked, read through the checkpointer's
and the graph's API (``checkpointer.list``, ``graph.get_state``), never its tables."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from langchain_core.messages import HumanMessage
from langgraph.checkpoint.base import BaseCheckpointSaver

from agent.thread_store import UntrustedThread, thread_ids

THREAD_PREFIX = "chat-"


def list_threads(graph: Any, checkpointer: BaseCheckpointSaver, limit: int = 20,
                 prefix: str = THREAD_PREFIX) -> list[dict[str, Any]]:
    """The threads whose id starts with ``prefix``, most recently active first, at most ``limit``: id, date, first
    request, number of requests, status. ``graph`` is the compiled graph over ``checkpointer``. A thread the
    checkpointer refuses to read (it holds data imgrag does not write, :class:`agent.thread_store.UntrustedThread`)
    is listed with status "refused" and nothing of it is read."""
    listed = []
    for tid in thread_ids(checkpointer):
        if not tid.startswith(prefix):
            continue
        try:
            snapshot = graph.get_state({"configurable": {"thread_id": tid}})
        except UntrustedThread:
            listed.append({"id": tid, "date": "", "first": "", "requests": 0,
                           "status": "refused (holds data imgrag does not write)"})
        else:
            requests = requests_of(snapshot.values)
            listed.append({"id": tid, "date": _when(snapshot.created_at), "first": requests[0] if requests else "",
                           "requests": len(requests), "status": snapshot.values.get("status") or "unfinished"})
        if len(listed) >= limit:
            break
    return listed


def requests_of(values: dict[str, Any]) -> list[str]:
    """The user's messages on a thread, in order (the graph keeps its own error notes to the LLM out of the state)."""
    return [str(m.content) for m in values.get("messages") or [] if isinstance(m, HumanMessage)]


def _when(created_at: str | None) -> str:
    if not created_at:
        return ""
    try:
        return datetime.fromisoformat(created_at).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return created_at[:16]

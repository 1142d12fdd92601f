"""The agent's graph, top to bottom:

    START → plan ──(a tool call)──► tools ──► plan ...
              ├──(a regenerate, with approve on)──► review ──► tools
              └──(match, finish or budget)──► finalize → END

``plan`` asks the LLM for the next tool call (or, with ``--planner fixed`` and whenever the LLM
fails repeatedly, the deterministic policy); ``tools`` runs the call(s); ``finalize`` picks the
best candidate. Budgets are counters in the state, checked by ``plan`` before every step.
``review`` exists for the terminal chat's ``/approve on``: it pauses the thread with ``interrupt()``
so the user accepts, drops or replaces a redraw's references; a plain run never goes there.

The nodes live in agent/nodes.py, what the LLM is shown in agent/llm_view.py, the runtime context in
agent/context.py and the tools in tools/.
"""

from __future__ import annotations

from typing import Any

from langchain_core.messages import HumanMessage
from langgraph.graph import END, START, StateGraph
from langgraph.prebuilt import ToolNode

from agent.context import RunContext
from agent.nodes import EVERY_TOOL, finalize, plan, review, route
from agent.state import AgentState


def build_graph() -> StateGraph:
    """The agent as a StateGraph over AgentState with a :class:`agent.context.RunContext` runtime context; compile it
    once with a checkpointer, and give each run its context at invoke time (``graph.stream(..., context=ctx)``)."""
    graph = StateGraph(AgentState, context_schema=RunContext)
    graph.add_node("plan", plan)
    graph.add_node("review", review)
    graph.add_node("tools", ToolNode(EVERY_TOOL))
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



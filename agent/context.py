"""The graph's runtime context: what one run's nodes and tools read beside the state.

LangGraph passes it at invoke time (``graph.stream(..., context=ctx)``, the graph's ``context_schema``) and hands it
to every node as ``runtime.context`` and to every tool through its injected ``ToolRuntime``; it is never
checkpointed, so it may hold models, open handles and callbacks. One compiled graph serves every run of a process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tools.budget import Clock
from tools.context import ToolContext


@dataclass
class RunContext(ToolContext):
    """One run's :class:`tools.context.ToolContext` plus what the planner needs beyond the state."""

    clock: Clock = field(default_factory=Clock)  # the run's wall clock across its processes
    llm_down: str | None = None  # why the LLM cannot be asked any more in this process (a failed call)
    llm_name: str = "llm"  # the model manager's name of the planner LLM (and of the caption step's)

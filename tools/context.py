"""What the tools share during one run: settings, the model manager, the run's files, the store.

The graph state is the source of truth for candidates and references; the context holds only things that cannot
live in a checkpoint (models, open handles, callbacks). It is the graph's LangGraph runtime context (the agent's
``RunContext`` extends it): passed at invoke time (``graph.stream(..., context=ctx)``) and read by the tools
through their injected ``ToolRuntime``, so one compiled graph serves every run of a process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from imgrag.candidate_ids import candidate_number, next_candidate_id
from imgrag.records.runs import RunRecord
from imgrag.settings import Settings
from imgrag.store import ReferenceStore
from tools.budget import Claims

T = TypeVar("T")

# Called with small dicts ({"event": "tool_start", "tool": ...}) so a front end can show progress.
EventSink = Callable[[dict[str, Any]], None]


class Models(Protocol):
    """What the agent asks of :class:`imgrag.management.manager.ModelManager` (tests pass a fake with the same
    methods)."""

    def run(self, name: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``fn(model, *args, **kwargs)`` with the model ``name`` loaded, on its device's model thread."""
        ...

    def load_counts(self) -> dict[str, int]:
        """How many times each model was loaded in this process."""
        ...

    def stats(self) -> dict[str, dict]:
        """Per-model load and call statistics (result.json's ``model_stats``)."""
        ...


@dataclass
class ToolContext:
    """One run's context for the tools (see the module's docstring)."""

    settings: Settings
    manager: Models
    record: RunRecord
    on_event: EventSink = lambda event: None
    # The reference store; opened on first use unless given (tests pass an in-memory one).
    reference_store: Any = None
    # When this process's share of the run's time budget ends (a time.monotonic() instant); None: no limit.
    deadline: float | None = None
    # Whether drawings send "preview" events (a small picture from the latents; imgrag/models/previews.py) to on_event:
    # on for the chat and the web page, off for scripts (--json) and batches.
    previews: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _next_candidate: int = 0
    _claims: Claims = field(default_factory=Claims)
    _finished: dict[str, dict[str, Any]] | None = None
    # What the tools build once per run (the safety gate and its concept vectors): it lives and dies with this
    # context, so nothing of a run (its manager, its models) outlives it in a process-wide cache.
    _built: dict[Any, Any] = field(default_factory=dict)

    def once(self, key: Any, build: Callable[[], T]) -> T:
        """``build()``'s value for ``key``, built on this run's first call and kept for the rest of the run."""
        with self._lock:
            if key not in self._built:
                self._built[key] = build()
            return self._built[key]

    def finished_call(self, call_id: str, name: str, args: dict[str, Any],
                      state: dict[str, Any]) -> dict[str, Any] | None:
        """The trace step of a call that already finished in an earlier process and whose result the checkpoint
        never got (the process stopped in between), or None.

        Matched by the call's id, tool and arguments; a call the state already answered is a new call that
        reuses an id (scripted or careless LLMs), never a replay. The trace is read once per context."""
        if not call_id:
            return None
        if any(getattr(m, "tool_call_id", None) == call_id for m in state.get("messages") or []):
            return None
        with self._lock:
            if self._finished is None:
                self._finished = {s["call_id"]: s for s in self.record.read_steps()
                                  if s.get("call_id") and s.get("ok") and isinstance(s.get("replay"), dict)}
        kept = self._finished.get(call_id)
        if kept is None or kept.get("tool") != name or kept.get("args") != args:
            return None
        return kept

    def claim(self, state: dict[str, Any], *, draws: bool) -> tuple[int, str | None]:
        """Claim one tool call (and one round when the call ``draws``) for a call of the current turn
        (:meth:`tools.budget.Claims.claim`). Returns ``(round number of the drawing or 0, None)``, or
        ``(0, why)`` when the budget is spent."""
        return self._claims.claim(state, draws=draws, defaults=self.settings.budget, deadline=self.deadline)

    def release_round(self, state: dict[str, Any]) -> None:
        """Give back the round a drawing claimed but did not draw (it failed), so another call may use it."""
        self._claims.release_round(state)

    def allocate_candidate_id(self, existing: dict[str, Any]) -> str:
        """A fresh candidate id; safe when the LLM asks for two pictures in one turn (threads)."""
        with self._lock:
            cid = next_candidate_id(existing, lambda c: self.record.candidate_path(c).exists(), self._next_candidate)
            self._next_candidate = candidate_number(cid) + 1
            return cid

    def store(self, embedder: Any) -> Any:
        """The reference store for this embedder, opened once per run."""
        with self._lock:
            if self.reference_store is None:
                self.reference_store = ReferenceStore.open(self.settings, embedder.model_id, embedder.dim)
            return self.reference_store

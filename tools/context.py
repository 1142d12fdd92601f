"""What the tools share during one run: settings, the model manager, the run's files, the store.

The graph state is the source of truth for candidates and references; the context holds only
things that cannot live in a checkpoint (models, open handles, callbacks).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from imgrag.runs import RunRecord
from imgrag.settings import Settings

# Called with small dicts ({"event": "tool_start", "tool": ...}) so a front end can show progress.
EventSink = Callable[[dict[str, Any]], None]


@dataclass
class ToolContext:
    settings: Settings
    manager: Any  # imgrag.manager.ModelManager; typed loosely so tests can pass a fake
    record: RunRecord
    on_event: EventSink = lambda event: None
    # The reference store; opened on first use unless given (tests pass an in-memory one).
    reference_store: Any = None
    # When this process's share of the run's time budget ends (a time.monotonic() instant); None: no limit.
    deadline: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _next_candidate: int = 0
    # Budget claimed by the calls of each LLM turn so far, keyed by the turn's message id: {"calls", "rounds"}.
    _claims: dict[str, dict[str, int]] = field(default_factory=dict)

    def claim(self, state: dict[str, Any], *, draws: bool) -> tuple[int, str | None]:
        """Claim one tool call (and one round when the call ``draws``) for a call of the current turn.

        The calls of one LLM turn run in parallel threads against the same state, so the state's counters
        alone cannot stop a turn of thirty calls: each call claims its share here, under the lock, as it is
        taken. Returns ``(round number of the drawing or 0, None)``, or ``(0, why)`` when the budget is spent."""
        budget = state.get("budget") or {}
        with self._lock:
            claimed = self._claims.setdefault(_turn(state), {"calls": 0, "rounds": 0})
            calls = state.get("tool_calls", 0) + claimed["calls"]
            limit_calls = int(budget.get("max_tool_calls", self.settings.budget.max_tool_calls))
            if calls >= limit_calls:
                return 0, f"the tool-call budget is spent ({limit_calls} calls); call finish with the best candidate"
            if self.deadline is not None and time.monotonic() >= self.deadline:
                return 0, "the time budget is spent; call finish with the best candidate"
            round_no = 0
            if draws:
                rounds = state.get("rounds", 0) + claimed["rounds"]
                limit_rounds = int(budget.get("max_rounds", self.settings.budget.max_rounds))
                if rounds >= limit_rounds:
                    return 0, (f"the drawing budget is spent ({limit_rounds} rounds, counting the drawings of this "
                               "turn); critique what was drawn, or call finish with the best candidate")
                claimed["rounds"] += 1
                round_no = rounds + 1
            claimed["calls"] += 1
            return round_no, None

    def release_round(self, state: dict[str, Any]) -> None:
        """Give back the round a drawing claimed but did not draw (it failed), so another call may use it."""
        with self._lock:
            claimed = self._claims.get(_turn(state))
            if claimed and claimed["rounds"] > 0:
                claimed["rounds"] -= 1

    def allocate_candidate_id(self, existing: dict[str, Any]) -> str:
        """A fresh candidate id; safe when the LLM asks for two pictures in one turn (threads)."""
        with self._lock:
            taken = {int(cid[1:]) for cid in existing if cid[1:].isdigit()}
            n = max([self._next_candidate - 1, *taken], default=-1) + 1
            # A picture on disk that the state no longer lists (a chat /undo, a crash before the checkpoint)
            # keeps its file: the new candidate takes the next free name instead of overwriting it.
            while self.record.candidate_path(f"c{n}").exists():
                n += 1
            self._next_candidate = n + 1
            return f"c{n}"

    def store(self, embedder: Any) -> Any:
        """The reference store for this embedder, opened once per run."""
        with self._lock:
            if self.reference_store is None:
                from imgrag.store import ReferenceStore

                self.reference_store = ReferenceStore.open(self.settings, embedder.model_id, embedder.dim)
            return self.reference_store


def _turn(state: dict[str, Any]) -> str:
    """The key of the LLM turn whose calls run now: the id of the message that holds them."""
    messages = state.get("messages") or []
    return str(getattr(messages[-1], "id", None) or len(messages)) if messages else "-"

"""What the tools share during one run: settings, the model manager, the run's files, the store.

The graph state is the source of truth for candidates and references; the context holds only
things that cannot live in a checkpoint (models, open handles, callbacks).
"""

from __future__ import annotations

import threading
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
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _next_candidate: int = 0

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

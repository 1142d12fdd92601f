"""How a run stops short, as exceptions the front-ends catch: Ctrl-C, a full disk, a thread database that cannot be
written. Each carries the partial result the run's record was closed with, so a front-end can say what was kept and
how to go on (``--resume``).
"""

from __future__ import annotations

from typing import Any

from imgrag.errors import UserError


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run or batch, after the run's record was closed: ``result`` is the partial result.json
    (status ``interrupted``) and ``batch_dir`` is set for a batch. A KeyboardInterrupt still, so callers that
    stop on Ctrl-C (the chat) keep doing so."""

    def __init__(self, result: dict[str, Any], batch_dir: str | None = None) -> None:
        super().__init__(f"run {result['run_id']} interrupted")
        self.result = result
        self.batch_dir = batch_dir


class DiskFull(UserError):
    """A write failed for want of space mid-run: the record was closed at the last checkpoint with what it has
    (``result``, status ``interrupted``) and the thread left as it was, so ``--resume`` goes on once space is freed.
    The message is one line: the path, the space left there, and what was kept."""

    def __init__(self, message: str, result: dict[str, Any] | None, batch_dir: str | None = None) -> None:
        super().__init__(message)
        self.result = result
        self.batch_dir = batch_dir


class CheckpointFailed(UserError):
    """A run's checkpoint could not be written (agent/thread_store.py's CheckpointWriteError): its record was closed
    from the state in memory (``result``, status ``interrupted``, result.json written) and the thread left at its
    last checkpoint. The message is one line: the database's reason, what was kept and how to go on."""

    def __init__(self, message: str, result: dict[str, Any], batch_dir: str | None = None) -> None:
        super().__init__(message)
        self.result = result
        self.batch_dir = batch_dir

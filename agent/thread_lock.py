"""One writer per chat thread across processes: ``imgrag chat`` and ``imgrag serve`` share the thread store.

A request on a thread holds a file lock beside the checkpoint database (``<threads_db>.locks/<thread>.lock``)
for as long as it runs. A second process that wants to write the same thread gets a one-line UserError instead
of interleaving checkpoints; and a thread that looks unfinished is left alone while another process holds its
lock (its request is running there, not cut off). flock locks are per open file, so two sessions of one process
exclude each other too.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock, Timeout

from imgrag.errors import UserError

T = TypeVar("T")
BUSY = ("thread {thread} is busy: another imgrag chat or serve is running a request on it; wait for that "
        "request to end, or start a new thread")


def lock_path(threads_db: str | Path, thread_id: str) -> Path:
    """The lock file of one thread (thread ids are checked against RUN_ID_PATTERN: safe as file names)."""
    db = Path(threads_db)
    return db.parent / f"{db.name}.locks" / f"{thread_id}.lock"


@contextlib.contextmanager
def thread_writer(threads_db: str | Path, thread_id: str | None) -> Iterator[None]:
    """Hold the thread's writer lock for the block; a UserError at once if another process holds it.

    ``thread_id`` None (a thread not named yet) locks nothing: nobody else can know its id."""
    if not thread_id:
        yield
        return

    path = lock_path(threads_db, thread_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    # thread_local=False: the chat runs a request's graph in the caller's thread but a web page may settle it
    # from a worker thread; the lock belongs to this object, not to a thread.
    lock = FileLock(str(path), timeout=0, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(BUSY.format(thread=thread_id)) from None
    try:
        yield
    finally:
        lock.release()


def busy_elsewhere(threads_db: str | Path, thread_id: str | None) -> bool:
    """Whether another writer holds the thread now (its request is running, not cut off)."""
    try:
        with thread_writer(threads_db, thread_id):
            return False
    except UserError:
        return True


def writes_thread(method: Callable[..., T]) -> Callable[..., T]:
    """Decorate a ChatSession method that writes its thread: it runs holding the thread's writer lock.

    Nested calls (send -> settle) take the lock once; ``_writing`` tells :meth:`ChatSession.settle_cut_off`
    that the lock it would find taken is its own."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> T:
        if getattr(self, "_writing", False):
            return method(self, *args, **kwargs)
        with thread_writer(self.settings.threads_db, self.thread_id):
            self._writing = True
            try:
                return method(self, *args, **kwargs)
            finally:
                self._writing = False

    return wrapper

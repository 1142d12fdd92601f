"""The thread database (``threads.sqlite``): LangGraph's SQLite checkpointer, read strictly and written patiently.

- **Read strictly.** A checkpoint is a msgpack record whose extension records name a Python type to rebuild;
  LangGraph's default serializer imports and calls whatever type a record names (GHSA-g48c-2wqr-h844), so a
  tampered database could run code when a thread is resumed or listed. :class:`StrictSerializer` rebuilds only
  :data:`CHECKPOINT_TYPES` (the message and LangGraph types imgrag's state holds; LangGraph's own short list of
  plain value types, ``SAFE_MSGPACK_TYPES``, is always accepted by its strict mode too) and reads no other record
  kind (no pickle, no JSON constructors). A record naming anything else refuses the whole thread:
  :class:`UntrustedThread`, one line naming the thread, raised before any of it is used, so nothing in it runs.
- **Written patiently.** Another process (a chat, a page, a batch) may hold the write lock for a moment: every
  connection waits up to ``threads_busy_timeout`` seconds (30 by default; sqlite3's own default is 5) and uses
  the WAL journal, so readers never wait for the writer.
- **A failed write is one line.** A write that fails anyway (the lock held past the timeout, an I/O error) is a
  :class:`CheckpointWriteError` naming the thread and the database; the runner then closes the run's record from
  the state it holds in memory (agent/runner.py).
"""

from __future__ import annotations

import difflib
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from langgraph.checkpoint.base import BaseCheckpointSaver, CheckpointTuple
from langgraph.checkpoint.serde.event_hooks import register_serde_event_listener
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.checkpoint.sqlite import SqliteSaver

from imgrag.errors import UserError
from imgrag.file_names import from_stored, is_text_name
from imgrag.records.runs import is_disk_full
from tools.records import RECORD_TYPES, Record, from_state

DEFAULT_BUSY_TIMEOUT_S = 30.0

# The types imgrag's graph state puts in a checkpoint (agent/state.py): its messages, its records (tools/records.py),
# and LangGraph's own records of a pause or a routing step. Everything else in the state is a plain dict, list,
# string or number.
CHECKPOINT_TYPES: tuple[tuple[str, str], ...] = (
    *((kind.__module__, kind.__name__) for kind in RECORD_TYPES),
    ("langchain_core.messages.human", "HumanMessage"),
    ("langchain_core.messages.ai", "AIMessage"),
    ("langchain_core.messages.tool", "ToolMessage"),
    ("langchain_core.messages.system", "SystemMessage"),
    ("langchain_core.messages.modifier", "RemoveMessage"),
    ("langgraph.types", "Interrupt"),
    ("langgraph.types", "Command"),
    ("langgraph.types", "Send"),
)
# Record kinds the serializer writes (JsonPlusSerializer.dumps_typed); "json" (constructor envelopes of old LangGraph
# versions) and "pickle" are never written by imgrag, so a thread holding one was not written by it.
READABLE_KINDS = ("null", "msgpack", "bytes", "bytearray")
_REFUSED_EVENTS = ("msgpack_blocked", "msgpack_method_blocked")


class UntrustedThread(UserError):
    """A thread whose checkpoint holds a record imgrag did not write: refused whole, nothing of it is used."""

    def __init__(self, thread_id: str, database: str | Path, what: str) -> None:
        super().__init__(f"thread {thread_id!r} in {database} holds data imgrag does not write ({what}); it is "
                         "refused and nothing of it was run: delete the thread, or restore the database from a copy")
        self.thread_id = thread_id
        self.what = what


class CheckpointWriteError(UserError):
    """A checkpoint of ``thread_id`` could not be written (the database locked past the busy timeout, an I/O
    error): one line naming the thread, the database and SQLite's reason."""

    def __init__(self, thread_id: str, database: str | Path, reason: str, timeout_s: float) -> None:
        locked = "locked" in reason.lower() or "busy" in reason.lower()
        why = (f"{reason}: another process held it longer than the {timeout_s:g} s busy timeout "
               "(threads_busy_timeout)" if locked else reason)
        super().__init__(f"cannot write the checkpoint of thread {thread_id!r} to {database}: {why}")
        self.thread_id = thread_id
        self.reason = why


class _Refused:
    """What a refused record reads as inside the checkpointer (never handed on: the thread is refused first)."""

    def __init__(self, what: str) -> None:
        self.what = what


class RefusedRecord(Exception):
    """A record the strict serializer will not rebuild (raised outside :class:`ThreadStore`)."""


_local = threading.local()


def _on_serde_event(event: dict[str, Any]) -> None:
    """LangGraph's strict mode says which types it blocked (and returns their raw data instead): collected here, per
    thread, for the record being read."""
    seen = getattr(_local, "refused", None)
    if seen is not None and event.get("kind") in _REFUSED_EVENTS:
        seen.append(".".join(str(p) for p in (event.get("module"), event.get("name"), event.get("method")) if p))


register_serde_event_listener(_on_serde_event)  # type: ignore[arg-type]

# msgpack strings are UTF-8, and ormsgpack writes a lone surrogate as "?": a path that is not UTF-8
# (imgrag.file_names) would come back as another, missing file. Such a string is written as its bytes instead.
_FILE_NAME_TAG = "__imgrag_file_name_bytes__"


def _keep_file_names(value: Any) -> Any:
    """``value`` with every string that is not valid UTF-8 (inside plain dicts, lists, tuples and records) replaced
    by ``{_FILE_NAME_TAG: hex of its file-system bytes}``; the same object when there is none.

    A record holding such a string is written as its plain dict (a record's fields cannot hold the tag); it reads
    back as a dict, which :func:`agent.state.from_state` turns into the record again."""
    if isinstance(value, Record):
        plain = value.model_dump()
        kept = _keep_file_names(plain)
        return value if kept is plain else kept
    if isinstance(value, str):
        return value if is_text_name(value) else {_FILE_NAME_TAG: os.fsencode(value).hex()}
    if isinstance(value, dict):
        kept = {key: _keep_file_names(item) for key, item in value.items()}
        return value if all(kept[key] is value[key] for key in value) else kept
    if isinstance(value, list | tuple):
        items = [_keep_file_names(item) for item in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else type(value)(items)
    return value


def _restore_file_names(value: Any) -> Any:
    """The inverse of :func:`_keep_file_names`."""
    if isinstance(value, dict):
        if len(value) == 1 and isinstance(value.get(_FILE_NAME_TAG), str):
            return from_stored(None, value[_FILE_NAME_TAG])
        return {key: _restore_file_names(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_restore_file_names(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_restore_file_names(item) for item in value)
    return value


class StrictSerializer(JsonPlusSerializer):
    """LangGraph's serializer in strict msgpack mode, allowing only :data:`CHECKPOINT_TYPES`; a record naming any
    other type, or of a kind imgrag never writes, is refused (:class:`RefusedRecord`) rather than read half-way."""

    def __init__(self) -> None:
        super().__init__(allowed_msgpack_modules=CHECKPOINT_TYPES, pickle_fallback=False)

    def dumps_typed(self, obj: Any) -> tuple[str, bytes]:
        return super().dumps_typed(_keep_file_names(obj))

    def loads_typed(self, data: tuple[str, bytes]) -> Any:
        value, what = self.read(data)
        if what is None:
            return _restore_file_names(value)
        if getattr(_local, "lenient", False):
            return _Refused(what)
        raise RefusedRecord(what)

    def read(self, data: tuple[str, bytes]) -> tuple[Any, str | None]:
        """``(value, None)`` for a record it may rebuild, ``(None, why)`` for one it refuses."""
        kind = data[0]
        if kind not in READABLE_KINDS:
            return None, f"a {kind!r} record"
        outer, _local.refused = getattr(_local, "refused", None), []
        try:
            value = super().loads_typed(data)
        except Exception as exc:  # a blob that is not msgpack at all
            return None, f"an unreadable record ({type(exc).__name__})"
        finally:
            blocked, _local.refused = _local.refused, outer
        if blocked:
            return None, "the type(s) " + ", ".join(sorted(set(blocked)))
        return value, None


def _refused_in(item: CheckpointTuple | None) -> str | None:
    if item is None:
        return None
    values = [item.checkpoint, *(write[2] for write in item.pending_writes or [])]
    found = [v.what for v in values if isinstance(v, _Refused)]
    return "; ".join(sorted(set(found))) or None


class ThreadStore(SqliteSaver):
    """The SQLite checkpointer with :class:`StrictSerializer`: reading a thread that holds a refused record raises
    :class:`UntrustedThread`; a failed write raises :class:`CheckpointWriteError` (a full disk keeps SQLite's own
    error, which the runner's full-disk handling reads)."""

    def __init__(self, conn: sqlite3.Connection, database: str | Path, busy_timeout_s: float) -> None:
        super().__init__(conn, serde=StrictSerializer())
        self.database = str(database)
        self.busy_timeout_s = busy_timeout_s

    def _read(self, produce: Any, thread_of: Any) -> Any:
        before, _local.lenient = getattr(_local, "lenient", False), True
        try:
            item = produce()
        finally:
            _local.lenient = before
        what = _refused_in(item)
        if what is not None:
            raise UntrustedThread(thread_of(item), self.database, what)
        if item is not None:  # a thread written when the state held plain dicts reads back with records
            item.checkpoint["channel_values"] = from_state(item.checkpoint.get("channel_values") or {})
        return item

    def get_tuple(self, config: dict[str, Any]) -> CheckpointTuple | None:
        thread = str(config["configurable"].get("thread_id"))
        return self._read(lambda: super(ThreadStore, self).get_tuple(config), lambda item: thread)

    def list(self, config: dict[str, Any] | None, **kwargs: Any) -> Iterator[CheckpointTuple]:
        items = super().list(config, **kwargs)
        while True:
            try:
                item = self._read(lambda: next(items), lambda item: item.config["configurable"]["thread_id"])
            except StopIteration:
                return
            yield item

    def put(self, config: dict[str, Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return super().put(config, *args, **kwargs)
        except sqlite3.Error as exc:
            raise self._write_error(config, exc) from exc

    def put_writes(self, config: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        try:
            return super().put_writes(config, *args, **kwargs)
        except sqlite3.Error as exc:
            raise self._write_error(config, exc) from exc

    def _write_error(self, config: dict[str, Any], exc: sqlite3.Error) -> BaseException:
        if is_disk_full(exc):
            return exc  # the full-disk path names the space left and keeps the thread for --resume
        return CheckpointWriteError(str(config["configurable"].get("thread_id")), self.database, str(exc),
                                    self.busy_timeout_s)

    def thread_ids(self) -> list[str]:
        """Every thread id of the database, most recently active first, read from the checkpoints' keys alone (no
        checkpoint is deserialised, so one refused thread does not hide the others)."""
        with self.cursor(transaction=False) as cur:
            cur.execute("SELECT thread_id FROM checkpoints WHERE checkpoint_ns = '' GROUP BY thread_id "
                        "ORDER BY MAX(checkpoint_id) DESC")
            return [str(row[0]) for row in cur.fetchall()]


def open_checkpointer(path: str | Path, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> ThreadStore:
    """The checkpointer shared by runs, batches and chat threads, over the SQLite file ``path`` (created with its
    folder): strict reads, a ``busy_timeout_s`` wait for another writer, the WAL journal.

    Raises UserError when the file cannot be opened as a database."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(str(path), check_same_thread=False, timeout=busy_timeout_s)
        conn.execute("PRAGMA journal_mode=WAL")  # SqliteSaver.setup sets it too; said here, where it is decided
    except sqlite3.Error as exc:
        raise UserError(f"{path}: cannot open the thread database: {exc}") from None
    return ThreadStore(conn, path, busy_timeout_s)


def thread_ids(checkpointer: BaseCheckpointSaver) -> list[str]:
    """Every thread id in the checkpointer, most recently active first.

    imgrag's own checkpointer (:class:`ThreadStore`) reads the ids alone, so a thread it would refuse to read does
    not hide the others. Any other checkpointer is asked through ``list(None)``, which yields every checkpoint of
    every thread, newest first, so the first time a thread shows up is its latest activity (fine for a person's
    chats; a shared server with many thousands of runs would want a checkpointer that lists threads itself)."""
    listed = getattr(checkpointer, "thread_ids", None)
    if callable(listed):
        return list(listed())
    seen: dict[str, None] = {}
    for item in checkpointer.list(None):
        configurable = item.config["configurable"]
        if not configurable.get("checkpoint_ns"):  # the top graph's checkpoints, not a subgraph's
            seen.setdefault(configurable["thread_id"], None)
    return list(seen)


def match_thread_id(ids: list[str], text: str, prefix: str = "") -> str | None:
    """The id in ``ids`` that a typed ``text`` names: itself, or the one id starting with it (with or without
    ``prefix``, e.g. the chat's ``chat-``); None when none does. Raises UserError when several ids start with it."""
    if text in ids:
        return text
    matches = [t for t in ids if t.startswith(text) or (prefix and t.startswith(prefix + text))]
    if len(matches) > 1:
        shown = ", ".join(matches[:6]) + (f" and {len(matches) - 6} more" if len(matches) > 6 else "")
        raise UserError(f"{text!r} matches {len(matches)} threads: {shown}; type more of the id")
    return matches[0] if matches else None


def closest_thread_ids(ids: list[str], text: str, prefix: str = "", n: int = 3) -> list[str]:
    """Up to ``n`` ids of ``ids`` closest to a typed ``text`` that names none (difflib's ratio, ``prefix``
    ignored on both sides), for a "did you mean" hint."""
    bare = {t.removeprefix(prefix): t for t in ids} if prefix else {t: t for t in ids}
    return [bare[t] for t in difflib.get_close_matches(text.removeprefix(prefix) if prefix else text, list(bare),
                                                        n=n, cutoff=0.5)]

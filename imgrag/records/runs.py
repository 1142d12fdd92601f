"""Run records: one directory per run, written so that a crash loses at most the step in flight.

    <output_dir>/<run_id>/
        candidates/c0.png, c1.png, ...   every picture the run drew
        trace.jsonl                      one JSON line per step, flushed and fsynced as it happens
        result.json                      the final summary, replaced atomically (never half-written)
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from imgrag.atomic_files import atomic_path, write_json_atomic
from imgrag.errors import UserError
from imgrag.file_names import with_name_bytes
from imgrag.records.provenance import save_kwargs

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def new_run_id() -> str:
    """A sortable, readable id: date, time and a short random suffix."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def path_error(path: str | Path, exc: OSError, doing: str = "cannot write") -> UserError:
    """One line naming the path and the system's reason (``/x/y: cannot write: Permission denied``); a full disk
    also says how much space is left there."""
    reason = exc.strerror or str(exc)
    if is_disk_full(exc):
        reason += space_left(path)
    elif exc.errno == errno.ENOENT and Path(path).is_dir():
        # The folder is there, yet a file cannot be made in it: a file system that takes none (/proc, /sys).
        reason = "the folder exists, but its file system does not take new files (choose a folder on a disk)"
    return UserError(f"{path}: {doing}: {reason}")


# errno values that mean "no room left": the disk, or the user's quota on it.
_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) says the disk is full: an OSError with ENOSPC/EDQUOT, SQLite's
    "database or disk is full", or a library's wrapped message of either (Chroma's "Error in compaction")."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        text = str(exc).lower()
        if "no space left on device" in text or "disk is full" in text or "disk quota exceeded" in text:
            return True
        if isinstance(exc, sqlite3.OperationalError) and "full" in text:
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return False


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KB"``: sizes in messages (powers of 1024, one decimal)."""
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def space_left(path: str | Path) -> str:
    """`` (12.0 KB left on /mnt)``: the free space of the disk holding ``path`` (its nearest existing folder),
    for a message about a full disk; empty when it cannot be measured."""
    probe = Path(path).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return ""
    return f" ({human_bytes(free)} left on the disk of {probe})"


def disk_full_line(exc: BaseException, fallback_path: str | Path | None = None) -> str:
    """One line for a full disk: the path that could not be written and the space left there.

    ``fallback_path`` names the place when the error carries no file name (SQLite, Chroma)."""
    where = getattr(exc, "filename", None) or fallback_path
    if where is None:
        return "the disk is full (No space left on device); free some space and run the command again"
    return f"{where}: No space left on device{space_left(where)}"


def ensure_writable_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create ``path`` (and its parents) if needed and prove a file can be made in it, before any work.

    Raises a UserError naming the path and the reason (not a directory, permission denied, read-only or full
    file system). Checking by doing (a probe file) is the only test that holds for root, ACLs and mounts."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: the {what} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".imgrag-write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise path_error(path, exc, f"cannot write the {what}") from None
    return path


def ensure_writable_file(path: str | Path, what: str = "output", example: str = "out.png") -> Path:
    """Check, before any work, that ``path`` can be written: its folder is made and probed, and the file itself,
    if it exists, is a file that may be replaced. A folder given instead is a UserError suggesting ``example``
    (the name of a file of the right kind) in it."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give a file name such as {path / example}")
    ensure_writable_dir(path.parent if str(path.parent) else Path("."), f"folder of the {what}")
    return path


def _last_byte(path: Path, size: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(size - 1)
        return fh.read(1)


# One writer at a time per process for every trace: parallel tool calls append to the same file.
_TRACE_LOCK = threading.Lock()
# Kept free in each run folder while the run works and given back on a full disk, so result.json and the last
# trace lines can still be written: a run on a full disk closes its record instead of losing it.
RESERVE_BYTES = 256 * 1024
RESERVE_NAME = ".space-reserve"


class RunRecord:
    """The files of one run. Safe to reopen: a resumed run appends to the same trace. Nothing is
    created on disk until something is written."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)
        self.candidates_dir = self.dir / "candidates"
        self.trace_path = self.dir / "trace.jsonl"
        self.result_path = self.dir / "result.json"
        # What the last read_steps skipped: ``["trace.jsonl line 7: torn (…)"]`` for the front ends to report.
        self.trace_problems: list[str] = []

    def reserve_space(self) -> None:
        """Set aside :data:`RESERVE_BYTES` in the run folder (a file of zeros) for closing the record on a full
        disk; :meth:`release_space` gives it back. A disk already too full for it is left as it is: the first
        write that fails then says so."""
        path = self.dir / RESERVE_NAME
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if path.exists() and path.stat().st_size >= RESERVE_BYTES:
                return
            with open(path, "wb") as fh:
                fh.write(b"\0" * RESERVE_BYTES)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError:
            path.unlink(missing_ok=True)

    def release_space(self) -> None:
        """Remove the reserve file (at the end of a run, and on a full disk before the record is closed)."""
        try:
            (self.dir / RESERVE_NAME).unlink(missing_ok=True)
        except OSError:
            pass

    def candidate_path(self, candidate_id: str) -> Path:
        """Where a candidate's picture goes (the folder is made on demand)."""
        self.candidates_dir.mkdir(parents=True, exist_ok=True)
        return self.candidates_dir / f"{candidate_id}.png"

    def save_candidate(self, candidate_id: str, image: Any, provenance: dict[str, Any] | None = None) -> Path:
        """Write a candidate's picture (a PIL image) atomically: a crash never leaves half a PNG that a resumed
        run or a report would then read as the candidate. ``provenance`` (:mod:`imgrag.records.provenance`) goes into
        its PNG text chunks in the same write. Returns its path."""
        path = self.candidate_path(candidate_id)
        with atomic_path(path) as tmp:
            image.save(tmp, **save_kwargs(path, provenance))
        return path

    def append_step(self, step: dict[str, Any]) -> None:
        """Append one step to trace.jsonl, whole or not at all, and make it durable before returning.

        The line goes out in one ``write`` on an O_APPEND descriptor; a write that fails part-way (a full disk)
        is cut back off, so the trace never keeps half a line. A torn line left by a crash is ended with a
        newline first, so the new step starts a line of its own. Raises the OSError of a failed write."""
        data = (json.dumps({"time": round(time.time(), 3), **step}, default=str) + "\n").encode("utf-8")
        self.dir.mkdir(parents=True, exist_ok=True)
        with _TRACE_LOCK:
            fd = os.open(self.trace_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                size = os.fstat(fd).st_size
                if size and _last_byte(self.trace_path, size) != b"\n":
                    data = b"\n" + data
                try:
                    written = os.write(fd, data)
                    if written != len(data):
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.trace_path))
                    os.fsync(fd)
                except OSError as exc:
                    try:
                        os.ftruncate(fd, size)  # give back the part that was written
                    except OSError:
                        pass
                    if exc.filename is None:
                        exc.filename = str(self.trace_path)
                    raise
            finally:
                os.close(fd)

    def read_steps(self) -> list[dict[str, Any]]:
        """Every complete step of the trace. A line that is not a whole JSON object (a torn line, from a crash
        mid-write) is skipped and named in :attr:`trace_problems`."""
        self.trace_problems = []
        if not self.trace_path.exists():
            return []
        steps = []
        lines = self.trace_path.read_bytes().decode("utf-8", errors="replace").split("\n")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                step = json.loads(line)
            except json.JSONDecodeError:
                step = None
            if isinstance(step, dict):
                steps.append(step)
            else:
                self.trace_problems.append(f"{self.trace_path} line {number}: torn (not a whole JSON object: a "
                                           "write cut off by a crash or a full disk); skipped")
        return steps

    def write_result(self, result: dict[str, Any]) -> None:
        """Write result.json whole (atomically), a name that is not UTF-8 with its bytes beside it
        (:func:`imgrag.file_names.with_name_bytes`), as ``--json`` prints it."""
        write_json_atomic(self.result_path, with_name_bytes(result))

    def read_result(self) -> dict[str, Any] | None:
        if not self.result_path.exists():
            return None
        return json.loads(self.result_path.read_text(encoding="utf-8"))

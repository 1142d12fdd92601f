"""Run records: one directory per run, written so that a crash loses at most the step in flight.

    <output_dir>/<run_id>/
        candidates/c0.png, c1.png, ...   every picture the run drew
        trace.jsonl                      one JSON line per step, flushed and fsynced as it happens
        result.json                      the final summary, replaced atomically (never half-written)
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from imgrag.errors import UserError

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def new_run_id() -> str:
    """A sortable, readable id: date, time and a short random suffix."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def path_error(path: str | Path, exc: OSError, doing: str = "cannot write") -> UserError:
    """One line naming the path and the system's reason (``/x/y: cannot write: Permission denied``)."""
    return UserError(f"{path}: {doing}: {exc.strerror or exc}")


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


def ensure_writable_file(path: str | Path, what: str = "output") -> Path:
    """Check, before any work, that ``path`` can be written: its folder is made and probed, and the file itself,
    if it exists, is a file that may be replaced."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give a file name such as {path / 'out.png'}")
    ensure_writable_dir(path.parent if str(path.parent) else Path("."), f"folder of the {what}")
    return path


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (os.umask alone must set it to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (POSIX needs the directory itself fsynced)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # not supported here (Windows): the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` for the block to write; fsynced and renamed over ``path`` when the
    block ends, removed if it fails, so a crash never leaves half a file under the name.

    The temporary name ends in ``path``'s own suffix, so writers that choose a format by it (Pillow) work.
    The file gets the mode an ordinary ``open`` would (0666 less the umask; mkstemp makes it 0600), and the
    folder is fsynced after the rename so the new name survives a power cut too.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, document: Any) -> None:
    """Write JSON to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")


class RunRecord:
    """The files of one run. Safe to reopen: a resumed run appends to the same trace. Nothing is
    created on disk until something is written."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)
        self.candidates_dir = self.dir / "candidates"
        self.trace_path = self.dir / "trace.jsonl"
        self.result_path = self.dir / "result.json"

    def candidate_path(self, candidate_id: str) -> Path:
        """Where a candidate's picture goes (the folder is made on demand)."""
        self.candidates_dir.mkdir(parents=True, exist_ok=True)
        return self.candidates_dir / f"{candidate_id}.png"

    def save_candidate(self, candidate_id: str, image: Any, provenance: dict[str, Any] | None = None) -> Path:
        """Write a candidate's picture (a PIL image) atomically: a crash never leaves half a PNG that a resumed
        run or a report would then read as the candidate. ``provenance`` (:mod:`imgrag.provenance`) goes into
        its PNG text chunks in the same write. Returns its path."""
        from imgrag.provenance import save_kwargs

        path = self.candidate_path(candidate_id)
        with atomic_path(path) as tmp:
            image.save(tmp, **save_kwargs(path, provenance))
        return path

    def append_step(self, step: dict[str, Any]) -> None:
        """Append one step to trace.jsonl and make it durable before returning."""
        line = json.dumps({"time": round(time.time(), 3), **step}, default=str)
        self.dir.mkdir(parents=True, exist_ok=True)
        with self.trace_path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_steps(self) -> list[dict[str, Any]]:
        """Every complete step of the trace; a torn last line (a crash mid-write) or a line that is not a JSON
        object is ignored."""
        if not self.trace_path.exists():
            return []
        steps = []
        for line in self.trace_path.read_text(encoding="utf-8").splitlines():
            try:
                step = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(step, dict):
                steps.append(step)
        return steps

    def write_result(self, result: dict[str, Any]) -> None:
        write_json_atomic(self.result_path, result)

    def read_result(self) -> dict[str, Any] | None:
        if not self.result_path.exists():
            return None
        return json.loads(self.result_path.read_text(encoding="utf-8"))

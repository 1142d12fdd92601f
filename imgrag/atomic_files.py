"""Files written whole or not at all: a temporary file beside the target, fsynced, renamed over it, and the folder
fsynced, so a crash or a power cut never leaves half a file under the name. Every record imgrag writes (run results,
batch and eval records, kit markers, pictures with their provenance, caches) goes through :func:`atomic_path`."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "fsync_dir", "write_json_atomic"]


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

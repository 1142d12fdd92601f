"""Weight files: whether one on disk is whole, read from its header alone, and how big a file is in words.

A loader that opens a damaged file fails deep inside a library (or, for a Git LFS pointer, reads 130 bytes of
text as weights); :func:`weight_file_problem` says what is wrong first, in one line, without loading a tensor.
Used by ``imgrag doctor`` (imgrag.weights.model_files), the generator's single-file loader and the LoRA checks
(imgrag.drawing.loras); it imports nothing of imgrag, so any module may use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def human_size(n: int | None) -> str:
    """Bytes as the hub shows them (decimal units, three significant digits); "?" when unknown."""
    if n is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


# What a Git LFS pointer starts with: a clone without `git lfs` (or a hub download through a proxy that serves the
# pointer) leaves this ~130-byte text file where the weights should be.
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"
# A safetensors header is JSON of a few hundred bytes per tensor; one claiming more than this is not a header.
MAX_SAFETENSORS_HEADER = 100 * 2**20


def weight_file_problem(path: Path) -> str | None:
    """Why a file a loader will open is not what it should be, in words, or None when it looks whole.

    Every file: empty (0 bytes), or a Git LFS pointer. A ``.safetensors`` file: its header is read as the format
    defines it (an 8-byte little-endian length, then that much JSON naming each tensor's dtype, shape and
    ``data_offsets`` into the data that follows) and the file's size must be exactly 8 + header + the last offset,
    so a truncated download (or extra bytes) is found without loading a tensor. Reads at most the header."""
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty file (0 bytes): the download or copy did not finish; fetch it again"
        with open(path, "rb") as fh:
            head = fh.read(8)
            if (head + fh.read(len(LFS_POINTER_PREFIX) - len(head))).startswith(LFS_POINTER_PREFIX):
                return ("a Git LFS pointer, not the weights: run `git lfs pull` in its repository, or fetch it with "
                        "`imgrag models download`")
            if path.suffix != ".safetensors":
                return None
            if len(head) < 8:
                return f"not a safetensors file: {size} bytes, shorter than its 8-byte header length"
            fh.seek(8)
            return _safetensors_problem(int.from_bytes(head, "little"), fh, size)
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"


def _safetensors_problem(header_len: int, fh: Any, size: int) -> str | None:
    """The header check of :func:`weight_file_problem` (``fh`` just past the 8-byte length)."""
    if header_len > MAX_SAFETENSORS_HEADER or 8 + header_len > size:
        return (f"truncated or not safetensors: its header claims {header_len} bytes and the file holds {size}; "
                "fetch it again")
    try:
        header = json.loads(fh.read(header_len).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return "not safetensors: its header is not JSON (a truncated or corrupt file); fetch it again"
    if not isinstance(header, dict):
        return "not safetensors: its header is not a JSON object; fetch it again"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            return f"not safetensors: tensor {name!r} has no valid data_offsets; fetch it again"
        end = max(end, offsets[1])
    expected = 8 + header_len + end
    if size < expected:
        return (f"truncated: its header needs {expected} bytes and the file holds {size} "
                f"({human_size(expected - size)} short); fetch it again")
    if size > expected:
        return f"{size - expected} bytes past the end its header gives: a corrupt file; fetch it again"
    return None


def safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a safetensors file that :func:`weight_file_problem` found whole: tensor name ->
    ``{"dtype", "shape", "data_offsets"}``, and ``__metadata__`` when it has one. Reads the header only."""
    with open(path, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        return json.loads(fh.read(length).decode("utf-8"))

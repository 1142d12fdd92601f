"""Files: walking folders for pictures, their caption sidecars, and reading a picture safely.

What :class:`imgrag.store.indexing.IndexJob` walks and reads; nothing here touches Chroma.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from imgrag.errors import UserError
from imgrag.images import IMAGE_SUFFIXES, UnreadableImage, decode_rgb

MAX_CAPTION_CHARS = 2000
# Pictures are shrunk to this box right after decoding: CLIP sees 224 px, and a batch of full-size
# 24 MP photos would hold gigabytes.
DECODE_BOX = 1024


@dataclass(frozen=True)
class ImageFile:
    """A candidate picture found by the walk, with what decides whether it changed since last time."""

    path: str  # absolute, symlinks kept as the user sees them
    size: int
    mtime_ns: int
    caption_path: str | None  # the sidecar .txt, when there is one

    def signature(self, caption_stat: tuple[int, int]) -> list[int]:
        return [self.size, self.mtime_ns, *caption_stat]


def content_digest(data: bytes) -> str:
    """The sha256 of a picture's bytes; its first ``ID_HEX_CHARS`` are the store id (same bytes, same id,
    wherever they are)."""
    return hashlib.sha256(data).hexdigest()


def caption_stat(path: str | None) -> tuple[int, int]:
    if path is None:
        return (-1, -1)
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def read_caption(path: str | None) -> str:
    """The sidecar caption's text (stripped, capped); empty when there is none or it cannot be read."""
    if path is None:
        return ""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read(MAX_CAPTION_CHARS * 4).strip()[:MAX_CAPTION_CHARS]
    except OSError:
        return ""


def sidecar_path(image_path: str) -> str:
    """Where a picture's caption would be: ``photo.jpg`` → ``photo.txt``."""
    return os.path.splitext(image_path)[0] + ".txt"


def walk_images(roots: Sequence[str | Path]) -> tuple[list[ImageFile], list[dict[str, str]]]:
    """Every picture file under ``roots`` (recursively, following symlinks), plus what was skipped and why.

    A directory reached twice (a symlink loop, or two links to one folder) is walked once: visited
    directories are tracked by device and inode. Names starting with a dot are left out (thumbnails,
    ``.git``, macOS ``._*`` files). A file given directly must have an image suffix.
    """
    files: list[ImageFile] = []
    skipped: list[dict[str, str]] = []
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[str] = set()

    def add_file(path: str, st: os.stat_result, names: set[str] | None) -> None:
        if path in seen_files:
            return
        seen_files.add(path)
        sidecar = sidecar_path(path)
        # In a walked folder the listing says whether it is there; a file given directly costs a stat.
        listed = names is None or os.path.basename(sidecar) in names
        caption = sidecar if listed and os.path.isfile(sidecar) else None
        files.append(ImageFile(path, st.st_size, st.st_mtime_ns, caption))

    for root in roots:
        root_path = os.path.abspath(os.path.expanduser(str(root)))
        if os.path.isfile(root_path):
            if os.path.splitext(root_path)[1].lower() not in IMAGE_SUFFIXES:
                skipped.append({"path": root_path, "reason": "not an image file type "
                                f"(accepted: {', '.join(sorted(IMAGE_SUFFIXES))})"})
                continue
            add_file(root_path, os.stat(root_path), None)
            continue
        stack = [root_path]
        while stack:
            folder = stack.pop()
            try:
                st = os.stat(folder)
            except OSError as exc:
                skipped.append({"path": folder, "reason": f"cannot read directory: {exc.strerror or exc}"})
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen_dirs:
                skipped.append({"path": folder, "reason": "directory already walked (a symlink loop or a second link)"})
                continue
            seen_dirs.add(key)
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                skipped.append({"path": folder, "reason": f"cannot list directory: {exc.strerror or exc}"})
                continue
            names = {e.name for e in entries}
            subdirs = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                path = os.path.join(folder, entry.name)
                try:
                    is_dir = entry.is_dir()  # follows symlinks
                except OSError:
                    is_dir = False
                if is_dir:
                    subdirs.append(path)
                    continue
                if os.path.splitext(entry.name)[1].lower() not in IMAGE_SUFFIXES:
                    continue
                try:
                    st = entry.stat()  # follows symlinks
                except OSError as exc:
                    reason = "broken symlink" if entry.is_symlink() else f"cannot stat: {exc.strerror or exc}"
                    skipped.append({"path": path, "reason": reason})
                    continue
                add_file(path, st, names)
            stack.extend(reversed(subdirs))  # depth first, in name order
    return files, skipped


def user_reason(exc: UserError, path: str) -> str:
    """A probe error without the leading ``<path>: `` (the summary shows the path beside it)."""
    if isinstance(exc, UnreadableImage):
        return exc.reason
    text = str(exc)
    return text[len(path) + 2:] if text.startswith(path + ": ") else text


def decode_image(data: bytes, path: str) -> Image.Image:
    """Decode bytes already read (so the embedding matches the hashed content) into an RGB picture no larger
    than the embedder needs, with :func:`imgrag.images.decode_rgb`'s guards."""
    picture = decode_rgb(io.BytesIO(data), path, draft_box=DECODE_BOX)
    if max(picture.size) > DECODE_BOX:
        picture.thumbnail((DECODE_BOX, DECODE_BOX), Image.Resampling.BICUBIC)
    return picture

"""What the store's modules share: a retrieved :class:`Reference`, a stored entry's metadata (:class:`StoredEntry`),
what the store needs from an embedder, and the index summary."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypedDict

import numpy as np
from PIL import Image

from imgrag.file_names import from_stored


class SupportsEmbedding(Protocol):
    """What the store needs from an embedder (imgrag.models.embedder.Embedder, or a test's fake)."""

    model_id: str
    dim: int

    def embed_images(self, images: Sequence[Image.Image], batch_size: int = ...) -> np.ndarray: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


class IndexSummary(TypedDict):
    """What ``imgrag index --json`` prints (DESIGN.md's contract). Counts are of files (paths)."""

    added: int
    duplicates: int  # new files whose picture the store already held under another file: linked, not added
    updated: int
    unchanged: int
    removed: int
    skipped: list[dict[str, str]]
    notes: list[dict[str, str]]  # files stored with a remark ({"path", "note"}): a name that is not UTF-8
    total: int  # pictures in the store afterwards
    seconds: float


@dataclass
class Reference:
    """One retrieved picture: its store id, a path that exists, its score, caption and the query that found it."""

    id: str
    path: str
    score: float
    caption: str = ""
    query: str | None = None
    similarity: float | None = None  # sim(query, ref) before reflective re-ranking

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "path": self.path, "score": round(float(self.score), 6), "caption": self.caption,
                "query": self.query,
                "similarity": None if self.similarity is None else round(float(self.similarity), 6)}


@dataclass
class StoredEntry:
    """One picture's stored metadata, with its path map parsed."""

    meta: dict[str, Any]
    paths: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def from_meta(cls, meta: dict[str, Any] | None) -> StoredEntry:
        meta = dict(meta or {})
        try:
            paths = json.loads(meta.get("paths") or "{}")
        except ValueError:
            paths = {}
        primary = cls(meta).primary
        if not paths and primary:
            paths = {primary: [-1, -1, -1, -1]}  # unknown signature: the next index re-checks it
        return cls(meta, {str(p): list(sig) for p, sig in paths.items()})

    @property
    def primary(self) -> str | None:
        """The picture's first path as the file system has it. The ``path`` field holds its display name
        (:mod:`imgrag.file_names`), and ``path_bytes`` the name's bytes when they are not UTF-8; ``paths`` is JSON
        with ``\\u`` escapes, which keep any name whole."""
        return from_stored(self.meta.get("path"), self.meta.get("path_bytes"))

    def live_path(self) -> str | None:
        """The first of this picture's paths (primary first) that still exists."""
        primary = self.primary
        ordered = ([primary] if primary in self.paths else []) + sorted(p for p in self.paths if p != primary)
        return next((p for p in ordered if os.path.isfile(p)), None)

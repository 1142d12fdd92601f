"""The reference store: the user's own pictures, embedded with CLIP, kept in Chroma, found by text or image.

Where it lives (``settings.store``): a directory holds an embedded Chroma database (``PersistentClient``,
the default); ``http://host:port`` talks to a Chroma server started with ``chroma run`` (``HttpClient``),
for a team or several processes. The code is the same for both.

What it holds. One Chroma collection per embedder: vectors of two models are not comparable, so the
collection's name and metadata carry the embedder's identity and width, and opening the store with an
embedder that did not build it is a :class:`UserError` naming the one that did. Chroma gets our own
vectors (``embedding_function=None``; its default function would try to download a model) in a cosine
HNSW index.

One entry per *picture*, not per file: its id is a hash of the file's bytes, so indexing twice, or
again after a crash, upserts the same ids and never duplicates anything. The same picture at two paths
is one entry listing both paths (two copies of one reference would only waste retrieval slots); a result
shows the first of its paths that still exists. Each entry's metadata records, per path, the file's size
and mtime (and its caption file's), so a rerun skips an unchanged file without reading it; a file whose
bytes changed gets the new id and leaves the old entry. A caption beside a picture (``rocket.jpg`` +
``rocket.txt``) is stored as ``caption``.

Writers. Embedded Chroma is not safe for two writers on one path, so :meth:`ReferenceStore.index` takes
an inter-process lock (``<store>/.write.lock``, released by the kernel if the process dies); a second
writer waits and says so. Readers need no lock. Against a server, the server orders the writes.

Retrieval for the agent (:meth:`ReferenceStore.retrieve`): one text query per missing concept, each with
up to ``k`` references, de-duplicated across concepts, optionally re-ranked after RealRAG's reflective
retrieval: ``score = sim(query, ref) - λ·sim(failed candidate, ref)`` prefers references that add what
the generator failed to draw over ones resembling what it drew. The maths is :func:`rank_references`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypedDict
from urllib.parse import urlparse

import numpy as np
from PIL import Image

from imgrag.errors import UserError
from imgrag.images import IMAGE_SUFFIXES, decode_rgb, probe_image
from imgrag.settings import Settings

log = logging.getLogger(__name__)

LOCK_NAME = ".write.lock"
# Larger files are skipped: no reference picture needs them, and reading one costs memory per batch.
MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_CAPTION_CHARS = 2000
# Pictures are shrunk to this box right after decoding: CLIP sees 224 px, and a batch of full-size
# 24 MP photos would hold gigabytes.
DECODE_BOX = 1024
ID_HEX_CHARS = 32  # 128 bits of sha256: collisions are out of reach for any personal collection
_METADATA_PAGE = 5000  # Chroma rejects a get() of ~100k ids at once ("too many SQL variables")
_METADATA_FLUSH = 1000  # path-map changes gathered before they are written (see _IndexJob._flush)
_WRITE_CHUNK = 1000  # ids per Chroma call; its limit is 5461


class SupportsEmbedding(Protocol):
    """What the store needs from an embedder (imgrag.embedder.Embedder, or a test's fake)."""

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


# ----------------------------------------------------------------------------------------------
# Ranking maths (pure; tested on constructed vectors)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankedPick:
    """Reference ``ref`` (a column of the similarity matrix) chosen for query ``query``."""

    ref: int
    query: int
    score: float
    similarity: float


def reflective_scores(similarities: np.ndarray, avoid_similarities: np.ndarray | None,
                      rerank_lambda: float) -> np.ndarray:
    """RealRAG's reflective score: ``sim(query, ref) - λ·sim(candidate, ref)`` for every query and ref.

    ``similarities`` is [queries, refs]; ``avoid_similarities`` is [refs] (None: no candidate, no penalty).
    """
    scores = np.asarray(similarities, dtype=np.float64)
    if avoid_similarities is None or rerank_lambda == 0:
        return scores.copy()
    return scores - float(rerank_lambda) * np.asarray(avoid_similarities, dtype=np.float64)[None, :]


def rank_references(similarities: np.ndarray, avoid_similarities: np.ndarray | None, k: int,
                    rerank_lambda: float = 0.3, min_score: float = -1.0) -> list[RankedPick]:
    """Pick up to ``k`` distinct references per query from a shared pool.

    - ``min_score`` filters on relevance, ``sim(query, ref)``, before any re-ranking: a reference
      unrelated to the query is never chosen because it happens to be far from the candidate.
    - Pairs are taken best re-ranked score first; a reference is used once, by the query it scores
      best with while that query still has room (so it keeps its best score, and a reference two
      concepts both want does not take a slot from each).
    - The order interleaves the queries (each one's best, then each one's second, ...), so a caller that
      keeps only the first few references still covers every concept.
    """
    sims = np.asarray(similarities, dtype=np.float64)
    if sims.ndim != 2:
        raise ValueError("similarities must be [queries, refs]")
    if k < 1 or sims.size == 0:
        return []
    scores = reflective_scores(sims, avoid_similarities, rerank_lambda)
    n_queries, _ = sims.shape
    query_idx, ref_idx = np.nonzero(sims >= min_score)
    # Best score first; ties by query then ref index, so the result is deterministic.
    order = sorted(zip(query_idx.tolist(), ref_idx.tolist(), strict=True),
                   key=lambda qr: (-scores[qr[0], qr[1]], qr[0], qr[1]))
    taken: set[int] = set()
    per_query: list[list[RankedPick]] = [[] for _ in range(n_queries)]
    for q, r in order:
        if r in taken or len(per_query[q]) >= k:
            continue
        taken.add(r)
        per_query[q].append(RankedPick(r, q, float(scores[q, r]), float(sims[q, r])))
    picks: list[RankedPick] = []
    for rank in range(k):
        tier = [chosen[rank] for chosen in per_query if len(chosen) > rank]
        picks.extend(sorted(tier, key=lambda p: -p.score))
    return picks


# ----------------------------------------------------------------------------------------------
# Files: walking folders, reading pictures safely
# ----------------------------------------------------------------------------------------------


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


def _caption_stat(path: str | None) -> tuple[int, int]:
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


def _user_reason(exc: UserError, path: str) -> str:
    """A probe error without the leading ``<path>: `` (the summary shows the path beside it)."""
    text = str(exc)
    return text[len(path) + 2:] if text.startswith(path + ": ") else text


def decode_image(data: bytes, path: str) -> Image.Image:
    """Decode bytes already read (so the embedding matches the hashed content) into an RGB picture no larger
    than the embedder needs, with :func:`imgrag.images.decode_rgb`'s guards."""
    picture = decode_rgb(io.BytesIO(data), path, draft_box=DECODE_BOX)
    if max(picture.size) > DECODE_BOX:
        picture.thumbnail((DECODE_BOX, DECODE_BOX), Image.Resampling.BICUBIC)
    return picture


# ----------------------------------------------------------------------------------------------
# The store
# ----------------------------------------------------------------------------------------------


def collection_name(embedder_id: str, dim: int) -> str:
    """Chroma collection for an embedder: readable, within Chroma's name rules, unique by a hash."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in embedder_id.lower())
    slug = "-".join(part for part in slug.split("-") if part)[:48].strip("-") or "embedder"
    digest = hashlib.sha256(f"{embedder_id}|{dim}".encode()).hexdigest()[:10]
    return f"imgrag-{slug}-{dim}d-{digest}"


def is_server_uri(location: str) -> bool:
    return location.startswith(("http://", "https://"))


@dataclass
class _Entry:
    """One picture's stored metadata, with its path map parsed."""

    meta: dict[str, Any]
    paths: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def from_meta(cls, meta: dict[str, Any] | None) -> _Entry:
        meta = dict(meta or {})
        try:
            paths = json.loads(meta.get("paths") or "{}")
        except ValueError:
            paths = {}
        if not paths and meta.get("path"):
            paths = {meta["path"]: [-1, -1, -1, -1]}  # unknown signature: the next index re-checks it
        return cls(meta, {str(p): list(sig) for p, sig in paths.items()})

    def live_path(self) -> str | None:
        """The first of this picture's paths (primary first) that still exists."""
        primary = self.meta.get("path")
        ordered = ([primary] if primary in self.paths else []) + sorted(p for p in self.paths if p != primary)
        return next((p for p in ordered if os.path.isfile(p)), None)


class ReferenceStore:
    """A Chroma collection of picture embeddings for one embedder; see the module docstring."""

    def __init__(self, location: str, embedder_id: str, dim: int, client: Any, collection: Any) -> None:
        self.location = location
        self.embedder_id = embedder_id
        self.dim = int(dim)
        self.name = collection_name(embedder_id, dim)
        self.is_server = is_server_uri(location)
        self._client = client
        self._collection = collection
        # Seconds per phase of the last index() run: benchmarks report the store's share from it.
        self.last_index_timings: dict[str, float] = {}

    # ----- opening -----
    @classmethod
    def open(cls, settings: Settings, embedder_id: str, dim: int, *, for_writing: bool = False) -> ReferenceStore:
        """Open the store of ``settings.store`` for one embedder.

        Reading: a store holding only other embedders' pictures is a UserError naming them; a store
        that does not exist yet reads as empty. ``for_writing`` (indexing) allows a new embedder: its
        collection is created on the first write.
        """
        location = settings.store.strip()
        if not location:
            raise UserError("no store configured: set --store, IMGRAG_STORE or 'store' in a config file")
        if not is_server_uri(location):
            location = os.path.abspath(os.path.expanduser(location))
        # Never created here: a new embedded store is created under the write lock by the first index().
        client = _connect(location, create=False)
        collection = None
        if client is not None:
            collection = _get_collection(client, collection_name(embedder_id, dim))
            if collection is not None and (collection.metadata or {}).get("imgrag_embedder") != embedder_id:
                raise UserError(f"store {location}: collection {collection.name} belongs to another embedder "
                                f"({(collection.metadata or {}).get('imgrag_embedder')!r})")
            if collection is None and not for_writing:
                others = _imgrag_collections(client)
                if others:
                    built = "; ".join(f"{m.get('imgrag_embedder')!r} (dim {m.get('imgrag_dim')}, "
                                      f"{c.count()} pictures)" for c, m in others)
                    raise UserError(
                        f"the store at {location} was built with another embedder: {built}; the current embedder "
                        f"is {embedder_id!r} (dim {dim}). Index your pictures again with this embedder "
                        "(imgrag index PATH), or use the profile that built the store.")
        return cls(location, embedder_id, dim, client, collection)

    # ----- reading -----
    def _current(self) -> Any:
        """This embedder's collection, looked up again while it does not exist (another process may create it),
        and reopened when another process has written to the store since (see :func:`_fresh_client`)."""
        if self._client is not None and not self.is_server:
            client = _fresh_client(self.location, self._client)
            if client is not self._client:
                self._client, self._collection = client, None
        if self._collection is None:
            if self._client is None:
                self._client = _connect(self.location, create=False)
            if self._client is not None:
                self._collection = _get_collection(self._client, self.name)
        return self._collection

    def count(self) -> int:
        """How many pictures (distinct contents) this embedder's collection holds."""
        collection = self._current()
        return 0 if collection is None else int(collection.count())

    def get(self, ids: Sequence[str]) -> list[Reference]:
        """The references with these ids, in the given order; unknown ids and vanished files are left out."""
        collection = self._current()
        if collection is None or not ids:
            return []
        got = collection.get(ids=list(ids), include=["metadatas"])
        by_id = {i: _Entry.from_meta(m) for i, m in zip(got["ids"], got["metadatas"], strict=True)}
        refs = []
        for ref_id in ids:
            entry = by_id.get(ref_id)
            path = entry.live_path() if entry else None
            if entry is not None and path is not None:
                refs.append(Reference(ref_id, path, 0.0, str(entry.meta.get("caption") or "")))
        return refs

    def embeddings(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored image embeddings of these ids (unknown ids left out): what the safety gate checks."""
        collection = self._current()
        if collection is None or not ids:
            return {}
        got = collection.get(ids=list(ids), include=["embeddings"])
        return {i: np.asarray(v, dtype=np.float32) for i, v in zip(got["ids"], got["embeddings"], strict=True)}

    def search_text(self, embedder: SupportsEmbedding, text: str, k: int = 5) -> list[Reference]:
        """The ``k`` pictures closest to a text, best first (score: cosine similarity)."""
        self._check_embedder(embedder)
        text = (text or "").strip()
        if not text:
            raise UserError("the search text is empty")
        return self._nearest(embedder.embed_texts([text])[0], k, query=text)

    def search_image(self, embedder: SupportsEmbedding, image: Image.Image, k: int = 5) -> list[Reference]:
        """The ``k`` pictures closest to a picture, best first (score: cosine similarity)."""
        self._check_embedder(embedder)
        return self._nearest(embedder.embed_images([image])[0], k, query=None)

    def retrieve(self, embedder: SupportsEmbedding, queries: list[str], k: int = 2, avoid: Image.Image | None = None,
                 rerank_lambda: float = 0.3, min_score: float = -1.0) -> list[Reference]:
        """References for the agent: up to ``k`` per query (one query per missing concept), merged.

        ``avoid`` is the failed candidate: with ``rerank_lambda`` > 0, references resembling it rank
        lower (see :func:`rank_references`). ``min_score`` is a floor on ``sim(query, ref)``. Only
        pictures whose file still exists are returned.
        """
        self._check_embedder(embedder)
        cleaned = list(dict.fromkeys(q.strip() for q in queries if isinstance(q, str) and q.strip()))
        if not cleaned:
            raise UserError("retrieve needs at least one non-empty query")
        if k < 1:
            raise UserError(f"k must be at least 1, got {k}")
        total = self.count()
        if total == 0:
            return []
        query_vectors = embedder.embed_texts(cleaned)
        pool_size = min(max(4 * k, k + 16), total)  # room for re-ranking and for entries whose file vanished
        ids: list[str] = []
        entries: dict[str, _Entry] = {}
        vectors: dict[str, np.ndarray] = {}
        for vector in query_vectors:
            for ref_id, meta, embedding, _ in self._query(vector, pool_size, with_embeddings=True):
                if ref_id not in entries:
                    ids.append(ref_id)
                    entries[ref_id] = _Entry.from_meta(meta)
                    vectors[ref_id] = np.asarray(embedding, dtype=np.float32)
        live = [(i, entries[i].live_path()) for i in ids]
        live = [(i, p) for i, p in live if p is not None]
        if not live:
            return []
        pool = np.stack([vectors[i] for i, _ in live])
        sims = query_vectors @ pool.T
        avoid_sims = None
        if avoid is not None and rerank_lambda:
            avoid_sims = pool @ embedder.embed_images([avoid])[0]
        picks = rank_references(sims, avoid_sims, k, rerank_lambda, min_score)
        return [Reference(live[p.ref][0], live[p.ref][1], p.score,
                          str(entries[live[p.ref][0]].meta.get("caption") or ""), cleaned[p.query], p.similarity)
                for p in picks]

    def _nearest(self, vector: np.ndarray, k: int, query: str | None) -> list[Reference]:
        if k < 1:
            raise UserError(f"k must be at least 1, got {k}")
        total = self.count()
        fetch = min(total, 2 * k + 8)
        while True:
            refs = []
            for ref_id, meta, _, distance in self._query(vector, fetch):
                entry = _Entry.from_meta(meta)
                path = entry.live_path()
                if path is not None:
                    similarity = 1.0 - float(distance)
                    refs.append(Reference(ref_id, path, similarity, str(entry.meta.get("caption") or ""), query,
                                          similarity))
            # Vanished files took some of the slots: ask for more, up to the whole collection.
            if len(refs) >= k or fetch >= total:
                return refs[:k]
            fetch = min(total, fetch * 4)

    def _query(self, vector: np.ndarray, n: int, with_embeddings: bool = False) -> list[tuple[str, dict, Any, float]]:
        """The ``n`` nearest entries; callers keep ``n`` within the collection's count (one count per search)."""
        collection = self._current()
        if collection is None or n < 1:
            return []
        include = ["metadatas", "distances"] + (["embeddings"] if with_embeddings else [])
        result = collection.query(query_embeddings=[np.asarray(vector, dtype=np.float32)],
                                        n_results=n, include=include)
        embeddings = result.get("embeddings")
        embeddings = embeddings[0] if embeddings is not None else [None] * len(result["ids"][0])
        return list(zip(result["ids"][0], result["metadatas"][0], embeddings, result["distances"][0], strict=True))

    def _check_embedder(self, embedder: SupportsEmbedding) -> None:
        if embedder.model_id != self.embedder_id or int(embedder.dim) != self.dim:
            raise UserError(f"this store was opened for embedder {self.embedder_id!r} (dim {self.dim}), "
                            f"not {embedder.model_id!r} (dim {embedder.dim})")

    # ----- writing -----
    @contextmanager
    def write_lock(self, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """Hold the inter-process write lock of an embedded store (no-op for a server)."""
        if self.is_server:
            yield
            return
        from filelock import FileLock, Timeout

        Path(self.location).mkdir(parents=True, exist_ok=True)
        lock_path = os.path.join(self.location, LOCK_NAME)
        lock = FileLock(lock_path)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if on_wait is not None:
                on_wait(f"another imgrag process is writing to the store {self.location}; waiting for it to "
                        f"finish (lock {lock_path})")
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def index(self, paths: Sequence[str | Path], embedder: SupportsEmbedding, prune: bool = False,
              progress: Callable[[int, int], None] | None = None, on_wait: Callable[[str], None] | None = None,
              batch_size: int = 32, screen: Callable[[np.ndarray], list[str | None]] | None = None) -> IndexSummary:
        """Add the pictures under ``paths`` (files or folders, walked recursively); see the module docstring.

        Unchanged files (same path, size, mtime and caption file) are not read at all. ``prune`` forgets
        files under ``paths`` that no longer exist; a folder that is gone is allowed then. ``progress``
        is called as ``(done, total)`` over the files that need work; ``on_wait`` once if another
        writer holds the lock. Writes go in batches of ``batch_size``, so a crash loses at most one batch.
        ``screen`` (the safety gate's index-time check) maps a batch's embeddings to a reason per picture, or None
        to keep it: a picture with a reason is skipped, not stored.
        """
        self._check_embedder(embedder)
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        if not paths:
            raise UserError("give at least one file or folder to index")
        start = time.perf_counter()
        timings = dict.fromkeys(("walk", "lock_wait", "store_read", "read_hash", "decode", "embed", "store_write"),
                                0.0)
        roots = [os.path.abspath(os.path.expanduser(str(p))) for p in paths]
        for root in roots:
            if not os.path.exists(root) and not prune:
                raise UserError(f"{root}: no such file or folder")
        files, skipped = walk_images([r for r in roots if os.path.exists(r)])
        timings["walk"] = time.perf_counter() - start

        lock_start = time.perf_counter()
        with self.write_lock(on_wait):
            timings["lock_wait"] = time.perf_counter() - lock_start
            job = _IndexJob(self, embedder, batch_size, timings, skipped)
            job.screen = screen
            job.load()
            job.run(files, progress)
            if prune:
                job.prune(roots)
            self.last_index_timings = {k: round(v, 4) for k, v in timings.items()}
            return IndexSummary(added=job.added, duplicates=job.duplicates, updated=job.updated,
                                unchanged=job.unchanged, removed=job.removed,
                                skipped=skipped, total=self.count(), seconds=round(time.perf_counter() - start, 3))

    def _ensure_collection(self) -> Any:
        if self._collection is None:
            if self._client is None:
                self._client = _connect(self.location, create=True)
            self._collection = self._client.get_or_create_collection(
                self.name, embedding_function=None, configuration={"hnsw": {"space": "cosine"}},
                metadata={"imgrag_embedder": self.embedder_id, "imgrag_dim": self.dim, "imgrag_store_version": 1})
        return self._collection


class _IndexJob:
    """One index() run under the write lock: the stored state in memory, and the batched writes."""

    def __init__(self, store: ReferenceStore, embedder: SupportsEmbedding, batch_size: int,
                 timings: dict[str, float], skipped: list[dict[str, str]]) -> None:
        self.store = store
        self.embedder = embedder
        self.batch_size = batch_size
        self.timings = timings
        self.skipped = skipped
        self.entries: dict[str, _Entry] = {}
        self.owners: dict[str, list[str]] = {}  # path -> ids whose path map lists it (normally one)
        self.added = self.duplicates = self.updated = self.unchanged = self.removed = 0
        self._dirty: set[str] = set()
        self.screen: Callable[[np.ndarray], list[str | None]] | None = None  # see ReferenceStore.index

    def load(self) -> None:
        """Every entry's metadata, paged: what the walk is compared against."""
        t0 = time.perf_counter()
        collection = self.store._ensure_collection()
        offset = 0
        while True:
            page = collection.get(include=["metadatas"], limit=_METADATA_PAGE, offset=offset)
            for ref_id, meta in zip(page["ids"], page["metadatas"], strict=True):
                entry = _Entry.from_meta(meta)
                self.entries[ref_id] = entry
                for path in entry.paths:
                    self.owners.setdefault(path, []).append(ref_id)
            if len(page["ids"]) < _METADATA_PAGE:
                break
            offset += _METADATA_PAGE
        self.timings["store_read"] += time.perf_counter() - t0

    def run(self, files: list[ImageFile], progress: Callable[[int, int], None] | None) -> None:
        pending: list[ImageFile] = []
        for f in files:
            owners = self.owners.get(f.path, [])
            if len(owners) == 1:
                stored = self.entries[owners[0]].paths[f.path]
                if stored[:2] == [f.size, f.mtime_ns]:
                    current = f.signature(_caption_stat(f.caption_path))
                    if stored == current:
                        self.unchanged += 1
                    else:  # only the caption file changed: no need to read the picture
                        self.entries[owners[0]].paths[f.path] = current
                        self._dirty.add(owners[0])
                        self.updated += 1
                    continue
            pending.append(f)
        if progress is not None:
            progress(0, len(pending))
        for start in range(0, len(pending), self.batch_size):
            batch = pending[start:start + self.batch_size]
            self._flush(self._read_batch(batch))
            if progress is not None:
                progress(min(start + self.batch_size, len(pending)), len(pending))
        self._flush([], final=True)

    def _read_batch(self, batch: list[ImageFile]) -> list[tuple[str, Image.Image]]:
        """Hash each file, link known contents, decode new ones; returns (id, picture) to embed."""
        new: list[tuple[str, Image.Image]] = []
        for f in batch:
            t0 = time.perf_counter()
            try:
                if f.size > MAX_FILE_BYTES:
                    raise UserError(f"{f.path}: file too large ({f.size / 2**20:.0f} MB; the limit is "
                                    f"{MAX_FILE_BYTES // 2**20} MB)")
                width, height = probe_image(f.path)  # header only: empty, not an image, a bomb, unreadable
                with open(f.path, "rb") as fh:
                    st = os.fstat(fh.fileno())
                    data = fh.read()
            except (UserError, OSError) as exc:
                reason = (_user_reason(exc, f.path) if isinstance(exc, UserError)
                          else f"cannot read: {exc.strerror or exc}")
                self._skip(f.path, reason)
                self.timings["read_hash"] += time.perf_counter() - t0
                continue
            digest = content_digest(data)
            ref_id = digest[:ID_HEX_CHARS]
            # The signature is of the bytes we read (the file may have changed since the walk).
            signature = [len(data), st.st_mtime_ns, *_caption_stat(f.caption_path)]
            self.timings["read_hash"] += time.perf_counter() - t0
            known = ref_id in self.entries  # the same picture under another file (earlier, or in this run)
            if not known:
                t0 = time.perf_counter()
                try:
                    picture = decode_image(data, f.path)
                except UserError as exc:
                    self._skip(f.path, _user_reason(exc, f.path))
                    continue
                finally:
                    self.timings["decode"] += time.perf_counter() - t0
                self.entries[ref_id] = _Entry({"sha256": digest, "width": width,
                                               "height": height, "bytes": len(data)})
                new.append((ref_id, picture))
            previous = self.owners.get(f.path, [])
            if not previous and known:
                self.duplicates += 1
            elif not previous:
                self.added += 1
            elif previous == [ref_id]:
                self.unchanged += 1  # touched, same bytes
            else:
                self.updated += 1
            for old_id in previous:
                if old_id != ref_id:
                    self.entries[old_id].paths.pop(f.path, None)
                    self._dirty.add(old_id)
            self.entries[ref_id].paths[f.path] = signature
            self.owners[f.path] = [ref_id]
            self._dirty.add(ref_id)
        return new

    def _skip(self, path: str, reason: str) -> None:
        """Record a file that cannot be used; if the store listed it, its old picture is no longer there."""
        self.skipped.append({"path": path, "reason": reason})
        for old_id in self.owners.pop(path, []):
            self.entries[old_id].paths.pop(path, None)
            self._dirty.add(old_id)

    def _flush(self, new: list[tuple[str, Image.Image]], final: bool = False) -> None:
        """Write new pictures now; changed path maps and entries left without a path once enough have gathered.

        New pictures are the work worth keeping, so they go at every batch. Path-map changes (a touched
        file's new mtime, a path that moved to another picture) wait, because Chroma's cost is per call,
        and losing them costs nothing: the next run sees those files as changed (a stale signature, or a
        path listed by two entries) and settles them. They are written after the new pictures, so a crash
        never leaves a file that no entry lists.
        """
        collection = self.store._ensure_collection()
        new_ids = [ref_id for ref_id, _ in new]
        if new:
            t0 = time.perf_counter()
            vectors = self.embedder.embed_images([picture for _, picture in new], batch_size=self.batch_size)
            self.timings["embed"] += time.perf_counter() - t0
            if vectors.shape != (len(new), self.store.dim):
                raise RuntimeError(f"embedder returned {vectors.shape}, expected ({len(new)}, {self.store.dim})")
            if self.screen is not None:  # the safety gate at index time: a flagged picture is skipped, not stored
                reasons = self.screen(vectors)
                for (ref_id, _), reason in zip(new, reasons, strict=True):
                    for path in list(self.entries[ref_id].paths) if reason else []:
                        self._skip(path, reason)
                        self.added = max(0, self.added - 1)
                keep = [n for n, reason in enumerate(reasons) if not reason]
                new, vectors = [new[n] for n in keep], vectors[keep]
                new_ids = [ref_id for ref_id, _ in new]
        t0 = time.perf_counter()
        if new:
            collection.upsert(ids=new_ids, embeddings=vectors, metadatas=[self._metadata(i) for i in new_ids])
            self._dirty.difference_update(new_ids)
        if self._dirty and (final or len(self._dirty) >= _METADATA_FLUSH):
            changed = [i for i in sorted(self._dirty) if self.entries[i].paths]
            for start in range(0, len(changed), _WRITE_CHUNK):
                chunk = changed[start:start + _WRITE_CHUNK]
                collection.update(ids=chunk, metadatas=[self._metadata(i) for i in chunk])
            emptied = [i for i in sorted(self._dirty) if not self.entries[i].paths]
            for start in range(0, len(emptied), _WRITE_CHUNK):
                collection.delete(ids=emptied[start:start + _WRITE_CHUNK])
            for ref_id in emptied:
                del self.entries[ref_id]
            self._dirty.clear()
        self.timings["store_write"] += time.perf_counter() - t0

    def _metadata(self, ref_id: str) -> dict[str, Any]:
        entry = self.entries[ref_id]
        ordered = sorted(entry.paths)
        caption = ""
        for path in ordered:  # the first path whose sidecar has text
            caption = read_caption(sidecar_path(path) if entry.paths[path][2] >= 0 else None)
            if caption:
                break
        entry.meta.update(path=ordered[0], paths=json.dumps(entry.paths, sort_keys=True), caption=caption,
                          indexed_at=round(time.time(), 3))
        return dict(entry.meta)

    def prune(self, roots: list[str]) -> None:
        """Forget paths under ``roots`` whose file is gone; entries left without a path are deleted."""
        prefixes = [r.rstrip(os.sep) + os.sep for r in roots]
        for ref_id, entry in list(self.entries.items()):
            for path in list(entry.paths):
                inside = any(path == r or path.startswith(p) for r, p in zip(roots, prefixes, strict=True))
                if inside and not os.path.isfile(path):
                    del entry.paths[path]
                    self.owners.pop(path, None)
                    self._dirty.add(ref_id)
                    self.removed += 1
        self._flush([], final=True)


# ----------------------------------------------------------------------------------------------
# Chroma clients
# ----------------------------------------------------------------------------------------------


def _chroma_settings() -> Any:
    from chromadb.config import Settings as ChromaSettings

    return ChromaSettings(anonymized_telemetry=False)


def _connect(location: str, create: bool) -> Any:
    """A Chroma client for the location; None for an embedded store that does not exist (and is not created)."""
    import chromadb

    if is_server_uri(location):
        url = urlparse(location)
        if not url.hostname:
            raise UserError(f"store {location!r}: expected http://host:port")
        port = url.port or (443 if url.scheme == "https" else 8000)
        try:
            client = chromadb.HttpClient(host=url.hostname, port=port, ssl=url.scheme == "https",
                                         settings=_chroma_settings())
            client.heartbeat()
        except Exception as exc:
            raise UserError(f"cannot reach the Chroma server at {location} ({type(exc).__name__}); start one with "
                            f"`chroma run --path DIR --host {url.hostname} --port {port}`") from None
        return client
    path = Path(location)
    if path.exists() and not path.is_dir():
        raise UserError(f"store {location}: exists and is not a directory")
    if not create and not (path / "chroma.sqlite3").exists():
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{location}: cannot create the store: {exc.strerror or exc}") from None
    with _CLIENTS_LOCK:
        known = _CLIENTS.get(str(location))
    if known is not None:
        return _fresh_client(str(location), known[0])
    return _remember(str(location), _open_persistent(path))


def _open_persistent(path: Path) -> Any:
    import chromadb

    try:
        return chromadb.PersistentClient(path=str(path), settings=_chroma_settings())
    except Exception as exc:
        raise UserError(f"cannot open the store {path}: {exc}") from None


# Embedded Chroma keeps one "system" per path per process, and its vector index (HNSW) is read into memory once:
# pictures another process indexes later are counted (SQLite) but never returned by a query. So each path's
# client is remembered with the store's on-disk signature, and a changed signature (any write, by anyone) makes
# the next read reopen the path: ~0.2 s after a write, one os.stat per read otherwise.
_CLIENTS: dict[str, tuple[Any, tuple]] = {}
_CLIENTS_LOCK = threading.Lock()


def _disk_signature(location: str) -> tuple:
    """What changes on disk whenever anyone writes to an embedded store: its SQLite file (and journal)."""
    signature = []
    for name in ("chroma.sqlite3", "chroma.sqlite3-wal"):
        try:
            st = os.stat(os.path.join(location, name))
            signature.append((st.st_mtime_ns, st.st_size))
        except OSError:
            signature.append(None)
    return tuple(signature)


def _remember(location: str, client: Any) -> Any:
    with _CLIENTS_LOCK:
        _CLIENTS[location] = (client, _disk_signature(location))
    return client


def _fresh_client(location: str, client: Any) -> Any:
    """``client``, or a reopened one when the store changed on disk since it was opened (by this process or
    another). Every store object of the path moves to the one new client: the first to notice reopens."""
    with _CLIENTS_LOCK:
        known, signature = _CLIENTS.get(location, (client, None))
        if known is not client:
            return known  # already reopened by another store object of this path
        current = _disk_signature(location)
        if signature is None or current == signature:
            _CLIENTS[location] = (client, current)
            return client
        from chromadb.api.shared_system_client import SharedSystemClient

        # Forget this path's cached system (only this one) so that a new client reads the store afresh. The old
        # system is not stopped: a collection object still held elsewhere (an index job) keeps working on it.
        SharedSystemClient._identifier_to_system.pop(client._identifier, None)
        SharedSystemClient._identifier_to_refcount.pop(client._identifier, None)
        fresh = _open_persistent(Path(location))
        _CLIENTS[location] = (fresh, current)
        return fresh


def _get_collection(client: Any, name: str) -> Any:
    from chromadb.errors import NotFoundError

    try:
        return client.get_collection(name, embedding_function=None)
    except (NotFoundError, ValueError):
        return None


def store_census(store: str) -> tuple[str, int | None]:
    """(the store's location, how many pictures its imgrag collections hold); the count is None when an
    embedded store's folder holds no store yet (a new path, or a typo). Creates nothing and needs no
    embedder, so a run can say what it will retrieve from before any model loads. An unreachable server
    is a UserError."""
    location = store.strip()
    if not location:
        raise UserError("no store configured: set --store, IMGRAG_STORE or 'store' in a config file")
    if not is_server_uri(location):
        location = os.path.abspath(os.path.expanduser(location))
    client = _connect(location, create=False)
    if client is None:
        return location, None
    return location, sum(int(collection.count()) for collection, _ in _imgrag_collections(client))


def _imgrag_collections(client: Any) -> list[tuple[Any, dict[str, Any]]]:
    found = []
    for collection in client.list_collections():
        meta = collection.metadata or {}
        if "imgrag_embedder" in meta:
            found.append((collection, meta))
    return found

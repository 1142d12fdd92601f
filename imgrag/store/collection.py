"""The store itself: :class:`ReferenceStore`, one embedder's Chroma collection, opened, searched, indexed."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout
from PIL import Image

from imgrag.errors import UserError
from imgrag.settings import Settings
from imgrag.store.client import (
    chroma_client,
    collection_name,
    fresh_client,
    get_collection,
    imgrag_collections,
    is_server_uri,
)
from imgrag.store.entries import IndexSummary, Reference, StoredEntry, SupportsEmbedding
from imgrag.store.indexing import IndexJob
from imgrag.store.ranking import rank_references
from imgrag.store.walking import walk_images

LOCK_NAME = ".write.lock"


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
        client = chroma_client(location, create=False)
        collection = None
        if client is not None:
            collection = get_collection(client, collection_name(embedder_id, dim))
            if collection is not None and (collection.metadata or {}).get("imgrag_embedder") != embedder_id:
                raise UserError(f"store {location}: collection {collection.name} belongs to another embedder "
                                f"({(collection.metadata or {}).get('imgrag_embedder')!r})")
            if collection is None and not for_writing:
                others = imgrag_collections(client)
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
        and reopened when another process has written to the store since (see :func:`fresh_client`)."""
        if self._client is not None and not self.is_server:
            client = fresh_client(self.location, self._client)
            if client is not self._client:
                self._client, self._collection = client, None
        if self._collection is None:
            if self._client is None:
                self._client = chroma_client(self.location, create=False)
            if self._client is not None:
                self._collection = get_collection(self._client, self.name)
        return self._collection

    def count(self) -> int:
        """How many pictures (distinct contents) this embedder's collection holds."""
        collection = self._current()
        return 0 if collection is None else int(collection.count())

    def embeddings(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored image embeddings of these ids (unknown ids left out): what the safety gate checks."""
        collection = self._current()
        if collection is None or not ids:
            return {}
        got = collection.get(ids=list(ids), include=["embeddings"])
        return {i: np.asarray(v, dtype=np.float32) for i, v in zip(got["ids"], got["embeddings"], strict=True)}

    def ids(self) -> list[str]:
        """Every stored picture's id (the content hash the indexer gives it)."""
        collection = self._current()
        return [] if collection is None else list(collection.get(include=[])["ids"])

    def paths_of(self, ids: Sequence[str]) -> dict[str, list[str]]:
        """Every path the store knows for each of these ids (unknown ids left out): where one picture's copies
        are, so an exclusion of a file can cover its copies (``imgrag eval``'s gold pictures)."""
        collection = self._current()
        if collection is None or not ids:
            return {}
        got = collection.get(ids=list(ids), include=["metadatas"])
        out = {}
        for ref_id, meta in zip(got["ids"], got["metadatas"], strict=True):
            out[ref_id] = sorted(StoredEntry.from_meta(meta).paths)
        return out

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
        entries: dict[str, StoredEntry] = {}
        vectors: dict[str, np.ndarray] = {}
        for vector in query_vectors:
            for ref_id, meta, embedding, _ in self._query(vector, pool_size, with_embeddings=True):
                if ref_id not in entries:
                    ids.append(ref_id)
                    entries[ref_id] = StoredEntry.from_meta(meta)
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
                entry = StoredEntry.from_meta(meta)
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
            job = IndexJob(self, embedder, batch_size, timings, skipped)
            job.screen = screen
            job.load()
            job.run(files, progress)
            if prune:
                job.prune(roots)
            self.last_index_timings = {k: round(v, 4) for k, v in timings.items()}
            return IndexSummary(added=job.added, duplicates=job.duplicates, updated=job.updated,
                                unchanged=job.unchanged, removed=job.removed,
                                skipped=skipped, notes=job.notes, total=self.count(),
                                seconds=round(time.perf_counter() - start, 3))

    def ensure_collection(self) -> Any:
        """The store's Chroma collection, created (with its client, for an embedded store its folder) on first
        use: only writers call this, so a search of a store that was never indexed creates nothing."""
        if self._collection is None:
            if self._client is None:
                self._client = chroma_client(self.location, create=True)
            self._collection = self._client.get_or_create_collection(
                self.name, embedding_function=None, configuration={"hnsw": {"space": "cosine"}},
                metadata={"imgrag_embedder": self.embedder_id, "imgrag_dim": self.dim, "imgrag_store_version": 1})
        return self._collection

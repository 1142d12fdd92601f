"""One :meth:`imgrag.store.ReferenceStore.index` run: the stored state read into memory, files hashed, linked or
decoded, embedded and written in batches."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from PIL import Image

from imgrag.errors import UserError
from imgrag.file_names import is_text_name, stored_name
from imgrag.images import probe_image
from imgrag.store.entries import StoredEntry, SupportsEmbedding
from imgrag.store.walking import (
    ImageFile,
    caption_stat,
    content_digest,
    decode_image,
    read_caption,
    sidecar_path,
    user_reason,
)


class IndexTarget(Protocol):
    """What an index run needs of its store (:class:`imgrag.store.ReferenceStore`): the width of its vectors and
    its collection, created on first write. A protocol, so this module needs nothing of the store's own."""

    dim: int

    def ensure_collection(self) -> Any: ...


# Larger files are skipped: no reference picture needs them, and reading one costs memory per batch.
MAX_FILE_BYTES = 200 * 1024 * 1024

ID_HEX_CHARS = 32  # 128 bits of sha256: collisions are out of reach for any personal collection
_METADATA_PAGE = 5000  # Chroma rejects a get() of ~100k ids at once ("too many SQL variables")
_METADATA_FLUSH = 1000  # path-map changes gathered before they are written (see IndexJob._flush)
_WRITE_CHUNK = 1000  # ids per Chroma call; its limit is 5461


class IndexJob:
    """One index() run under the write lock: the stored state in memory, and the batched writes."""

    def __init__(self, store: IndexTarget, embedder: SupportsEmbedding, batch_size: int,
                 timings: dict[str, float], skipped: list[dict[str, str]]) -> None:
        self.store = store
        self.embedder = embedder
        self.batch_size = batch_size
        self.timings = timings
        self.skipped = skipped
        self.notes: list[dict[str, str]] = []  # files stored with something worth saying (a name that is not UTF-8)
        self.entries: dict[str, StoredEntry] = {}
        self.owners: dict[str, list[str]] = {}  # path -> ids whose path map lists it (normally one)
        self.added = self.duplicates = self.updated = self.unchanged = self.removed = 0
        self._dirty: set[str] = set()
        self.screen: Callable[[Any], list[str | None]] | None = None  # see ReferenceStore.index

    def load(self) -> None:
        """Every entry's metadata, paged: what the walk is compared against."""
        t0 = time.perf_counter()
        collection = self.store.ensure_collection()
        offset = 0
        while True:
            page = collection.get(include=["metadatas"], limit=_METADATA_PAGE, offset=offset)
            for ref_id, meta in zip(page["ids"], page["metadatas"], strict=True):
                entry = StoredEntry.from_meta(meta)
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
                    current = f.signature(caption_stat(f.caption_path))
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
                reason = (user_reason(exc, f.path) if isinstance(exc, UserError)
                          else f"cannot read: {exc.strerror or exc}")
                self._skip(f.path, reason)
                self.timings["read_hash"] += time.perf_counter() - t0
                continue
            digest = content_digest(data)
            ref_id = digest[:ID_HEX_CHARS]
            # The signature is of the bytes we read (the file may have changed since the walk).
            signature = [len(data), st.st_mtime_ns, *caption_stat(f.caption_path)]
            self.timings["read_hash"] += time.perf_counter() - t0
            known = ref_id in self.entries  # the same picture under another file (earlier, or in this run)
            if not known:
                t0 = time.perf_counter()
                try:
                    picture = decode_image(data, f.path)
                except UserError as exc:
                    self._skip(f.path, user_reason(exc, f.path))
                    continue
                finally:
                    self.timings["decode"] += time.perf_counter() - t0
                self.entries[ref_id] = StoredEntry({"sha256": digest, "width": width,
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
            if not is_text_name(f.path) and previous != [ref_id]:
                self.notes.append({"path": f.path, "note": "its name is not valid UTF-8: stored with its bytes and "
                                   "shown with \\x escapes (the file itself is untouched)"})
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
        collection = self.store.ensure_collection()
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
        # Chroma keeps text only: a name that is not UTF-8 is stored as its display name plus its bytes
        # (imgrag.file_names); path_bytes is always written so that a rename to a text name clears it.
        shown, raw = stored_name(ordered[0])
        entry.meta.update(path=shown, path_bytes=raw, paths=json.dumps(entry.paths, sort_keys=True),
                          caption=caption, indexed_at=round(time.time(), 3))
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

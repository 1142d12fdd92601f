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

The modules: ``ranking`` (the maths), ``walking`` (folders, captions, decoding a file), ``client`` (Chroma
clients, their cache, collection names, the census), ``entries`` (a reference and a stored entry),
``indexing`` (one index run) and ``collection`` (:class:`ReferenceStore`). Import from ``imgrag.store``.
"""

from imgrag.store.client import chroma_client, collection_name, index_hint, is_server_uri, store_census
from imgrag.store.collection import LOCK_NAME, ReferenceStore
from imgrag.store.entries import IndexSummary, Reference, SupportsEmbedding
from imgrag.store.indexing import MAX_FILE_BYTES
from imgrag.store.ranking import RankedPick, rank_references, reflective_scores
from imgrag.store.walking import ImageFile, content_digest, decode_image, read_caption, sidecar_path, walk_images

__all__ = [
    "index_hint",
    "LOCK_NAME", "MAX_FILE_BYTES", "ImageFile", "IndexSummary", "RankedPick", "Reference", "ReferenceStore",
    "SupportsEmbedding", "chroma_client", "collection_name", "content_digest", "decode_image", "is_server_uri",
    "rank_references", "read_caption", "reflective_scores", "sidecar_path", "store_census", "walk_images",
]

"""Chroma clients: an embedded store (a folder) or a server (``http://host:port``), the per-path client cache that
reopens a store another process wrote to, the collection name per embedder, and the census of a store."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from imgrag.errors import UserError


def collection_name(embedder_id: str, dim: int) -> str:
    """Chroma collection for an embedder: readable, within Chroma's name rules, unique by a hash."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in embedder_id.lower())
    slug = "-".join(part for part in slug.split("-") if part)[:48].strip("-") or "embedder"
    digest = hashlib.sha256(f"{embedder_id}|{dim}".encode()).hexdigest()[:10]
    return f"imgrag-{slug}-{dim}d-{digest}"


def is_server_uri(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def _chroma_settings() -> Any:
    from chromadb.config import Settings as ChromaSettings

    return ChromaSettings(anonymized_telemetry=False)


def chroma_client(location: str, create: bool) -> Any:
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
        return fresh_client(str(location), known[0])
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


def fresh_client(location: str, client: Any) -> Any:
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


def get_collection(client: Any, name: str) -> Any:
    """The collection ``name`` of ``client``, or None when there is none (creates nothing)."""
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
    client = chroma_client(location, create=False)
    if client is None:
        return location, None
    return location, sum(int(collection.count()) for collection, _ in imgrag_collections(client))


def imgrag_collections(client: Any) -> list[tuple[Any, dict[str, Any]]]:
    """Every collection of ``client`` that imgrag made (one per embedder), with its metadata."""
    found = []
    for collection in client.list_collections():
        meta = collection.metadata or {}
        if "imgrag_embedder" in meta:
            found.append((collection, meta))
    return found


def index_hint(profile: str, store: str | None = None) -> str:
    """The ``imgrag index`` command that fills ``store`` with ``profile``'s embedder, in backticks: the same
    --profile (and --store), so following the hint never indexes with another profile's models."""
    flags = [] if profile == "default" else [f"--profile {profile}"]
    if store:
        flags.append(f"--store {store}")
    return "`" + " ".join(["imgrag index PATH", *flags]) + "`"

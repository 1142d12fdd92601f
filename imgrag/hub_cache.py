"""Where a model setting points, and what of it is here: a local folder or a hub id, and for a hub id what the local
Hugging Face cache holds. Nothing here touches the network (imgrag never downloads during a run).

The lowest of the model-file modules: :mod:`imgrag.weights.checkpoints` (loading), :mod:`imgrag.weights.model_files`
(what each role needs), :mod:`imgrag.weights.adapters` and :mod:`imgrag.weights.single_file` all read a setting through
these, so they agree on what is local and what is cached.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["cached_file", "hub_cached", "is_local_ref", "read_json_object"]


def is_local_ref(ref: str) -> bool:
    """Whether a model setting names a path the user meant (absolute, relative, home) or one that exists; otherwise
    it is a hub id ``org/name``. E.g. ``"./kit/sdxl"`` and ``"~/models/x"`` are local, ``"org/name"`` is not unless a
    folder of that name exists here."""
    return ref.startswith(("/", ".", "~")) or Path(ref).expanduser().exists()


def hub_cached(repo_id: str) -> bool:
    """Whether a hub repository is complete in the local Hugging Face cache."""
    from huggingface_hub import snapshot_download  # its import costs ~0.3 s; a command that never asks pays nothing

    try:
        snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached, or not a valid repo id
        return False
    return True


def cached_file(repo: str | None, path: str) -> str | None:
    """The local path of one file of a hub repository in the Hugging Face cache, or None when it is not there."""
    from huggingface_hub import try_to_load_from_cache  # as in hub_cached

    found = try_to_load_from_cache(repo or "", path)
    return found if isinstance(found, str) else None


def read_json_object(path: Path) -> dict[str, Any]:
    """A model folder's small JSON file (``config.json``, ``model_index.json``, a shard index) as a dict; ``{}`` when
    it is missing, unreadable, not JSON or not an object, so the checks that read it report what is absent instead of
    failing here."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}

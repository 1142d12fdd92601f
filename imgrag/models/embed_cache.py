"""The IP-Adapter's image-encoder embeddings of reference pictures, computed once and kept beside the store.

A guided drawing runs the adapter's CLIP image encoder (ViT-H/14 for the SDXL adapters, 0.63 B parameters) on
every reference; a reference used again (the next round, the next prompt of a batch) gives the same embedding.
diffusers' pipelines take precomputed embeddings as ``ip_adapter_image_embeds`` (see
``prepare_ip_adapter_image_embeds`` in ``StableDiffusionXLPipeline``), so a cached reference skips the encoder.

Format: one **safetensors** file per reference, ``<folder>/<encoder identity>/<sha256 of the picture>.safetensors``
holding two tensors, ``cond`` (the encoder's output for the picture: the projected embedding for a plain adapter,
the penultimate hidden states for a "plus" one) and ``uncond`` (the negative half classifier-free guidance pairs
it with). safetensors rather than Chroma: these are per-picture tensors of a fixed shape read back whole, not
vectors searched by similarity, and safetensors loads without running code. The folder is ``ip_embeds/`` inside
a local store's folder (beside Chroma's own files), or ``<output_dir>/ip_embeds/`` for a Chroma server.

The key is the picture's content hash (its file's sha256, so a renamed or moved file still hits) and the encoder's
identity (:func:`encoder_identity`: its config, its preprocessing, a fingerprint of its weights, the dtype, the
device type and which output the adapter reads). Any change of encoder gives another identity, so its entries are
never read: the cache is invalidated by construction, never by a timestamp. A file that cannot be read, or whose
recorded identity differs, is a miss and is written again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgrag.atomic_files import atomic_path

FOLDER_NAME = "ip_embeds"
_SHA256 = frozenset("0123456789abcdef")


def cache_folder(settings: Any) -> Path:
    """Where the embedding cache of ``settings``' store lives (see the module docstring)."""
    store = str(settings.store)
    if store.startswith(("http://", "https://")):
        return Path(settings.output_dir) / FOLDER_NAME
    return Path(store).expanduser() / FOLDER_NAME


def encoder_identity(pipe: Any, output_hidden_states: bool) -> str:
    """A 24-hex-digit identity of the pipeline's loaded image encoder, as its embeddings depend on it.

    Hashes the encoder's config, the feature extractor's config (the preprocessing), the dtype, the device type,
    which output is read (``output_hidden_states``), and a fingerprint of every weight tensor: its name, shape and
    its first and last 32 values (any retrained or other encoder differs in all of them; hashing 0.63 B parameters
    whole would cost seconds per process)."""
    import torch

    encoder = pipe.image_encoder
    digest = hashlib.sha256()
    digest.update(encoder.config.to_json_string().encode())
    extractor = getattr(pipe, "feature_extractor", None)
    if extractor is not None:
        digest.update(json.dumps(extractor.to_dict(), sort_keys=True, default=str).encode())
    first = next(encoder.parameters())
    digest.update(f"{first.dtype}|{first.device.type}|{bool(output_hidden_states)}".encode())
    with torch.no_grad():
        for name, tensor in encoder.state_dict().items():
            flat = tensor.detach().reshape(-1)
            sample = torch.cat([flat[:32], flat[-32:]]).to("cpu", torch.float32).contiguous()
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:24]


@dataclass
class EmbeddingCache:
    """The per-reference embedding files under ``folder`` for one encoder identity; counts hits and misses."""

    folder: Path
    hits: int = 0
    misses: int = 0
    _memory: dict[tuple[str, str], tuple[Any, Any]] = field(default_factory=dict, repr=False)

    def _path(self, identity: str, sha256: str) -> Path | None:
        if len(sha256) != 64 or not set(sha256) <= _SHA256 or not set(identity) <= _SHA256:
            return None  # never a path built from text that is not a hash
        return self.folder / identity / f"{sha256}.safetensors"

    def get(self, identity: str, sha256: str | None) -> tuple[Any, Any] | None:
        """(cond, uncond) tensors on the CPU for a picture of this content hash, or None (a miss)."""
        if not sha256:
            return None
        if (identity, sha256) in self._memory:
            self.hits += 1
            return self._memory[(identity, sha256)]
        path = self._path(identity, sha256)
        found = None
        if path is not None and path.is_file():
            found = _read(path, identity)
        if found is None:
            self.misses += 1
            return None
        self._memory[(identity, sha256)] = found
        self.hits += 1
        return found

    def put(self, identity: str, sha256: str | None, cond: Any, uncond: Any) -> None:
        """Keep the tensors (any device; stored on the CPU) for this content hash; a write error only costs the
        cache (the drawing goes on)."""
        if not sha256:
            return
        cond, uncond = cond.detach().to("cpu").contiguous(), uncond.detach().to("cpu").contiguous()
        self._memory[(identity, sha256)] = (cond, uncond)
        path = self._path(identity, sha256)
        if path is None:
            return
        from safetensors.torch import save_file

        try:
            with atomic_path(path) as tmp:
                save_file({"cond": cond, "uncond": uncond}, str(tmp), metadata={"encoder": identity})
        except OSError:
            pass


def _read(path: Path, identity: str) -> tuple[Any, Any] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            if (fh.metadata() or {}).get("encoder") != identity or set(fh.keys()) != {"cond", "uncond"}:
                return None
            return fh.get_tensor("cond"), fh.get_tensor("uncond")
    except Exception:  # a damaged or foreign file: recompute
        return None

"""The image/text embedder: an open_clip model that turns pictures and text into comparable vectors.

Every vector it returns is float32 and L2-normalised, so a dot product is the cosine similarity.
The reference store keys its collections by :attr:`Embedder.model_id`: vectors from two different
models are not comparable, and the store refuses to mix them.

Checkpoints are named the open_clip way (``settings.models.embedder``):

- ``hf-hub:org/repo``: a Hugging Face repository (read from the local cache when offline);
- ``local-dir:/path``: a folder with ``open_clip_config.json`` and the weights (the tiny kit's format);
- ``ARCH`` (``ViT-B-32``) with ``settings.models.embedder_pretrained`` set to a weights file or a tag.

open_clip itself only *warns* when a ``local-dir:`` or ``hf-hub:`` checkpoint has no weights and then
builds a random model; we check first and raise :class:`~imgrag.errors.ModelLoadError` instead, because
random embeddings would silently fill the store with garbage.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imgrag.errors import ModelLoadError
from imgrag.hub_cache import hub_cached
from imgrag.settings import Settings
from imgrag.text import first_line
from imgrag.weights.checkpoints import download_hint, quiet_libraries
from imgrag.weights.model_files import is_torchscript_archive

log = logging.getLogger(__name__)

LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
# Bytes hashed at each end of a local weights file for its fingerprint: enough to tell two trainings
# (or two random seeds) apart, cheap enough for a 600 MB checkpoint on every load.
_FINGERPRINT_SPAN = 1 << 20


class Embedder:
    """An open_clip model with its preprocessing and tokenizer; see the module docstring."""

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, model_id: str, device: str = "cpu") -> None:
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.device = device
        self.dim = _output_dim(model)
        self.context_length = int(getattr(tokenizer, "context_length", 0) or 0)

    # ----- loading -----
    @classmethod
    def from_pretrained(cls, settings: Settings, device: str | None = None, *, place: bool = True) -> Embedder:
        """Load ``settings.models.embedder`` onto ``device`` (default: the settings' device and dtype).

        ``place=False`` leaves it in CPU RAM (in the dtype chosen for ``device``) for the model manager to move."""
        import open_clip

        name = settings.models.embedder.strip()
        pretrained = settings.models.embedder_pretrained.strip() or None
        if not name:
            raise ModelLoadError("models.embedder is empty: name an open_clip checkpoint")
        model_id = _model_identity(name, pretrained)
        try:
            if pretrained and not name.startswith((LOCAL_DIR, HF_HUB)) and \
                    is_torchscript_archive(Path(pretrained).expanduser()):
                model, preprocess, tokenizer = _load_openai_archive(name, Path(pretrained).expanduser())
            else:
                with quiet_libraries():  # a SigLIP's HF tokenizer and weights load through transformers
                    model, _, preprocess = open_clip.create_model_and_transforms(
                        name, pretrained=None if name.startswith((LOCAL_DIR, HF_HUB)) else pretrained)
                    tokenizer = open_clip.get_tokenizer(name)
        except ModelLoadError:
            raise
        except Exception as exc:  # open_clip raises RuntimeError/ValueError/FileNotFoundError/hub errors
            raise ModelLoadError(f"cannot load the embedder {name!r}: {first_line(exc)}") from exc
        embedder = cls(model, preprocess, tokenizer, model_id)
        device = device or settings.resolved_device()
        dtype = settings.torch_dtype() if device.startswith("cuda") else None
        return embedder.to(device if place else "cpu", dtype)

    def to(self, device: str, dtype: Any = None) -> Embedder:
        """Move the model (the model manager calls this to evict to CPU and bring back); returns self."""
        self.model.to(device=device, dtype=dtype) if dtype is not None else self.model.to(device)
        self.device = str(device)
        return self

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the weights: what the model manager budgets for."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    # ----- embedding -----
    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """Embed pictures with the model's own preprocessing: float32 [n, dim], rows of length 1."""
        import torch

        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        rows: list[np.ndarray] = []
        dtype = self._dtype()
        for start in range(0, len(images), batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[start:start + batch_size]])
            with torch.inference_mode():
                vectors = self.model.encode_image(batch.to(self.device, dtype))
            rows.append(vectors.float().cpu().numpy())
        return _normalise(rows, self.dim)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts: float32 [n, dim], rows of length 1. Text beyond the context is cut, with a warning."""
        import torch

        texts = [str(t) for t in texts]
        for text in texts:
            count = self._token_count(text)
            if count is not None and self.context_length and count > self.context_length:
                # A debug line only: the front ends say it once, in words (prompt_length_notice).
                log.debug("text of %d tokens cut to the embedder's %d: %.60r...", count, self.context_length, text)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        tokens = self.tokenizer(texts)
        with torch.inference_mode():
            vectors = self.model.encode_text(tokens.to(self.device))
        return _normalise([vectors.float().cpu().numpy()], self.dim)

    # ----- helpers -----
    def _dtype(self) -> Any:
        return next(self.model.parameters()).dtype

    def _token_count(self, text: str) -> int | None:
        """Tokens the text needs, start and end markers included; None when the tokenizer cannot say."""
        tok = self.tokenizer
        try:
            if hasattr(tok, "encode"):  # open_clip's SimpleTokenizer (CLIP's BPE)
                return len(tok.encode(text)) + 2
            inner = getattr(tok, "tokenizer", None)  # HFTokenizer / SigLipTokenizer wrap a transformers one
            if inner is not None:
                return len(inner(text)["input_ids"])
        except Exception:  # a count is only for the warning; never fail an embedding over it
            return None
        return None


# CLIP's text context, in tokens with the start and end markers: SDXL's two text encoders and CLIP scorers read
# no more (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision").
CLIP_CONTEXT = 77
_BPE: list[Any] = []


def clip_token_count(text: str) -> int:
    """Tokens CLIP's BPE (open_clip's ``SimpleTokenizer``, the vocabulary SDXL's encoders share) makes of
    ``text``, start and end markers included. No model is loaded; the vocabulary loads once (~0.3 s)."""
    if not _BPE:
        from open_clip.tokenizer import SimpleTokenizer

        _BPE.append(SimpleTokenizer())
    return len(_BPE[0].encode(text)) + 2


def prompt_length_notice(prompt: str, limit: int = CLIP_CONTEXT) -> str | None:
    """One line when ``prompt`` is longer than the text encoders read (SDXL's and CLIP's 77 tokens), naming
    where it is cut; None when it fits. A prompt of at most ``limit - 2`` characters always fits (a token covers
    at least one character), so short prompts cost no tokenizer."""
    if len(prompt) <= limit - 2:
        return None
    count = clip_token_count(prompt)
    if count <= limit:
        return None
    words = prompt.split()
    low, high = 0, len(words)  # binary search for the longest opening that fits: where the encoders stop reading
    while low < high:
        mid = (low + high + 1) // 2
        if clip_token_count(" ".join(words[:mid])) <= limit:
            low = mid
        else:
            high = mid - 1
    kept = " ".join(words[:low])
    tail = kept[-40:] if len(kept) > 40 else kept
    return (f"the prompt is {count} CLIP tokens; SDXL's text encoders and the CLIP scores read only the first "
            f"{limit} (up to \"…{tail}\"), so the rest changes nothing; put what matters first")


def _load_openai_archive(name: str, path: Path) -> tuple[Any, Any, Any]:
    """Load one of OpenAI's CLIP checkpoints (``ViT-B-32.pt``, what openai/CLIP and TinyIMGRAG download).

    They are TorchScript archives, which ``torch.load(weights_only=True)`` refuses. ``torch.jit.load`` reads
    them with TorchScript's own loader (tensors and compiled code, no arbitrary Python objects unpickled);
    open_clip's ``build_model_from_openai_state_dict`` (what its ``load_openai_model`` does, without that
    function's fallback to a plain ``torch.load``) rebuilds an eager model with QuickGELU, as OpenAI trained
    it. Raises ModelLoadError when the archive's architecture is not ``name``'s.
    """
    import open_clip
    import torch
    from open_clip.model import build_model_from_openai_state_dict

    with warnings.catch_warnings():  # "torch.jit.load is deprecated": it is still the one reader of these files
        warnings.simplefilter("ignore", FutureWarning)
        state = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    state.pop("attn_mask", None)  # a constant, not a weight: traced open_clip archives carry it, OpenAI's do not
    model = build_model_from_openai_state_dict(state, cast_dtype=None).float().eval()
    expected = open_clip.get_model_config(name) or {}
    widths = (expected.get("embed_dim"), expected.get("vision_cfg", {}).get("width"))
    found = (int(state["text_projection"].shape[1]), int(state["visual.conv1.weight"].shape[0]))
    if None not in widths and tuple(widths) != found:
        raise ModelLoadError(f"embedder weights {path} hold a CLIP of embedding/vision width {found}, not "
                             f"{name} {tuple(widths)}: set models.embedder to the archive's architecture")
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    model.visual.image_mean, model.visual.image_std = mean, std
    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False, mean=mean, std=std)
    return model, preprocess, open_clip.get_tokenizer(name, context_length=model.context_length)


def _normalise(chunks: list[np.ndarray], dim: int) -> np.ndarray:
    if not chunks:
        return np.zeros((0, dim), dtype=np.float32)
    vectors = np.concatenate(chunks).astype(np.float32, copy=False)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def _output_dim(model: Any) -> int:
    """The embedding width, from the model's own attributes (a dummy forward pass as a last resort)."""
    projection = getattr(model, "text_projection", None)
    if projection is not None and hasattr(projection, "shape"):
        return int(projection.shape[-1])
    visual_dim = getattr(getattr(model, "visual", None), "output_dim", None)
    if visual_dim:
        return int(visual_dim)
    import torch

    # The model's own context (SigLIP's is 64, not CLIP's 77): a custom-text model keeps it on its text tower.
    length = getattr(model, "context_length", None) or getattr(getattr(model, "text", None), "context_length", 77)
    with torch.inference_mode():
        return int(model.encode_text(torch.zeros(1, int(length), dtype=torch.long)).shape[-1])


def _model_identity(name: str, pretrained: str | None) -> str:
    """A stable identity for the checkpoint, checking on the way that its weights are really there.

    Hub names and pretrained tags name fixed weights, so the name is the identity. A local folder or
    file can be moved or rebuilt with other weights under the same path, so its identity is its base
    name plus a fingerprint of its content (config and both ends of the weights file).
    """
    if name.startswith(LOCAL_DIR):
        folder = Path(name[len(LOCAL_DIR):]).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(f"embedder checkpoint folder not found: {folder}")
        config = folder / "open_clip_config.json"
        if not config.is_file():
            raise ModelLoadError(f"embedder checkpoint {folder} has no open_clip_config.json")
        weights = sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
        if not weights:
            raise ModelLoadError(f"embedder checkpoint {folder} has no weights file (*.safetensors, *.bin, *.pth)")
        return f"local-dir:{folder.resolve().name}@{_fingerprint([config, *weights])}"
    if name.startswith(HF_HUB):
        repo = name[len(HF_HUB):]
        if not hub_cached(repo):
            raise ModelLoadError(f"embedder: {download_hint(repo)} (a local-dir: copy also works)")
        return name
    import open_clip

    if name.replace("/", "-") not in open_clip.list_models():
        raise ModelLoadError(f"unknown open_clip architecture {name!r} (see open_clip.list_models(); or use "
                             "hf-hub:org/repo or local-dir:/path)")
    if not pretrained:
        raise ModelLoadError(
            f"models.embedder {name!r} names an architecture without weights: set models.embedder_pretrained "
            "to a weights file or an open_clip tag, or use hf-hub:/local-dir:")
    if any(sep in pretrained for sep in ("/", os.sep)) or pretrained.endswith(_WEIGHT_SUFFIXES):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"embedder weights file not found: {path}")
        return f"{name}@{path.name}@{_fingerprint([path])}"
    return f"{name}/{pretrained}"


def _fingerprint(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}:".encode())
        with path.open("rb") as fh:
            digest.update(fh.read(_FINGERPRINT_SPAN))
            if size > 2 * _FINGERPRINT_SPAN:
                fh.seek(-_FINGERPRINT_SPAN, os.SEEK_END)
                digest.update(fh.read(_FINGERPRINT_SPAN))
    return digest.hexdigest()[:12]

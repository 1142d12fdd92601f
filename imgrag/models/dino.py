"""DINO image embeddings for ``imgrag eval``'s image-image scores (ImageRAG, arXiv 2502.09411, reports them).

Loaded with transformers' ``AutoModel`` + ``AutoImageProcessor`` from ``models.dino`` (a hub id, or a local
folder) into CPU RAM: ``facebook/dino-vits16`` (DINO ViT-S/16, Caron et al. 2021, arXiv 2104.14294; 22 M
parameters), the DINO ImageRAG's evaluation code loads, or a DINOv2 such as ``facebook/dinov2-base`` (86 M). The
model manager registers it as "dino" (:func:`imgrag.management.engine.build_manager`) and moves it onto the device
within
the budget like every other model.

The embedding is the class token after the final layer norm, which is what DINO's own ``forward`` returns and what
DINOv2's pooled output is; a ViT's ``pooler_output`` is a dense+tanh layer that the DINO checkpoints do not have
(transformers would initialise it at random), so it is never used.
"""

from __future__ import annotations

from typing import Any

from imgrag.errors import ModelLoadError
from imgrag.text import first_line
from imgrag.weights.checkpoints import quiet_libraries


class DinoScorer:
    """DINO / DINOv2 image embeddings (the CLS token after the final layer norm) for image-image similarity."""

    def __init__(self, checkpoint: str, device: str = "cpu", dtype: Any = None) -> None:
        """Load ``checkpoint`` in ``dtype`` onto ``device`` (the manager's loader keeps it on "cpu");
        a ``ModelLoadError`` naming the checkpoint when it cannot."""
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        try:
            with quiet_libraries():  # no "Loading weights" bar nor library warnings on the command line's stderr
                self.processor = AutoImageProcessor.from_pretrained(checkpoint, trust_remote_code=False)
                kind = AutoConfig.from_pretrained(checkpoint, trust_remote_code=False).model_type
                extra = {"add_pooling_layer": False} if kind == "vit" else {}  # DINO ships no pooler (see above)
                self.model = AutoModel.from_pretrained(checkpoint, dtype=dtype, trust_remote_code=False,
                                                       use_safetensors=True, **extra).to(device).eval()
        except Exception as exc:  # transformers raises OSError/ValueError/hub errors; name the checkpoint
            raise ModelLoadError(f"cannot load the DINO checkpoint {checkpoint!r}: {first_line(exc)}") from exc
        self.checkpoint = checkpoint
        self.device = device

    def to(self, device: str) -> DinoScorer:
        """Move the model (the model manager calls this); returns self."""
        self.model.to(device)
        self.device = str(device)
        return self

    def embed(self, images: list[Any]) -> Any:
        """One unit vector per picture (float32 numpy, [n, hidden])."""
        import numpy as np
        import torch

        inputs = self.processor(images=images, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, next(self.model.parameters()).dtype)
        with torch.inference_mode():
            out = self.model(pixel_values=pixel_values)
        vectors = out.last_hidden_state[:, 0].float().cpu().numpy()
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

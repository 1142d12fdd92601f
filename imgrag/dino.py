"""DINOv2 image embeddings for ``imgrag eval``'s image-image scores (ImageRAG, arXiv 2502.09411, reports them).

Loaded with transformers' ``AutoModel`` + ``AutoImageProcessor`` from ``models.dino`` (a hub id such as
``facebook/dinov2-base``, or a local folder) into CPU RAM; the model manager registers it as "dino"
(:func:`imgrag.engine.build_manager`) and moves it onto the device within the budget like every other
model. DINOv2-base is 86 M parameters (0.2 GB in fp16).
"""

from __future__ import annotations

from typing import Any


class DinoScorer:
    """DINOv2 image embeddings (the CLS token after the final layer norm) for image-image similarity."""

    def __init__(self, checkpoint: str, device: str = "cpu", dtype: Any = None) -> None:
        """Load ``checkpoint`` in ``dtype`` onto ``device`` (the manager's loader keeps it on "cpu");
        a ``ModelLoadError`` naming the checkpoint when it cannot."""
        from transformers import AutoImageProcessor, AutoModel

        from imgrag.checkpoints import first_line
        from imgrag.errors import ModelLoadError

        try:
            self.processor = AutoImageProcessor.from_pretrained(checkpoint)
            self.model = AutoModel.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
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
        pooled = getattr(out, "pooler_output", None)
        vectors = (pooled if pooled is not None else out.last_hidden_state[:, 0]).float().cpu().numpy()
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

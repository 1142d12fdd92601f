"""``imgrag eval``'s scores of a drawing: text-image and image-image similarities, and the judge's match.

ImageRAG (Shalev-Arkushin et al., arXiv 2502.09411; its project page, rotem-shalev.github.io/ImageRAG, "Evaluation")
reports "CLIP, SigLIP text-to-image similarities, and DINO similarity between real and generated images". The
checkpoints its evaluation code loads (the public re-implementation github.com/Tonkic/ImageRAG, evaluate_cub.py,
follows it): open_clip ``ViT-B-32`` / ``laion2b_s34b_b79k`` for CLIP (imgrag's default embedder,
``hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K``), ``hf-hub:timm/ViT-SO400M-14-SigLIP-384`` for SigLIP, and DINO
ViT-S/16 (``dino_vits16``; on the hub as ``facebook/dino-vits16``) for DINO.

Which model gives which score (every vector unit length, every score a cosine in -1..1):

- ``clip_text``: the profile's embedder, drawing against the prompt. The agent's loop selects its answer with this
  (after the judge's match), so it is marked in eval.json and never the headline;
- ``clip_gold``: the same embedder, drawing against each gold picture, averaged;
- ``siglip_text``: ``models.siglip`` (an open_clip name), drawing against the prompt;
- ``dino_gold``: ``models.dino`` (transformers), drawing against each gold picture, averaged;
- ``judge_match``: the judge's verdict on the drawing (1 or 0); also what the loop selects with.

A scorer whose checkpoint is not configured gives no score (the column stays empty) and eval.json says so.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from imgrag.images import UnreadableImage, open_image
from imgrag.management.engine import register_dino, register_siglip

IMAGERAG_CHECKPOINTS = {"clip": "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
                        "siglip": "hf-hub:timm/ViT-SO400M-14-SigLIP-384", "dino": "facebook/dino-vits16"}


def scorer_names(settings: Any) -> dict[str, str | None]:
    """Per score, the checkpoint that gives it (None: not configured, so not taken)."""
    m = settings.models
    return {"clip_text": m.embedder, "clip_gold": m.embedder, "siglip_text": m.siglip.strip() or None,
            "dino_gold": m.dino.strip() or None, "judge_match": m.judge}


def _mean_cosine(vector: np.ndarray, others: np.ndarray) -> float:
    sims = _unit(others) @ _unit(vector[None, :])[0]
    return float(np.mean(sims))


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


class Scorers:
    """The scores of :mod:`imgrag.scoring.scorers` over one model manager ("embedder", "judge", and "siglip"/"dino" when
    configured: registered here if the manager was built without them). Gold pictures are embedded once each."""

    def __init__(self, settings: Any, manager: Any) -> None:
        self.settings = settings
        self.manager = manager
        names = scorer_names(settings)
        self.text_image = {"clip_text": "embedder"}
        self.image_image = {"clip_gold": "embedder"}
        if names["siglip_text"]:
            if "siglip" not in manager.names():
                register_siglip(manager, settings)
            self.text_image["siglip_text"] = "siglip"
        if names["dino_gold"]:
            if "dino" not in manager.names():
                register_dino(manager, settings)
            self.image_image["dino_gold"] = "dino"
        self._gold: dict[tuple[str, str], np.ndarray] = {}
        self.skipped: dict[str, str] = {}  # gold path -> why it could not be decoded

    def _embed(self, model: str, images: list[Any]) -> np.ndarray:
        if model == "dino":
            return np.asarray(self.manager.run("dino", lambda d: d.embed(images)))
        return np.asarray(self.manager.run(model, lambda e: e.embed_images(images)))

    def _gold_vectors(self, model: str, gold: list[str]) -> np.ndarray | None:
        """The gold pictures' vectors under ``model``; a gold file that cannot be decoded is left out (and listed in
        ``skipped``), so one broken picture costs only itself. None when none is readable."""
        todo = [p for p in gold if (model, p) not in self._gold and p not in self.skipped]
        pictures = {}
        for path in todo:
            try:
                pictures[path] = open_image(path)
            except UnreadableImage as exc:
                self.skipped[path] = exc.reason
        if pictures:
            for path, vector in zip(pictures, self._embed(model, list(pictures.values())), strict=True):
                self._gold[(model, path)] = vector
        vectors = [self._gold[(model, p)] for p in gold if (model, p) in self._gold]
        return np.stack(vectors) if vectors else None

    def score(self, prompt: str, images: dict[str, str], gold: list[str],
              verdicts: dict[str, dict[str, Any] | None] | None = None) -> dict[str, dict[str, Any]]:
        """Scores of each named picture (``{name: path}``) for ``prompt`` against the ``gold`` paths:
        ``{name: {metric: value}}``, values rounded to 4 places. ``verdicts`` are judge verdicts already made
        (the loop's own); a picture without one is judged here, and the verdict kept as ``verdict``."""
        names = list(images)
        out: dict[str, dict[str, Any]] = {name: {} for name in names}
        if not names:
            return out
        pictures = [open_image(images[name]) for name in names]
        for metric, model in self.text_image.items():
            vectors = self._embed(model, pictures)
            text = np.asarray(self.manager.run(model, lambda e: e.embed_texts([prompt])))[0]
            for name, vector in zip(names, vectors, strict=True):
                out[name][metric] = round(_mean_cosine(text, vector[None, :]), 4)
        if gold:
            for metric, model in self.image_image.items():
                references = self._gold_vectors(model, gold)
                if references is None:
                    continue
                vectors = self._embed(model, pictures)
                for name, vector in zip(names, vectors, strict=True):
                    out[name][metric] = round(_mean_cosine(vector, references), 4)
        for name, picture in zip(names, pictures, strict=True):
            verdict = (verdicts or {}).get(name)
            if verdict is None:
                verdict = self.manager.run("judge", lambda j, picture=picture: j.judge(picture, prompt).to_dict())
                out[name]["verdict"] = verdict
            out[name]["judge_match"] = bool(verdict.get("match"))
        return out

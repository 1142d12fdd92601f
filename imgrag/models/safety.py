"""The safety gate: a zero-shot CLIP check of references and outputs against a list of unsafe concepts.

No new model: it compares the CLIP image embeddings imgrag already has (the store's vectors for references, the
vector computed for a drawing's CLIP score) with the text embeddings of ``safety.concepts``, as CLIP's own
zero-shot classification does (Radford et al. 2021, arXiv 2103.00020), and as the Stable Diffusion safety
checker does with its fixed concept embeddings (CompVis/stable-diffusion-safety-checker).

Rule: a picture is **flagged** when its cosine similarity to any concept's text embedding is at least
``safety.threshold``. Both vectors are L2-normalised, so the score is in -1..1. For open_clip ViT-B-32
(laion2b), a caption that describes a picture typically scores about 0.25-0.35 and an unrelated one about
0.05-0.20, hence the default 0.26; raise it for fewer false alarms, lower it to catch more. Check a concept's
scores on your own collection with ``imgrag search "CONCEPT" --json``. The check is off until ``safety.enabled``
is set, because that threshold was not measured here (no real CLIP weights on the machines this was built on).

Besides the check, ``safety.exclude`` lists folders (or files) the store must never retrieve from, whatever their
content: see :func:`excluded_by`. An entry is a literal path (``scans [old]`` is that folder, brackets and all)
unless it starts with ``glob:`` (``glob:*/scans/id-*``, Python's ``fnmatch``, matched against the whole path).
Both sides are compared after resolving symbolic links, so a link into an excluded folder is excluded too.

What it cannot do: a zero-shot check at a fixed threshold misses what the concepts do not name, what CLIP does
not see (small regions, text in the picture, context), and errs both ways near the threshold; it knows nothing
of copyright or of who is in a photo. It reduces what reaches a drawing; it proves nothing.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Flag:
    """Why a picture was flagged: the concept it came closest to and that cosine similarity."""

    concept: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"concept": self.concept, "score": round(float(self.score), 4)}


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1.0, norms)


def flags(image_vectors: np.ndarray, concept_vectors: np.ndarray, concepts: Sequence[str],
          threshold: float) -> list[Flag | None]:
    """One entry per image: a :class:`Flag` for its closest concept when that cosine similarity is at least
    ``threshold``, else None. ``image_vectors`` is (n, d), ``concept_vectors`` (len(concepts), d); both are
    normalised here. No concept: nothing is flagged."""
    if len(concepts) == 0 or len(image_vectors) == 0:
        return [None] * len(image_vectors)
    sims = _normalise(image_vectors) @ _normalise(concept_vectors).T  # (n, c) cosine similarities
    best = sims.argmax(axis=1)
    return [Flag(concepts[int(j)], float(sims[i, j])) if sims[i, j] >= threshold else None
            for i, j in enumerate(best)]


GLOB_PREFIX = "glob:"


def _forms(path: str) -> set[str]:
    """``path`` absolute (``~`` expanded) as written and with every symbolic link resolved."""
    written = os.path.abspath(os.path.expanduser(path))
    return {written, os.path.realpath(written)}


def excluded_by(path: str | Path, patterns: Sequence[str]) -> str | None:
    """The first ``safety.exclude`` entry that covers ``path``, or None.

    An entry is a literal path (a folder covers everything under it; a file covers itself), whatever characters
    its name holds (``[``, ``*``, ``?``, spaces, any script); ``glob:PATTERN`` is an ``fnmatch`` pattern on the whole
    absolute path (``*`` also crosses ``/``). Both ``path`` and each entry are compared absolute (``~`` expanded), as
    written and with symbolic links resolved: a link into an excluded folder, and a link kept inside one that points
    elsewhere, are both excluded (what the link leads to, and where it was found)."""
    candidates = _forms(str(path))
    for pattern in patterns:
        if pattern.startswith(GLOB_PREFIX):
            expanded = os.path.expanduser(pattern[len(GLOB_PREFIX):])
            target = expanded if os.path.isabs(expanded) or expanded.startswith("*") else os.path.abspath(expanded)
            if any(fnmatch.fnmatchcase(full, target) for full in candidates):
                return pattern
            continue
        for folder in _forms(pattern):
            folder = folder.rstrip(os.sep) or os.sep
            prefix = folder if folder.endswith(os.sep) else folder + os.sep
            if any(full == folder or full.startswith(prefix) for full in candidates):
                return pattern
    return None


def concept_check_on(settings: Any) -> bool:
    """Whether the concept check runs for ``safety`` settings (``safety.enabled`` and at least one concept): when it
    is off, no gate is built, no concept is embedded and no picture's vector is checked (``safety.exclude`` still
    applies, as :func:`excluded_by`)."""
    return bool(settings.enabled and settings.concepts)


class SafetyGate:
    """The gate of one run or index job: ``safety`` settings plus an embedder for the concepts' text vectors.

    ``embedder`` has ``embed_texts(list[str]) -> (n, d) array`` (imgrag's Embedder, or ManagedEmbedder); the
    concepts are embedded once, on first use."""

    def __init__(self, settings: Any, embedder: Any) -> None:
        self.settings = settings  # imgrag.settings.SafetySettings
        self.embedder = embedder
        self._concept_vectors: np.ndarray | None = None

    @property
    def enabled(self) -> bool:
        return concept_check_on(self.settings)

    def concept_vectors(self) -> np.ndarray:
        if self._concept_vectors is None:
            self._concept_vectors = np.asarray(self.embedder.embed_texts(list(self.settings.concepts)))
        return self._concept_vectors

    def check(self, image_vectors: np.ndarray) -> list[Flag | None]:
        """:func:`flags` against the configured concepts and threshold (all None when the gate is off)."""
        if not self.enabled:
            return [None] * len(image_vectors)
        return flags(image_vectors, self.concept_vectors(), self.settings.concepts, self.settings.threshold)

    def excluded(self, path: str | Path) -> str | None:
        """:func:`excluded_by` with ``safety.exclude`` (applies even when the concept check is off)."""
        return excluded_by(path, self.settings.exclude)


def index_screen(settings: Any, embedder: Any) -> Any:
    """The ``screen`` for :meth:`imgrag.store.ReferenceStore.index` when ``safety.skip_flagged_at_index`` is set
    (the check runs then even if ``safety.enabled`` is off: asking to skip is asking to check), else None.

    It maps a batch of image embeddings to a skip reason per picture (None: store it)."""
    if not settings.skip_flagged_at_index or not settings.concepts:
        return None
    gate = SafetyGate(dataclasses.replace(settings, enabled=True), embedder)

    def screen(vectors: np.ndarray) -> list[str | None]:
        return [None if flag is None else f"flagged as unsafe: {flag.concept} (similarity {flag.score:.3f})"
                for flag in gate.check(vectors)]

    return screen

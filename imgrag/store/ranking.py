"""The ranking maths of retrieval: RealRAG's reflective score and the per-query pick of references.

Pure numpy, tested on constructed vectors; :meth:`imgrag.store.ReferenceStore.retrieve` feeds it the similarities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RankedPick:
    """Reference ``ref`` (a column of the similarity matrix) chosen for query ``query``."""

    ref: int
    query: int
    score: float
    similarity: float


def reflective_scores(similarities: np.ndarray, avoid_similarities: np.ndarray | None,
                      rerank_lambda: float) -> np.ndarray:
    """RealRAG's reflective score: ``sim(query, ref) - λ·sim(candidate, ref)`` for every query and ref.

    ``similarities`` is [queries, refs]; ``avoid_similarities`` is [refs] (None: no candidate, no penalty).
    """
    scores = np.asarray(similarities, dtype=np.float64)
    if avoid_similarities is None or rerank_lambda == 0:
        return scores.copy()
    return scores - float(rerank_lambda) * np.asarray(avoid_similarities, dtype=np.float64)[None, :]


def rank_references(similarities: np.ndarray, avoid_similarities: np.ndarray | None, k: int,
                    rerank_lambda: float = 0.3, min_score: float = -1.0) -> list[RankedPick]:
    """Pick up to ``k`` distinct references per query from a shared pool.

    - ``min_score`` filters on relevance, ``sim(query, ref)``, before any re-ranking: a reference
      unrelated to the query is never chosen because it happens to be far from the candidate.
    - Pairs are taken best re-ranked score first; a reference is used once, by the query it scores
      best with while that query still has room (so it keeps its best score, and a reference two
      concepts both want does not take a slot from each).
    - The order interleaves the queries (each one's best, then each one's second, ...), so a caller that
      keeps only the first few references still covers every concept.
    """
    sims = np.asarray(similarities, dtype=np.float64)
    if sims.ndim != 2:
        raise ValueError("similarities must be [queries, refs]")
    if k < 1 or sims.size == 0:
        return []
    scores = reflective_scores(sims, avoid_similarities, rerank_lambda)
    n_queries, _ = sims.shape
    query_idx, ref_idx = np.nonzero(sims >= min_score)
    # Best score first; ties by query then ref index, so the result is deterministic.
    order = sorted(zip(query_idx.tolist(), ref_idx.tolist(), strict=True),
                   key=lambda qr: (-scores[qr[0], qr[1]], qr[0], qr[1]))
    taken: set[int] = set()
    per_query: list[list[RankedPick]] = [[] for _ in range(n_queries)]
    for q, r in order:
        if r in taken or len(per_query[q]) >= k:
            continue
        taken.add(r)
        per_query[q].append(RankedPick(r, q, float(scores[q, r]), float(sims[q, r])))
    picks: list[RankedPick] = []
    for rank in range(k):
        tier = [chosen[rank] for chosen in per_query if len(chosen) > rank]
        picks.extend(sorted(tier, key=lambda p: -p.score))
    return picks

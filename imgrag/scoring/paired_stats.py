"""Paired differences with bootstrap intervals: how ``imgrag eval`` says whether an arm beats plain SDXL.

Each prompt is drawn by every arm on the same seed, so the natural comparison is per prompt: the difference
``arm - plain`` of one metric on one prompt. Over the prompts this module reports the mean difference, a 95 %
percentile-bootstrap interval of that mean (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13:
resample the prompts with replacement, take the mean each time, read the 2.5th and 97.5th percentiles), and the
shares of prompts the arm improved and worsened. Differences of exactly 0 (the arm returned the plain picture)
count as neither.

The resampling uses numpy's ``default_rng(seed)``, so the same differences and seed give the same interval on
every machine. With few prompts the interval is wide; an interval that contains 0 says the evaluation cannot
tell the arm from plain generation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedSummary:
    """One metric of one arm against the baseline, over the prompts both were scored on.

    ``mean_diff`` is the mean of ``arm - baseline``; ``ci_low``/``ci_high`` its bootstrap interval at
    ``confidence``; ``improved``/``worsened`` the shares (0..1) of prompts with a positive/negative difference.
    Means and interval are None when no prompt has both values (``n == 0``)."""

    metric: str
    arm: str
    baseline: str
    n: int
    mean_arm: float | None
    mean_baseline: float | None
    mean_diff: float | None
    ci_low: float | None
    ci_high: float | None
    improved: float | None
    worsened: float | None
    confidence: float = CONFIDENCE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired(arm: Sequence[float | None], baseline: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray]:
    """The prompts scored in both (``arm[i]`` and ``baseline[i]`` present and finite), as two float64 arrays
    of equal length. ``arm`` and ``baseline`` must be aligned by prompt (ValueError otherwise)."""
    if len(arm) != len(baseline):
        raise ValueError(f"paired values need the same prompts: {len(arm)} against {len(baseline)}")
    keep = [(float(a), float(b)) for a, b in zip(arm, baseline, strict=True)
            if _finite(a) and _finite(b)]
    if not keep:
        return np.zeros(0), np.zeros(0)
    values = np.asarray(keep, dtype=np.float64)
    return values[:, 0], values[:, 1]


def bootstrap_interval(differences: Sequence[float], *, resamples: int = BOOTSTRAP_RESAMPLES,
                       confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``differences`` (float, [n], n >= 1).

    ``resamples`` sets of n prompts are drawn with replacement by ``np.random.default_rng(seed)``; the interval
    is the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of their means (numpy's default linear
    interpolation). One difference gives the interval (d, d). ValueError for no differences."""
    d = np.asarray(differences, dtype=np.float64).ravel()
    if d.size == 0:
        raise ValueError("a bootstrap interval needs at least one difference")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    low, high = np.quantile(means, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
    return float(low), float(high)


def summarise(metric: str, arm_name: str, arm: Sequence[float | None], baseline: Sequence[float | None], *,
              baseline_name: str = "plain", seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES,
              digits: int = 4) -> PairedSummary:
    """:class:`PairedSummary` of ``arm`` against ``baseline`` (aligned by prompt; None where not scored)."""
    a, b = paired(arm, baseline)
    if a.size == 0:
        return PairedSummary(metric, arm_name, baseline_name, 0, None, None, None, None, None, None, None)
    d = a - b
    low, high = bootstrap_interval(d, resamples=resamples, seed=seed)

    def r(x: float) -> float:
        return round(float(x), digits)

    return PairedSummary(metric, arm_name, baseline_name, int(d.size), r(a.mean()), r(b.mean()), r(d.mean()),
                         r(low), r(high), r(np.mean(d > 0)), r(np.mean(d < 0)))


def _finite(value: Any) -> bool:
    # A judge's match (bool) counts as 0 or 1.
    return isinstance(value, bool) or (isinstance(value, (int, float)) and math.isfinite(value))

"""The run's time budget inside long model calls.

A deadline is a ``time.monotonic()`` instant. Drawings check it at each denoising step (see
:meth:`imgrag.models.generator.Generator.generate`); text generations through transformers' ``max_time``,
a stopping criterion checked after every token.
"""

from __future__ import annotations

import time


def time_limit(deadline: float | None) -> dict[str, float]:
    """``generate()`` keyword arguments that stop a generation at ``deadline``: transformers' ``max_time``
    (seconds, measured from the call; 0 stops after the first token). Empty without a deadline."""
    if deadline is None:
        return {}
    return {"max_time": max(0.0, deadline - time.monotonic())}

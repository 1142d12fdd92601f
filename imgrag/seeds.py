"""Seeds: the one place that says which seeds a drawing accepts.

torch's ``Generator.manual_seed`` takes integers in [-2**63, 2**64 - 1] and raises a RuntimeError
outside it; imgrag accepts the non-negative part, so a seed means the same thing in a file, on the
command line, from the LLM and in ``result.json``. Every boundary (CLI, prompt files, tool
arguments, the generator) checks with :func:`check_seed` and gets the same one-line error.
"""

from __future__ import annotations

from typing import Any

from imgrag.errors import UserError

SEED_MIN = 0
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed's upper end


def check_seed(value: Any, what: str = "seed") -> int:
    """``value`` as an int seed in [SEED_MIN, SEED_MAX]; a UserError naming ``what`` otherwise.

    Accepts ints and integral floats (an LLM writes ``3.0``); rejects booleans, fractions, text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{what} must be a whole number between {SEED_MIN} and {SEED_MAX}, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise UserError(f"{what} must be a whole number, got {value!r}")
        value = int(value)
    if not SEED_MIN <= value <= SEED_MAX:
        raise UserError(f"{what} must be between {SEED_MIN} and {SEED_MAX} (torch's seed range), got {value}")
    return value

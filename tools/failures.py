"""What a step of a run catches: one rule for the agent's tools and the runner's own steps (the final redraw).

A step that fails becomes an error the run goes on from (the planner reads it; the trace keeps it), never the
end of the run: a user's mistake (:class:`imgrag.errors.UserError`), an argument the LLM got wrong
(:class:`ToolArgumentError`), and any other exception (a model or generator error, out of memory, a vanished or
unreadable file). The one exception a step does not catch is a full disk: no step can succeed until space is freed,
so it is raised again and the runner closes the run's record for it (one line, a resume hint).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any

from imgrag.errors import UserError
from imgrag.records.runs import is_disk_full
from imgrag.text import describe_error

# The part of a failed step's traceback kept in its trace line (the newest frames).
TRACEBACK_CHARS = 4000


class ToolArgumentError(Exception):
    """An argument the LLM got wrong; the message goes back to it."""


@dataclass(frozen=True)
class StepFailure:
    """A caught failure of one step: ``text`` is what the planner and the user read (``"Error: ..."``, one line for
    anything but the step's own message), ``kind`` is ``"argument"`` (the LLM's argument), ``"user"`` (a user's
    mistake, e.g. a reference file gone) or ``"error"`` (anything else), and ``trace`` holds the extra fields of the
    step's trace line (the traceback of an unexpected error)."""

    text: str
    kind: str
    trace: dict[str, Any] = field(default_factory=dict)


def step_failure(name: str, exc: Exception) -> StepFailure:
    """The failure of step ``name`` that raised ``exc``, as the run goes on from it.

    Must be called inside the ``except`` block that caught ``exc`` (the traceback is read from there). Raises
    ``exc`` again when it is a full disk (:func:`imgrag.records.runs.is_disk_full`): that one ends the run, closed by
    the
    runner."""
    if is_disk_full(exc):
        raise exc
    if isinstance(exc, ToolArgumentError):
        return StepFailure(f"Error: {exc}", "argument")
    if isinstance(exc, UserError):
        return StepFailure(f"Error: {exc}", "user")
    return StepFailure(f"Error: {name} failed: {describe_error(exc)}", "error",
                       {"exception": traceback.format_exc(limit=8)[-TRACEBACK_CHARS:]})

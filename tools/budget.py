"""The run's budgets, in one place: what a run (or a chat request) may spend, and when it is spent.

A budget is ``{"max_rounds", "max_tool_calls", "max_seconds"}`` in the graph's state, so it checkpoints and a
chat follow-up can grow it. Everything that reads or writes one calls this module:

- the runner makes a run's budget (:func:`run_budget`) and its recursion limit (:func:`recursion_limit`);
- the chat grows it by one request's worth (:func:`request_budget`);
- ``plan`` stops the run when it is spent (:func:`spent`) and the fixed policy draws no more once the rounds
  are used (:func:`rounds_spent`);
- each tool call claims its share as it is taken (:class:`Claims`, through ``ToolContext.claim``);
- the wall clock of a run across its processes is a :class:`Clock`.

The limits of one drawing (at most :data:`MAX_REFERENCES` references, at most ``MAX_IP_SCALE``) live here too.
It sits in ``tools/`` because the tools need it and may not import ``agent``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from imgrag.errors import UserError
from imgrag.settings import MAX_IP_SCALE, BudgetSettings, Settings
from tools.records import Candidate

__all__ = ["MAX_IP_SCALE", "MAX_REFERENCES", "Claims", "Clock", "check_rounds", "recursion_limit", "request_budget",
           "rounds_spent", "run_budget", "spent"]

MAX_REFERENCES = 4  # reference pictures one drawing may use (the tools refuse more; the policy and chat pick fewer)


def check_rounds(value: object, what: str = "--max-rounds", most: int | None = None) -> int | None:
    """``value`` when it is a round budget: a whole number of at least 1 (and at most ``most`` when given), or None
    (the settings' ``budget.max_rounds`` applies). Else a one-line UserError naming ``what`` (the flag, or the file
    and line a value came from), e.g. ``--max-rounds must be at least 1, got 0``."""
    if value is None:
        return None
    whole = isinstance(value, int) and not isinstance(value, bool)
    if whole and value >= 1 and (most is None or value <= most):
        return value
    bound = ("" if whole else "a whole number ") + ("of at least 1" if most is None else f"between 1 and {most}")
    raise UserError(f"{what} must be {bound.removeprefix('of ')}, got {value!r}")


def run_budget(settings: Settings, max_rounds: int | None = None, per_round: int = 1) -> dict[str, float]:
    """A new run's budget: the settings' ``budget`` section, with ``max_rounds`` (``--max-rounds``) when given.

    A round of ``per_round`` drawings takes a critique for each: the tool-call budget grows by the extra critiques
    (``(per_round - 1)`` a round), so several drawings a round do not cut the run's rounds short."""
    b = settings.budget
    rounds = max_rounds or b.max_rounds
    return {"max_rounds": rounds, "max_tool_calls": b.max_tool_calls + extra_critiques(rounds, per_round),
            "max_seconds": b.max_seconds}


def extra_critiques(rounds: int, per_round: int) -> int:
    """Tool calls ``rounds`` rounds of ``per_round`` drawings need beyond rounds of one: one critique per extra
    drawing."""
    return max(0, int(per_round) - 1) * int(rounds)


def request_budget(state: dict[str, Any], rounds: int, budget: BudgetSettings, per_round: int = 1) -> dict[str, float]:
    """The budget of a chat follow-up: one request's worth (``rounds`` pictures, tool calls enough for them and for
    the critiques of ``per_round`` drawings a round, the settings' seconds) beyond what the thread has already
    spent."""
    calls = max(budget.max_tool_calls, 4 * rounds + 2) + extra_critiques(rounds, per_round)
    return {"max_rounds": int(state.get("rounds", 0)) + rounds,
            "max_tool_calls": int(state.get("tool_calls", 0)) + calls,
            "max_seconds": float(state.get("seconds") or 0.0) + budget.max_seconds}


def recursion_limit(budget: dict[str, float]) -> int:
    """LangGraph's step limit for a run: never the reason it stops (the tool-call budget comes first)."""
    return 4 * int(budget["max_tool_calls"]) + 20


def rounds_spent(state: dict[str, Any]) -> bool:
    """Whether the run has drawn every picture its budget allows (no budget: never)."""
    rounds = state.get("rounds", 0)
    return rounds >= (state.get("budget") or {}).get("max_rounds", rounds + 1)


def spent(state: dict[str, Any], elapsed: float, latest: Candidate | None) -> str | None:
    """Which budget is spent (a stop reason), or None. ``elapsed``: seconds the run has spent, over all its
    processes; ``latest``: the candidate the run works on, which still deserves its verdict before the round
    budget ends the run."""
    budget = state["budget"]
    if state.get("tool_calls", 0) >= budget["max_tool_calls"]:
        return "tool-call budget spent"
    if elapsed >= budget["max_seconds"]:
        return "time budget spent"
    if state.get("rounds", 0) >= budget["max_rounds"] and (latest is None or latest.verdict is not None):
        return "round budget spent"
    return None


@dataclass
class Clock:
    """A run's wall clock: this process's ``time.monotonic()`` start plus what earlier processes spent (a resume)."""

    started: float = field(default_factory=time.monotonic)
    seconds_before: float = 0.0

    def elapsed(self) -> float:
        """Seconds the run has spent, in this process and the ones before it."""
        return self.seconds_before + (time.monotonic() - self.started)

    def deadline(self, max_seconds: float) -> float:
        """The ``time.monotonic()`` instant at which the run's time budget ends."""
        return self.started + (max_seconds - self.seconds_before)


class Claims:
    """The budget claimed by the calls of each LLM turn, so parallel calls of one turn cannot overspend it.

    The calls of one turn run in parallel threads against the same state, so the state's counters alone cannot
    stop a turn of thirty calls: each call claims its share here, under a lock, as it is taken."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._turns: dict[str, dict[str, int]] = {}  # turn (message id) -> {"calls", "rounds"} claimed so far

    def claim(self, state: dict[str, Any], *, draws: bool, defaults: BudgetSettings,
              deadline: float | None) -> tuple[int, str | None]:
        """Claim one tool call (and one round when the call ``draws``). Returns ``(round number of the drawing
        or 0, None)``, or ``(0, why)`` when the budget is spent. ``defaults`` stand in for a state without a
        budget; ``deadline`` is a ``time.monotonic()`` instant, or None for no time limit."""
        budget = state.get("budget") or {}
        with self._lock:
            claimed = self._turns.setdefault(_turn(state), {"calls": 0, "rounds": 0})
            calls = state.get("tool_calls", 0) + claimed["calls"]
            limit_calls = int(budget.get("max_tool_calls", defaults.max_tool_calls))
            if calls >= limit_calls:
                return 0, f"the tool-call budget is spent ({limit_calls} calls); call finish with the best candidate"
            if deadline is not None and time.monotonic() >= deadline:
                return 0, "the time budget is spent; call finish with the best candidate"
            round_no = 0
            if draws:
                rounds = state.get("rounds", 0) + claimed["rounds"]
                limit_rounds = int(budget.get("max_rounds", defaults.max_rounds))
                if rounds >= limit_rounds:
                    return 0, (f"the drawing budget is spent ({limit_rounds} rounds, counting the drawings of this "
                               "turn); critique what was drawn, or call finish with the best candidate")
                claimed["rounds"] += 1
                round_no = rounds + 1
            claimed["calls"] += 1
            return round_no, None

    def release_round(self, state: dict[str, Any]) -> None:
        """Give back the round a drawing claimed but did not draw (it failed), so another call may use it."""
        with self._lock:
            claimed = self._turns.get(_turn(state))
            if claimed and claimed["rounds"] > 0:
                claimed["rounds"] -= 1


def _turn(state: dict[str, Any]) -> str:
    """The key of the LLM turn whose calls run now: the id of the message that holds them."""
    messages = state.get("messages") or []
    return str(getattr(messages[-1], "id", None) or len(messages)) if messages else "-"

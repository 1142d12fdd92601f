"""May this candidate be the answer: the one rule, and the one order among the candidates that may.

Every path that names a run's answer asks here: the ``finish`` tool, a turn that finishes beside other calls
(tools/image_tools.py), the stop rules and ``finalize`` (agent/nodes.py), the fixed policy and the
retrieve-or-generate step (agent/policy.py, agent/retrieve_or_generate.py), a run closed early (agent/runner.py)
and the chat. So a candidate the rule refuses is never the answer, by any path.

The rule (:func:`answer_refusal`):

- a candidate the safety gate flagged (``answer_blocked``: flagged and ``safety.allow_flagged`` off) is never the
  answer; it stays on disk and in the record;
- a photo of the user's collection (``source: "retrieved"``) is the answer only when the judge matched it or the
  user chose it (the chat's "use photo N", ``chosen_by: "user"``): a run answers with a photo only when it shows
  the prompt;
- any other drawing may be the answer (the best of them, when none matched and the budget ran out).

``finish`` asks more (:func:`finish_refusal`): the candidate may be the answer *and* the judge matched it with a
verdict on the current prompt (a verdict on an earlier prompt of a chat thread is set aside as stale).

Candidates are the state's records (:class:`tools.records.Candidate`, built by tools/image_tools.py and
tools/retrieved_tools.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from tools.records import Candidate

SOURCE_RETRIEVED = "retrieved"  # a candidate that is a photo of the user's collection, not a drawing


def is_photo(candidate: Candidate) -> bool:
    """Whether a candidate is a retrieved photo rather than a drawing."""
    return candidate.source == SOURCE_RETRIEVED


def is_matched(candidate: Candidate) -> bool:
    """Whether the judge's current verdict on the candidate is a match (no verdict, or a stale one: no)."""
    return candidate.verdict is not None and candidate.verdict.match


def is_stale(candidate: Candidate) -> bool:
    """Whether the candidate's only verdict was given against an earlier prompt (a chat refinement changed it)."""
    return candidate.verdict is None and candidate.stale_verdict is not None


def answer_refusal(candidate: Candidate) -> str | None:
    """Why ``candidate`` may not be the run's answer, as a sentence naming it; None when it may (the module's rule)."""
    cid = candidate.id
    if candidate.answer_blocked:
        return (f"{cid} was flagged by the safety gate ({candidate.flagged}) and cannot be the answer; draw "
                "another (a new seed)")
    if is_photo(candidate) and not is_matched(candidate) and candidate.chosen_by != "user":
        return f"{cid} is a photo of the collection the judge did not match; a photo is the answer only when it matches"
    return None


def can_answer(candidate: Candidate | None) -> bool:
    """Whether ``candidate`` may be the run's answer (:func:`answer_refusal` is None); None may not."""
    return candidate is not None and answer_refusal(candidate) is None


def finish_refusal(candidate: Candidate) -> str | None:
    """Why a ``finish`` call may not end the run with ``candidate`` (a sentence for the planner), or None: it must
    have a verdict, be allowed as the answer (:func:`answer_refusal`) and be matched by the judge."""
    cid = candidate.id
    verdict = candidate.verdict
    if verdict is None:
        stale = " (its verdict was against an earlier prompt)" if is_stale(candidate) else ""
        return f"{cid} has not been critiqued yet{stale}; call critique first"
    refusal = answer_refusal(candidate)
    if refusal:
        return refusal
    if not verdict.match:
        return (f"the judge did not match {cid} (missing: {verdict.missing}); repair it with retrieve and "
                "regenerate")
    return None


def can_finish(candidate: Candidate | None) -> bool:
    """Whether a ``finish`` with ``candidate`` ends the run (:func:`finish_refusal` is None); None may not."""
    return candidate is not None and finish_refusal(candidate) is None


def answer_order(candidate: Candidate) -> tuple:
    """The sort key of the answer among candidates that may be it (higher is better): a judge match, then a verdict
    on the current prompt, then the CLIP score, then the earlier round."""
    return (is_matched(candidate), not is_stale(candidate), float(candidate.clip_score or 0.0), -candidate.round)


def best_answer(candidates: Iterable[Candidate], finished: str | None = None) -> Candidate | None:
    """The run's answer among ``candidates``: the one ``finished`` names (a finish call's, or the user's choice)
    when it may be the answer, else the best by :func:`answer_order` of those that may; None when none may."""
    allowed = [c for c in candidates if can_answer(c)]
    chosen = next((c for c in allowed if finished is not None and c.id == finished), None)
    if chosen is not None:
        return chosen
    return max(allowed, key=answer_order, default=None)

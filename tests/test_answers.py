"""One rule for "may this candidate be the answer" (tools/answers.py), and every path that names an answer using it:
the finish tool, a turn that finishes beside other calls, the stop rules, finalize, the fixed policy, the
retrieve-or-generate step and a run closed early. A candidate the rule refuses is never the answer by any path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage

import tools.answers as answers
from agent.nodes import best_candidate, outcome, stop_reason
from agent.policy import next_step
from agent.retrieve_or_generate import drawings_only, photo_step
from agent.runner import RunInterrupted
from tests.fakes import FakeVerdict
from tests.test_safety import MATCH, NO_CRADLE, UNSAFE, make_runner, trace
from tools.answers import (
    SOURCE_RETRIEVED,
    answer_refusal,
    best_answer,
    can_answer,
    can_finish,
    finish_refusal,
)
from tools.records import Candidate, from_state

MATCHED = {"match": True, "missing": [], "parsed": True}
MISSING = {"match": False, "missing": ["a cradle"], "parsed": True}


def cand(cid: str, *, verdict: dict | None = None, clip: float = 0.2, round_no: int = 1, **extra: Any) -> Candidate:
    return Candidate.of({"id": cid, "path": f"/x/{cid}.png", "prompt": "p", "seed": 0, "reference_ids": [],
                         "ip_scale": None, "round": round_no, "clip_score": clip, "verdict": verdict, **extra})


BLOCKED = {"answer_blocked": True, "flagged": {"concept": UNSAFE, "score": 0.9}}
PHOTO = {"source": SOURCE_RETRIEVED, "reference_id": "ref-x", "chosen_by": "agent"}


# ----- the rule -----

@pytest.mark.parametrize("candidate, answer, finish, says", [
    (cand("c0", verdict=MATCHED), True, True, None),
    (cand("c0", verdict=MISSING), True, False, "did not match c0"),
    (cand("c0"), True, False, "has not been critiqued yet"),
    (cand("c0", stale_verdict=MATCHED), True, False, "verdict was against an earlier prompt"),
    (cand("c0", verdict=MATCHED, **BLOCKED), False, False, "flagged by the safety gate"),
    (cand("c0", verdict=MISSING, **BLOCKED), False, False, "flagged by the safety gate"),
    (cand("c0", verdict=MATCHED, **PHOTO), True, True, None),
    (cand("c0", verdict=MISSING, **PHOTO), False, False, "photo of the collection the judge did not match"),
    (cand("c0", **PHOTO), False, False, "has not been critiqued yet"),
    (cand("c0", **{**PHOTO, "chosen_by": "user"}), True, False, "has not been critiqued yet"),  # the chat's /use
], ids=["matched", "unmatched", "unjudged", "stale", "blocked-matched", "blocked-unmatched", "photo-matched",
        "photo-unmatched", "photo-unjudged", "photo-chosen-by-user"])
def test_the_rule(candidate: dict, answer: bool, finish: bool, says: str | None) -> None:
    assert can_answer(candidate) is answer and (answer_refusal(candidate) is None) is answer
    assert can_finish(candidate) is finish
    refusal = finish_refusal(candidate)
    assert (refusal is None) is finish and (says is None or says in refusal)
    assert not can_answer(None) and not can_finish(None)


def test_the_order_among_the_candidates_that_may_answer() -> None:
    fresh = cand("c1", verdict=MISSING, clip=0.1)
    stale = cand("c2", stale_verdict=MATCHED, clip=0.9)
    assert best_answer([fresh, stale]).id == "c1"  # a verdict on the current prompt before a stale one
    assert best_answer([cand("c1", clip=0.3), cand("c2", clip=0.5)]).id == "c2"  # then the CLIP score
    assert best_answer([cand("c1", clip=0.5, round_no=2), cand("c2", clip=0.5, round_no=1)]).id == "c2"
    matched = cand("c3", verdict=MATCHED, clip=0.0)
    assert best_answer([fresh, stale, matched]).id == "c3"  # a match first
    # Refused ones never, not even named by finish, not even alone.
    blocked = cand("c4", verdict=MATCHED, clip=1.0, **BLOCKED)
    photo = cand("c5", verdict=MISSING, clip=1.0, **PHOTO)
    assert best_answer([fresh, blocked, photo]).id == "c1"
    assert best_answer([fresh, blocked], finished="c4").id == "c1"
    assert best_answer([blocked, photo], finished="c5") is None
    assert best_answer([fresh, matched], finished="c1").id == "c1"  # finish names the answer when it may be


# ----- every caller, on states: the graph's nodes, the policy, the retrieve-or-generate step -----

def state_of(*candidates: Candidate, finished: str | None = None, messages: list | None = None) -> dict:
    return from_state({"prompt": "a wooden cradle", "seed": 0, "candidates": {c.id: c for c in candidates},
            "finished": {"candidate_id": finished, "reason": ""} if finished else None, "references": {},
            "retrievals": [], "failed_steps": [], "rounds": max([c.round for c in candidates], default=0),
            "tool_calls": 0, "budget": {"max_rounds": 5, "max_tool_calls": 40, "max_seconds": 600},
            "messages": messages or []})


REFUSED = [cand("c0", verdict=MATCHED, clip=0.9, **BLOCKED), cand("c0", verdict=MISSING, clip=0.9, **PHOTO)]


@pytest.mark.parametrize("refused", REFUSED, ids=["blocked", "unmatched-photo"])
def test_finalize_and_the_stop_rule_never_answer_with_a_refused_candidate(refused: dict) -> None:
    other = cand("c1", verdict=MISSING, clip=0.1, round_no=2)
    state = state_of(refused, other, finished="c0")
    assert best_candidate(state).id == "c1" and outcome(state) == {"status": "budget_exhausted",
                                                                        "final_candidate": "c1"}
    alone = state_of(refused, finished="c0")
    assert outcome(alone) == {"status": "failed", "final_candidate": None}
    assert stop_reason(state_of(refused), 0.0, refused) is None  # a refused match is no match


def test_the_policy_and_the_photo_step_never_finish_with_a_refused_candidate() -> None:
    blocked = cand("c0", verdict=MATCHED, **BLOCKED)
    for view in (state_of(blocked), drawings_only(state_of(blocked))):  # the policy itself, not only its view
        step = next_step(view, 0.6)
        assert step is None or step[0] != "finish"
    photo = cand("c0", verdict=MISSING, **PHOTO)
    assert photo_step(state_of(photo), allowed=True) is None  # draw instead
    matched_photo = cand("c0", verdict=MATCHED, **PHOTO)
    assert photo_step(state_of(matched_photo), allowed=True)[0] == "finish"


# ----- every caller, through the real runner: the rule made to refuse an ordinary matched drawing -----

@pytest.fixture
def refuse_c0(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule refuses c0 (a plain drawing the judge matches): every path must then look elsewhere. Each caller
    reaches the rule through tools.answers' functions, so patching the rule there reaches them all."""
    rule = answers.answer_refusal

    def refusing(candidate: dict) -> str | None:
        return "c0 is refused by the test's rule" if candidate.id == "c0" else rule(candidate)

    monkeypatch.setattr(answers, "answer_refusal", refusing)


GREY = (200, 0, 0)


def test_the_fixed_planner_and_finalize_use_the_rule(tmp_path: Path, refuse_c0) -> None:
    runner, models = make_runner(tmp_path, [MATCH], {"cradle": GREY})
    result = runner.run("a wooden cradle", planner="fixed", max_rounds=3, seed=2)
    assert result["final_candidate"] == "c1" and result["status"] == "matched"
    assert len(models["generator"].calls) == 2  # c0 matched but was refused: the policy drew again


def test_the_finish_tool_and_a_finishing_turn_use_the_rule(tmp_path: Path, refuse_c0) -> None:
    both = AIMessage(content="", tool_calls=[
        {"name": "finish", "args": {"candidate_id": "c0"}, "id": "call-finish"},
        {"name": "generate", "args": {"prompt": "a wooden cradle", "seed": 3}, "id": "call-generate"}])
    script = [AIMessage(content="", tool_calls=[{"name": "generate", "args": {"prompt": "a wooden cradle", "seed": 2},
                                                 "id": "call-g0"}]),
              AIMessage(content="", tool_calls=[{"name": "critique", "args": {"candidate_id": "c0"}, "id": "call-c0"}]),
              both]
    runner, models = make_runner(tmp_path, [MATCH, NO_CRADLE], {"cradle": GREY}, llm_script=script)
    result = runner.run("a wooden cradle", planner="agent", max_rounds=2)
    steps = trace(result)
    finish = next(s for s in steps if s.get("tool") == "finish" and "args" in s)
    assert not finish["ok"] and "refused by the test's rule" in finish["message"]
    generate = [s for s in steps if s.get("tool") == "generate" and "args" in s]
    assert len(generate) == 2 and all(s["ok"] and not s.get("refused") for s in generate), \
        "the generate beside a refused finish ran (the turn did not finish the run)"
    assert result["final_candidate"] != "c0"


def test_a_run_closed_early_uses_the_rule(tmp_path: Path, refuse_c0) -> None:
    """Ctrl-C after c0 was drawn and matched: the partial record names no refused candidate."""
    runner, models = make_runner(tmp_path, [MATCH], {"cradle": GREY})

    def stop_after_critique(event: dict) -> None:
        if event["event"] == "tool_end" and event["tool"] == "critique":
            raise KeyboardInterrupt

    runner.on_event = stop_after_critique
    with pytest.raises(RunInterrupted) as caught:
        runner.run("a wooden cradle", planner="fixed", max_rounds=3, seed=2)
    assert caught.value.result["final_candidate"] is None and caught.value.result["final_image"] is None


def test_a_blocked_match_beside_a_generate_does_not_end_the_turn(tmp_path: Path) -> None:
    """The kind as found: a flagged drawing (seed 1 draws the blue picture tests/test_safety.py's embedder reads as
    the unsafe concept) matched by the judge, finished in the same turn as a generate. The generate used to be
    refused ("this turn also finished the run") although the finish itself was refused."""
    script = [AIMessage(content="", tool_calls=[{"name": "generate", "args": {"prompt": "a wooden cradle", "seed": 1},
                                                 "id": "call-g0"}]),
              AIMessage(content="", tool_calls=[{"name": "critique", "args": {"candidate_id": "c0"}, "id": "call-c0"}]),
              AIMessage(content="", tool_calls=[
                  {"name": "finish", "args": {"candidate_id": "c0"}, "id": "call-finish"},
                  {"name": "generate", "args": {"prompt": "a wooden cradle", "seed": 2}, "id": "call-g1"}])]
    runner, models = make_runner(tmp_path, [MATCH, FakeVerdict(False, ["x"], "")], {"cradle": GREY}, llm_script=script)
    result = runner.run("a wooden cradle", planner="agent", max_rounds=2)
    assert [c["seed"] for c in models["generator"].calls] == [1, 2]
    by_id = {c["id"]: c for c in result["candidates"]}
    assert by_id["c0"]["answer_blocked"] and result["final_candidate"] == "c1"

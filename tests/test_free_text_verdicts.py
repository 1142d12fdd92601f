"""Free-text verdicts and reasoning blocks: the judge's answer shapes, and the LLM's replies, as real models write them.

``tests/cases/*.jsonl`` are the project's shared cases (copied from the shared folder); ``OWN_ANSWERS`` adds our own
wording of the same kinds. Missing concepts are compared loosely: lower case, articles dropped."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from imgrag.models.chat_model import parse_tool_calls, read_reply
from imgrag.models.judge import absent_concepts, parse_verdict
from imgrag.models.reasoning import answer_text

CASES = Path(__file__).parent / "cases"


def _load(name: str) -> list[dict]:
    return [json.loads(line) for line in (CASES / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def loose(concepts: list[str]) -> list[str]:
    return [re.sub(r"^(?:the|a|an)\s+", "", c.strip().lower()) for c in concepts]


# (answer, match, missing): our own wording, one line per shape.
OWN_ANSWERS = [
    ("Yes, the lighthouse is there, but there is no boat.", False, ["boat"]),
    ("Yes - but there are no candles on the cake.", False, ["candles"]),
    ("Yes. The fox is drawn; however, the snow is missing.", False, ["snow"]),
    ("Yes, although the red umbrella is absent.", False, ["red umbrella"]),
    ("Yes, it shows the castle, though the moat is not visible.", False, ["moat"]),
    ("Yes, a dog on a sofa, without the blue collar.", False, ["blue collar"]),
    ("Yes; everything except the clock tower.", False, ["clock tower"]),
    ("Yes, everything is present except for the kite.", False, ["kite"]),
    ("Mostly: the owl is there but no moon.", False, ["moon"]),
    ("The image lacks a sailboat.", False, ["sailboat"]),
    ("It is lacking the green hat and the scarf.", False, ["green hat", "scarf"]),
    ("The picture does not include a bridge.", False, ["bridge"]),
    ("I can't see any bicycle.", False, ["bicycle"]),
    ("No sign of the waterfall.", False, ["waterfall"]),
    ("The mountains are missing.", False, ["mountains"]),
    ("A cat sits there, but the fishbowl is nowhere to be seen.", False, ["fishbowl"]),
    ("Close, but the tent itself is not shown.", False, ["tent"]),
    ("No. The piano and the violin are missing.", False, ["piano", "violin"]),
    ("No, it shows a beach without any palm trees.", False, ["palm trees"]),
    ("Yes, without any doubt.", True, []),
    ("Yes, there is no problem with this picture.", True, []),
    ("Yes, nothing is missing.", True, []),
    ("Everything matches the prompt.", True, []),
    ("The image matches the description well.", True, []),
    ("It does not match: wrong colours.", False, []),
    ("<think>Is there a moon? I think not... wait, yes there is.</think>Yes, the moon and the owl are there.",
     True, []),
    ("<think>The bridge may be missing.</think>\nYes.", True, []),
    ("<think>Looks right.</think>\nNo, the train is missing.", False, ["train"]),
    ('{"match": true, "missing": [], "reason": "the heron is there but there is no pond"}', False, ["pond"]),
    ('{"match": true, "missing": [], "reason": "no problems, nothing missing"}', True, []),
    ("<think>I will answer {\"match\": true} maybe", False, []),  # cut off inside its reasoning: no answer
]


@pytest.mark.parametrize("case", _load("judge-answers.jsonl"), ids=lambda c: c["answer"][:40])
def test_shared_judge_answers(case: dict) -> None:
    verdict = parse_verdict(case["answer"])
    assert verdict.match == case["match"]
    assert loose(verdict.missing) == loose(case["missing"])


@pytest.mark.parametrize(("answer", "match", "missing"), OWN_ANSWERS, ids=[a[:40] for a, _, _ in OWN_ANSWERS])
def test_own_answer_shapes(answer: str, match: bool, missing: list[str]) -> None:
    verdict = parse_verdict(answer)
    assert (verdict.match, loose(verdict.missing)) == (match, loose(missing))


def test_the_corpus_holds_at_least_thirty_shapes() -> None:
    assert len(OWN_ANSWERS) + len(_load("judge-answers.jsonl")) >= 30 and len(OWN_ANSWERS) >= 30


def test_absent_concepts_reads_lists_and_ignores_idioms() -> None:
    assert absent_concepts("the image lacks a lantern, a bench and a tree") == ["lantern", "bench", "tree"]
    assert absent_concepts("no doubt, without issues, nothing is missing") == []


# ----- LLM replies -----

@pytest.mark.parametrize("case", _load("llm-replies.jsonl"), ids=lambda c: c["reply"][:40])
def test_shared_llm_replies(case: dict) -> None:
    _, calls, invalid = parse_tool_calls(case["reply"])
    assert [c["name"] for c in calls] == case["tool_calls"]
    assert len(invalid) == case["invalid_calls"]


@pytest.mark.parametrize("case", _load("llm-replies.jsonl"), ids=lambda c: c["reply"][:40])
def test_shared_llm_replies_through_the_real_model(case: dict, tiny_kit) -> None:
    """The same replies as token output of the real QwenChatModel (tiny kit tokenizer and chat template)."""
    from langchain_core.messages import HumanMessage

    from tests.fakes import scripted_qwen

    reply = scripted_qwen(tiny_kit["llm"], [case["reply"]]).invoke([HumanMessage("draw a kite")])
    assert [c["name"] for c in reply.tool_calls] == case["tool_calls"]
    assert len(reply.invalid_tool_calls) == case["invalid_calls"]


def test_a_server_reply_with_calls_left_in_its_text_is_read() -> None:
    from langchain_core.messages import AIMessage

    text = ('<think>draft <tool_call>{"name": "generate", "arguments": {}}</tool_call></think>'
            '<tool_call>\n{"name": "critique", "arguments": {"candidate_id": "c0"}}\n</tool_call>')
    reply = read_reply(AIMessage(content=text))
    assert [c["name"] for c in reply.tool_calls] == ["critique"] and reply.response_metadata["raw"] == text


@pytest.mark.parametrize(("text", "answer"), [
    ("<think>a</think>b", "b"), ("a</think>\nb", "b"), ("<think>cut off", ""), ("plain", "plain"),
    ("<THINK>x</THINK> y", "y"),
])
def test_answer_text(text: str, answer: str) -> None:
    assert answer_text(text) == answer

"""The judge: a tolerant parser for real-world answers, and the tiny Qwen2.5-VL through from_pretrained."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from imgrag.errors import ModelLoadError
from imgrag.models.judge import Judge, parse_verdict
from imgrag.settings import Settings

# (answer as a model wrote it, match, missing, parsed)
ANSWERS = [
    ('{"match": true, "missing": [], "reason": "A cat sits on a red chair."}', True, [], True),
    ('{"match": false, "missing": ["a red chair"], "reason": "The cat sits on the floor."}',
     False, ["a red chair"], True),
    ('```json\n{"match": false, "missing": ["a wooden cradle"], "reason": "no cradle"}\n```',
     False, ["a wooden cradle"], True),
    ('Sure! Here is my assessment:\n{"match": false, "missing": ["a golden retriever"], "reason": "only a cat"}\n'
     "Let me know if you need anything else.", False, ["a golden retriever"], True),
    ("{'match': False, 'missing': ['a rocket', 'the moon'], 'reason': 'empty sky'}",
     False, ["a rocket", "the moon"], True),
    ('{"match": False, "missing": ["a hat"], "reason": "bare head"}', False, ["a hat"], True),
    ('{"match": "yes", "missing": [], "reason": "all there"}', True, [], True),
    ('{"match": "No", "missing": "a red umbrella, two dogs", "reason": "x"}',
     False, ["a red umbrella", "two dogs"], True),
    ('{"match": false, "missing": ["a cat",], "reason": "no cat",}', False, ["a cat"], True),
    ('{"matches": 0, "missing_concepts": [{"concept": "a lighthouse"}], "explanation": "coast only"}',
     False, ["a lighthouse"], True),
    ('{"verdict": {"match": true, "missing": "none"}}', True, [], True),
    # contradicts itself: a "match" that names a missing concept is not a match
    ('{"match": true, "missing": ["a blue car"], "reason": "mostly fine"}', False, ["a blue car"], True),
    # cut off by max_new_tokens in the middle of the list
    ('{"match": false, "missing": ["a red umbrella", "a dog wearing', False, ["a red umbrella"], True),
    ("\u201cmatch\u201d: false, \u201cmissing\u201d: [\u201ca kite\u201d]", False, ["a kite"], True),
    ("Yes.", True, [], True),
    ("No, the image does not show a violin.", False, ["violin"], True),
    ("**No**. Missing: a violin; a music stand", False, ["a violin", "a music stand"], True),
    ("The different conception is a cradle.", False, ["a cradle"], True),
    ("The different conception is a wooden cradle\nThe different conception is a baby", False,
     ["a wooden cradle", "a baby"], True),
    ("<Content matches>", True, [], True),
    ("<think>the chair is blue, not red</think>\n{\"match\": false, \"missing\": [\"a red chair\"]}",
     False, ["a red chair"], True),
    ("Missing concepts:\n- a red barn\n- 1. three sheep\n\nOverall the scene is rural.",
     False, ["a red barn", "three sheep"], True),
    # unusable answers: kept raw, never an exception
    ("", False, [], False),
    ("qwxz \ufffd\ufffd park jdge <|fim_prefix|>", False, [], False),
    ('["a cat", "a dog"]', False, [], False),
    ("{not json at all", False, [], False),
    ("I cannot determine that from the picture.", False, [], False),
]


@pytest.mark.parametrize(("answer", "match", "missing", "parsed"), ANSWERS)
def test_parse_verdict_table(answer: str, match: bool, missing: list[str], parsed: bool) -> None:
    verdict = parse_verdict(answer)
    assert (verdict.match, verdict.missing, verdict.parsed) == (match, missing, parsed)
    assert verdict.raw == answer


def test_parse_verdict_keeps_the_reason_and_serialises() -> None:
    verdict = parse_verdict('{"match": false, "missing": ["a cat"], "reason": "only a chair"}')
    assert verdict.reason == "only a chair"
    assert verdict.to_dict() == {"match": False, "missing": ["a cat"], "reason": "only a chair",
                                 "raw": '{"match": false, "missing": ["a cat"], "reason": "only a chair"}',
                                 "parsed": True}


def test_parse_verdict_never_raises_on_odd_input() -> None:
    for odd in ("{" * 5000, "}" * 10, "{'a': " * 200, None, 42, "", "```json\n```", '{"match": }'):
        verdict = parse_verdict(odd)  # type: ignore[arg-type]
        # Not a verdict, said as such, the answer kept as text; and no parser error hidden behind the guard.
        assert (verdict.match, verdict.missing, verdict.parsed) == (False, [], False), odd
        assert verdict.reason == "the judge's answer could not be parsed", (odd, verdict.reason)
        assert verdict.raw == (odd if isinstance(odd, str) else str(odd))


def test_a_parser_bug_is_named_in_the_reason_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    import imgrag.models.judge as judge_module

    def broken(text: str) -> list[str]:
        raise IndexError("a bug")

    monkeypatch.setattr(judge_module, "_object_candidates", broken)
    verdict = parse_verdict('{"match": true, "missing": []}')
    assert (verdict.match, verdict.parsed) == (False, False)
    assert verdict.reason.endswith("(parser error: IndexError)")


def test_judge_prompt_asks_for_json() -> None:
    import prompts

    text = prompts.render("judge", prompt="a cat on a red chair")
    assert '"a cat on a red chair"' in text
    assert '{"match": true or false, "missing": [' in text


def test_tiny_judge_returns_a_verdict(tiny_settings: Settings) -> None:
    judge = Judge.from_pretrained(tiny_settings)
    picture = Image.new("RGB", (300, 120), (10, 200, 30))
    verdict = judge.judge(picture, "a green field")
    assert isinstance(verdict.raw, str) and verdict.raw  # random weights: junk, but text
    # Greedy decoding: the same picture and prompt give the same answer, read the same way.
    again = judge.judge(picture, "a green field")
    assert again.to_dict() == verdict.to_dict() == parse_verdict(verdict.raw).to_dict()
    assert "parser error" not in verdict.reason


def test_images_are_resized_within_the_pixel_bounds(tiny_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    # Wider than the kit processor's own maximum (16 merged patches): ours must win.
    bounds = replace(tiny_settings.judge, min_pixels=2 * 28 * 28, max_pixels=36 * 28 * 28)
    judge = Judge.from_pretrained(replace(tiny_settings, judge=bounds))
    seen: list[int] = []
    real_generate = judge.model.generate

    def spy(**inputs):
        (_frames, h, w), = inputs["image_grid_thw"].tolist()
        seen.append(h * w * 14 * 14)  # the grid counts 14-pixel patches
        return real_generate(**inputs)

    monkeypatch.setattr(judge.model, "generate", spy)
    for size in ((2000, 1500), (28, 28)):
        judge.ask(Image.new("RGB", size), "describe")
    big, small = seen
    assert 16 * 28 * 28 < big <= bounds.max_pixels
    assert bounds.min_pixels <= small <= bounds.max_pixels


@pytest.mark.parametrize("role", ["llm", "generator"])
def test_another_architecture_is_a_model_load_error(tiny_settings: Settings, tiny_kit: dict[str, Path],
                                                    role: str) -> None:
    wrong = replace(tiny_settings, models=replace(tiny_settings.models, judge=str(tiny_kit[role])))
    with pytest.raises(ModelLoadError, match="judge") as info:
        Judge.from_pretrained(wrong)
    assert str(tiny_kit[role]) in str(info.value)

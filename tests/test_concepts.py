"""The concept rewriter: captions from the LLM when it answers well, the phrases themselves when not."""

from __future__ import annotations

from pathlib import Path

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel

from imgrag.models.concepts import caption_concepts, clean_concepts, parse_captions, rewrite_concepts


@pytest.mark.parametrize(("text", "expected"), [
    ('["a photo of a wooden cradle", "a photo of a golden retriever"]',
     ["a photo of a wooden cradle", "a photo of a golden retriever"]),
    ('Here you go:\n```json\n["a red umbrella in the rain"]\n```', ["a red umbrella in the rain"]),
    ("['a lighthouse on a cliff']", ["a lighthouse on a cliff"]),
    ("[]", []),  # every concept dropped as unpicturable: a valid answer
    ("- a photo of a violin\n- a photo of a music stand", ["a photo of a violin", "a photo of a music stand"]),
    ("qwxz \ufffd park <|fim_prefix|>", None),
    ("[1, 2, 3]", None),
    ("", None),
])
def test_parse_captions(text: str, expected: list[str] | None) -> None:
    assert parse_captions(text) == expected


def test_clean_concepts_dedupes_and_drops_empty() -> None:
    assert clean_concepts(["- a cradle.", "A cradle", "", "  ", '"a dog"', "a dog"]) == ["a cradle", "a dog"]


def test_a_good_answer_gives_captions() -> None:
    llm = FakeListChatModel(responses=['["a photo of a wooden baby cradle", "a photo of a kitten"]'])
    result = caption_concepts(llm, "a kitten in a cradle", ["the cradle", "kitten"])
    assert result.captions == ["a photo of a wooden baby cradle", "a photo of a kitten"]
    assert result.fallback is False


def test_extra_captions_are_cut_to_one_per_concept() -> None:
    llm = FakeListChatModel(responses=['["a", "b", "c"]'])
    assert rewrite_concepts(llm, "p", ["x", "y"]) == ["a", "b"]


def test_junk_or_failure_falls_back_to_the_phrases() -> None:
    junk = FakeListChatModel(responses=["\ufffd\ufffd qwxz"])
    result = caption_concepts(junk, "a kitten in a cradle", [" a cradle. ", "a cradle", "", "a kitten"])
    assert result.captions == ["a cradle", "a kitten"] and result.fallback

    class Broken:
        def invoke(self, messages):
            raise RuntimeError("server down")

    result = caption_concepts(Broken(), "p", ["a cradle"])
    assert result.captions == ["a cradle"] and result.fallback and "server down" in result.notes[0]


def test_nothing_missing_asks_nothing() -> None:
    class Never:
        def invoke(self, messages):
            raise AssertionError("must not be called")

    assert rewrite_concepts(Never(), "p", ["", "  "]) == []


def test_the_tiny_llm_gives_junk_and_the_fallback(tiny_kit: dict[str, Path], tmp_path: Path) -> None:
    from imgrag.models.chat_model import QwenChatModel
    from imgrag.settings import load_settings

    settings = load_settings("tiny", environ={"IMGRAG_TINY_KIT_DIR": str(tiny_kit["llm"].parent),
                                              "IMGRAG_HOME": str(tmp_path)})
    result = caption_concepts(QwenChatModel.from_pretrained(settings), "a cat in a cradle", ["a cradle", "a cradle"])
    assert result.fallback and result.captions == ["a cradle"]

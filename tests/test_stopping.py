"""Short answers: the judge stops at the end of its JSON verdict, the LLM at ``</tool_call>``, and each call's
tokens are counted. The tiny models are random, so a logits processor makes them write a scripted answer
through the real ``generate`` (prefill, decoding, stopping criteria) of the real wrappers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from imgrag.models.stopping import JsonObjectEnd, TextMarker, json_object_closed
from imgrag.settings import Settings


@pytest.mark.parametrize(("text", "closed"), [
    ('{"match": true, "missing": [], "reason": "ok"}', True),
    ('Sure! ```json\n{"match": false, "missing": ["a {red} cat"]', False),  # a brace inside a string
    ('{"match": false, "missing": ["a {red} cat"], "reason": "no \\"cat}\\""} trailing', True),
    ('{"verdict": {"match": true}', False),  # the nested object closed, the outer one not yet
    ("no JSON at all }", False),
    ("", False),
])
def test_json_object_closed(text: str, closed: bool) -> None:
    assert json_object_closed(text) is closed


class Script(LogitsProcessor):
    """Forces the scripted token ids after the prompt, then keeps repeating the last one."""

    def __init__(self, ids: list[int], prompt_length: int) -> None:
        self.ids, self.prompt_length = ids, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_length
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.ids[min(step, len(self.ids) - 1)]] = 0.0
        return forced


def script(model: Any, monkeypatch: pytest.MonkeyPatch, ids: list[int]) -> None:
    original = model.generate

    def generate(**kwargs: Any) -> Any:
        processor = Script(ids, kwargs["input_ids"].shape[1])
        return original(**kwargs, logits_processor=LogitsProcessorList([processor]))

    monkeypatch.setattr(model, "generate", generate)


def test_criteria_read_only_the_new_tokens(tiny_settings: Settings) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_settings.models.llm)
    prompt = tokenizer('{"match": true} </tool_call> in the prompt', return_tensors="pt")["input_ids"]
    answer = tokenizer('{"match": false, "missing": []} and then </tool_call>', return_tensors="pt")["input_ids"]
    ids = torch.cat([prompt, answer], dim=1)
    json_end, marker = JsonObjectEnd(tokenizer, prompt.shape[1]), TextMarker(tokenizer, prompt.shape[1], "</tool_call>")
    assert not json_end(prompt, None).item() and not marker(prompt, None).item()
    assert json_end(ids, None).item() and marker(ids, None).item()


def test_a_draft_inside_a_reasoning_block_does_not_stop_the_answer(tiny_settings: Settings) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_settings.models.llm)
    prompt = tokenizer("the question", return_tensors="pt")["input_ids"]

    def stops(text: str) -> tuple[bool, bool]:
        ids = torch.cat([prompt, tokenizer(text, return_tensors="pt")["input_ids"]], dim=1)
        json_end = JsonObjectEnd(tokenizer, prompt.shape[1])
        marker = TextMarker(tokenizer, prompt.shape[1], "</tool_call>")
        return bool(json_end(ids, None).item()), bool(marker(ids, None).item())

    draft = '<think>maybe {"match": true} or <tool_call>{"name": "generate"}</tool_call>'
    assert stops(draft) == (False, False)  # still reasoning: the drafts are not the answer
    assert stops(draft + '</think>{"match": false, "missing": ["a pond"]} <tool_call>{}</tool_call>') == (True, True)


def test_the_judge_stops_at_the_end_of_its_verdict(tiny_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from imgrag.models.judge import Judge

    judge = Judge.from_pretrained(tiny_settings)
    tokenizer = judge.processor.tokenizer
    verdict_text = '{"match": false, "missing": ["a cat"], "reason": "no cat"}'
    ids = tokenizer(verdict_text + " and then some more words", add_special_tokens=False)["input_ids"]
    needed = len(tokenizer(verdict_text, add_special_tokens=False)["input_ids"])
    monkeypatch.setattr(judge.settings.judge, "max_new_tokens", len(ids) + 10)
    script(judge.model, monkeypatch, ids)
    verdict = judge.judge(Image.new("RGB", (64, 64), (200, 10, 10)), "a red square with a cat")
    assert verdict.parsed and verdict.missing == ["a cat"] and verdict.raw == verdict_text
    assert judge.last_tokens["output"] == needed and judge.last_tokens["stop"] == "answer"
    assert judge.last_tokens["input"] > 0 and judge.last_tokens["max_new_tokens"] == len(ids) + 10


def test_a_judge_answer_without_json_runs_to_its_token_limit(tiny_settings: Settings,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from imgrag.models.judge import Judge

    judge = Judge.from_pretrained(tiny_settings)
    script(judge.model, monkeypatch, judge.processor.tokenizer("no no no", add_special_tokens=False)["input_ids"])
    judge.judge(Image.new("RGB", (64, 64)), "a cat")
    assert judge.last_tokens["output"] == tiny_settings.judge.max_new_tokens
    assert judge.last_tokens["stop"] == "max_new_tokens"


def test_the_llm_stops_at_the_end_of_its_tool_call(tiny_kit: dict[str, Path], tiny_settings: Settings,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool

    from imgrag.models.chat_model import QwenChatModel

    @tool
    def generate(prompt: str) -> str:
        """Draw a picture."""
        return prompt

    chat = QwenChatModel.from_pretrained(tiny_settings)
    call = '<tool_call>\n{"name": "generate", "arguments": {"prompt": "a cat"}}\n</tool_call>'
    ids = chat.tokenizer(call + "\n<tool_call>\n{\"name\": \"generate\"", add_special_tokens=False)["input_ids"]
    needed = len(chat.tokenizer(call, add_special_tokens=False)["input_ids"])
    chat.max_new_tokens = len(ids) + 10
    script(chat.model, monkeypatch, ids)
    reply = chat.bind_tools([generate]).invoke([HumanMessage("draw a cat")])
    assert [c["name"] for c in reply.tool_calls] == ["generate"] and not reply.invalid_tool_calls
    assert reply.usage_metadata["output_tokens"] == needed
    assert reply.response_metadata["stop"] == "answer"


def test_a_langchain_stop_sequence_ends_the_generation(tiny_kit: dict[str, Path], tiny_settings: Settings,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from langchain_core.messages import HumanMessage

    from imgrag.models.chat_model import QwenChatModel

    chat = QwenChatModel.from_pretrained(tiny_settings)
    ids = chat.tokenizer("a red cat STOP and then more words", add_special_tokens=False)["input_ids"]
    needed = next(n for n in range(1, len(ids) + 1) if "STOP" in chat.tokenizer.decode(ids[:n]))
    chat.max_new_tokens = len(ids) + 10
    script(chat.model, monkeypatch, ids)
    reply = chat.invoke([HumanMessage("draw a cat")], stop=["STOP"])
    assert reply.content.strip() == "a red cat"
    assert reply.usage_metadata["output_tokens"] == needed < len(ids)  # transformers stopped it, not the limit
    assert reply.response_metadata["stop"] == "answer"


def test_a_stop_sequence_the_prompt_could_begin_only_cuts_the_reply(tiny_kit: dict[str, Path],
                                                                    tiny_settings: Settings,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from langchain_core.messages import HumanMessage

    from imgrag.models.chat_model import QwenChatModel
    from imgrag.models.stopping import generation_stop_strings

    chat = QwenChatModel.from_pretrained(tiny_settings)
    prompt = chat.render([HumanMessage("draw a cat")], None)
    assert prompt.endswith("\n") and generation_stop_strings(prompt, ["\n\n", "STOP"]) == ["STOP"]
    # The reply opens with a newline: with the prompt's own last newline transformers would see "\n\n" at once.
    ids = chat.tokenizer("\nfirst line\n\nsecond line", add_special_tokens=False)["input_ids"]
    chat.max_new_tokens = len(ids) + 4
    script(chat.model, monkeypatch, ids)
    reply = chat.invoke([HumanMessage("draw a cat")], stop=["\n\n"])
    assert reply.content.strip() == "first line"
    assert reply.usage_metadata["output_tokens"] == chat.max_new_tokens

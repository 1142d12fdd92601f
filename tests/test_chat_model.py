"""The local Qwen chat model: the real chat template with tools, tool-call parsing, bind_tools + invoke."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool

from imgrag.errors import ModelLoadError, UserError
from imgrag.models.chat_model import QwenChatModel, make_chat_model, parse_tool_calls, to_template_messages
from imgrag.settings import Settings


@tool
def retrieve(queries: list[str], avoid_candidate_id: str | None = None) -> str:
    """Find reference photos for the missing concepts."""
    return "[]"


@tool
def regenerate(prompt: str, reference_ids: list[str], ip_scale: float = 0.5) -> str:
    """Draw again guided by reference photos."""
    return "c1"


TOOLS = [convert_to_openai_tool(t) for t in (retrieve, regenerate)]

TRANSCRIPT = [
    SystemMessage("You are imgrag's image agent."),
    HumanMessage("a cat in a wooden cradle"),
    AIMessage("", tool_calls=[{"name": "retrieve", "args": {"queries": ["a wooden cradle"]}, "id": "call-1"}]),
    ToolMessage('{"reference_ids": ["r1"]}', tool_call_id="call-1", name="retrieve"),
    AIMessage("Two things at once.", tool_calls=[
        {"name": "regenerate", "args": {"prompt": "a cat in a cradle", "reference_ids": ["r1"], "ip_scale": 0.7},
         "id": "call-2"},
        {"name": "retrieve", "args": {"queries": ["a kitten"], "avoid_candidate_id": "c0"}, "id": "call-3"},
    ]),
    ToolMessage('{"candidate_id": "c1"}', tool_call_id="call-2", name="regenerate"),
    ToolMessage('{"reference_ids": ["r2"]}', tool_call_id="call-3", name="retrieve"),
]


@pytest.fixture(scope="module")
def chat(tiny_kit: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> QwenChatModel:
    from imgrag.settings import load_settings

    settings = load_settings("tiny", environ={"IMGRAG_TINY_KIT_DIR": str(tiny_kit["llm"].parent),
                                              "IMGRAG_HOME": str(tmp_path_factory.mktemp("chat-home"))})
    return QwenChatModel.from_pretrained(settings)


def test_transcript_renders_through_the_real_template(chat: QwenChatModel) -> None:
    text = chat.render(TRANSCRIPT, TOOLS)
    # tools in the system turn, after our own system message
    assert text.startswith("<|im_start|>system\nYou are imgrag's image agent.\n\n# Tools")
    assert '"name": "retrieve"' in text and '"name": "regenerate"' in text
    # arguments rendered once as JSON objects, not as a JSON string inside JSON
    assert '{"name": "retrieve", "arguments": {"queries": ["a wooden cradle"]}}' in text
    assert '\\"queries\\"' not in text
    # two results of one turn go in one user turn, each in its own <tool_response>
    assert text.count("<tool_response>") == 3
    assert '<tool_response>\n{"candidate_id": "c1"}\n</tool_response>\n<tool_response>' in text
    assert text.endswith("<|im_start|>assistant\n")


def test_rendered_tool_calls_parse_back_to_the_same_calls(chat: QwenChatModel) -> None:
    """Round trip: what the template writes for past calls is what parse_tool_calls reads."""
    text = chat.render(TRANSCRIPT, TOOLS)
    last_assistant = text.rsplit("<|im_start|>assistant\n", 2)[1].split("<|im_end|>")[0]
    content, calls, invalid = parse_tool_calls(last_assistant)
    assert content == "Two things at once."
    assert [(c["name"], c["args"]) for c in calls] == [(c["name"], c["args"]) for c in TRANSCRIPT[4].tool_calls]
    assert invalid == []
    assert len({c["id"] for c in calls}) == 2


def test_to_template_messages_passes_arguments_as_dicts() -> None:
    messages = to_template_messages(TRANSCRIPT)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant", "tool", "tool"]
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == {"queries": ["a wooden cradle"]}
    assert messages[3]["content"] == '{"reference_ids": ["r1"]}'


@pytest.mark.parametrize(("text", "names", "n_invalid", "content"), [
    ("I will draw a cat first.", [], 0, "I will draw a cat first."),
    ('<tool_call>\n{"name": "retrieve", "arguments": {"queries": ["a cradle"]}}\n</tool_call>', ["retrieve"], 0, ""),
    ('Let me do both.\n<tool_call>\n{"name": "retrieve", "arguments": {"queries": ["a"]}}\n</tool_call>\n'
     '<tool_call>\n{"name": "regenerate", "arguments": {"prompt": "p", "reference_ids": ["r1"]}}\n</tool_call>',
     ["retrieve", "regenerate"], 0, "Let me do both."),
    ('<tool_call>\n{"name": "retrieve", "arguments": {"queries": ["a"]</tool_call>', [], 1, ""),
    ('<tool_call>{"name": "retrieve", "arguments": "{\\"queries\\": [\\"a\\"]}"}</tool_call>', ["retrieve"], 0, ""),
    ('<tool_call>{"arguments": {}}</tool_call>', [], 1, ""),
    ('<tool_call>{"name": "retrieve", "arguments": ["a"]}</tool_call>', [], 1, ""),
    ('<tool_call>\n{"name": "retrieve", "arguments": {"queries": ["a"]}}', [], 1, ""),  # cut off
    ('{"name": "retrieve", "arguments": {"queries": ["a"]}}', ["retrieve"], 0, ""),  # tags dropped
    ('```json\n{"name": "retrieve", "arguments": {}}\n```', ["retrieve"], 0, ""),
])
def test_parse_tool_calls(text: str, names: list[str], n_invalid: int, content: str) -> None:
    got_content, calls, invalid = parse_tool_calls(text)
    assert [c["name"] for c in calls] == names
    assert len(invalid) == n_invalid
    assert got_content == content
    for item in invalid:
        assert item["error"] and item["id"] and item["type"] == "invalid_tool_call"
    for call in calls:
        assert isinstance(call["args"], dict) and call["id"].startswith("call_")


def test_malformed_call_keeps_its_name_and_text_for_the_error_message() -> None:
    _, calls, invalid = parse_tool_calls('<tool_call>{"name": "retrieve", "arguments": {"queries": [}</tool_call>')
    assert calls == []
    assert invalid[0]["name"] == "retrieve"
    assert "not valid JSON" in invalid[0]["error"]
    assert '"queries": [' in invalid[0]["args"]


def test_bind_tools_and_invoke_on_the_tiny_model(chat: QwenChatModel) -> None:
    reply = chat.bind_tools([retrieve, regenerate]).invoke(TRANSCRIPT[:2])
    assert isinstance(reply, AIMessage)
    assert reply.usage_metadata["output_tokens"] <= chat.max_new_tokens
    assert reply.usage_metadata["input_tokens"] > 100  # the tools were rendered into the prompt
    assert isinstance(reply.response_metadata["raw"], str)


def test_decoding_keeps_tool_call_tags(chat: QwenChatModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scripted 'model output' in token ids goes through the real tokenizer's decode and our parser."""
    reply_text = ('<tool_call>\n{"name": "retrieve", "arguments": {"queries": ["a cat"]}}\n</tool_call>'
                  '<tool_call>\n{"name": "regenerate", "arguments": {"prompt": "a cat", "reference_ids": ["r1"]}}\n'
                  "</tool_call><|im_end|>")
    reply_ids = chat.tokenizer(reply_text, add_special_tokens=False, return_tensors="pt")["input_ids"]

    def scripted_generate(input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.cat([input_ids, reply_ids.to(input_ids.device)], dim=1)

    monkeypatch.setattr(chat.model, "generate", scripted_generate)
    reply = chat.bind_tools([retrieve, regenerate]).invoke(TRANSCRIPT)
    assert [c["name"] for c in reply.tool_calls] == ["retrieve", "regenerate"]
    assert reply.tool_calls[1]["args"] == {"prompt": "a cat", "reference_ids": ["r1"]}
    assert reply.content == "" and reply.invalid_tool_calls == []


def test_sampling_follows_the_temperature(chat: QwenChatModel, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict] = []
    real = chat.model.generate

    def spy(**kwargs):
        seen.append({k: v for k, v in kwargs.items() if k in ("do_sample", "temperature", "max_new_tokens")})
        return real(**kwargs)

    monkeypatch.setattr(chat.model, "generate", spy)
    chat.invoke([HumanMessage("hi")])
    warm = chat.model_copy(update={"temperature": 0.7})
    warm.invoke([HumanMessage("hi")])
    assert seen[0] == {"do_sample": False, "max_new_tokens": chat.max_new_tokens}
    assert seen[1]["do_sample"] is True and seen[1]["temperature"] == 0.7


def test_openai_backend_constructs_without_a_server(tiny_settings: Settings) -> None:
    from langchain_openai import ChatOpenAI

    models = replace(tiny_settings.models, llm_backend="openai", llm="qwen2.5:7b-instruct",
                     llm_base_url="http://127.0.0.1:9/v1")
    chat = make_chat_model(replace(tiny_settings, models=models))
    assert isinstance(chat, ChatOpenAI)
    assert chat.model_name == "qwen2.5:7b-instruct"
    assert re.match(r"http://127\.0\.0\.1:9/v1/?", str(chat.openai_api_base))
    with pytest.raises(UserError, match="llm_base_url"):
        make_chat_model(replace(tiny_settings, models=replace(models, llm_base_url="")))


def test_a_vision_checkpoint_is_not_an_llm(tiny_settings: Settings, tiny_kit: dict[str, Path]) -> None:
    wrong = replace(tiny_settings, models=replace(tiny_settings.models, llm=str(tiny_kit["judge"])))
    with pytest.raises(ModelLoadError, match="qwen2_5_vl"):
        make_chat_model(wrong)


def test_tool_schemas_reach_the_prompt_as_json(chat: QwenChatModel) -> None:
    text = chat.render([HumanMessage("x")], TOOLS)
    schemas = [json.loads(line) for line in text.split("<tools>\n")[1].split("\n</tools>")[0].splitlines()]
    assert [s["function"]["name"] for s in schemas] == ["retrieve", "regenerate"]

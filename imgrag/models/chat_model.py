"""The agent's LLM as a LangChain chat model: a local Qwen2.5 with real tool calls, or an OpenAI-compatible server.

langchain-huggingface's ``ChatHuggingFace`` cannot drive a tool loop over a local model (bound tools
never reach the prompt, ``<tool_call>`` text is not parsed, a ToolMessage in the history raises;
langchain-ai/langchain#29033), so :class:`QwenChatModel` does the three things itself:

1. renders the LangChain messages and the bound tools through the tokenizer's own chat template
   (Qwen2.5's template writes the tools into the system turn and past calls as ``<tool_call>`` blocks);
2. generates, greedy unless ``temperature > 0``;
3. parses every ``<tool_call>{json}</tool_call>`` block of the reply into ``AIMessage.tool_calls``
   (several per turn), unreadable ones into ``invalid_tool_calls`` with the reason, the rest into
   ``content`` (:func:`parse_tool_calls`, a pure function).
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage, convert_to_openai_messages
from langchain_core.messages.tool import InvalidToolCall, ToolCall, invalid_tool_call, tool_call
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict

from imgrag.deadlines import time_limit
from imgrag.errors import ModelLoadError, UserError
from imgrag.models.reasoning import answer_text
from imgrag.settings import Settings
from imgrag.text import describe_error
from imgrag.untrusted import control_markers, neutralise, neutralise_tree
from imgrag.weights.checkpoints import check_model_type, loading, qwen_dtype

LLM_EXPECTED = "a Qwen2.5 (or Qwen3) instruct checkpoint with its tool-calling chat template"
# Families whose chat template speaks the <tool_call>{"name", "arguments"}</tool_call> dialect we parse.
QWEN_MODEL_TYPES = {"qwen2", "qwen2_moe", "qwen3", "qwen3_moe"}

_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", flags=re.S)


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall], list[InvalidToolCall]]:
    """Split a Qwen reply into (content, tool_calls, invalid_tool_calls); never raises.

    A block cut off by the token limit (no ``</tool_call>``) is invalid. A reply that is nothing but
    one ``{"name": ..., "arguments": {...}}`` object (Qwen sometimes drops the tags) counts as a call.
    Only the answer after a reasoning block is read (:func:`imgrag.models.reasoning.answer_text`): a call
    drafted inside ``<think>`` is not a call.
    """
    text = answer_text(text)
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    blocks = list(_BLOCK.finditer(text))
    if not blocks:
        bare = _strip_fence(text.strip())
        if bare.startswith("{") and '"name"' in bare and '"arguments"' in bare:
            call, error = _read_call(bare)
            if call is not None:
                return "", [call], []
        return text.strip(), [], []
    for block in blocks:
        body = _strip_fence(block.group(1).strip())
        if block.group(0).endswith("</tool_call>"):
            call, error = _read_call(body)
        else:
            call, error = None, "unterminated <tool_call> block (cut off by the token limit?)"
        if call is not None:
            calls.append(call)
        else:
            name = re.search(r'"name"\s*:\s*"([^"]+)"', body)
            invalid.append(invalid_tool_call(name=name.group(1) if name else None, args=body, id=_new_id(),
                                             error=error))
    content = _BLOCK.sub("", text).strip()
    return content, calls, invalid


def _read_call(body: str) -> tuple[ToolCall | None, str]:
    try:
        obj = json.loads(body)
    except ValueError as exc:
        return None, f"tool call is not valid JSON: {exc}"
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"].strip():
        return None, 'tool call must be a JSON object {"name": <tool name>, "arguments": {...}}'
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models double-encode the arguments
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError as exc:
            return None, f"tool call arguments are not valid JSON: {exc}"
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None, f"tool call arguments must be a JSON object, got {type(args).__name__}"
    return tool_call(name=obj["name"].strip(), args=args, id=_new_id()), ""


def _strip_fence(text: str) -> str:
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.S)
    return fenced.group(1) if fenced else text


def _new_id() -> str:
    return f"call_{uuid.uuid4().hex[:16]}"


def content_text(content: Any) -> str:
    """A message's content as plain text: content blocks are joined line by line."""
    if isinstance(content, list):
        return "\n".join(b.get("text", "") if isinstance(b, dict) else str(b) for b in content)
    return str(content or "")


def read_reply(reply: AIMessage) -> AIMessage:
    """A reply whose calls the server left in its text (no parsed ``tool_calls``: Qwen's ``<tool_call>`` blocks,
    a reasoning block) read as :func:`parse_tool_calls` reads a local reply; any other reply unchanged."""
    if reply.tool_calls or reply.invalid_tool_calls:
        return reply
    text = content_text(reply.content)
    content, calls, invalid = parse_tool_calls(text)
    if not calls and not invalid and content == text.strip():
        return reply
    metadata = {**reply.response_metadata, "raw": text}
    return reply.model_copy(update={"content": content, "tool_calls": calls, "invalid_tool_calls": invalid,
                                    "response_metadata": metadata})


def to_template_messages(messages: Sequence[BaseMessage], markers: Sequence[str] = ()) -> list[dict[str, Any]]:
    """LangChain messages -> the dicts Qwen's chat template reads.

    Tool-call arguments must be dicts: ``convert_to_openai_messages`` gives JSON strings, which the
    template's ``| tojson`` would encode a second time. Content blocks become plain text.
    Every content string and argument passes :func:`imgrag.untrusted.neutralise` (with the tokenizer's
    ``markers``): captions, file names, prompts and tool results are content, never template markup.
    """
    out = []
    for message in convert_to_openai_messages(list(messages)):
        message = dict(message)
        message["content"] = neutralise(content_text(message.get("content")), markers)
        calls = []
        for call in message.get("tool_calls") or []:
            function = dict(call["function"])
            if isinstance(function.get("arguments"), str):
                function["arguments"] = json.loads(function["arguments"] or "{}")
            function["arguments"] = neutralise_tree(function.get("arguments") or {}, markers)
            function["name"] = neutralise(str(function.get("name", "")), markers)
            calls.append({**call, "function": function})
        if calls:
            message["tool_calls"] = calls
        out.append(message)
    return out


class QwenChatModel(BaseChatModel):
    """A local transformers Qwen2.5 instruct model with tool calling; see the module docstring."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: Any
    tokenizer: Any
    max_new_tokens: int = 512
    temperature: float = 0.0
    model_name: str = "qwen-local"

    @classmethod
    def from_pretrained(cls, settings: Settings, device: str | None = None, *, place: bool = True) -> QwenChatModel:
        """Load ``settings.models.llm`` (safetensors only, no remote code) onto ``device``.

        ``place=False`` leaves it in CPU RAM (in the dtype chosen for ``device``) for the model manager to move."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        ref = settings.models.llm
        device = device or settings.resolved_device()
        with loading("agent LLM", ref, LLM_EXPECTED):
            check_model_type(ref, "agent LLM", LLM_EXPECTED, QWEN_MODEL_TYPES)
            tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(ref, dtype=qwen_dtype(settings, device),
                                                         trust_remote_code=False, use_safetensors=True)
        if not getattr(tokenizer, "chat_template", None):
            raise ModelLoadError(f"{ref} has no chat template (expected {LLM_EXPECTED})")
        chat = cls(model=model.eval(), tokenizer=tokenizer, max_new_tokens=settings.llm.max_new_tokens,
                   temperature=settings.llm.temperature, model_name=str(ref))
        return chat.to(device) if place else chat

    def to(self, device: str) -> QwenChatModel:
        self.model.to(device)
        return self

    @property
    def _llm_type(self) -> str:
        return "imgrag-qwen-local"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "max_new_tokens": self.max_new_tokens, "temperature": self.temperature}

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (rendered into the prompt by the chat template). ``tool_choice`` cannot be forced
        on a local model and is accepted only for interface compatibility."""
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    def render(self, messages: Sequence[BaseMessage], tools: list[dict[str, Any]] | None = None) -> str:
        """The exact prompt text the model sees (useful for debugging and tests)."""
        markers = control_markers(self.tokenizer)
        return self.tokenizer.apply_chat_template(to_template_messages(messages, markers), tools=tools or None,
                                                  add_generation_prompt=True, tokenize=False)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        import torch

        from imgrag.models.stopping import generation_stop_strings, stop_reason, tool_call_stopping

        prompt = self.render(messages, tools)
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        stopping = tool_call_stopping(self.tokenizer, inputs["input_ids"].shape[1])
        sampling: dict[str, Any] = {"do_sample": False}
        if self.temperature > 0:
            sampling = {"do_sample": True, "temperature": self.temperature}
        # ``deadline`` (a time.monotonic() instant, passed to invoke) stops the generation at a token; LangChain's
        # stop sequences end it in transformers, those it can be trusted with (generation_stop_strings).
        limits: dict[str, Any] = {**time_limit(kwargs.get("deadline"))}
        stop_strings = generation_stop_strings(prompt, stop)
        if stop_strings:
            limits.update(stop_strings=stop_strings, tokenizer=self.tokenizer)
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens,
                                         pad_token_id=self.tokenizer.pad_token_id, stopping_criteria=stopping,
                                         **sampling, **limits)
        new_tokens = output[0, inputs["input_ids"].shape[1]:]
        # skip_special_tokens drops <|im_end|> but keeps <tool_call> (an added, non-special token in Qwen2.5).
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
        n_in, n_out = int(inputs["input_ids"].shape[1]), int(new_tokens.shape[0])
        # A stop sequence reached is the answer's end too, though no criterion of ours saw it.
        reason = "answer" if any(m in text for m in stop or []) else stop_reason(stopping, n_out, self.max_new_tokens)
        for marker in stop or []:
            text = text.split(marker, 1)[0]
        content, calls, invalid = parse_tool_calls(text)
        message = AIMessage(content=content, tool_calls=calls, invalid_tool_calls=invalid,
                            response_metadata={"model_name": self.model_name, "raw": text, "stop": reason},
                            usage_metadata={"input_tokens": n_in, "output_tokens": n_out, "total_tokens": n_in + n_out})
        return ChatResult(generations=[ChatGeneration(message=message)])


REMOTE_TIMEOUT_S = 300.0  # one reply of a remote LLM, seconds
PROBE_TIMEOUT_S = 5.0


def check_endpoint(settings: Settings, timeout: float = PROBE_TIMEOUT_S) -> list[str]:
    """Ask the OpenAI-compatible server of ``settings`` which models it serves (``GET {base_url}/models``).

    Returns their ids. Raises a UserError of one line when the server cannot be reached, refuses the key, or
    does not speak the protocol; a model it does not list is only logged (Ollama and ``transformers serve``
    load models on demand)."""
    import httpx

    base = (settings.models.llm_base_url or "").rstrip("/")
    if not base:
        raise UserError("models.llm_base_url must name the server (e.g. http://localhost:8000/v1) "
                        "when models.llm_backend = \"openai\"")
    headers = {"Authorization": f"Bearer {settings.models.llm_api_key}"} if settings.models.llm_api_key else {}
    hint = "start the server, fix models.llm_base_url, or run with --planner fixed"
    try:
        response = httpx.get(f"{base}/models", headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise UserError(f"cannot reach the agent LLM server at {base} ({describe_error(exc)}); "
                        f"{hint}") from None
    if response.status_code >= 400:
        raise UserError(f"the agent LLM server at {base} answered {response.status_code} to GET /models; {hint}")
    try:
        served = [str(m.get("id")) for m in response.json().get("data", []) if isinstance(m, dict)]
    except (ValueError, AttributeError):
        raise UserError(f"{base}/models did not answer as an OpenAI-compatible server (no JSON model list); "
                        f"{hint}") from None
    if served and settings.models.llm not in served:
        logging.getLogger(__name__).warning("the server at %s does not list %s (it lists %s)", base,
                                            settings.models.llm, ", ".join(served[:5]))
    return served


def make_chat_model(settings: Settings, device: str | None = None, *, place: bool = True) -> BaseChatModel:
    """The profile's agent LLM: "local" (transformers, in this process; ``device`` and ``place`` as in
    :meth:`QwenChatModel.from_pretrained`) or "openai" (vLLM, Ollama, ...)."""
    backend = settings.models.llm_backend
    if backend == "local":
        return QwenChatModel.from_pretrained(settings, device, place=place)
    if backend == "openai":
        if not settings.models.llm_base_url:
            raise UserError("models.llm_base_url must name the server (e.g. http://localhost:8000/v1) "
                            "when models.llm_backend = \"openai\"")
        from langchain_openai import ChatOpenAI

        # One retry, not the client's default backoff: a server that is down should hand the step to the policy soon.
        return ChatOpenAI(base_url=settings.models.llm_base_url, model=settings.models.llm,
                          api_key=settings.models.llm_api_key or "not-needed", temperature=settings.llm.temperature,
                          max_tokens=settings.llm.max_new_tokens, max_retries=1, timeout=REMOTE_TIMEOUT_S)
    raise UserError(f"models.llm_backend must be local or openai, got {backend!r}")

"""Short answers: stopping criteria that end a generation as soon as the answer is complete.

A random-weight judge writes its full ``max_new_tokens`` every time and a real one adds free text
after its verdict; the agent LLM may go on after its tool call. Each new token costs a full decoder
step (27 ms for Qwen2.5-VL-3B on an H100, BENCHMARKS.md), so stopping at the answer's end is the
cheapest speed-up there is:

- :class:`JsonObjectEnd`: the first top-level JSON object of the new text has closed (the judge's
  verdict, ``{"match": ..., "missing": [...], "reason": ...}``);
- :class:`TextMarker`: the new text contains a marker (the LLM's ``</tool_call>``).

Both are ``transformers.StoppingCriteria`` and look only at the tokens generated after the prompt, and only
at the answer part of them (:func:`imgrag.models.reasoning.answer_text`): a JSON draft or a ``</tool_call>`` inside
a ``<think>`` block does not end the generation. Neither is transformers' ``stop_strings``: a closed JSON object is
no fixed string, and for the marker see :class:`TextMarker`. Where a fixed string should end the text wherever it
is written (LangChain's ``stop`` sequences, cut from the reply anyway), :func:`generation_stop_strings` hands them to
``generate(stop_strings=..., tokenizer=...)``. :func:`stop_reason` names why a call ended, for the trace.
"""

from __future__ import annotations

from typing import Any

from transformers import StoppingCriteria, StoppingCriteriaList

from imgrag.models.reasoning import answer_text, matching_brace

# How many trailing tokens TextMarker decodes: enough for any marker (</tool_call> is one token in Qwen2.5's
# vocabulary, a handful in a byte-level tokenizer without it), without decoding the whole answer every step.
_TAIL_TOKENS = 24


def json_object_closed(text: str) -> bool:
    """Whether ``text`` holds a complete top-level JSON object: a ``{`` and its matching ``}``, with braces
    inside JSON strings (double quotes, backslash escapes) not counted."""
    start = text.find("{")
    return start != -1 and matching_brace(text, start) != -1


class _NewTextCriterion(StoppingCriteria):
    """Base: decodes each row's tokens after the prompt and asks :meth:`done` about them."""

    def __init__(self, tokenizer: Any, prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = int(prompt_length)
        self.fired = False

    def new_text(self, row: Any) -> str:
        return self.tokenizer.decode(row[self.prompt_length:], skip_special_tokens=False)

    def done(self, row: Any) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        flags = torch.tensor([self.done(row) for row in input_ids], dtype=torch.bool, device=input_ids.device)
        self.fired = self.fired or bool(flags.any())
        return flags


class JsonObjectEnd(_NewTextCriterion):
    """Stop once the new text holds a complete JSON object (the judge's verdict)."""

    def done(self, row: Any) -> bool:
        return json_object_closed(answer_text(self.new_text(row)))


class TextMarker(_NewTextCriterion):
    """Stop once the answer part of the new text contains ``marker`` (``"</tool_call>"`` for the agent LLM).

    Not transformers' ``stop_strings`` (``StopStringCriteria``, checked with transformers 5.25), for two reasons:
    it stops at the marker wherever it is written, also inside a ``<think>`` block, where a drafted call is not the
    answer; and it matches across the prompt's end, so a marker that begins in the prompt ends the answer (a stop
    string of two newlines ended the tiny Qwen's answer after its first newline, the prompt ending in one). This
    criterion reads only the new tokens' answer."""

    def __init__(self, tokenizer: Any, prompt_length: int, marker: str) -> None:
        super().__init__(tokenizer, prompt_length)
        self.marker = marker

    def done(self, row: Any) -> bool:
        tail = row[max(self.prompt_length, len(row) - _TAIL_TOKENS):]
        # The tail is the cheap test; the whole answer is decoded only when the marker is there.
        return self.marker in self.tokenizer.decode(tail, skip_special_tokens=False) and \
            self.marker in answer_text(self.new_text(row))


def verdict_stopping(tokenizer: Any, prompt_length: int) -> StoppingCriteriaList:
    """Criteria for a judge call: stop at the end of the JSON verdict."""
    return StoppingCriteriaList([JsonObjectEnd(tokenizer, prompt_length)])


def tool_call_stopping(tokenizer: Any, prompt_length: int) -> StoppingCriteriaList:
    """Criteria for an agent LLM call: stop at the end of its (first) tool call, ``</tool_call>``."""
    return StoppingCriteriaList([TextMarker(tokenizer, prompt_length, "</tool_call>")])


def generation_stop_strings(prompt: str, stop: list[str] | None) -> list[str]:
    """The ``stop`` sequences (LangChain's: the reply is cut at the first of them) that transformers'
    ``generate(stop_strings=...)`` may end the generation at, so that it does not run on to ``max_new_tokens``.

    Left out: each string the prompt's end could begin (``prompt`` ends with a proper prefix of it), because
    ``StopStringCriteria`` also matches a string that starts before the first new token (on the tiny Qwen, whose
    prompt ends in a newline, ``"\n\n"`` ended the reply at its first newline). Those still cut the reply; the
    generation just runs to its limit, as every stop sequence did before."""
    return [s for s in stop or [] if s and not any(prompt.endswith(s[:k]) for k in range(1, len(s)))]


def stop_reason(criteria: StoppingCriteriaList, new_tokens: int, max_new_tokens: int) -> str:
    """Why a generation ended: "answer" (one of ``criteria`` fired), "max_new_tokens", or "eos"."""
    if any(getattr(c, "fired", False) for c in criteria):
        return "answer"
    return "max_new_tokens" if new_tokens >= max_new_tokens else "eos"

"""Content is never markup: text imgrag did not write cannot become a chat-template control token.

The local LLM and the judge render their conversation through the checkpoint's chat template as *text* and then
tokenize it, so a caption, a file name, a prompt, a tool result or picture metadata that contains ``<|im_start|>``,
``<|im_end|>``, ``<tool_call>``, ``<|endoftext|>`` or a vision marker would otherwise become the real control token
and could open a new turn or fake a tool call. :func:`neutralise` breaks every such marker *visibly* (a space after
its first character: ``<|im_end|>`` becomes ``< |im_end|>``), so the model still reads the text but the tokenizer can
no longer match it as one token. It is applied where the messages are built, for both models
(:func:`imgrag.models.chat_model.to_template_messages` and :meth:`imgrag.models.judge.Judge.ask`).

Markers are every token the tokenizer added on top of its vocabulary (``added_tokens_decoder``: Qwen's specials,
``<tool_call>``, ``<think>``, vision tokens) plus a fixed pattern for Qwen-style ``<|...|>`` and ``<tool_...>`` tags,
so the rule also holds without a tokenizer at hand.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

# Qwen's template dialect: <|name|> specials and <tool_call>/<tool_response>/<think> tags (opening or closing).
_PATTERN = re.compile(r"<\|[^<>|\s]{1,40}\|>|</?(?:tool_call|tool_response|think|tools)>")


def control_markers(tokenizer: Any) -> list[str]:
    """The text of every added token of ``tokenizer`` (a transformers tokenizer or a processor holding one).

    Returns the strings longest first (so a marker that contains another is broken whole); [] when the object has
    no ``added_tokens_decoder``."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    decoder = getattr(tok, "added_tokens_decoder", None) or {}
    markers = {str(getattr(t, "content", t)) for t in decoder.values()}
    return sorted((m for m in markers if len(m) > 1), key=len, reverse=True)


def neutralise(text: str, markers: Iterable[str] = ()) -> str:
    """``text`` with every control marker broken visibly (``<|im_end|>`` -> ``< |im_end|>``).

    ``markers`` are extra token strings (see :func:`control_markers`); the built-in Qwen pattern always applies.
    Repeats until nothing matches, so no marker can be assembled from the pieces of a broken one."""
    extra = [m for m in markers if m]
    while True:
        before = text
        text = _PATTERN.sub(lambda m: m.group(0)[0] + " " + m.group(0)[1:], text)
        for marker in extra:
            if marker in text:
                text = text.replace(marker, marker[0] + " " + marker[1:])
        if text == before:
            return text


def neutralise_tree(value: Any, markers: Iterable[str] = ()) -> Any:
    """:func:`neutralise` applied to every string inside ``value`` (dicts' keys and values, lists, tuples)."""
    markers = list(markers)
    if isinstance(value, str):
        return neutralise(value, markers)
    if isinstance(value, dict):
        return {neutralise_tree(k, markers): neutralise_tree(v, markers) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(neutralise_tree(v, markers) for v in value)
    return value

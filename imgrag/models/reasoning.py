"""The answer part of a model's reply: what follows its reasoning block.

Reasoning models (Qwen3, QwQ, DeepSeek-R1 and their servers) write ``<think>...</think>`` before the
answer; a draft tool call or verdict inside it is not the answer. Qwen3's chat template opens the
block in the prompt, so a reply may hold only the closing tag. A block the token limit cut off
(``<think>`` with no close) holds no answer at all.
"""

from __future__ import annotations

import re

_OPEN = re.compile(r"<think>", flags=re.I)
_CLOSE = re.compile(r"</think>", flags=re.I)


def answer_text(text: str) -> str:
    """``text`` after its last ``</think>``; empty when a ``<think>`` block never closes."""
    text = text if isinstance(text, str) else str(text or "")
    closes = list(_CLOSE.finditer(text))
    if closes:
        return text[closes[-1].end():].strip()
    if _OPEN.search(text):
        return ""  # still thinking when the reply ended: nothing was answered
    return text.strip()


def matching_brace(text: str, start: int, quotes: str = '"') -> int:
    """The index of the ``}`` that closes the ``{`` at ``start``, or -1 when it is not closed yet. Braces inside
    strings opened by any of ``quotes`` (backslash escapes honoured) do not count."""
    depth, quote, escaped = 0, "", False
    for i in range(start, len(text)):
        ch = text[i]
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = ""
        elif ch in quotes:
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1

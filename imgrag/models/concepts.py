"""The concept rewriter: missing concepts -> stand-alone retrieval captions (ImageRAG's caption step).

A judge names what is missing in the words of the prompt ("the cradle"); a reference store finds
photos better with a caption of what such a photo shows ("a photo of a wooden baby cradle"). The LLM
writes one caption per concept (``prompts/concepts.md``) and drops concepts no photo can show.

A small or random model often answers with something else than a JSON list; then the missing phrases
themselves are the queries (cleaned, de-duplicated), which is what ImageRAG does without a rewriter.
This never raises: retrieval must go on.
"""

from __future__ import annotations

import ast
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import prompts
from imgrag.models.chat_model import content_text
from imgrag.models.judge import clean_phrase

log = logging.getLogger(__name__)

MAX_CAPTION_CHARS = 200


@dataclass
class ConceptCaptions:
    """The captions to retrieve with; ``fallback`` is True when they are the missing phrases themselves."""

    captions: list[str]
    fallback: bool
    raw: str = ""
    notes: list[str] = field(default_factory=list)


def rewrite_concepts(chat_model: Any, prompt: str, missing: list[str]) -> list[str]:
    """Retrieval captions for ``missing`` (see :func:`caption_concepts`, which also says whether it fell back)."""
    return caption_concepts(chat_model, prompt, missing).captions


def caption_concepts(chat_model: Any, prompt: str, missing: list[str]) -> ConceptCaptions:
    """Ask the chat model for one caption per missing concept; fall back to the phrases on junk."""
    phrases = clean_concepts(missing)
    if not phrases:
        return ConceptCaptions([], fallback=False)
    from langchain_core.messages import HumanMessage

    question = prompts.render("concepts", prompt=prompt, missing="\n".join(f"- {p}" for p in phrases))
    try:
        reply = chat_model.invoke([HumanMessage(question)])
        raw = content_text(getattr(reply, "content", reply))
    except Exception as exc:  # a failing LLM (server down, OOM turned UserError) must not stop retrieval
        log.warning("concept rewriter failed (%s); retrieving with the missing phrases", exc)
        return ConceptCaptions(phrases, fallback=True, notes=[f"rewriter failed: {exc}"])
    captions = parse_captions(raw)
    if captions is None:
        log.info("concept rewriter answered without a usable JSON list; retrieving with the missing phrases")
        return ConceptCaptions(phrases, fallback=True, raw=raw, notes=["rewriter answer unusable"])
    if len(captions) > len(phrases):  # one caption per concept: extra ones are the model rambling
        captions = captions[:len(phrases)]
    return ConceptCaptions(captions, fallback=False, raw=raw)


def clean_concepts(missing: list[str]) -> list[str]:
    """Cleaned, de-duplicated (case-insensitively), non-empty phrases, in their order."""
    seen: set[str] = set()
    out: list[str] = []
    for item in missing or []:
        phrase = clean_phrase(str(item))[:MAX_CAPTION_CHARS]
        if phrase and phrase.lower() not in seen:
            seen.add(phrase.lower())
            out.append(phrase)
    return out


def parse_captions(text: str) -> list[str] | None:
    """A JSON (or Python) list of strings anywhere in ``text``, or a bullet list; None if neither is there.

    An explicit empty list is a valid answer: every concept was dropped as unpicturable.
    """
    for candidate in _list_candidates(text):
        for load in (json.loads, ast.literal_eval):
            try:
                value = load(candidate)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                captions = clean_concepts(value)
                if captions or not value:
                    return captions
    bullets = re.findall(r"^\s*(?:[-*\u2022]|\d+[.)])\s+(.*\S)", text, flags=re.M)
    # Only a list made wholly of word-bearing bullets counts: random text rarely looks like that.
    if not bullets or not all(re.search(r"[A-Za-z]{3,}", b) for b in bullets):
        return None
    return clean_concepts(bullets) or None


def _list_candidates(text: str) -> list[str]:
    fenced = [m.group(1) for m in re.finditer(r"```(?:json|python)?\s*(.*?)```", text, flags=re.S)]
    spans = [m.group(0) for m in re.finditer(r"\[[^\[\]]*\]", text, flags=re.S)]
    return fenced + spans

"""The judge: Qwen2.5-VL looks at a picture and its prompt and says what is missing.

Its answer is free text from a small model, so :func:`parse_verdict` accepts every shape seen in
practice: JSON (bare, in code fences, inside prose, truncated by the token limit), Python-literal
pseudo-JSON, synonyms for the keys, "yes"/"no" answers, and the free-text forms of ImageRAG and
TinyIMGRAG ("The different conception is a X", "<Content matches>"). An answer it cannot read gives
``parsed=False`` with the raw text kept; the caller then retrieves with the prompt itself
(ImageRAG's own fallback). It never raises.
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image

import prompts
from imgrag.deadlines import time_limit
from imgrag.errors import UserError
from imgrag.images import NEUTRAL_BACKGROUND
from imgrag.models.reasoning import answer_text, matching_brace
from imgrag.settings import Settings
from imgrag.untrusted import control_markers, neutralise
from imgrag.weights.checkpoints import check_model_type, loading, qwen_dtype

JUDGE_EXPECTED = "a Qwen2.5-VL checkpoint (Qwen2_5_VLForConditionalGeneration + its processor)"

_MATCH_KEYS = ("match", "matches", "matched", "is_match", "content_matches", "answer", "verdict")
_MISSING_KEYS = ("missing", "missing_concepts", "missing_objects", "missing_elements", "differences", "concepts")
_REASON_KEYS = ("reason", "explanation", "rationale", "reasoning", "why", "comment")
_TRUE_WORDS = {"yes", "y", "true", "match", "matches", "matched", "1"}
_FALSE_WORDS = {"no", "n", "false", "mismatch", "no match", "does not match", "0"}
_NOTHING = {"", "none", "nothing", "n/a", "na", "null", "[]", "-", "no", "nothing missing"}


@dataclass
class Verdict:
    """The judge's answer: does the picture match, which concepts are missing, and why."""

    match: bool
    missing: list[str] = field(default_factory=list)
    reason: str = ""
    raw: str = ""
    parsed: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------


def parse_verdict(text: str) -> Verdict:
    """Read a judge's answer in any of the shapes the module docstring lists; never raises."""
    raw = text if isinstance(text, str) else str(text)
    try:
        cleaned = _clean(raw)
        for candidate in _object_candidates(cleaned):
            mapping = _load_mapping(candidate)
            verdict = _from_mapping(mapping, raw) if mapping is not None else None
            if verdict is not None:
                return verdict
        verdict = _from_keys(cleaned, raw) or _from_free_text(cleaned, raw)
        if verdict is not None:
            return verdict
    except Exception as exc:  # a parser bug must not stop a run: it is named in the reason, with the raw answer
        return Verdict(match=False, missing=[], raw=raw, parsed=False,
                       reason=f"the judge's answer could not be parsed (parser error: {type(exc).__name__})")
    return Verdict(match=False, missing=[], reason="the judge's answer could not be parsed", raw=raw, parsed=False)


def _clean(text: str) -> str:
    text = answer_text(text)  # reasoning models think aloud first; only the answer after </think> counts
    return text.replace("\u201c", '"').replace("\u201d", '"').replace("\u2018", "'").replace("\u2019", "'").strip()


def _object_candidates(text: str) -> list[str]:
    """Text that may hold the verdict object: fenced blocks, then each balanced {...}, then a truncated tail."""
    found = [m.group(1) for m in re.finditer(r"```(?:json|JSON|python)?\s*(.*?)```", text, flags=re.S)]
    start = text.find("{")
    while start != -1:
        end = _matching_brace(text, start)
        if end == -1:
            found.append(text[start:] + "}")  # cut off by the token limit: try closing it
            break
        found.append(text[start:end + 1])
        start = text.find("{", end + 1)
    return found


def _matching_brace(text: str, start: int) -> int:
    return matching_brace(text, start, quotes="\"'")  # Python-style dicts quote with ' too


def _load_mapping(candidate: str) -> dict | None:
    """JSON, then a Python literal (single quotes, True/False), then both after removing trailing commas."""
    candidate = candidate.strip()
    repaired = re.sub(r",\s*([}\]])", r"\1", candidate)
    pythonic = re.sub(r"\btrue\b", "True", re.sub(r"\bfalse\b", "False", re.sub(r"\bnull\b", "None", repaired)))
    for attempt in (candidate, repaired):
        try:
            value = json.loads(attempt)
            return value if isinstance(value, dict) else None
        except ValueError:
            pass
    for attempt in (repaired, pythonic):
        try:
            value = ast.literal_eval(attempt)
            return value if isinstance(value, dict) else None
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            pass
    return None


def _from_mapping(mapping: dict, raw: str) -> Verdict | None:
    lowered = {str(k).strip().lower().replace(" ", "_"): v for k, v in mapping.items()}
    match = next((m for k in _MATCH_KEYS if k in lowered and (m := _as_bool(lowered[k])) is not None), None)
    missing_value = next((lowered[k] for k in _MISSING_KEYS if k in lowered), None)
    missing = _as_concepts(missing_value)
    if match is None and missing_value is None:
        # {"verdict": {...}} or {"result": {...}}: look one level down.
        for value in mapping.values():
            if isinstance(value, dict) and (inner := _from_mapping(value, raw)) is not None:
                return inner
        return None
    if match is None:
        match = not missing
    reason = next((str(lowered[k]) for k in _REASON_KEYS if k in lowered and lowered[k] is not None), "")
    if match and not missing:
        missing = absent_concepts(reason)  # {"match": true, "reason": "the heron is there but there is no pond"}
    # A "match" that still names missing concepts contradicts itself; trust the concrete list.
    return Verdict(match=bool(match) and not missing, missing=missing, reason=reason.strip(), raw=raw)


def _from_keys(text: str, raw: str) -> Verdict | None:
    """A broken object (a missing quote, a stray word) whose "match" key is still readable."""
    m = re.search(r"[\"']?match(?:es)?[\"']?\s*[:=]\s*[\"']?(true|false|yes|no)\b", text, flags=re.I)
    if m is None:
        return None
    missing: list[str] = []
    block = re.search(r"[\"']?missing[\"']?\s*[:=]\s*\[(.*?)(?:\]|$)", text, flags=re.I | re.S)
    if block:
        missing = _as_concepts(re.findall(r"[\"']([^\"']+)[\"']", block.group(1)))
    reason = re.search(r"[\"']?reason[\"']?\s*[:=]\s*[\"']([^\"']*)", text, flags=re.I)
    match = m.group(1).lower() in ("true", "yes")
    return Verdict(match=match and not missing, missing=missing, reason=reason.group(1).strip() if reason else "",
                   raw=raw)


def _from_free_text(text: str, raw: str) -> Verdict | None:
    differences = re.findall(r"the different conceptions? (?:is|are)\s*:?\s*([^\n.;]+)", text, flags=re.I)
    if differences:
        missing = _as_concepts(",".join(differences))
        return Verdict(match=False, missing=missing, reason="the judge named different concepts", raw=raw)
    if re.search(r"<\s*content\s+matches\s*>", text, flags=re.I):
        return Verdict(match=True, missing=[], reason="content matches", raw=raw)
    listed = re.search(r"missing(?: concepts| objects| elements)?\s*:\s*(.+)", text, flags=re.I | re.S)
    first = re.match(r"[\s*_#>`\"']*(yes|no)\b[\s.,!:;-]*(.*)", text, flags=re.I | re.S)
    if listed and _as_concepts(_first_block(listed.group(1))):
        return Verdict(match=False, missing=_as_concepts(_first_block(listed.group(1))),
                       reason=first.group(2).strip() if first else "", raw=raw)
    absent = absent_concepts(text)
    if first:
        rest = first.group(2).strip()
        # "Yes, the heron is there, but there is no pond.": a yes that names something missing is no match.
        return Verdict(match=first.group(1).lower() == "yes" and not absent, missing=absent, reason=rest, raw=raw)
    if absent:
        return Verdict(match=False, missing=absent, reason=_first_sentence(text), raw=raw)
    if re.search(r"\b(?:does not|doesn't|do not|don't|did not|not)\s+(?:fully\s+|quite\s+)?match", text, flags=re.I):
        return Verdict(match=False, missing=[], reason=_first_sentence(text), raw=raw)
    if re.search(r"\b(?:it|image|picture|content|everything)\s+(?:fully\s+|clearly\s+)?match(?:es)?\b|"
                 r"\bmatches the (?:description|prompt)\b|\bnothing is missing\b", text, flags=re.I):
        return Verdict(match=True, missing=[], reason=_first_sentence(text), raw=raw)
    return None


# ----- what a free-text answer says is missing -----
# A concept: up to six words, none of them a verb or a conjunction that starts the next clause.
_WORD = (r"(?!(?:no|not|yes|is|are|was|were|be|but|though|although|however|while|whereas|there|it|this|that|"
         r"which|who|so|in|on|at|from|to|of|for|as|with|by|anywhere|here|visible|shown|present)\b)[a-z0-9][\w'-]*")
# A list goes on past a comma only into another article: "a lantern, a bench and a tree".
_CONCEPT = rf"(?P<x>{_WORD}(?:(?:\s+|\s*,\s*(?:and\s+)?(?=(?:the|a|an)\s)){_WORD}){{0,7}})"
_ART = r"(?:(?:the|a|an|any|its|their|his|her|some|one)\s+)?"
_CLAUSE = r"(?:^|[.,;:!?\-\u2013\u2014]\s*|\b(?:but|though|although|however|while|whereas|and)\s*,?\s*)"
_ABSENT_PATTERNS = [re.compile(p, flags=re.I | re.M) for p in (
    rf"\b(?:there\s+(?:is|are)|there's|but|and|with|shows?|has|have)\s+no\s+{_ART}{_CONCEPT}",
    rf"\bno\s+sign\s+of\s+{_ART}{_CONCEPT}",
    rf"\bwithout\s+{_ART}{_CONCEPT}",
    rf"\b(?:lacks?|lacking|missing)\s+{_ART}{_CONCEPT}",
    rf"\bexcept(?:\s+for)?\s+{_ART}{_CONCEPT}",
    rf"\b(?:does\s+not|doesn't|do\s+not|don't|did\s+not|fails?\s+to|cannot|can't)\s+(?:show|include|contain|have|"
    rf"depict|see|find)\s+{_ART}{_CONCEPT}",
    rf"{_CLAUSE}{_ART}{_CONCEPT}\s+(?:itself\s+|themselves\s+)?(?:is|are)\s+(?:still\s+|completely\s+)?"
    rf"(?:missing|absent|lacking|nowhere\s+to\s+be\s+(?:seen|found)|not\s+(?:present|visible|shown|there|"
    rf"included|depicted|drawn))",
)]
# Words after "no"/"without" that name no concept: "without any doubt", "no missing concepts".
_NOT_CONCEPTS = {"doubt", "doubts", "problem", "problems", "issue", "issues", "question", "mistake", "mistakes",
                 "error", "errors", "exception", "exceptions", "concern", "concerns", "difference", "differences",
                 "concept", "concepts", "element", "elements", "object", "objects", "item", "items", "detail",
                 "details", "nothing", "anything", "everything", "something", "thing", "things", "more", "other",
                 "others", "one", "missing", "matches", "match", "way", "need"}


def absent_concepts(text: str) -> list[str]:
    """The concepts a free-text answer says are missing, absent or lacking ("but there is no pond", "however
    the lighthouse is missing", "without its basket", "everything except the violin"), in order, articles
    dropped; ``[]`` when it names none."""
    found: list[tuple[int, int, str]] = []
    for pattern in _ABSENT_PATTERNS:
        for m in pattern.finditer(text):
            for n, part in enumerate(re.split(r"\s*,\s*|\s+(?:and|or|nor)\s+", m.group("x"))):
                part = re.sub(r"^(?:(?:the|a|an|any|its|their|his|her|some)\s+)+", "", part.strip(), flags=re.I)
                part = re.sub(r"\s+(?:itself|themselves|at all|either)$", "", part, flags=re.I)
                phrase = clean_phrase(part)
                if phrase and phrase.lower() not in _NOT_CONCEPTS and not phrase.lower().startswith(("no ", "not ")):
                    found.append((m.start("x"), n, phrase))
    concepts: list[str] = []
    for _, _, phrase in sorted(found):
        if phrase.lower() not in (c.lower() for c in concepts):
            concepts.append(phrase)
    return concepts


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0][:300]


def _first_block(text: str) -> str:
    """The list after "Missing:": up to a blank line (a bullet list keeps its line breaks)."""
    return re.split(r"\n\s*\n", text.strip(), maxsplit=1)[0]


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().strip(".!").lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    return None


def _as_concepts(value: Any) -> list[str]:
    """A list, a comma/semicolon/newline separated string, or dicts of those -> clean unique phrases."""
    if value is None:
        return []
    if isinstance(value, str):
        items: list[Any] = re.split(r"[,;\n]", value)
    elif isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, dict):
        items = list(value.values())
    else:
        items = [value]
    concepts: list[str] = []
    for item in items:
        if isinstance(item, dict):  # [{"concept": "a cat", "why": ...}]: the first text field names it
            item = next((v for v in item.values() if isinstance(v, str)), "")
        phrase = clean_phrase(str(item))
        if phrase.lower() not in _NOTHING and phrase not in concepts:
            concepts.append(phrase)
    return concepts


def clean_phrase(text: str) -> str:
    """Strip bullets, numbering, quotes, brackets and end punctuation from a concept phrase."""
    text = re.sub(r"^\s*(?:[-*\u2022]+\s*|\d+[.)]\s+)+", "", text)  # "2.5 m pole" keeps its number
    return text.strip().strip("\"'`[]").strip().rstrip(".!").strip()


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


# Qwen2.5-VL sees a picture as 28 px patches (14 px, merged 2x2), and qwen-vl-utils refuses an aspect ratio of 200
# or more; a shape far from square also leaves the short side under one patch once the picture is shrunk into
# max_pixels. The judge is shown a letterboxed copy instead: never more elongated than JUDGE_MAX_ASPECT (nor than
# what max_pixels allows with a short side of at least one patch), never a side under one patch.
JUDGE_PATCH_PX = 28
JUDGE_MAX_ASPECT = 50.0


def judge_view(image: Image.Image, max_pixels: int) -> Image.Image:
    """``image`` as RGB in a shape qwen-vl-utils and Qwen2.5-VL's processor accept for a ``max_pixels`` bound.

    A picture more elongated than the bound allows is padded on its short side with imgrag's neutral grey
    (:data:`imgrag.images.NEUTRAL_BACKGROUND`), centred: the content keeps its proportions, nothing is cut. A side
    under :data:`JUDGE_PATCH_PX` (20x20, or 2 px after padding) is then scaled up to one patch (bicubic). A usual
    picture comes back unchanged (as RGB). Raises UserError when ``max_pixels`` is under one patch (no shape fits).
    """
    patch_area = JUDGE_PATCH_PX * JUDGE_PATCH_PX
    if max_pixels < patch_area:
        raise UserError(f"judge.max_pixels is {max_pixels}: the judge needs at least {patch_area} "
                        f"({JUDGE_PATCH_PX}x{JUDGE_PATCH_PX}) to see a picture")
    image = image.convert("RGB")
    width, height = image.size
    # Shrunk into max_pixels, the short side is sqrt(max_pixels / aspect): at least one patch, with room for the
    # rounding down to whole patches.
    max_aspect = max(1.0, min(JUDGE_MAX_ASPECT, max_pixels / patch_area / 2))
    if max(width, height) / min(width, height) > max_aspect:
        new_w = max(width, math.ceil(height / max_aspect))
        new_h = max(height, math.ceil(width / max_aspect))
        canvas = Image.new("RGB", (new_w, new_h), NEUTRAL_BACKGROUND)
        canvas.paste(image, ((new_w - width) // 2, (new_h - height) // 2))
        image, (width, height) = canvas, canvas.size
    if min(width, height) < JUDGE_PATCH_PX:
        scale = JUDGE_PATCH_PX / min(width, height)
        image = image.resize((max(JUDGE_PATCH_PX, math.ceil(width * scale)),
                              max(JUDGE_PATCH_PX, math.ceil(height * scale))), Image.Resampling.BICUBIC)
    return image


class Judge:
    """Qwen2.5-VL with its processor; greedy decoding, images resized within the settings' pixel bounds."""

    def __init__(self, model: Any, processor: Any, settings: Settings) -> None:
        self.model = model.eval()
        self.processor = processor
        self.settings = settings
        # The last call's tokens: {"input", "output", "max_new_tokens", "stop": "answer"|"max_new_tokens"|"eos"}.
        self.last_tokens: dict[str, Any] | None = None

    @classmethod
    def from_pretrained(cls, settings: Settings, device: str | None = None, *, place: bool = True) -> Judge:
        """Load ``settings.models.judge`` (safetensors only, no remote code) onto ``device``.

        ``place=False`` leaves it in CPU RAM (in the dtype chosen for ``device``) for the model manager to move."""
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        ref = settings.models.judge
        device = device or settings.resolved_device()
        with loading("judge", ref, JUDGE_EXPECTED):
            check_model_type(ref, "judge", JUDGE_EXPECTED, {"qwen2_5_vl"})
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                ref, dtype=qwen_dtype(settings, device), trust_remote_code=False, use_safetensors=True)
            processor = AutoProcessor.from_pretrained(ref, trust_remote_code=False)
        judge = cls(model, processor, settings)
        return judge.to(device) if place else judge

    def to(self, device: str) -> Judge:
        self.model.to(device)
        return self

    def judge(self, image: Image.Image, prompt: str, *, deadline: float | None = None) -> Verdict:
        """Ask whether ``image`` shows everything ``prompt`` asks for (``deadline`` as in :meth:`ask`)."""
        return parse_verdict(self.ask(image, prompts.render("judge", prompt=prompt), until_json=True,
                                      deadline=deadline))

    def ask(self, image: Image.Image, question: str, *, until_json: bool = False,
            deadline: float | None = None) -> str:
        """The model's raw answer to ``question`` about ``image`` (greedy, ``judge.max_new_tokens``).

        ``until_json`` stops it at the end of its first JSON object after any reasoning block. ``deadline`` (a
        ``time.monotonic()`` instant) ends the generation at the first token past it (transformers' ``max_time``,
        a stopping criterion checked per token). Token counts go to ``last_tokens``."""
        import torch
        from qwen_vl_utils import process_vision_info

        from imgrag.models.stopping import StoppingCriteriaList, stop_reason, verdict_stopping

        bounds = self.settings.judge
        messages = [{"role": "user", "content": [
            {"type": "image", "image": judge_view(image, bounds.max_pixels), "min_pixels": bounds.min_pixels,
             "max_pixels": bounds.max_pixels},
            # The question holds the user's prompt and captions: content, never template markup.
            {"type": "text", "text": neutralise(question, control_markers(self.processor))},
        ]}]
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images, _ = process_vision_info(messages)  # resized to multiples of 28 within the bounds
        # The processor resizes again within its own bounds; give it ours so both agree.
        inputs = self.processor(text=[text], images=images, padding=True, return_tensors="pt",
                                size={"shortest_edge": bounds.min_pixels, "longest_edge": bounds.max_pixels})
        inputs = inputs.to(self.model.device)
        limits = time_limit(deadline)
        prompt_length = inputs["input_ids"].shape[1]
        stopping = verdict_stopping(self.processor.tokenizer, prompt_length) if until_json else StoppingCriteriaList()
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=bounds.max_new_tokens, do_sample=False,
                                         stopping_criteria=stopping, **limits)
        new_tokens = output[:, prompt_length:]
        self.last_tokens = {"input": int(prompt_length), "output": int(new_tokens.shape[1]),
                            "max_new_tokens": bounds.max_new_tokens,
                            "stop": stop_reason(stopping, int(new_tokens.shape[1]), bounds.max_new_tokens)}
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True,
                                           clean_up_tokenization_spaces=False)[0].strip()


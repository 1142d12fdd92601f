"""Reading a chat follow-up: the agent LLM's reading (``prompts/followup.md``), the regular-expression reader
(the fixed planner's, and the fallback), and the state update a follow-up makes on its thread.

A refinement ("make the cradle wooden") is added to the prompt, and verdicts given against the old prompt are set
aside (``stale_verdict``); "two more rounds" sets the request's rounds; "use the second reference" picks references
by their ``/refs`` number. The budget grows by one request's worth (:func:`tools.budget.request_budget`), and the
request continues from the thread's best candidate (``continue_from``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import HumanMessage

import prompts
from agent.nodes import best_candidate
from imgrag.drawing.steering import MAX_WEIGHT, check_weight
from imgrag.models.chat_model import content_text
from imgrag.models.reasoning import answer_text
from imgrag.settings import BudgetSettings
from imgrag.text import shorten
from tools.budget import request_budget

# ----- follow-ups -----

_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
            "eight": 8, "nine": 9, "ten": 10, "few": 3, "a few": 3, "couple": 2, "a couple": 2, "a couple of": 2}
_ORDINALS = {"first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7, "eighth": 8,
             "ninth": 9, "tenth": 10, "last": -1}
_N = r"(?:\d+|" + "|".join(sorted((re.escape(k) for k in _NUMBERS), key=len, reverse=True)) + ")"
_ORD = r"(?:\d+(?:st|nd|rd|th)|" + "|".join(_ORDINALS) + ")"
_SEP = r"\s*(?:,|and|&)\s*(?:the\s+)?"
# A directive's noun ends its phrase: "another picture frame" and "the second reference photo pose" describe the
# picture ("picture" and "reference" are modifiers there), so they are refinements, not directives.
_ENDS = r"(?=\s*(?:$|[.,;:!?)]|\b(?:and|then|please|but|so|instead|this|now|too)\b))"
_MORE_ROUNDS = re.compile(
    rf"\b(?:(?P<n>{_N})\s+more|another)\s+(?:rounds?|tries|try|attempts?|drawings?|pictures?|goes|go){_ENDS}", re.I)
_REF_NOUN = r"(?:references?|refs?)(?:\s+(?:photos?|images?|pictures?))?"
_USE_REFS = re.compile(
    rf"\buse\s+(?:only\s+)?(?:the\s+)?(?P<ords>{_ORD}(?:{_SEP}{_ORD})*)\s+{_REF_NOUN}{_ENDS}"
    rf"|\buse\s+(?:only\s+)?(?:the\s+)?{_REF_NOUN}\s+(?:#)?(?P<nums>\d+(?:{_SEP}#?\d+)*)\b", re.I)
# "use the second reference more strongly", "... less strongly", "... at weight 1.5", "... for its style only":
# a reference's weight or mode (imgrag.drawing.steering) for this request's guided drawings, which then use it.
_STEER_REF = re.compile(
    rf"\buse\s+(?:the\s+)?(?:(?P<ord>{_ORD})\s+{_REF_NOUN}|{_REF_NOUN}\s+#?(?P<num>\d+))\s+"
    r"(?:(?P<much>much\s+)?(?P<more>more|less)\s+(?:strongly|heavily|weakly)"
    r"|(?:with|at)\s+(?:a\s+)?weight\s+(?:of\s+)?(?P<weight>\d*\.?\d+)"
    r"|(?:only\s+)?for\s+(?:its\s+)?(?P<mode>style|look|content|subject|layout)(?:\s+only)?)"
    rf"{_ENDS}", re.I)
STRONGER, WEAKER = 1.5, 0.5  # "more strongly" multiplies the weight by 1.5 ("much more": 2), "less" by 0.5 (0.25)
_GO_ON = re.compile(r"\b(?:(?:try|go|draw(?:\s+it)?|do\s+it)\s+again|keep\s+going|go\s+on|continue)\b", re.I)
_FILLER = {"and", "then", "please", "also", "just", "now", "ok", "okay", "try", "give", "it", "me", "with", "but",
           "so", "more", "the", "again", "thanks", "thank", "you"}
_EDGE_WORDS = {"and", "then", "also", "but", "so", "please", "now"}


@dataclass
class FollowUp:
    """A follow-up message, read: what to add to the prompt, this request's rounds, references picked."""

    refinement: str | None = None
    rounds: int | None = None
    picks: list[int] = field(default_factory=list)  # /refs numbers, 1-based; -1 is the last
    prompt: str | None = None  # the whole new prompt, rewritten by the LLM (replaces the old one); None: unchanged
    # /refs number -> {"factor": x} (more/less strongly), {"weight": w} or {"mode": m}: see _STEER_REF
    steer: dict[int, dict[str, Any]] = field(default_factory=dict)


def _ordinal(word: str) -> int:
    word = word.lower()
    return _ORDINALS[word] if word in _ORDINALS else int(re.match(r"\d+", word).group())


def _trim(text: str) -> str:
    """Strip joining words and punctuation left at either end once the directives are cut out."""
    words = re.sub(r"\s+", " ", text).strip(" ,;.!-").split(" ")
    while words and words[0].lower().strip(",;") in _EDGE_WORDS:
        words.pop(0)
    while words and words[-1].lower().strip(",;.!") in _EDGE_WORDS:
        words.pop()
    return " ".join(words).strip(" ,;.!-")


def parse_followup(text: str) -> FollowUp:
    """Read a follow-up: "two more rounds", "use the second reference" and "try again" are directives; whatever
    else the message says is a refinement of the picture, added to the prompt."""
    result = FollowUp()
    rest = text
    for match in _MORE_ROUNDS.finditer(text):
        n = (match.group("n") or "one").lower()
        result.rounds = int(n) if n.isdigit() else _NUMBERS[n]
    rest = _MORE_ROUNDS.sub(" ", rest)
    result.steer = parse_steering(rest)
    rest = _STEER_REF.sub(" ", rest)
    for match in _USE_REFS.finditer(rest):
        if match.group("ords"):
            result.picks += [_ordinal(w) for w in re.findall(_ORD, match.group("ords"), flags=re.I)]
        else:
            result.picks += [int(n) for n in re.findall(r"\d+", match.group("nums"))]
    rest = _GO_ON.sub(" ", _USE_REFS.sub(" ", rest))
    words = re.findall(r"[\w'-]+", rest)
    if any(w.lower() not in _FILLER for w in words):
        result.refinement = _trim(rest) or None
    return result


def parse_steering(text: str) -> dict[int, dict[str, Any]]:
    """The reference steering a message asks for, by /refs number (see :data:`_STEER_REF`)."""
    steer: dict[int, dict[str, Any]] = {}
    for match in _STEER_REF.finditer(text):
        number = _ordinal(match.group("ord")) if match.group("ord") else int(match.group("num"))
        how = steer.setdefault(number, {})
        if match.group("more"):
            stronger = match.group("more").lower() == "more" and "weakly" not in match.group(0).lower()
            factor = STRONGER if stronger else WEAKER
            how["factor"] = factor ** 2 if match.group("much") else factor
        elif match.group("weight"):
            how["weight"] = float(match.group("weight"))
        else:
            how["mode"] = "style" if match.group("mode").lower() in ("style", "look") else "content"
    return steer


def steer_records(steer: dict[int, dict[str, Any]], references: dict[str, dict],
                  resolve: Any) -> dict[str, dict]:
    """The thread's reference records with the steering applied (``resolve(number) -> id``; it raises a
    UserError for a number the thread does not have); a weight out of 0..2 is a UserError."""
    changed = {}
    for number, how in steer.items():
        rid = resolve(str(number))
        record = dict(references[rid])
        if "factor" in how:
            record["weight"] = round(min(MAX_WEIGHT, float(record.get("weight", 1.0)) * how["factor"]), 3)
        if "weight" in how:
            record["weight"] = check_weight(how["weight"], f"the weight of reference {number}")
        if "mode" in how:
            record["mode"] = how["mode"]
        changed[rid] = record
    return changed


MAX_FOLLOWUP_ROUNDS = 20


def read_followup_with_llm(chat_model: Any, prompt: str, message: str, references: dict[str, dict]) -> FollowUp | None:
    """The follow-up read by the agent LLM (``prompts/followup.md``): the rewritten prompt (replacing the old
    one), extra rounds and reference numbers. None when its answer is unusable (no JSON object, a prompt that is
    empty or too long, numbers out of range): the caller falls back to :func:`parse_followup`. Never raises."""
    listing = "\n".join(f"[{n}] {shorten(r.get('caption') or r.get('query') or rid, 100)}"
                        for n, (rid, r) in enumerate(references.items(), 1)) or "(none)"
    question = prompts.render("followup", prompt=prompt, message=message, references=listing)
    try:
        reply = chat_model.invoke([HumanMessage(question)])
    except Exception:  # a failing LLM must not stop the chat: the regular-expression reader takes over
        return None
    text = answer_text(content_text(getattr(reply, "content", reply)))
    match = re.search(r"\{.*\}", text, flags=re.S)
    try:
        obj = json.loads(match.group(0)) if match else None
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        return None
    new_prompt, rounds, picks = obj.get("prompt"), obj.get("rounds"), obj.get("references") or []
    if not isinstance(new_prompt, str) or not new_prompt.strip() or len(new_prompt) > 1000:
        return None
    if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int)
                               or not 1 <= rounds <= MAX_FOLLOWUP_ROUNDS):
        return None
    if not isinstance(picks, list) or not all(isinstance(p, int) and not isinstance(p, bool)
                                              and (1 <= p <= len(references) or p == -1) for p in picks):
        return None
    new_prompt = " ".join(new_prompt.split())
    return FollowUp(refinement=None, rounds=rounds, picks=picks,
                    prompt=None if new_prompt == " ".join(prompt.split()) else new_prompt)


def refine_prompt(prompt: str, refinement: str) -> str:
    """The prompt after a refinement: the refinement is added, so the judge checks both."""
    return f"{prompt.rstrip(' .;,')}; {refinement}"


def follow_up_update(state: dict[str, Any], message: str, followup: FollowUp, *, rounds: int,
                     budget: BudgetSettings, approve: bool, planner: str | None = None,
                     drawing: dict[str, Any] | None = None) -> dict[str, Any]:
    """The state update for a follow-up on a settled thread (merged through the state's reducers). ``planner``
    is the chat's planner: a thread resumed under another ``--planner`` runs its next request with it. ``drawing``:
    the thread's drawing options from this request on (:class:`imgrag.drawing.draw_options.DrawOptions` as a dict; the
    chat's /negative, /guidance, /scheduler, /per-round); None keeps the thread's."""
    used_rounds = int(state.get("rounds", 0))
    per_round = int(((drawing or state.get("drawing")) or {}).get("per_round") or 1)
    update: dict[str, Any] = {
        "messages": [HumanMessage(message)], "planner": planner or state["planner"],
        "failures": 0, "finished": None, "status": None, "stop_reason": None, "approve": approve,
        # A new request gets one request's worth of budget beyond what the thread has spent.
        "budget": request_budget(state, rounds, budget, per_round),
    }
    if drawing is not None:
        update["drawing"] = drawing
    best = best_candidate(state)
    update["continue_from"] = {"candidate_id": best.id, "rounds": used_rounds} if best else None
    if followup.prompt or followup.refinement:
        update["prompt"] = followup.prompt or refine_prompt(state["prompt"], followup.refinement)
        if update["continue_from"]:  # earlier retrievals answered the old prompt: the repair retrieves afresh
            update["continue_from"]["retrievals_from"] = len(state.get("retrievals") or [])
        # The verdicts answered another prompt: keep them for the record, with that prompt; the judge looks again.
        update["candidates"] = {cid: c.replace(verdict=None, stale_verdict=c.verdict, stale_prompt=state["prompt"])
                                for cid, c in (state.get("candidates") or {}).items() if c.verdict is not None}
    return update

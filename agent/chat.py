"""The terminal chat's logic, without the terminal (``agent/cli_chat.py`` draws the screen).

A conversation is one LangGraph thread in the same SQLite checkpointer that runs use, so it outlives the
process. The first message describes the picture and starts the thread (``Runner.run``). Every later
message is a follow-up on the same thread (``follow_up_update`` builds the state update):

- it is appended to the thread's messages, so the LLM sees it beside the candidates, verdicts and
  references of the thread (numbered as ``/refs`` numbers them);
- a refinement ("make the cradle wooden") is added to the prompt, and verdicts given against the old
  prompt are set aside (``stale_verdict``): the judge looks again;
- "two more rounds" sets this request's round budget; "use the second reference" picks references (by
  their ``/refs`` number) for the guided drawings of this request;
- the budget grows by one request's worth beyond what is spent, and the graph runs again on the same
  thread, continuing from the best candidate so far (``continue_from``), not from scratch.

Ctrl-C stops a request; the thread is closed at its last checkpoint (``Runner.stop``) and takes the next
message. ``/undo`` forks the thread back to where the previous request ended.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import re
import shlex
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from langchain_core.messages import HumanMessage
from langgraph.types import Command

import prompts
from agent.graph import best_candidate, is_stale, outcome
from agent.runner import PLANNERS, Runner
from agent.thread_lock import busy_elsewhere, writes_thread
from imgrag.errors import UserError
from imgrag.images import IMAGE_SUFFIXES, open_image
from imgrag.runs import RUN_ID_PATTERN, RunRecord, new_run_id
from imgrag.settings import BudgetSettings
from tools.image_tools import MAX_REFERENCES_PER_DRAWING

THREAD_PREFIX = "chat-"
STOPPED_BY_USER = "stopped by the user (Ctrl-C)"
CUT_OFF = "cut off: the chat ended in the middle of this request"
MAX_ROUNDS_PER_REQUEST = 50

# name -> (usage, what it does); /help prints them in this order.
COMMANDS: dict[str, tuple[str, str]] = {
    "help": ("/help", "this list"),
    "new": ("/new", "start a new thread: the next message describes a new picture"),
    "threads": ("/threads", "the saved chat threads, newest first, with their first request and date"),
    "resume": ("/resume ID", "continue a saved thread (a unique start of its id is enough)"),
    "show": ("/show [CANDIDATE]", "the best picture (or c2, or 2): a preview where the terminal can, else its path"),
    "refs": ("/refs", "the references retrieved on this thread, numbered"),
    "budget": ("/budget N", "rounds (pictures) each request may draw"),
    "approve": ("/approve on|off", "pause before each guided redraw to accept, drop or replace its references"),
    "undo": ("/undo", "take back the last request: the thread returns to where the one before ended"),
    "save": ("/save PATH", "copy the best picture to PATH (a file, or a folder)"),
    "quit": ("/quit", "leave (Ctrl-D too); threads are kept"),
}
ALIASES = {"exit": "quit", "?": "help"}
NO_ARGUMENT = {"help", "new", "threads", "refs", "undo", "quit"}

REVIEW_HELP = ("Enter accepts; 'drop 2' leaves reference 2 out; 'use 1 3' or 'use PATH' draws with exactly those; "
               "'replace 2 with PATH' swaps one; 'add PATH' adds one; 'none' draws without references. Numbers and "
               "ids are those of /refs.")


class RequestCancelled(Exception):
    """Raised inside the graph (from the progress callback) once the user pressed Ctrl-C."""


# ----- the command line of the chat -----

@dataclass(frozen=True)
class SlashCommand:
    name: str
    arg: str = ""


def resolve_command(word: str) -> str:
    """A command name from what was typed after '/': exact, an alias, or an unambiguous prefix."""
    word = word.lower()
    if word in COMMANDS:
        return word
    if word in ALIASES:
        return ALIASES[word]
    if not word:
        raise UserError("a command name must follow '/'; /help lists them")
    matches = [name for name in COMMANDS if name.startswith(word)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UserError(f"/{word} is ambiguous: " + ", ".join(f"/{m}" for m in matches))
    close = difflib.get_close_matches(word, list(COMMANDS) + list(ALIASES), n=1, cutoff=0.5)
    hint = f"did you mean /{ALIASES.get(close[0], close[0])}? " if close else ""
    raise UserError(f"unknown command /{word}; {hint}/help lists the commands")


def parse_line(line: str) -> str | SlashCommand | None:
    """What a typed line is: None (blank), a request (text), or a slash command (UserError if unknown)."""
    text = line.strip()
    if not text:
        return None
    if not text.startswith("/"):
        return text
    word, _, arg = text[1:].partition(" ")
    name = resolve_command(word)
    arg = arg.strip()
    if arg and name in NO_ARGUMENT and name != "help":
        raise UserError(f"/{name} takes no argument (usage: {COMMANDS[name][0]})")
    return SlashCommand(name, arg)


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


MAX_FOLLOWUP_ROUNDS = 20


def read_followup_with_llm(chat_model: Any, prompt: str, message: str, references: dict[str, dict]) -> FollowUp | None:
    """The follow-up read by the agent LLM (``prompts/followup.md``): the rewritten prompt (replacing the old
    one), extra rounds and reference numbers. None when its answer is unusable (no JSON object, a prompt that is
    empty or too long, numbers out of range): the caller falls back to :func:`parse_followup`. Never raises."""
    from imgrag.chat_model import content_text
    from imgrag.reasoning import answer_text

    listing = "\n".join(f"[{n}] {_short(r.get('caption') or r.get('query') or rid)}"
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


def _short(text: str, limit: int = 100) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def refine_prompt(prompt: str, refinement: str) -> str:
    """The prompt after a refinement: the refinement is added, so the judge checks both."""
    return f"{prompt.rstrip(' .;,')}; {refinement}"


def follow_up_update(state: dict[str, Any], message: str, followup: FollowUp, *, rounds: int,
                     budget: BudgetSettings, approve: bool, planner: str | None = None) -> dict[str, Any]:
    """The state update for a follow-up on a settled thread (merged through the state's reducers). ``planner``
    is the chat's planner: a thread resumed under another ``--planner`` runs its next request with it."""
    used_rounds = int(state.get("rounds", 0))
    update: dict[str, Any] = {
        "messages": [HumanMessage(message)], "planner": planner or state["planner"],
        "failures": 0, "finished": None, "status": None, "stop_reason": None, "approve": approve,
        # A new request gets one request's worth of budget beyond what the thread has spent.
        "budget": {"max_rounds": used_rounds + rounds,
                   "max_tool_calls": int(state.get("tool_calls", 0)) + max(budget.max_tool_calls, 4 * rounds + 2),
                   "max_seconds": float(state.get("seconds") or 0.0) + budget.max_seconds},
    }
    best = best_candidate(state)
    update["continue_from"] = {"candidate_id": best["id"], "rounds": used_rounds} if best else None
    if followup.prompt or followup.refinement:
        update["prompt"] = followup.prompt or refine_prompt(state["prompt"], followup.refinement)
        if update["continue_from"]:  # earlier retrievals answered the old prompt: the repair retrieves afresh
            update["continue_from"]["retrievals_from"] = len(state.get("retrievals") or [])
        # The verdicts answered another prompt: keep them for the record, with that prompt; the judge looks again.
        update["candidates"] = {cid: {**c, "verdict": None, "stale_verdict": c["verdict"],
                                      "stale_prompt": state["prompt"]}
                                for cid, c in (state.get("candidates") or {}).items() if c.get("verdict") is not None}
    return update


# ----- references: numbers, ids, files -----

def resolve_reference(token: str, references: dict[str, dict]) -> str:
    """A reference id of the thread from a /refs number (1-based, -1 the last) or an id (a unique start is enough)."""
    ids = list(references)
    token = token.strip().lstrip("#")
    if re.fullmatch(r"-?\d+", token):
        n = int(token)
        if not ids:
            raise UserError("this thread has no references yet (they come from retrieval)")
        if n == -1:
            return ids[-1]
        if not 1 <= n <= len(ids):
            raise UserError(f"there is no reference {n}: this thread has {len(ids)} (/refs lists them)")
        return ids[n - 1]
    if token in references:
        return token
    matches = [i for i in ids if i.startswith(token)] if len(token) >= 3 else []
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UserError(f"{token!r} matches several references: {', '.join(matches)}")
    raise UserError(f"no reference {token!r} on this thread; give a number or id from /refs, or an image file")


def file_reference(path_text: str) -> dict[str, Any]:
    """A reference record for an image file the user names (checked to open as an image)."""
    path = Path(path_text).expanduser()
    open_image(path)  # a UserError naming the file if it is missing or not an image
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return {"id": f"file-{digest}", "path": str(path.resolve()), "caption": path.name, "score": None,
            "query": "chosen by the user"}


def _looks_like_path(token: str) -> bool:
    return "/" in token or token.startswith("~") or Path(token).suffix.lower() in IMAGE_SUFFIXES


def _references_from(tokens: list[str], references: dict[str, dict]) -> tuple[list[str], dict[str, dict]]:
    ids, added = [], {}
    for token in tokens:
        if token.strip().lstrip("#").lstrip("-").isdigit() or not _looks_like_path(token):
            ids.append(resolve_reference(token, references))
        else:
            record = file_reference(token)
            added[record["id"]] = record
            ids.append(record["id"])
    return ids, added


def parse_review(text: str, proposed: list[str], references: dict[str, dict]) -> dict[str, Any]:
    """The answer to a review pause: ``{"reference_ids": [...], "references": {id: record}}`` (see REVIEW_HELP)."""
    low = text.strip().lower()
    if low in ("", "y", "yes", "ok", "accept", "a", "keep"):
        return {"reference_ids": list(proposed), "references": {}}
    if low in ("n", "no", "none", "drop all", "without", "no references"):
        return {"reference_ids": [], "references": {}}
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise UserError(f"cannot read that ({exc}); {REVIEW_HELP}") from None
    verb, args = words[0].lower(), [w for w in words[1:] if w.lower() not in ("and", ",")]
    added: dict[str, dict] = {}
    if verb in ("drop", "remove", "skip") and args:
        dropped, _ = _references_from(args, references)
        strangers = [d for d in dropped if d not in proposed]
        if strangers:
            raise UserError(f"{', '.join(strangers)} is not among this drawing's references")
        ids = [i for i in proposed if i not in dropped]
    elif verb in ("use", "only") and args:
        ids, added = _references_from(args, references)
    elif verb == "add" and args:
        new, added = _references_from(args, references)
        ids = list(dict.fromkeys(list(proposed) + new))
    elif verb == "replace" and "with" in [a.lower() for a in args]:
        cut = [a.lower() for a in args].index("with")
        old_ids, _ = _references_from(args[:cut], references)
        if len(old_ids) != 1:
            raise UserError("replace one reference at a time: 'replace 2 with PATH'")
        old = old_ids[0]
        if old not in proposed:
            raise UserError(f"{old} is not among this drawing's references")
        replacement, added = _references_from(args[cut + 1:], references)
        position = proposed.index(old)
        ids = list(dict.fromkeys(proposed[:position] + replacement + proposed[position + 1:]))
    else:
        raise UserError(f"cannot read {text.strip()!r}. {REVIEW_HELP}")
    ids = check_reference_count(list(dict.fromkeys(ids)))
    return {"reference_ids": ids, "references": added}


def check_reference_count(ids: list[str]) -> list[str]:
    """``ids`` if one drawing may use that many references, else a UserError."""
    if len(ids) > MAX_REFERENCES_PER_DRAWING:
        raise UserError(f"at most {MAX_REFERENCES_PER_DRAWING} references per drawing, got {len(ids)}")
    return ids


def reference_number(references: dict[str, dict], reference_id: str) -> int | None:
    """A reference's number as /refs shows it (1-based, in the thread's order), or None if unknown."""
    ids = list(references)
    return ids.index(reference_id) + 1 if reference_id in ids else None


# ----- threads in the checkpointer -----

def thread_ids(checkpointer: Any) -> list[str]:
    """Every thread id in the checkpointer, most recently active first."""
    checkpointer.setup()
    with checkpointer.lock:  # SqliteSaver has no listing of threads; its table is simple enough to ask
        rows = checkpointer.conn.execute(
            "SELECT thread_id, MAX(checkpoint_id) AS last FROM checkpoints WHERE checkpoint_ns = '' "
            "GROUP BY thread_id ORDER BY last DESC").fetchall()
    return [row[0] for row in rows]


def requests_of(values: dict[str, Any]) -> list[str]:
    """The user's messages on a thread, in order (the graph keeps its own error notes to the LLM out of the state)."""
    return [str(m.content) for m in values.get("messages") or [] if isinstance(m, HumanMessage)]


def _when(created_at: str | None) -> str:
    if not created_at:
        return ""
    try:
        return datetime.fromisoformat(created_at).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return created_at[:16]


@dataclass
class Proposal:
    """What a review pause asks the user: the redraw's prompt, scale and references (ids of the thread's refs)."""

    prompt: str
    ip_scale: float | None
    proposed: list[str]
    references: dict[str, dict]  # every reference of the thread, in /refs order

    def number(self, reference_id: str) -> int | None:
        return reference_number(self.references, reference_id)


@contextlib.contextmanager
def _ctrl_c_sets(flag: threading.Event) -> Iterator[None]:
    """While a request runs, Ctrl-C sets ``flag`` before raising KeyboardInterrupt, so a tool busy in a worker
    thread stops at its next progress event instead of finishing its drawing first."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        flag.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# ----- the session -----

Reviewer = Callable[[Proposal], dict[str, Any]]


class ChatSession:
    """One chat: the current thread, its per-request settings, and the requests and commands on it.

    ``reviewer`` is asked (with a :class:`Proposal`) when the graph pauses before a guided redraw and the
    user has ``approve`` on; it returns :func:`parse_review`'s answer. ``on_event`` gets the runner's progress
    events plus ``{"event": "note", "text"}`` lines worth showing.
    """

    def __init__(self, runner: Runner, *, planner: str = "agent", rounds: int | None = None, approve: bool = False,
                 reviewer: Reviewer | None = None, on_event: Callable[[dict], None] | None = None) -> None:
        if planner not in PLANNERS:
            raise UserError(f"unknown planner {planner!r} (use {' or '.join(PLANNERS)})")
        self.runner = runner
        self.settings = runner.settings
        self.planner = planner
        self.rounds = self._check_rounds(rounds or self.settings.budget.max_rounds)
        self.approve = approve
        self.reviewer = reviewer
        self.on_event = on_event or (lambda event: None)
        self.thread_id: str | None = None
        self.cancelled = threading.Event()
        self._picks: list[str] | None = None
        self._picks_used = False
        runner.on_event = self._event  # models stay loaded in the runner's manager for the whole chat

    # ----- state of the current thread -----
    def _config(self, thread_id: str | None = None) -> dict[str, Any]:
        return {"configurable": {"thread_id": thread_id or self.thread_id}}

    def snapshot(self) -> Any:
        return self.runner.graph().get_state(self._config()) if self.thread_id else None

    def values(self) -> dict[str, Any]:
        snapshot = self.snapshot()
        return dict(snapshot.values) if snapshot is not None and snapshot.values else {}

    def _note(self, text: str) -> None:
        self.on_event({"event": "note", "text": text})

    def _event(self, event: dict[str, Any]) -> None:
        if self.cancelled.is_set():
            raise RequestCancelled(STOPPED_BY_USER)
        self.on_event(event)

    # ----- requests -----
    @writes_thread
    def send(self, text: str) -> dict[str, Any]:
        """One request: the first on a thread starts it, later ones refine it. Returns the runner's result; with
        ``stopped`` when Ctrl-C ended it (the thread keeps everything up to its last checkpoint)."""
        text = text.strip()
        if not text:
            raise UserError("the message is empty; describe the picture, or say what to change")
        self.cancelled.clear()
        try:
            with _ctrl_c_sets(self.cancelled):
                from agent.chat_photos import parse_use_photo, use_photo  # issue 18: "use photo N as the answer"

                if self.values() and (photo := parse_use_photo(text)) is not None:
                    return use_photo(self, photo)
                result = self._follow_up(text) if self.values() else self._start(text)
                return self._settle(result)
        except (KeyboardInterrupt, RequestCancelled):
            return self._stopped()
        finally:
            self._picks = None

    def _start(self, text: str) -> dict[str, Any]:
        self.thread_id = self.thread_id or THREAD_PREFIX + new_run_id()
        return self.runner.run(text, planner=self.planner, max_rounds=self.rounds, run_id=self.thread_id,
                               approve=self.approve)

    def _follow_up(self, text: str) -> dict[str, Any]:
        self.settle_cut_off()
        values = self.values()
        references = values.get("references") or {}
        followup = self._read_followup(values["prompt"], text, references)
        picks = check_reference_count(list(dict.fromkeys(resolve_reference(str(p), references)
                                                         for p in followup.picks)))
        rounds = self._check_rounds(followup.rounds or self.rounds)
        update = follow_up_update(values, text, followup, rounds=rounds, budget=self.settings.budget,
                                  approve=self.approve or bool(picks), planner=self.planner)
        if values.get("planner") and values["planner"] != self.planner:
            self._note(f"planner {self.planner} from this request on (the thread ran with {values['planner']})")
        if "prompt" in update:
            self._note(f"prompt: {update['prompt']}")
        if followup.rounds:
            self._note(f"{rounds} more round(s) for this request")
        if picks:
            self._note("guided drawings of this request use reference " + ", ".join(
                f"{reference_number(references, p)} ({p})" for p in picks))
        self._picks = picks or None
        self._picks_used = False
        event = {"event": "follow_up", "message": text, "prompt": update.get("prompt", values["prompt"]),
                 "planner": self.planner,
                 "budget": update["budget"], "continue_from": update["continue_from"]}
        return self.runner.continue_thread(self.thread_id, update, event)

    def _read_followup(self, prompt: str, text: str, references: dict[str, dict]) -> FollowUp:
        """With the agent planner the LLM reads the follow-up (a remote one outside the GPU lock); the
        regular-expression reader is the fixed planner's and the fallback when the LLM's answer is unusable."""
        if self.planner == "agent":
            try:  # the manager runs a local LLM on the model thread, a remote one here without the GPU lock
                read = self.runner.manager.run("llm", read_followup_with_llm, prompt, text, references)
            except Exception:  # the LLM cannot load: the policy runs this request anyway
                read = None
            if read is not None:
                self._note("read by the LLM")
                return read
        return parse_followup(text)

    def _settle(self, result: dict[str, Any], ask: bool = False) -> dict[str, Any]:
        """Answer every pause of the request (review of a redraw's references) until the request ends."""
        while result.get("pending"):
            answer = self._answer(result["pending"][0], ask=ask)
            result = self.runner.continue_thread(self.thread_id, Command(resume=answer))
        if self._picks and not self._picks_used:
            self._note("the agent made no guided drawing in this request, so the references you picked were not used")
        return result

    def _answer(self, question: dict[str, Any], ask: bool) -> dict[str, Any]:
        proposed = list(question.get("reference_ids") or [])
        if self._picks:  # "use the second reference" holds for every guided drawing of the request
            self._picks_used = True
            return {"reference_ids": list(self._picks), "references": {}}
        if not (self.approve or ask) or self.reviewer is None:
            return {"reference_ids": proposed, "references": {}}
        references = self.values().get("references") or {}
        return self.reviewer(Proposal(question.get("prompt") or "", question.get("ip_scale"), proposed, references))

    def _stopped(self) -> dict[str, Any]:
        self.cancelled.clear()
        if not self.thread_id or not self.values():  # stopped before the first checkpoint: nothing to keep
            self.thread_id = None
            return {"stopped": True, "status": None, "final_image": None, "final_candidate": None}
        result = self.runner.stop(self.thread_id, STOPPED_BY_USER)
        if result is None:  # the request had just ended when Ctrl-C came
            values = self.values()
            best = best_candidate(values)
            result = {**outcome(values), "final_image": best["path"] if best else None,
                      "stop_reason": values.get("stop_reason"), "rounds": values.get("rounds", 0)}
        return {**result, "stopped": True}

    def settle_cut_off(self, include_paused: bool = True) -> dict[str, Any] | None:
        """Close a request an earlier process left in flight (killed mid-way), keeping what it drew. A thread
        paused for a review is closed too unless ``include_paused`` is False (see :meth:`pending`)."""
        snapshot = self.snapshot()
        if snapshot is None or not snapshot.values or not snapshot.next:
            return None
        if snapshot.interrupts and not include_paused:
            return None
        if not getattr(self, "_writing", False) and busy_elsewhere(self.settings.threads_db, self.thread_id):
            return None  # its request is running in another process (agent/thread_lock.py), not cut off
        return self.runner.stop(self.thread_id, CUT_OFF)

    def pending(self) -> bool:
        """Whether the thread waits for the user's review of a redraw's references."""
        snapshot = self.snapshot()
        return bool(snapshot is not None and snapshot.interrupts)

    @writes_thread
    def answer_pending(self) -> dict[str, Any]:
        """Ask the reviewer the question the thread is paused on (a thread resumed in a new process), then go on."""
        snapshot = self.snapshot()
        self.cancelled.clear()
        try:
            with _ctrl_c_sets(self.cancelled):
                result = {"pending": [i.value for i in snapshot.interrupts]}
                return self._settle(result, ask=True)
        except (KeyboardInterrupt, RequestCancelled):
            return self._stopped()

    # ----- settings of the chat -----
    @staticmethod
    def _check_rounds(n: int) -> int:
        if not 1 <= n <= MAX_ROUNDS_PER_REQUEST:
            raise UserError(f"rounds per request must be between 1 and {MAX_ROUNDS_PER_REQUEST}, got {n}")
        return n

    def set_budget(self, text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise UserError(f"/budget takes a number of rounds, got {text!r}") from None
        self.rounds = self._check_rounds(n)
        return self.rounds

    def set_approve(self, text: str) -> bool:
        value = text.strip().lower()
        if value not in ("on", "off"):
            raise UserError(f"use /approve on or /approve off (got {text!r})")
        self.approve = value == "on"
        return self.approve

    # ----- threads -----
    def new(self) -> None:
        self.thread_id = None

    def threads(self, limit: int = 20) -> list[dict[str, Any]]:
        """The chat threads, most recently active first: id, date, first request, number of requests, status."""
        graph = self.runner.graph()
        listed = []
        for tid in thread_ids(self.runner.checkpointer):
            if not tid.startswith(THREAD_PREFIX):
                continue
            snapshot = graph.get_state(self._config(tid))
            requests = requests_of(snapshot.values)
            listed.append({"id": tid, "date": _when(snapshot.created_at), "first": requests[0] if requests else "",
                           "requests": len(requests), "status": snapshot.values.get("status") or "unfinished"})
            if len(listed) >= limit:
                break
        return listed

    def match_thread(self, text: str) -> str | None:
        """The thread a typed id names (exact, or a unique start, with or without 'chat-'); None if none does."""
        text = text.strip()
        if not text:
            raise UserError("give a thread id (/threads lists them)")
        ids = thread_ids(self.runner.checkpointer)
        if text in ids:
            return text
        matches = [t for t in ids if t.startswith(text) or t.startswith(THREAD_PREFIX + text)]
        if len(matches) > 1:
            shown = ", ".join(matches[:6]) + (f" and {len(matches) - 6} more" if len(matches) > 6 else "")
            raise UserError(f"{text!r} matches {len(matches)} threads: {shown}; type more of the id")
        return matches[0] if matches else None

    def resume(self, text: str) -> dict[str, Any]:
        """Make a saved thread the current one; returns its summary."""
        found = self.match_thread(text)
        if found is None:
            raise UserError(f"no thread {text.strip()!r} (/threads lists them)")
        self.thread_id = found
        closed = self.settle_cut_off(include_paused=False)
        summary = self.summary()
        summary["closed"] = closed is not None
        return summary

    def open(self, text: str) -> dict[str, Any] | None:
        """``imgrag chat --thread ID``: resume a saved thread, or name the new one. None for a new thread."""
        found = self.match_thread(text)
        if found is not None:
            return self.resume(found)
        if not RUN_ID_PATTERN.match(text):
            raise UserError(f"thread id {text!r} may hold only letters, digits, '.', '_' and '-'")
        self.thread_id = text
        return None

    def summary(self) -> dict[str, Any]:
        """The current thread: its requests, prompt, candidates, best candidate and status."""
        snapshot = self.snapshot()  # read once: values and whether it is paused
        values = dict(snapshot.values) if snapshot is not None and snapshot.values else {}
        best = best_candidate(values) if values else None
        return {"thread_id": self.thread_id, "requests": requests_of(values), "prompt": values.get("prompt"),
                "candidates": len(values.get("candidates") or {}), "rounds": values.get("rounds", 0),
                "best": best, "status": values.get("status"), "stop_reason": values.get("stop_reason"),
                "paused": bool(snapshot is not None and snapshot.interrupts)}

    # ----- pictures and references -----
    def _require_snapshot(self) -> Any:
        snapshot = self.snapshot()
        if snapshot is None or not snapshot.values:
            raise UserError("no request on this thread yet: describe a picture first")
        return snapshot

    def _require_thread(self) -> dict[str, Any]:
        return dict(self._require_snapshot().values)

    def candidate(self, which: str | None = None) -> dict[str, Any]:
        """A candidate by id (c2) or number (2); the best one when None."""
        values = self._require_thread()
        candidates = values.get("candidates") or {}
        if not which:
            best = best_candidate(values)
            if best is None:
                raise UserError("nothing drawn on this thread yet")
            return best
        key = which.strip().lower()
        key = f"c{key}" if key.isdigit() else key
        if key not in candidates:
            known = ", ".join(sorted(candidates, key=lambda c: int(c[1:]))) or "none yet"
            raise UserError(f"no candidate {which!r} on this thread (candidates: {known})")
        return candidates[key]

    def references(self) -> list[dict[str, Any]]:
        """The thread's references in /refs order, each with its number and whether the best picture used it."""
        values = self._require_thread()
        best = best_candidate(values) or {}
        used = set(best.get("reference_ids") or [])
        return [{"number": n, **ref, "id": rid, "used_by_best": rid in used}
                for n, (rid, ref) in enumerate((values.get("references") or {}).items(), 1)]

    def save(self, target: str) -> tuple[dict[str, Any], Path]:
        """Copy the best picture to ``target`` (a folder, or a file whose suffix picks the format)."""
        if not target.strip():
            raise UserError("give a path: /save PATH")
        best = self.candidate()
        path = Path(target.strip()).expanduser()
        if path.is_dir() or target.endswith(("/", "\\")):
            path = path / f"{self.thread_id}-{best['id']}.png"
        elif not path.suffix:
            path = path.with_suffix(".png")
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise UserError(f"{path}: unknown picture format {path.suffix!r} (use .png, .jpg or .webp)")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            from imgrag.provenance import copy_with_provenance  # issue 18: the copy keeps how it was made

            copy_with_provenance(best["path"], path)
        except OSError as exc:
            raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
        return best, path

    # ----- undo -----
    @writes_thread
    def undo(self) -> dict[str, Any]:
        """Take back the last request: fork the thread from the checkpoint where the request before it ended (the
        checkpointer's history, followed from the latest checkpoint through its parents). Pictures on disk stay."""
        graph = self.runner.graph()
        snapshot = self._require_snapshot()
        values = snapshot.values
        requests = requests_of(values)
        count = len(requests)
        if count <= 1:
            raise UserError("nothing to undo before the first request; /new starts a new thread")
        target = snapshot
        while target.parent_config is not None:
            target = graph.get_state(target.parent_config)
            if not target.next and len(requests_of(target.values)) == count - 1:
                break
        else:
            raise UserError("cannot find where the previous request ended in this thread's history")
        # A copy of that checkpoint becomes the thread's latest, so the undo holds in later processes too.
        graph.update_state(target.config, None, as_node="__copy__")
        undone = requests[-1]
        RunRecord(values["run_dir"]).append_step({"event": "undo", "request": undone,
                                                  "to_checkpoint": target.config["configurable"].get("checkpoint_id")})
        return {"undone": undone, **self.summary()}


def verdict_text(candidate: dict[str, Any]) -> str:
    """A candidate's verdict in a few words."""
    verdict = candidate.get("verdict")
    if verdict is None:
        return "judged against an earlier prompt" if is_stale(candidate) else "not judged yet"
    if verdict.get("match"):
        return "the judge sees everything asked"
    if not verdict.get("parsed", True):
        return "the judge's answer could not be read"
    missing = ", ".join(verdict.get("missing") or []) or "unnamed"
    return f"the judge misses: {missing}"

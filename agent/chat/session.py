"""The chat session: the current thread, its per-request settings, and the requests and commands on it.

A conversation is one LangGraph thread in the same SQLite checkpointer that runs use, so it outlives the process.
The first message describes the picture and starts the thread (``Runner.run``); every later message is a follow-up
on the same thread (:mod:`agent.chat.followups`), continuing from the best candidate so far. Ctrl-C stops a request;
the thread is closed at its last checkpoint (``Runner.stop``) and takes the next message. ``/undo`` forks the
thread back to where the previous request ended.

Over 400 lines because it is one class whose methods are the chat's commands, each short; the parsing, the
reading of follow-ups and the thread listing it calls live in the package's other modules.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langgraph.types import Command

from agent.chat.commands import check_reference_count, reference_number, resolve_reference
from agent.chat.followups import (
    FollowUp,
    follow_up_update,
    parse_followup,
    parse_steering,
    read_followup_with_llm,
    steer_records,
)
from agent.chat.photos import parse_use_photo, use_photo
from agent.chat.threads import THREAD_PREFIX, list_threads, requests_of
from agent.nodes import best_candidate, outcome
from agent.run_lookup import check_resume_profile
from agent.runner import PLANNERS, Runner
from agent.thread_lock import busy_elsewhere, writes_thread
from agent.thread_store import closest_thread_ids, match_thread_id, thread_ids
from imgrag.candidate_ids import parse_candidate, sorted_ids
from imgrag.drawing.draw_options import MAX_PER_ROUND, DrawOptions, check_guidance, options_of, parse_options
from imgrag.drawing.loras import parse_lora_arg
from imgrag.drawing.schedulers import check_scheduler
from imgrag.errors import UserError
from imgrag.records.provenance import check_picture_suffix, copy_with_provenance
from imgrag.records.runs import RUN_ID_PATTERN, RunRecord, new_run_id
from tools.answers import is_stale
from tools.budget import check_rounds
from tools.records import Candidate, to_plain

STOPPED_BY_USER = "stopped by the user (Ctrl-C)"
CUT_OFF = "cut off: the chat ended in the middle of this request"
MAX_ROUNDS_PER_REQUEST = 50


class RequestCancelled(KeyboardInterrupt):
    """Raised inside the graph (from the progress callback) once the user pressed Ctrl-C or a page's Stop. A
    ``KeyboardInterrupt``: a stop is not an error, so no tool's or runner's error handling (``except Exception``)
    records it as one; the runner closes the run as interrupted, as for Ctrl-C, wherever the stop lands."""


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
        # Drawing options the user set in this chat (/negative, /guidance, /scheduler, /per-round): applied to every
        # request from the next on, over the thread's own (imgrag.drawing.draw_options).
        self.drawing: dict[str, Any] = {}
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
                               approve=self.approve, options=self.drawing_options({}))

    def _follow_up(self, text: str) -> dict[str, Any]:
        self.settle_cut_off()
        values = self.values()
        references = to_plain(values.get("references") or {})  # the chat's helpers read references as plain dicts
        followup = self._read_followup(values["prompt"], text, references)
        # "use the second reference more strongly": read by the rules whoever read the rest of the message
        steer = followup.steer or parse_steering(text)
        steered = steer_records(steer, references, lambda n: resolve_reference(n, references))
        picks = check_reference_count(list(dict.fromkeys(
            [resolve_reference(str(p), references) for p in followup.picks] + list(steered))))
        rounds = self._check_rounds(followup.rounds or self.rounds)
        drawing = self.drawing_options(values).to_state() if self.drawing else None
        update = follow_up_update(values, text, followup, rounds=rounds, budget=self.settings.budget,
                                  approve=self.approve or bool(picks), planner=self.planner, drawing=drawing)
        if values.get("planner") and values["planner"] != self.planner:
            self._note(f"planner {self.planner} from this request on (the thread ran with {values['planner']})")
        if "prompt" in update:
            self._note(f"prompt: {update['prompt']}")
        if followup.rounds:
            self._note(f"{rounds} more round(s) for this request")
        if steered:
            update["references"] = steered  # merged into the thread's records: the drawings read weight and mode
            self._note("reference steering: " + ", ".join(
                f"{reference_number(references, rid)} weight {r.get('weight', 1.0):g}, {r.get('mode', 'both')}"
                for rid, r in steered.items()))
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
        references = to_plain(self.values().get("references") or {})
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
            result = {**outcome(values), "final_image": best.path if best else None,
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
        return check_rounds(n, "rounds per request", MAX_ROUNDS_PER_REQUEST)

    def set_budget(self, text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise UserError(f"/budget takes a number of rounds, got {text!r}") from None
        self.rounds = self._check_rounds(n)
        return self.rounds

    def drawing_options(self, values: dict[str, Any] | None = None) -> DrawOptions:
        """The drawing options the next request uses: the thread's (``values``; default the current thread's; a new
        thread: the settings'), with what was set in this chat over them."""
        values = self.values() if values is None else values
        # LoRA files were checked when they were chosen (/lora, the settings); the generator checks them again.
        return parse_options({**options_of(values, self.settings).model_dump(), **self.drawing}, "drawing options",
                             check_files=False)

    def set_drawing(self, **changes: Any) -> DrawOptions:
        """Set drawing options for the requests from the next on (``negative_prompt``, ``guidance``, ``scheduler``,
        ``per_round``; a None guidance: the settings' again); a bad value is a UserError and changes nothing."""
        if "scheduler" in changes:
            changes["scheduler"] = check_scheduler(changes["scheduler"], "scheduler")
        wanted = {**self.drawing, **changes}
        parse_options({**options_of(None, self.settings).model_dump(), **wanted}, "drawing options")  # checked
        self.drawing = wanted
        return self.drawing_options()

    def set_lora(self, text: str) -> DrawOptions:
        """``/lora PATH[:WEIGHT]`` adds a LoRA (or sets the weight of one already used: its file or name; 0 switches
        it off), ``/lora off`` drops them all, for the requests from the next on. A missing file or one that is not
        a LoRA is a UserError naming it and changes nothing (:func:`imgrag.drawing.loras.merge_loras`)."""
        options = self.drawing_options().with_loras([parse_lora_arg(text, "/lora")], "/lora")
        return self.set_drawing(loras=[choice.model_dump() for choice in options.loras])

    def set_guidance(self, text: str) -> DrawOptions:
        """``/guidance N`` (0..30) or ``/guidance default``."""
        word = text.strip().lower()
        if word in ("default", "off", "none"):
            return self.set_drawing(guidance=None)
        try:
            value = float(word)
        except ValueError:
            raise UserError(f"/guidance takes a number from 0 to 30, or default; got {text!r}") from None
        return self.set_drawing(guidance=check_guidance(value, "/guidance"))

    def set_per_round(self, text: str) -> DrawOptions:
        """``/per-round N``: drawings per round, 1..:data:`imgrag.drawing.draw_options.MAX_PER_ROUND`."""
        try:
            n = int(text)
        except ValueError:
            n = 0
        if not 1 <= n <= MAX_PER_ROUND:
            raise UserError(f"/per-round takes a whole number from 1 to {MAX_PER_ROUND}, got {text!r}")
        return self.set_drawing(per_round=n)

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
        return list_threads(self.runner.graph(), self.runner.checkpointer, limit)

    def chat_thread_ids(self) -> list[str]:
        """The chat's threads (ids starting 'chat-'), most recently active first: a plain ``imgrag run`` shares the
        checkpoint database but is not a conversation, and ``run --resume`` is its way back."""
        return [t for t in thread_ids(self.runner.checkpointer) if t.startswith(THREAD_PREFIX)]

    def match_thread(self, text: str) -> str | None:
        """The chat thread a typed id names (exact, or a unique start, with or without 'chat-'); None if none does."""
        text = text.strip()
        if not text:
            raise UserError("give a thread id (/threads lists them)")
        return match_thread_id(self.chat_thread_ids(), text, THREAD_PREFIX)

    def no_thread(self, text: str, *, how: str = "/threads lists them") -> UserError:
        """The error for a typed id that names no chat thread: the closest ids (the 'chat-' prefix ignored) and
        ``how`` to find the rest; a run's id says to resume it as a run."""
        text = text.strip()
        every = thread_ids(self.runner.checkpointer)
        ids = [t for t in every if t.startswith(THREAD_PREFIX)]
        if text in every:
            return UserError(f"{text!r} is a run, not a chat thread: continue it with imgrag run --resume {text}")
        close = closest_thread_ids(ids, text, THREAD_PREFIX)
        hint = f"closest: {', '.join(close)}; " if close else ("no thread is saved yet; " if not ids else "")
        return UserError(f"no thread {text!r} ({hint}{how})")

    def resume(self, text: str) -> dict[str, Any]:
        """Make a saved thread the current one; returns its summary."""
        found = self.match_thread(text)
        if found is None:
            raise self.no_thread(text)
        run_dir = dict(self.runner.graph().get_state({"configurable": {"thread_id": found}}).values).get("run_dir")
        if run_dir:  # a thread goes on with the models that drew it (agent/run_lookup.py)
            check_resume_profile(run_dir, self.runner.settings.profile, f"thread {found}",
                                 f"open it with imgrag chat --thread {found}")
        self.thread_id = found
        closed = self.settle_cut_off(include_paused=False)
        summary = self.summary()
        summary["closed"] = closed is not None
        return summary

    def open(self, text: str, *, new: bool = False) -> dict[str, Any] | None:
        """``imgrag chat --thread ID``: resume the saved thread ID names (a unique start is enough); with ``new``
        (``--new``), name the thread the first message starts instead (``chat-ID``: chat threads are the ids that
        start so), and return None.

        A typo is never a new thread by accident: an ID that names no thread is a UserError listing the closest
        ids, and ``--new`` on an id already saved is one too."""
        if new:
            text = text.strip()
            if not text:
                raise UserError("give a thread id (/threads lists them)")
            if not RUN_ID_PATTERN.match(text):
                raise UserError(f"thread id {text!r} may hold only letters, digits, '.', '_' and '-'")
            named = text if text.startswith(THREAD_PREFIX) else THREAD_PREFIX + text  # so /threads lists it
            if named in thread_ids(self.runner.checkpointer):
                raise UserError(f"thread {named!r} already exists; drop --new to continue it")
            self.thread_id = named
            return None
        found = self.match_thread(text)
        if found is None:
            raise self.no_thread(text, how=f"imgrag chat, then /threads, lists them; --thread {text.strip()} --new "
                                           "starts a new thread of that name")
        return self.resume(found)

    def summary(self) -> dict[str, Any]:
        """The current thread: its requests, prompt, candidates, best candidate and status."""
        snapshot = self.snapshot()  # read once: values and whether it is paused
        values = dict(snapshot.values) if snapshot is not None and snapshot.values else {}
        best = best_candidate(values) if values else None
        return {"thread_id": self.thread_id, "requests": requests_of(values), "prompt": values.get("prompt"),
                "candidates": len(values.get("candidates") or {}), "rounds": values.get("rounds", 0),
                "best": best.model_dump() if best else None, "status": values.get("status"),
                "stop_reason": values.get("stop_reason"),
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
        """A candidate by id (c2) or number (2); the best one when None. As its plain dict (result.json's form), the
        form the front ends show."""
        values = self._require_thread()
        candidates = values.get("candidates") or {}
        if not which:
            best = best_candidate(values)
            if best is None:
                raise UserError("nothing drawn on this thread yet")
            return best.model_dump()
        key = parse_candidate(which)
        if key not in candidates:
            known = ", ".join(sorted_ids(candidates)) or "none yet"
            raise UserError(f"no candidate {which!r} on this thread (candidates: {known})")
        return candidates[key].model_dump()

    def references(self) -> list[dict[str, Any]]:
        """The thread's references in /refs order, each with its number and whether the best picture used it."""
        values = self._require_thread()
        best = best_candidate(values)
        used = set(best.reference_ids if best else [])
        return [{"number": n, **ref.model_dump(), "id": rid, "used_by_best": rid in used}
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
        check_picture_suffix(path, "/save's file")
        if not path.parent.is_dir():  # a typo'd folder is refused, never made behind the user's back
            raise UserError(f"the folder {path.parent} does not exist; create it first, or /save into an existing one")
        try:
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


def verdict_text(candidate: Candidate | Mapping[str, Any]) -> str:
    """A candidate's verdict in a few words; the candidate as a record or as result.json's plain dict."""
    candidate = Candidate.of(candidate)
    verdict = candidate.verdict
    if verdict is None:
        return "judged against an earlier prompt" if is_stale(candidate) else "not judged yet"
    if verdict.match:
        return "the judge sees everything asked"
    if not verdict.parsed:
        return "the judge's answer could not be read"
    missing = ", ".join(verdict.missing) or "unnamed"
    return f"the judge misses: {missing}"

"""``imgrag serve``'s page: the chat of ``agent/chat/`` in a browser (Gradio), on the same thread store.

Every action of the page is a call into :class:`agent.chat.ChatSession`, the class ``imgrag chat`` drives: a
message is ``send`` (the first starts a thread, later ones refine it), "Open" is ``resume``, "Undo" is ``undo``,
the review of a guided redraw's references answers the thread's pause (``answer_pending``). So a thread started
in the terminal continues here and the reverse: the same SQLite checkpointer and thread ids, and one writer per
thread at a time (``agent/thread_lock.py``).

One :class:`agent.runner.Runner` (one model manager) serves the whole process. Each browser tab keeps only its
thread id and settings (a ``gr.State``); a ``ChatSession`` is built over the shared runner for each action.
Everything that touches the models runs in one Gradio queue of width 1, so concurrent requests wait their turn
and the page shows their place in the queue.

Safety: the page never sends a path that the server reads. Pictures shown come from the thread's state (the
run folders, under ``output_dir``: the only folder Gradio may serve) or, for references and search results
(the indexed store's files, which may live anywhere), as thumbnails the server opens and re-encodes.

Why one module of ~650 lines: :class:`WebChat` (what each action does, ~230 lines) and :func:`build_app` (the
page's components, ~240 lines of Gradio layout wiring each event to a WebChat method) are read together, one
event at a time; split, every handler would be looked up across two files. The rest is small text helpers of
the page.
"""

from __future__ import annotations

import functools
import html
import inspect
import os
import queue
import re
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from agent.chat import MAX_ROUNDS_PER_REQUEST, ChatSession, check_reference_count, verdict_text
from agent.frontends.progress import activity
from imgrag.candidate_ids import candidate_number
from imgrag.drawing.draw_options import MAX_GUIDANCE, MAX_PER_ROUND
from imgrag.drawing.loras import settings_loras
from imgrag.drawing.schedulers import SCHEDULER_NAMES
from imgrag.errors import UserError
from imgrag.images import open_image
from imgrag.settings import TINY_MARK, TINY_WARNING
from imgrag.text import describe_error
from tools.records import Reference

THUMB_PX = 256
PREVIEW_PX = 256  # the live preview's side on the page (the latents' picture is enlarged to it)
DEFAULT_SCHEDULER = "default (the checkpoint's own)"
WORKING = "working…"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ReviewNeeded(Exception):
    """Raised by the page's reviewer: the thread stays paused at its review until the user answers by clicking."""


def fresh_page(rounds: int) -> dict[str, Any]:
    """A browser tab's state: its thread, rounds per request, /approve and the drawing options set on the page
    (negative prompt, guidance, scheduler, drawings per round, as the chat's /negative... set them; a plain dict:
    Gradio copies it), and the tab's own key (``tab``): what this tab's Stop button, and only this one, stops. The
    page's ``gr.State`` calls this once per browser session, so every tab gets its own key."""
    return {"thread_id": None, "rounds": rounds, "approve": False, "drawing": {}, "tab": uuid.uuid4().hex}


_MARKDOWN_SPECIALS = re.compile(r"([\\`*_{}\[\]()#+\-.!|~>])")


def as_text(text: Any) -> str:
    """``text`` (a prompt, a verdict, a thread id: not ours) for a Markdown panel, shown as the characters it has:
    HTML escaped, every Markdown marker backslashed, line breaks kept as spaces (a table row stays one row)."""
    escaped = html.escape(" ".join(str(text).split()), quote=False)
    return _MARKDOWN_SPECIALS.sub(r"\\\1", escaped)


def tab_of(page: dict[str, Any]) -> str:
    """The tab's key (:func:`fresh_page`); a state without one (an older page) gets one here."""
    if not page.get("tab"):
        page["tab"] = uuid.uuid4().hex
    return page["tab"]


def settings_lora_text(settings: Any) -> str:
    """The page's LoRA field as it starts: the settings' ``[[models.loras]]``, one ``PATH:WEIGHT`` a line."""
    return "\n".join(f"{choice.path}:{choice.weight:g}" for choice in settings_loras(settings))


def page_drawing(settings: Any, negative: str | None, guidance: Any, scheduler: str | None,
                 per_round: Any, loras: str | None = None) -> dict[str, Any]:
    """The page's drawing fields as the chat session's overrides (:attr:`agent.chat.ChatSession.drawing`): only the
    fields the user changed from the settings' values (the page starts with them), so a thread opened from the
    terminal keeps the options it has unless a field says otherwise. An empty guidance field and the "default"
    scheduler are the settings' own. The LoRA field holds the whole list, one ``PATH[:WEIGHT]`` a line; its files
    are checked here (a UserError naming the file). Checked by the session when set (:meth:`WebChat.session`)."""
    g = settings.generation
    drawing: dict[str, Any] = {}
    if (negative or "").strip() != g.negative_prompt:
        drawing["negative_prompt"] = (negative or "").strip()
    if guidance not in (None, ""):
        drawing["guidance"] = float(guidance)
    chosen = "" if not scheduler or scheduler == DEFAULT_SCHEDULER else scheduler
    if chosen != g.scheduler:
        drawing["scheduler"] = chosen
    if per_round not in (None, "") and int(per_round) != g.per_round:
        drawing["per_round"] = int(per_round)
    lines = [line.strip() for line in (loras or "").splitlines() if line.strip()]
    if loras is not None and lines != [line for line in settings_lora_text(settings).splitlines() if line]:
        from imgrag.drawing.loras import merge_loras, parse_lora_arg

        chosen = merge_loras((), [parse_lora_arg(line, "LoRA") for line in lines], "LoRA")
        drawing["loras"] = [choice.model_dump() for choice in chosen]
    return drawing


def error_text(exc: BaseException, log: Path) -> str:
    """One line for any error: a user mistake as it is, anything else with its type and the log that has the
    traceback (the page never shows a stack trace, as the CLI never prints one)."""
    if isinstance(exc, UserError):
        return f"error: {exc}"
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a", encoding="utf-8") as fh:
            fh.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                     f"{''.join(traceback.format_exception(type(exc), exc, exc.__traceback__))}\n")
        where = f"; the details are in {log}"
    except OSError:
        where = ""
    return f"error: {describe_error(exc)}{where}"


class WebChat:
    """The server side of the page: one runner, the sessions built over it, and what each view shows."""

    def __init__(self, settings: Any, planner: str = "agent", rounds: int | None = None, runner: Any = None) -> None:
        from agent.runner import Runner
        from imgrag.settings import imgrag_home

        self.settings = settings
        self.planner = planner
        # One model manager for the whole server; its drawings send live previews for the page's preview picture.
        self.runner = runner or Runner(settings, previews=True)
        self.rounds = ChatSession(self.runner, planner=planner, rounds=rounds).rounds  # checked as the chat does
        self.output_dir = Path(settings.output_dir).resolve()
        self.error_log = imgrag_home() / "serve-errors.log"
        # Each tab's running request (by tab_of): a Stop in one tab never stops another's.
        self.running: dict[str, ChatSession] = {}
        self._running_lock = threading.Lock()

    # ----- sessions -----
    def session(self, page: dict[str, Any], on_event: Callable[[dict], None] | None = None,
                answer: dict[str, Any] | None = None) -> ChatSession:
        """A ChatSession over the shared runner for this tab's thread. Its reviewer answers a pause with
        ``answer`` (the references clicked) once; any other pause stays open for the page to show."""
        pending = [answer] if answer is not None else []

        def reviewer(proposal: Any) -> dict[str, Any]:
            if pending:
                return pending.pop()
            raise ReviewNeeded

        session = ChatSession(self.runner, planner=self.planner, rounds=page["rounds"], approve=page["approve"],
                              reviewer=reviewer, on_event=on_event)
        session.thread_id = page["thread_id"]
        if page.get("drawing"):
            session.set_drawing(**page["drawing"])  # checked as the chat's /negative, /guidance... check them
        return session

    def stream(self, page: dict[str, Any], work: Callable[[ChatSession], dict[str, Any]],
               answer: dict[str, Any] | None = None) -> Iterator[tuple[str, Any]]:
        """Run ``work(session)`` in a worker thread and yield what happens: ("event", event) for each progress
        event, then ("result", result) or ("paused", None) or ("error", text). The page's thread id follows the
        session's (a first request names the thread)."""
        events: queue.Queue = queue.Queue()
        session = self.session(page, on_event=events.put, answer=answer)
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["result"] = work(session)
            except ReviewNeeded:
                outcome["paused"] = True
            except BaseException as exc:  # shown as one line on the page; the worker must not die silently
                outcome["error"] = error_text(exc, self.error_log)
            finally:
                events.put(None)

        tab = tab_of(page)
        with self._running_lock:
            self.running[tab] = session
        worker = threading.Thread(target=run, name="imgrag-request", daemon=True)
        worker.start()
        try:
            while (event := events.get()) is not None:
                page["thread_id"] = session.thread_id
                yield "event", event
        finally:
            worker.join()
            with self._running_lock:
                if self.running.get(tab) is session:
                    del self.running[tab]
            page["thread_id"] = session.thread_id
        if "error" in outcome:
            yield "error", outcome["error"]
        elif "paused" in outcome:
            yield "paused", None
        else:
            yield "result", outcome["result"]

    def stop(self, page: dict[str, Any]) -> None:
        """The Stop button of ``page``'s tab: that tab's running request ends at its next progress event (as Ctrl-C
        in the chat); another tab's request goes on."""
        with self._running_lock:
            session = self.running.get(page.get("tab") or "")
        if session is not None:
            session.cancelled.set()

    # ----- what the page shows of a thread -----
    def thread_view(self, page: dict[str, Any]) -> dict[str, Any]:
        """Everything the side panels show of the tab's thread: a header, the rounds table, the candidates and
        references galleries, the best picture, the pending review (if any) and the report link."""
        view: dict[str, Any] = {"header": "**New thread.** Describe a picture.", "rounds": "", "candidates": [],
                                "references": [], "best": None, "review": None, "report": ""}
        if not page["thread_id"]:
            return view
        session = self.session(page)
        snapshot = session.snapshot()
        values = dict(snapshot.values) if snapshot is not None and snapshot.values else {}
        if not values:
            view["header"] = f"**New thread** {as_text(page['thread_id'])}. Describe a picture."
            return view
        summary = session.summary()
        view["header"] = (f"**Thread** {as_text(page['thread_id'])} · {len(summary['requests'])} request(s) · "
                          f"{summary['rounds']} round(s) · {summary['status'] or 'running'}\n\n"
                          f"**Prompt:** {as_text(summary['prompt'] or '')}")
        references = values.get("references") or {}
        numbers = {rid: n for n, rid in enumerate(references, 1)}
        candidates = sorted((values.get("candidates") or {}).values(), key=lambda c: candidate_number(c.id))
        best = summary["best"]
        rows = ["| candidate | round | references | verdict |", "|---|---|---|---|"]
        for c in candidates:
            refs = ", ".join(f"#{numbers.get(r, '?')}" for r in c.reference_ids) or "none"
            mark = " **(best)**" if best and c.id == best["id"] else ""
            rows.append(f"| {c.id}{mark} | {c.round} | {refs} | {as_text(verdict_text(c))} |")
            view["candidates"].append((self.picture(c.path), f"{c.id} · {verdict_text(c)}"))
        view["rounds"] = "\n".join(rows) if candidates else "_nothing drawn yet_"
        for rid, ref in references.items():
            score = "" if ref.score is None else f" · score {float(ref.score):.3f}"
            used = " · used by the best" if best and rid in (best.get("reference_ids") or []) else ""
            view["references"].append((self.thumbnail(ref.path),
                                       f"#{numbers[rid]} {label(rid, ref)}{score}{used}"))
        view["references"] = [r for r in view["references"] if r[0] is not None]
        if best:
            view["best"] = self.picture(best["path"])
        if snapshot.interrupts:
            question = snapshot.interrupts[0].value
            view["review"] = {"proposed": list(question.get("reference_ids") or []),
                              "choices": [(f"#{numbers[rid]} {label(rid, ref)}", rid)
                                          for rid, ref in references.items()],
                              "ip_scale": question.get("ip_scale")}
        report = Path(values.get("run_dir") or "") / "report.html"
        if report.is_file() and self.servable(report):
            view["report"] = f"[Open the run's report]({'/gradio_api/file=' + str(report.resolve())})"
        return view

    def servable(self, path: str | Path) -> bool:
        """Whether Gradio may serve the file: inside the run folders (``output_dir``)."""
        try:
            return Path(path).resolve().is_relative_to(self.output_dir)
        except OSError:
            return False

    def picture(self, path: str | None) -> Any:
        """A picture of a run folder as its path (Gradio serves it); anything else as a thumbnail opened here."""
        if path and self.servable(path) and Path(path).is_file():
            return str(Path(path).resolve())
        return self.thumbnail(path)

    @staticmethod
    def thumbnail(path: str | None) -> Any:
        """A small copy of a store picture, opened by the server (None if it is gone)."""
        if not path:
            return None
        try:
            image = open_image(path)
        except UserError:
            return None
        image.thumbnail((THUMB_PX, THUMB_PX))
        return image

    def write_report(self, result: dict[str, Any]) -> None:
        """Rebuild the run's report after a request, so the link shows the thread as it is now."""
        from imgrag.records.report import write_report

        run_dir = result.get("run_dir")
        if run_dir and (Path(run_dir) / "result.json").is_file():
            try:
                write_report(run_dir)
            except (UserError, OSError):
                pass  # the page itself shows the run; a report that cannot be written only loses its link

    def history(self, page: dict[str, Any]) -> list[dict[str, Any]]:
        """The chat history of a thread opened on the page: its requests, then where it stands now."""
        if not page["thread_id"]:
            return []
        summary = self.session(page).summary()
        messages: list[dict[str, Any]] = [{"role": "user", "content": text} for text in summary["requests"]]
        if summary["requests"]:
            messages += self.result_messages({"status": summary["status"], "stop_reason": summary["stop_reason"],
                                              "rounds": summary["rounds"], "best": summary["best"]})
        if summary["paused"]:
            messages.append(assistant("This thread waits for your review of a guided redraw's references "
                                      "(below the pictures)."))
        return messages

    def result_messages(self, result: dict[str, Any]) -> list[dict[str, Any]]:
        """The chat's answer to a finished request: status, the best picture and its verdict."""
        if result.get("stopped"):
            kept = f"; the best so far is {result['final_candidate']}" if result.get("final_candidate") else ""
            return [assistant(f"Stopped: the thread keeps everything up to its last step{kept}. "
                              "Send a message to go on.")]
        best = result.get("best")
        if best is None:
            best = next((c for c in result.get("candidates") or [] if c["id"] == result.get("final_candidate")), None)
        text = f"{result.get('status') or 'unfinished'} ({result.get('stop_reason')}) · " \
               f"{result.get('rounds', 0)} round(s) on this thread"
        if best is None:
            return [assistant(text + " · nothing was drawn")]
        tiny = f" ({TINY_MARK})" if self.settings.is_tiny else ""
        messages = [assistant(f"{text}\n\nbest: {best['id']}, {verdict_text(best)}{tiny}")]
        picture = self.picture(best["path"])
        if isinstance(picture, str):
            messages.append(assistant({"path": picture, "alt_text": f"best picture {best['id']}"}))
        return messages

    # ----- search -----
    def search(self, text: str, k: int = 8) -> list[tuple[Any, str]]:
        """Pictures of the store closest to a text (the model manager's embedder, as a run uses it)."""
        from imgrag.store import ReferenceStore

        text = (text or "").strip()
        if not text:
            raise UserError("type what to look for in the store")
        with self.runner.manager.use("embedder") as embedder:
            store = self.runner.reference_store
            if store is None:
                store = ReferenceStore.open(self.settings, embedder.model_id, embedder.dim)
                self.runner.reference_store = store
            if store.count() == 0:
                from imgrag.store import index_hint

                raise UserError(f"the store holds no pictures yet: add some with "
                                f"{index_hint(self.settings.profile, self.settings.store)}")
            results = store.search_text(embedder, text, k)
        shown = [(self.thumbnail(r.path), f"{r.score:.3f} · {r.caption or Path(r.path).name}") for r in results]
        return [s for s in shown if s[0] is not None]


def enlarged(image: Any) -> Any:
    """A live preview (the latents' own size: 1/8 of the drawing's side) enlarged to :data:`PREVIEW_PX` for the page."""
    from PIL import Image

    factor = max(1, PREVIEW_PX // max(1, max(image.size)))
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST) if factor > 1 \
        else image


def label(reference_id: str, reference: Reference) -> str:
    """What a reference is called on the page: its caption, else its file's name, else its id."""
    return reference.caption or (Path(reference.path).name if reference.path else reference_id)


def assistant(content: Any, **extra: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content, **extra}


def tool_text(event: dict[str, Any]) -> str:
    mark = "✓" if event["ok"] else "✗"
    return f"{mark} {event['tool']} ({event['seconds']:.2f} s): {event['message'][:160]}"


# ----- the page -----

def build_app(web: WebChat) -> Any:
    """The Gradio Blocks of the page over ``web`` (not launched)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    s = web.settings
    tiny = f" · **{TINY_WARNING}**" if s.is_tiny else ""

    with gr.Blocks(title="imgrag", analytics_enabled=False) as app:
        page = gr.State(functools.partial(fresh_page, web.rounds))  # called per browser session
        gr.Markdown(f"## imgrag · profile {s.profile} · planner {web.planner}{tiny}\n"
                    "Describe a picture; later messages refine it (\"make the cradle wooden\"), pick references "
                    "(\"use the second reference\") or extend the budget (\"two more rounds\"). Threads are shared "
                    "with `imgrag chat`.")
        with gr.Row():
            with gr.Column(scale=3):
                # Messages are text, not Markdown: a prompt's or an LLM's "**" or "[x](y)" is shown as typed.
                chatbot = gr.Chatbot(label="conversation", elem_id="chat", height=560, render_markdown=False)
                with gr.Row():
                    message = gr.Textbox(placeholder="a request, or what to change", show_label=False,
                                         elem_id="message", scale=5, submit_btn=False)
                    send = gr.Button("Send", variant="primary", elem_id="send", scale=1)
                    stop = gr.Button("Stop", elem_id="stop", scale=1)
                with gr.Row():
                    rounds = gr.Number(value=web.rounds, label="rounds per request", precision=0, minimum=1,
                                       maximum=MAX_ROUNDS_PER_REQUEST, elem_id="rounds-per-request")
                    approve = gr.Checkbox(value=False, label="review references before each guided redraw (/approve)",
                                          elem_id="approve")
                with gr.Accordion("drawing options", open=False, elem_id="drawing-options"):
                    negative = gr.Textbox(value=s.generation.negative_prompt, label="negative prompt (what to leave "
                                          "out; the judge never sees it)", elem_id="negative")
                    with gr.Row():
                        guidance = gr.Number(value=None, label=f"guidance, 0..{MAX_GUIDANCE:g} (empty: the "
                                             "settings')", minimum=0, maximum=MAX_GUIDANCE, elem_id="guidance")
                        scheduler = gr.Dropdown(choices=[DEFAULT_SCHEDULER, *SCHEDULER_NAMES],
                                                value=s.generation.scheduler or DEFAULT_SCHEDULER,
                                                label="scheduler (A1111's names)", elem_id="scheduler")
                        per_round = gr.Number(value=s.generation.per_round, label="drawings per round", precision=0,
                                              minimum=1, maximum=MAX_PER_ROUND, elem_id="per-round")
                    loras = gr.Textbox(value=settings_lora_text(s), lines=2, elem_id="loras",
                                       label="LoRAs: one PATH[:WEIGHT] a line (an SDXL LoRA's .safetensors; weight "
                                             "-4..4, 0 off)")
                with gr.Row():
                    threads = gr.Dropdown(label="threads (newest first)", choices=[], elem_id="threads", scale=4)
                    open_btn = gr.Button("Open", elem_id="open", scale=1)
                    new_btn = gr.Button("New thread", elem_id="new", scale=1)
                    undo_btn = gr.Button("Undo", elem_id="undo", scale=1)
            with gr.Column(scale=2):
                header = gr.Markdown("**New thread.** Describe a picture.", elem_id="thread")
                report = gr.Markdown("", elem_id="report")
                preview = gr.Image(label="live preview (from the latents, while drawing)", elem_id="preview",
                                   interactive=False, height=PREVIEW_PX, type="pil")
                best = gr.Image(label="best picture", elem_id="best", interactive=False, height=256)
                table = gr.Markdown("", elem_id="rounds")
                candidates = gr.Gallery(label="candidates (verdicts in the captions)", elem_id="candidates",
                                        columns=4, height=220, interactive=False)
                references = gr.Gallery(label="references (scores)", elem_id="references", columns=4, height=220,
                                        interactive=False)
                with gr.Group(visible=False, elem_id="review") as review_box:
                    review_note = gr.Markdown("")
                    review_refs = gr.CheckboxGroup(label="draw with these references", choices=[],
                                                   elem_id="review-refs")
                    review_btn = gr.Button("Draw with the checked references", variant="primary",
                                           elem_id="review-go")
                with gr.Accordion("search the store", open=False, elem_id="search-panel"):
                    query = gr.Textbox(placeholder="what to look for", show_label=False, elem_id="search")
                    found = gr.Gallery(label="found (cosine similarity)", columns=4, height=200, interactive=False,
                                       elem_id="found")

        panels = [header, report, best, table, candidates, references, review_box, review_note, review_refs]

        def panel_values(state: dict[str, Any]) -> list[Any]:
            view = web.thread_view(state)
            review = view["review"]
            if review:
                scale = "" if review["ip_scale"] is None else f" (reference scale {review['ip_scale']})"
                note = f"**Review:** the next guided drawing{scale} would use the checked references."
                review_updates = [gr.update(visible=True), note,
                                  gr.update(choices=review["choices"], value=review["proposed"])]
            else:
                review_updates = [gr.update(visible=False), "", gr.update(choices=[], value=[])]
            return [view["header"], view["report"], view["best"], view["rounds"], view["candidates"],
                    view["references"], *review_updates]

        def thread_choices(state: dict[str, Any]) -> Any:
            listed = web.session(state).threads()
            choices = [(f"{t['id']} · {t['date']} · {t['status']} · {t['first'][:50]}", t["id"]) for t in listed]
            value = state["thread_id"] if state["thread_id"] in {t["id"] for t in listed} else None
            return gr.update(choices=choices, value=value)

        def drive(history: list, state: dict[str, Any], work: Callable[[ChatSession], dict[str, Any]],
                  answer: dict[str, Any] | None, progress: Any) -> Iterator[list[Any]]:
            """Stream one request into the chat: a 'working' message with a line per tool, the progress bar of
            the drawing and its live preview, the panels after each tool, then the answer (or the pause, or the
            error). The last element of each update is the threads list, the one before it the preview."""
            log = assistant("", metadata={"title": WORKING, "status": "pending"})
            history = [*history, log]
            lines: list[str] = []
            yield [history, state, *panel_values(state), gr.update(), gr.update()]
            for kind, item in web.stream(state, work, answer):
                if kind == "event":
                    event = item
                    if event["event"] == "denoise":
                        progress((event["step"], event["total"]), desc="drawing", unit="steps")
                        continue
                    if event["event"] == "preview":  # only the picture changes: the panels stay as they are
                        yield [history, state, *[gr.update() for _ in panels],
                               gr.update(value=enlarged(event["image"]),
                                         label=f"live preview, step {event['step']}/{event['total']}"),
                               gr.update()]
                        continue
                    if event["event"] == "tool_end":
                        lines.append(tool_text(event))
                    elif event["event"] == "note":
                        lines.append("· " + event["text"])
                    else:
                        text = activity(event)
                        if text is None:
                            continue
                        log["metadata"] = {**log["metadata"], "title": f"{WORKING} {text}"}
                    log["content"] = "\n".join(lines)
                    yield [history, state, *panel_values(state), gr.update(), gr.update()]
                    continue
                log["metadata"] = {"title": "what the agent did", "status": "done"}
                if not lines:  # nothing ran (a mistake in the message): only the answer stays
                    history = [m for m in history if m is not log]
                if kind == "result":
                    web.write_report(item)
                    history = history + web.result_messages(item)
                elif kind == "paused":
                    history = history + [assistant("Paused before a guided redraw: check the references to draw "
                                                   "with (right), then press the button.")]
                else:
                    history = history + [assistant(item)]
                yield [history, state, *panel_values(state), gr.update(), thread_choices(state)]

        def on_send(text: str, history: list, state: dict[str, Any], n_rounds: Any, approve_on: bool,
                    negative_text: str, guidance_value: Any, scheduler_name: str, per_round_value: Any,
                    lora_text: str | None = None, progress: Any = gr.Progress()) -> Iterator[list[Any]]:
            state = dict(state)
            text = (text or "").strip()
            if not text:
                history = [*history, assistant("error: the message is empty; describe the picture, or say what "
                                                        "to change")]
                yield ["", history, state, *panel_values(state), gr.update(), gr.update()]
                return
            try:
                state["rounds"] = ChatSession._check_rounds(int(n_rounds or 0))
                state["drawing"] = page_drawing(s, negative_text, guidance_value, scheduler_name, per_round_value,
                                                lora_text)
                web.session(state)  # the drawing options checked now: a bad value is one line, nothing runs
            except (UserError, ValueError, TypeError) as exc:
                yield ["", [*history, assistant(error_text(exc, web.error_log))], state, *panel_values(state),
                       gr.update(), gr.update()]
                return
            state["approve"] = bool(approve_on)
            history = [*history, {"role": "user", "content": text}]
            for update in drive(history, state, lambda session: session.send(text), None, progress):
                yield ["", *update]

        def on_review(checked: list[str], history: list, state: dict[str, Any],
                      progress: Any = gr.Progress()) -> Iterator[list[Any]]:
            state = dict(state)
            try:
                ids = check_reference_count(list(checked or []))
            except UserError as exc:
                yield [[*history, assistant(error_text(exc, web.error_log))], state, *panel_values(state),
                       gr.update(), gr.update()]
                return
            said = "draw with " + (", ".join(ids) if ids else "no references")
            history = [*history, {"role": "user", "content": said}]
            answer = {"reference_ids": ids, "references": {}}
            yield from drive(history, state, lambda session: session.answer_pending(), answer, progress)

        def guarded(action: Callable[[dict[str, Any]], str | None]) -> Callable[..., list[Any]]:
            """A thread action (open, new, undo): its note or error goes into the chat as one message."""

            def handler(history: list, state: dict[str, Any], *args: Any) -> list[Any]:
                state = dict(state)
                try:
                    note = action(state, *args)
                    history = web.history(state) + ([assistant(note)] if note else [])
                except Exception as exc:
                    history = [*history, assistant(error_text(exc, web.error_log))]
                return [history, state, *panel_values(state), gr.update(), thread_choices(state)]

            return handler

        def do_open(state: dict[str, Any], chosen: str | None) -> str | None:
            if not chosen:
                raise UserError("choose a thread in the list first")
            session = web.session(state)
            summary = session.resume(chosen)
            state["thread_id"] = session.thread_id
            if summary.get("closed"):
                return "Its last request had been cut off; it is closed with the best picture so far."
            return None

        def do_new(state: dict[str, Any]) -> str:
            state["thread_id"] = None
            return "New thread: describe the picture."

        def do_undo(state: dict[str, Any]) -> str:
            summary = web.session(state).undo()
            return f"Undid {summary['undone']!r}."

        def on_search(text: str) -> Any:
            try:
                return web.search(text)
            except Exception as exc:
                gr.Warning(error_text(exc, web.error_log))
                return []

        outputs = [chatbot, page, *panels, preview, threads]
        # One queue of width 1 for everything that touches the models or writes a thread.
        models = {"concurrency_limit": 1, "concurrency_id": "models"}
        for trigger in (send.click, message.submit):
            trigger(on_send, [message, chatbot, page, rounds, approve, negative, guidance, scheduler, per_round,
                              loras], [message, *outputs], show_progress_on=chatbot, **models)
        review_btn.click(on_review, [review_refs, chatbot, page], outputs, show_progress_on=chatbot, **models)
        stop.click(web.stop, [page], None, queue=False)
        open_btn.click(guarded(do_open), [chatbot, page, threads], outputs, **models)
        new_btn.click(guarded(do_new), [chatbot, page], outputs, **models)
        undo_btn.click(guarded(do_undo), [chatbot, page], outputs, **models)
        query.submit(on_search, [query], [found], **models)

        def on_load(history: list, state: dict[str, Any], request: Any) -> list[Any]:
            """``/?thread=ID`` opens a saved thread (as ``imgrag chat --thread ID`` does); else the thread list."""
            wanted = (request.query_params.get("thread") or "").strip() if request else ""
            if wanted:
                return guarded(do_open)(history, state, wanted)
            return [history, state, *panel_values(state), gr.update(), thread_choices(state)]

        # Gradio finds the request by its annotation; postponed annotations would hide gr.Request from it.
        on_load.__annotations__["request"] = gr.Request
        app.load(on_load, [chatbot, page], outputs, **models)
    return app


def launch(web: WebChat, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> Any:
    """Start the page's server: no share link, no analytics, files only from the run folders. Returns the app."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    app = build_app(web)
    app.queue(default_concurrency_limit=1)
    db = Path(web.settings.threads_db).resolve()  # never served, even if it sits inside output_dir
    extra = {}
    if "_frontend" in inspect.signature(app.launch).parameters:
        # Gradio's self-check (a HEAD with a 3 s timeout) exists only to demand a share link when localhost
        # looks unreachable; share links are never made here, and on a busy machine the check fails spuriously.
        extra["_frontend"] = False
    try:
        app.launch(server_name=host, server_port=port, share=False, show_error=False, inbrowser=False,
                   allowed_paths=[str(web.output_dir)], blocked_paths=[str(db), f"{db}.locks"],
                   prevent_thread_lock=not block, quiet=True, ssr_mode=False, enable_monitoring=False, **extra)
    except OSError as exc:  # Gradio's own text names its environment variable; ours names the flag
        busy = "port" in str(exc).lower()
        raise UserError(busy_port_message(host, port) if busy else f"cannot serve on {host}:{port}: {exc}") from None
    return app


def busy_port_message(host: str, port: int) -> str:
    """The one line for a port another server holds: it names ``--port``."""
    return (f"cannot serve on {host}:{port}: the port is already in use (another server listens there); choose "
            "another with --port N")

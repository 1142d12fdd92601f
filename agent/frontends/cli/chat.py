"""``imgrag chat``: the terminal chat.

The conversation logic lives in ``agent/chat/``; this file is the screen: a prompt_toolkit prompt with a
persistent input history, a live status line on stderr while the agent works, the slash commands, and the
review prompt of ``/approve on``. Ctrl-C stops the current request (the thread keeps its last checkpoint);
Ctrl-D quits. A user mistake prints one line and the chat goes on.
"""

from __future__ import annotations

import textwrap
import time
import traceback
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from agent.frontends.cli.chat_screen import ChatStatus, LineReader
from agent.frontends.cli.common import (
    ConfigOpt,
    FastOpt,
    ProfileOpt,
    RepairWithOpt,
    StoreOpt,
    app,
    err,
    out,
    prepare_models,
    repair_flags,
    settings_from_flags,
)
from agent.frontends.cli.run import (
    AllowFlaggedOpt,
    AllowRetrievedOpt,
    MaxRoundsOpt,
    NoMemoryOpt,
    OutOpt,
    PlannerOpt,
    check_planner,
    gate_flags,
    memory_flag,
)
from imgrag.drawing.schedulers import choices_text
from imgrag.errors import UserError
from imgrag.settings import TINY_MARK, imgrag_home
from imgrag.text import describe_error

PROMPT = "imgrag> "
REVIEW_PROMPT = "references> "


class ChatRepl:
    """The read-eval-print loop over a :class:`agent.chat.ChatSession`."""

    def __init__(self, settings: Any, planner: str, rounds: int | None) -> None:
        from agent.chat import ChatSession
        from agent.runner import Runner

        self.settings = settings
        self.status = ChatStatus()
        self.home = imgrag_home()
        self.reader = LineReader(self.home / "chat_history")
        # Previews are made only when this terminal can show them (they cost a little per step).
        self.session = ChatSession(Runner(settings, previews=self.status.preview.available), planner=planner,
                                   rounds=rounds, reviewer=self.review, on_event=self.status)
        self._hinted_preview = False

    # ----- the loop -----
    def run(self, thread: str | None, *, new: bool = False, prepare: Callable[[], None] | None = None) -> None:
        """The loop until Ctrl-D or /quit. ``thread`` (``--thread``) is opened first, so a bad one is its one-line
        error before anything else is printed; then ``prepare`` (the models' first-use preparation, which prints
        the tiny profile's warning) runs, then the banner."""
        s = self.session
        summary = s.open(thread, new=new) if thread is not None else None
        if prepare is not None:
            prepare()
        out.print(f"[bold]imgrag chat[/] · profile {self.settings.profile} · planner {s.planner} · "
                  f"{s.rounds} round(s) per request. Describe a picture; later messages refine it. "
                  "/help lists the commands; Ctrl-C stops a request, Ctrl-D quits.")
        if thread is not None:
            self.show_opened(summary)
        while True:
            try:
                line = self.reader.read(PROMPT)
            except KeyboardInterrupt:
                continue  # Ctrl-C at the prompt clears the line, as in a shell
            except EOFError:
                out.print("bye: threads are kept (/threads, /resume ID, or imgrag chat --thread ID)")
                return
            if self.guard(lambda text=line: self.handle(text)) == "quit":
                out.print("bye: threads are kept (/threads, /resume ID, or imgrag chat --thread ID)")
                return

    def guard(self, action) -> Any:
        """Run one action; a user mistake is one line, an unexpected error one line plus a log file."""
        try:
            return action()
        except UserError as exc:
            self.status.end()
            err.print(f"[red]error:[/] {escape(str(exc))}")
        except KeyboardInterrupt:
            self.status.end()
            err.print("[yellow]interrupted[/]")
        except Exception as exc:  # a bug or a broken model must not end the chat or print a traceback
            self.status.end()
            log = self.home / "chat-errors.log"
            try:
                log.parent.mkdir(parents=True, exist_ok=True)
                with log.open("a", encoding="utf-8") as fh:
                    fh.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}\n{traceback.format_exc()}\n")
                where = f"; the details are in {log}"
            except OSError:
                where = ""
            err.print(f"[red]error:[/] {escape(describe_error(exc))}{where}")
        return None

    def handle(self, line: str) -> str | None:
        from agent.chat import SlashCommand, parse_line

        item = parse_line(line)
        if item is None:
            return None
        if isinstance(item, SlashCommand):
            return getattr(self, f"cmd_{item.name.replace('-', '_')}")(item.arg)
        self.request(item)
        return None

    # ----- requests -----
    def request(self, text: str) -> None:
        self.status.begin(int(self.session.values().get("rounds") or 0))  # a follow-up: the thread's round
        try:
            result = self.session.send(text)
        finally:
            self.status.end()
        self.show_result(result)

    def show_result(self, result: dict[str, Any]) -> None:
        from agent.chat import verdict_text

        if result.get("stopped"):
            kept = f"; the best so far is {result['final_candidate']}" if result.get("final_candidate") else ""
            out.print(f"[yellow]stopped[/]: the thread keeps everything up to its last step{kept}. "
                      "Send a message to go on.")
            return
        best = next((c for c in result.get("candidates") or [] if c["id"] == result.get("final_candidate")), None)
        reason = escape(str(result.get("stop_reason")))
        out.print(f"{result['status']} ({reason}) · {result['rounds']} round(s) on this thread")
        if best is None:
            out.print("nothing was drawn")
            return
        tiny = f" [dim]({TINY_MARK})[/]" if self.settings.is_tiny else ""
        out.print(f"best: {best['id']}, {escape(verdict_text(best))}{tiny}")
        out.print(f"picture: {escape(best['path'])}")

    def show_opened(self, summary: dict[str, Any] | None) -> None:
        """What ``--thread`` opened: the saved thread's summary, or (None) the new thread's name."""
        if summary is None:
            out.print(f"new thread {self.session.thread_id}: describe the picture")
            return
        self.show_summary(summary)

    def show_summary(self, summary: dict[str, Any]) -> None:
        from agent.chat import verdict_text

        out.print(f"thread {summary['thread_id']}: {len(summary['requests'])} request(s)")
        for n, text in enumerate(summary["requests"], 1):
            out.print(f"  {n}. {escape(text)}")
        if summary["prompt"]:
            out.print(f"prompt: {escape(summary['prompt'])}")
        best = summary["best"]
        if best:
            out.print(f"best: {best['id']} of {summary['candidates']}, {escape(verdict_text(best))} → "
                      f"{escape(best['path'])}")
        if summary.get("closed"):
            out.print("[dim]its last request had been cut off; it is closed with the best picture so far[/]")
        if summary["paused"]:
            out.print("this thread waits for your review of a guided redraw's references")
            self.status.begin()
            try:
                result = self.session.answer_pending()
            finally:
                self.status.end()
            self.show_result(result)

    def review(self, proposal: Any) -> dict[str, Any]:
        """Asked by the session when the graph pauses before a guided redraw (/approve on)."""
        from agent.chat import REVIEW_HELP, parse_review

        self.status.end()
        try:
            out.print(f"[bold]review[/]: the next drawing (scale {proposal.ip_scale}) would use:")
            for rid in proposal.proposed:
                ref = proposal.references.get(rid, {})
                label = ref.get("caption") or ref.get("query") or ""
                out.print(f"  {proposal.number(rid) or '-'}. {rid}  {escape(label)}  {escape(ref.get('path', ''))}")
            out.print(f"[dim]{REVIEW_HELP}[/]")
            while True:
                try:
                    text = self.reader.read(REVIEW_PROMPT, which="review")
                except EOFError:
                    raise KeyboardInterrupt from None  # Ctrl-D here stops the request, like Ctrl-C
                if text.strip() in ("/refs", "refs"):
                    self.cmd_refs("")
                    continue
                try:
                    answer = parse_review(text, proposal.proposed, proposal.references)
                except UserError as exc:
                    err.print(f"[red]error:[/] {escape(str(exc))}")
                    continue
                ids = answer["reference_ids"]
                out.print("drawing with " + (", ".join(ids) if ids else "no references"))
                return answer
        finally:
            self.status.resume()

    # ----- commands -----
    def cmd_help(self, arg: str) -> None:
        from agent.chat import COMMANDS

        table = Table(show_header=False, box=None, padding=(0, 2))
        for usage, what in COMMANDS.values():
            table.add_row(usage, what)
        out.print(table)
        out.print("Anything else is a request. The first describes the picture; later ones refine it "
                  "(\"make the cradle wooden\"), pick references (\"use the second reference\") or extend the "
                  "budget (\"two more rounds\"). Ctrl-C stops a request and keeps the thread; Ctrl-D quits.")

    def cmd_quit(self, arg: str) -> str:
        return "quit"

    def cmd_new(self, arg: str) -> None:
        self.session.new()
        out.print("new thread: describe the picture")

    def cmd_threads(self, arg: str) -> None:
        threads = self.session.threads()
        if not threads:
            out.print("no chat threads yet")
            return
        table = Table(title="chat threads, newest first")
        for column in ("id", "date", "requests", "status", "first request"):
            table.add_column(column, overflow="fold")
        for t in threads:
            mark = " *" if t["id"] == self.session.thread_id else ""
            first = textwrap.shorten(t["first"], 60, placeholder=" …") if t["first"].strip() else ""
            table.add_row(t["id"] + mark, t["date"], str(t["requests"]), t["status"], escape(first))
        out.print(table)

    def cmd_resume(self, arg: str) -> None:
        self.show_summary(self.session.resume(arg))

    def cmd_show(self, arg: str) -> None:
        from agent.chat import verdict_text

        candidate = self.session.candidate(arg or None)
        refs = f", references {', '.join(candidate['reference_ids'])}" if candidate.get("reference_ids") else ""
        out.print(f"{candidate['id']} (round {candidate['round']}, seed {candidate['seed']}{refs}): "
                  f"{escape(verdict_text(candidate))}")
        self.preview(candidate["path"])
        out.print(f"picture: {escape(candidate['path'])}")

    def preview(self, path: str) -> None:
        """An inline picture through textual-image (the optional "preview" extra) where the terminal can show it."""
        if not out.is_terminal:
            return
        try:
            from textual_image.renderable import Image as TerminalImage
        except ImportError:
            if not self._hinted_preview:
                out.print("[dim](inline previews need the preview extra: pip install 'imgrag\\[preview]')[/]")
                self._hinted_preview = True
            return
        try:
            out.print(TerminalImage(path, width=32, height="auto"))
        except Exception:  # a terminal the library cannot drive: the path below is enough
            return

    def cmd_refs(self, arg: str) -> None:
        refs = self.session.references()
        if not refs:
            out.print("no references on this thread yet (they come from retrieval)")
            return
        table = Table(title="references (✓: used by the best picture)")
        for column in ("#", "id", "about", "score", "weight:mode", "", "path"):
            table.add_column(column, overflow="fold")
        for ref in refs:
            score = "" if ref.get("score") is None else f"{float(ref['score']):.3f}"
            # "use the second reference more strongly" changes these (imgrag.drawing.steering); "(memory)": remembered
            steer = f"{float(ref.get('weight', 1.0)):g}:{ref.get('mode', 'both')}"
            steer += f" ({ref['source']})" if ref.get("source") in ("user", "memory") else ""
            table.add_row(str(ref["number"]), ref["id"], escape(ref.get("caption") or ref.get("query") or ""), score,
                          steer, "✓" if ref["used_by_best"] else "", escape(ref.get("path", "")))
        out.print(table)

    def cmd_budget(self, arg: str) -> None:
        if arg:
            self.session.set_budget(arg)
        values = self.session.values()
        used = f"; this thread has drawn {values.get('rounds', 0)}" if values else ""
        out.print(f"each request may draw {self.session.rounds} picture(s){used}")

    def cmd_approve(self, arg: str) -> None:
        if arg:
            self.session.set_approve(arg)
        out.print("approve " + ("on: each guided redraw waits for your review of its references"
                                if self.session.approve else "off: the agent chooses references itself"))

    def cmd_negative(self, arg: str) -> None:
        if arg:
            self.session.set_drawing(negative_prompt="" if arg.strip().lower() in ("off", "none") else arg)
        negative = self.session.drawing_options().negative_prompt
        out.print(f"negative prompt: {escape(negative)}" if negative else "no negative prompt")

    def cmd_guidance(self, arg: str) -> None:
        if arg:
            self.session.set_guidance(arg)
        guidance = self.session.drawing_options().guidance
        out.print(f"guidance {guidance:g}" if guidance is not None else
                  f"guidance: the settings' ({self.settings.generation.guidance:g}, or the fast mode's)")

    def cmd_scheduler(self, arg: str) -> None:
        if arg.strip().lower() == "list":
            out.print(f"schedulers: {choices_text()}; default: the checkpoint's own")
            return
        if arg:
            self.session.set_drawing(scheduler=arg)
        scheduler = self.session.drawing_options().scheduler
        out.print(f"scheduler {scheduler}" if scheduler else "scheduler: the checkpoint's own")

    def cmd_per_round(self, arg: str) -> None:
        if arg:
            self.session.set_per_round(arg)
        out.print(f"{self.session.drawing_options().per_round} drawing(s) per round")

    def cmd_lora(self, arg: str) -> None:
        if arg:
            self.session.set_lora(arg)
        loras = self.session.drawing_options().loras
        out.print("LoRAs: " + ", ".join(f"{escape(c.label)}:{c.weight:g} ({escape(c.path)})" for c in loras)
                  if loras else "no LoRA")

    def cmd_undo(self, arg: str) -> None:
        summary = self.session.undo()
        out.print(f"undid {escape(summary['undone'])!r}")
        self.show_summary(summary)

    def cmd_save(self, arg: str) -> None:
        best, path = self.session.save(arg)
        out.print(f"saved {best['id']} to {path}")


@app.command()
def chat(
    thread: Annotated[
        str | None, typer.Option("--thread", help="Continue a saved thread (a unique start of its id is enough); "
                                 "with --new, the name of a new one.")
    ] = None,
    new: Annotated[bool, typer.Option("--new", help="With --thread NAME: start a new thread of that name.")] = False,
    planner: PlannerOpt = "agent",
    max_rounds: MaxRoundsOpt = None,
    out_dir: OutOpt = None,
    fast: FastOpt = None,
    repair_with: RepairWithOpt = None,
    allow_retrieved: AllowRetrievedOpt = None,
    allow_flagged: AllowFlaggedOpt = None,
    no_memory: NoMemoryOpt = False,
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """A terminal chat with thread memory: describe a picture, then refine it message by message.

    Each message is a request on one LangGraph thread, saved in the same checkpoint database as runs: later
    messages continue from the best picture so far. /help inside lists the commands.
    """
    check_planner(planner)
    if new and thread is None:
        raise UserError("--new names a new thread: give it with --thread NAME (without --thread every chat is new)")
    settings = settings_from_flags(profile, config, store=store, output_dir=str(out_dir) if out_dir else None,
                                   **{"generation.fast": fast, **gate_flags(allow_retrieved, allow_flagged),
                                      **repair_flags(repair_with), **memory_flag(no_memory)})
    ChatRepl(settings, planner, max_rounds).run(thread, new=new, prepare=lambda: prepare_models(settings))

"""What ``imgrag run`` and ``imgrag batch`` show while they work and at the end, on stderr (the results on stdout):
the live status line (:class:`StatusText`), a line per finished tool, the drawings' previews where the terminal can,
the run's notes (every drawing blocked, the fixed policy standing in for the LLM), a batch's table and the Ray
driver's progress. The chat shows its requests with the same status line.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from agent.frontends.cli.common import err, out
from agent.frontends.cli.terminal_images import TerminalPreview, preview_event_image
from agent.frontends.progress import activity

# Tools that draw a picture: while one runs, the round shown is the one being drawn (tool_start carries the
# rounds drawn so far).
DRAWING_TOOLS = ("generate", "regenerate")


def tool_line(event: dict[str, Any], elapsed: float) -> str:
    """The line kept on stderr when a tool finishes (its message escaped: captions may hold [brackets])."""
    mark = "[green]✓[/]" if event["ok"] else "[red]✗[/]"
    message = escape(event["message"])
    return f"{elapsed:6.1f}s  {mark} {escape(event['tool']):<10} {event['seconds']:6.2f}s  [dim]{message}[/]"


def print_tool_line(event: dict[str, Any], elapsed: float, console: Console | None = None) -> None:
    """Print :func:`tool_line`: on a terminal cut to its width with an ellipsis (one line per step, however wide
    the terminal), elsewhere (a log file) whole."""
    console = console or err
    if console.is_terminal:
        console.print(tool_line(event, elapsed), no_wrap=True, overflow="ellipsis")
    else:
        console.print(tool_line(event, elapsed), soft_wrap=True)


def print_store(event: dict[str, Any], console: Console | None = None) -> None:
    """The runner's ``store`` event: a warning when the store is empty or missing, else a dim line naming it."""
    console = console or err
    if event.get("warning"):
        console.print(f"[yellow]warning:[/] {escape(event['warning'])}", soft_wrap=True)
    else:
        console.print(f"[dim]store {escape(event['location'])}: {event['pictures']} pictures[/]", soft_wrap=True)


class StatusText:
    """The live status line: elapsed time, round, what the agent does. Rich's Live re-renders it at every
    refresh (``__rich__``), so the clock ticks through model loads and LLM calls, which send no event."""

    def __init__(self, suffix: str = "") -> None:
        self.suffix = suffix  # markup added after the activity, e.g. "(Ctrl-C stops)"
        self.restart()

    def restart(self, rounds: int = 0) -> None:
        """Start the clock again; ``rounds`` is what the thread has drawn already (a chat follow-up)."""
        self.start = time.monotonic()
        self.round = rounds
        self.text = "starting"

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def update(self, event: dict[str, Any]) -> bool:
        """Take a runner event; True when it changed what the line shows."""
        if event["event"] == "tool_start":
            drawn = int(event.get("round", self.round) or 0)
            self.round = drawn + 1 if event.get("tool") in DRAWING_TOOLS else max(drawn, 1)
        text = activity(event)
        if text is None:
            return False
        self.text = text
        return True

    def __rich__(self) -> Text:
        line = Text(f"{self.elapsed():6.1f}s  round {self.round}  ")
        line.append(self.text)  # plain text: a tool's words are never read as markup
        if self.suffix:
            line.append("  ").append_text(Text.from_markup(self.suffix))
        return line


class ProgressPrinter:
    """Turns the runner's events into one live status line and a line per finished tool on stderr, and shows the
    drawings' live previews where the terminal can (:mod:`agent.frontends.cli.terminal_images`; ``previews=False`` for
    --json)."""

    def __init__(self, previews: bool = True) -> None:
        self.line = StatusText()
        self.status = err.status(self.line, spinner="dots")
        self.preview = TerminalPreview(err.file, enabled=previews)

    def __enter__(self) -> ProgressPrinter:
        self.status.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.status.__exit__(*exc)

    def __call__(self, event: dict[str, Any]) -> None:
        seconds = self.line.elapsed()
        elapsed = f"{seconds:6.1f}s"
        kind = event["event"]
        image = preview_event_image(event)
        if image is not None:
            self.status.stop()  # the status line steps aside while the picture is drawn above it
            self.preview.show(image)
            self.status.start()
            return
        if kind in ("store", "run_start", "note", "tool_end", "run_end"):
            self.preview.detach()
        if self.line.update(event):
            self.status.update(self.line)
        elif kind == "store":
            print_store(event)
        elif kind == "run_start":
            err.print(f"[dim]run {escape(event['run_id'])} → {escape(event['run_dir'])}[/]", soft_wrap=True)
        elif kind == "note":  # said once: the store is unreachable, the LLM failed and the policy took over
            err.print(f"[yellow]warning:[/] {escape(event['text'])}", soft_wrap=True)
        elif kind == "tool_end":
            print_tool_line(event, seconds)
        elif kind == "run_end":
            reason = f" ({escape(event['stop_reason'])})" if event.get("stop_reason") else ""
            err.print(f"{elapsed}  {event['status']}{reason}: {escape(answer_text(event))}", soft_wrap=True)
            print_run_notes(event)


def answer_text(result: dict[str, Any]) -> str:
    """The answer's path, or why there is none (every drawing blocked, nothing drawn)."""
    if result.get("final_image"):
        return str(result["final_image"])
    return "no answer: every drawing was blocked by the safety gate" if result.get("blocked") else "no answer"


def print_run_notes(result: dict[str, Any], console: Console | None = None) -> None:
    """Once per run, what the answer alone hides: every drawing blocked by the safety gate (and which concepts),
    how many steps the fixed policy took for a failing LLM planner, and why, and a full-step redraw that failed."""
    console = console or err
    redraw = result.get("final_full") or {}
    if redraw.get("error"):
        console.print(f"[yellow]warning:[/] the full-step redraw of {escape(str(redraw['candidate_id']))} failed "
                      f"({escape(redraw['error'])}); the answer is its fast draft", soft_wrap=True)
    if result.get("blocked"):
        console.print(f"[yellow]warning:[/] {escape(result['blocked'])}", soft_wrap=True)
    if result.get("fallback_steps"):
        why = f" ({escape(str(result['fallback_reason']))})" if result.get("fallback_reason") else ""
        console.print(f"[yellow]note:[/] the LLM planner could not choose {result['fallback_steps']} step(s); the "
                      f"fixed policy took them{why}", soft_wrap=True)


def print_batch(summary: dict[str, Any], console: Console | None = None) -> None:
    """The batch's table on stdout. Paths are folded onto more lines, never cut, and stay out of the title, so a
    narrow terminal shows them whole."""
    console = console or out
    table = Table(title="batch results")
    for column in ("#", "prompt", "status", "rounds", "seconds", "image or error"):
        table.add_column(column, overflow="fold")
    for item in summary["items"]:
        table.add_row(str(item["index"] + 1), escape(item["prompt"]), item["status"], str(item.get("rounds", "")),
                      str(item.get("seconds", "")), escape(item.get("error") or item.get("final_image") or ""))
    console.print(table)
    console.print(f"batch folder: {escape(summary['batch_dir'])}", soft_wrap=True)
    console.print(f"model loads: {summary['model_loads']}", soft_wrap=True)


class RayProgress:
    """The driver's one progress display on stderr: a live line (done/total, per worker, failures, deaths) and a
    line per settled prompt."""

    def __init__(self, console: Any, total: int) -> None:
        self.console = console
        self.total = total
        self.done = 0
        self.failed = 0
        self.deaths = 0
        self.per_worker: dict[str, int] = {}
        self.start = time.monotonic()
        self.status = console.status("starting the Ray workers", spinner="dots")

    def __enter__(self) -> RayProgress:
        self.status.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.status.__exit__(*exc)

    def line(self) -> str:
        """The live line's text."""
        workers = ", ".join(f"{name}: {n}" for name, n in sorted(self.per_worker.items()))
        return (f"{time.monotonic() - self.start:6.1f}s  {self.done}/{self.total} prompts  ({workers})  "
                f"failed {self.failed}  worker deaths {self.deaths}")

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "workers":
            self.per_worker = {w["name"]: 0 for w in event["workers"]}
            self.done = event.get("done", 0)
            nodes = ", ".join(f"{w['name']}@{w['node']} (pid {w['pid']})" for w in event["workers"])
            self.console.print(f"[dim]ray workers: {escape(nodes)} → {escape(event['batch_dir'])}[/]", soft_wrap=True)
        elif kind == "worker_died":
            self.deaths += 1
            self.console.print(f"[yellow]worker {event['worker']} died ({event['error']}); prompt "
                               f"{event['index'] + 1} goes to another worker[/]")
        elif kind == "item":
            item = event["item"]
            self.done += 1
            if item["status"] == "failed":
                self.failed += 1
            worker = event.get("worker")
            if worker:
                self.per_worker[worker] = self.per_worker.get(worker, 0) + 1
            detail = item.get("error") or item.get("final_image") or ""
            self.console.print(f"prompt {item['index'] + 1}: {item['status']} ({worker or '-'}) {escape(str(detail))}",
                               soft_wrap=True)
        self.status.update(self.line())

"""What ``imgrag chat`` shows and reads on the terminal: the live status line while a request runs, and the input
line (prompt_toolkit with a history file on a terminal, plain stdin when piped). The chat's loop and commands are
in :mod:`agent.frontends.cli.chat`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rich.markup import escape

from agent.frontends.cli.common import err, out
from agent.frontends.cli.run_display import StatusText, print_store, print_tool_line
from agent.frontends.cli.terminal_images import TerminalPreview, preview_event_image


class ChatStatus:
    """The live status line (tool, round, elapsed) on stderr while a request runs, a line per finished tool, and the
    drawing's live preview where the terminal shows pictures (:mod:`agent.frontends.cli.terminal_images`; else none)."""

    def __init__(self, preview: Any = None) -> None:
        self.status: Any = None
        self.line = StatusText(suffix="[dim](Ctrl-C stops)[/]")
        self.preview = preview if preview is not None else TerminalPreview(err.file)

    def begin(self, rounds: int = 0) -> None:
        """Show the line for a new request on a thread that has drawn ``rounds`` pictures already."""
        self.line.restart(rounds)
        self.resume()

    def resume(self) -> None:
        if self.status is None:
            self.status = err.status(self.line, spinner="dots")  # re-rendered at each refresh: the clock ticks
            self.status.start()

    def end(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        image = preview_event_image(event)
        if image is not None:
            running = self.status is not None
            self.end()  # the status line steps aside while the picture is drawn above it
            self.preview.show(image)
            if running:
                self.resume()
            return
        if kind in ("note", "tool_end", "store"):
            self.preview.detach()  # printed below the preview: the next drawing's preview gets its own place
        if kind == "note":
            out.print(f"[cyan]·[/] {escape(event['text'])}")
            return
        if self.line.update(event):
            if self.status is not None:
                self.status.update(self.line)
        elif kind == "tool_end":
            print_tool_line(event, self.line.elapsed())
        elif kind == "store":
            print_store(event)


class LineReader:
    """Lines from a prompt_toolkit prompt (with a history file) on a terminal, from plain stdin otherwise."""

    def __init__(self, history_path: Path) -> None:
        self.interactive = sys.stdin.isatty() and sys.stdout.isatty()
        self.sessions: dict[str, Any] = {}
        if self.interactive:
            from prompt_toolkit import PromptSession
            from prompt_toolkit.history import FileHistory

            history_path.parent.mkdir(parents=True, exist_ok=True)
            self.sessions["main"] = PromptSession(history=FileHistory(str(history_path)))
            self.sessions["review"] = PromptSession()

    def read(self, message: str, which: str = "main") -> str:
        """The next line; KeyboardInterrupt on Ctrl-C, EOFError on Ctrl-D or the end of input."""
        if self.interactive:
            return self.sessions[which].prompt(message)
        sys.stdout.write(message)
        sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

"""What the terminal shows while and after the agent works: the live status line, step lines, and tables at
80 and 200 columns (Rich consoles writing to a buffer, as a terminal of that width would)."""

from __future__ import annotations

import io
import re
import time

from rich.console import Console
from rich.status import Status

from agent.cli_run import StatusText, print_batch, print_tool_line

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\r")


def terminal(width: int) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=width, force_terminal=True, color_system=None, legacy_windows=False), buffer


def test_the_status_clock_ticks_while_no_event_comes() -> None:
    """A model load or an LLM call sends no event for many seconds: the line still counts them."""
    console, buffer = terminal(100)
    line = StatusText()
    line.update({"event": "llm_start", "attempt": 1})
    with Status(line, console=console, spinner="dots", refresh_per_second=20):
        time.sleep(0.8)
    shown = {float(m) for m in re.findall(r"(\d+\.\d)s  round", ANSI.sub("", buffer.getvalue()))}
    assert len(shown) >= 3 and max(shown) >= 0.5, shown


def test_the_round_shown_is_the_one_being_drawn_or_judged() -> None:
    line = StatusText()
    rounds = []
    for tool, drawn in [("generate", 0), ("critique", 1), ("retrieve", 1), ("regenerate", 1), ("critique", 2)]:
        line.update({"event": "tool_start", "tool": tool, "args": {}, "round": drawn})
        rounds.append(line.round)
    assert rounds == [1, 1, 1, 2, 2]


MESSAGE = "Retrieved 2 references for 'a wooden cradle': " + ", ".join(f"ref-{i:02d} (a photo of a thing)"
                                                                      for i in range(3))


def test_step_lines_use_the_terminal_width() -> None:
    event = {"event": "tool_end", "tool": "retrieve", "ok": True, "seconds": 0.25, "message": MESSAGE}
    wide, wide_buffer = terminal(200)
    print_tool_line(event, 3.0, wide)
    assert MESSAGE in wide_buffer.getvalue() and len(MESSAGE) > 110
    narrow, narrow_buffer = terminal(80)
    print_tool_line(event, 3.0, narrow)
    lines = narrow_buffer.getvalue().rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].endswith("…") and len(lines[0]) <= 80
    log = io.StringIO()  # not a terminal (a log file): the whole line
    print_tool_line(event, 3.0, Console(file=log, width=80, color_system=None))
    assert MESSAGE in log.getvalue()


def test_the_batch_table_shows_whole_paths_at_80_columns() -> None:
    batch_dir = "/tmp/imgrag-home/runs/batch-prompts-0123456789-20261129-101500"
    image = batch_dir.replace("batch-prompts", "batch-run") + "-000/candidates/c2.png"
    summary = {"batch_dir": batch_dir, "model_loads": {"generator": 1}, "items": [
        {"index": 0, "prompt": "a red cradle beside a retriever", "status": "matched", "rounds": 2, "seconds": 3.5,
         "final_image": image, "error": None}]}
    console, buffer = terminal(80)
    print_batch(summary, console)
    text = buffer.getvalue()
    assert "…" not in text
    last_column = "".join(line.split("│")[-2].strip() for line in text.splitlines() if line.count("│") == 7)
    assert last_column == image  # folded onto several lines, every character there
    assert f"batch folder: {batch_dir}" in text.replace("\n", "")
    assert all(len(line) <= 80 for line in text.splitlines())

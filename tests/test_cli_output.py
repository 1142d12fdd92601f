"""What the terminal shows while and after the agent works: the live status line, step lines, and tables at
80 and 200 columns (Rich consoles writing to a buffer, as a terminal of that width would)."""

from __future__ import annotations

import io
import re
import time

from rich.console import Console
from rich.status import Status

from agent.frontends.cli.run_display import StatusText, print_batch, print_store, print_tool_line

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\r")


def terminal(width: int) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=width, force_terminal=True, color_system=None, legacy_windows=False), buffer


def test_the_status_clock_ticks_while_no_event_comes() -> None:
    """A model load or an LLM call sends no event for many seconds: the line still counts them."""
    console, buffer = terminal(100)
    line = StatusText()
    line.update({"event": "llm_start", "attempt": 1})
    def shown() -> set[float]:
        return {float(m) for m in re.findall(r"(\d+\.\d)s  round", ANSI.sub("", buffer.getvalue()))}

    with Status(line, console=console, spinner="dots", refresh_per_second=20):
        deadline = time.monotonic() + 30  # waited for by condition: a busy machine refreshes late, not wrongly
        while (len(shown()) < 3 or max(shown()) < 0.5) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(shown()) >= 3 and max(shown()) >= 0.5, shown()


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


def _runner(tmp_path, store: str, events: list, reference_store=None):
    from agent.runner import Runner, open_checkpointer
    from imgrag.settings import load_settings
    from tests.fakes import FakeEmbedder, FakeGenerator, FakeManager, FakeVerdict, ScriptedJudge

    settings = load_settings("default", environ={"IMGRAG_HOME": str(tmp_path / "home"), "IMGRAG_STORE": store})
    models = {"generator": FakeGenerator(), "judge": ScriptedJudge([FakeVerdict(True, [], "all there")]),
              "embedder": FakeEmbedder()}
    return Runner(settings, manager=FakeManager(models), on_event=events.append, reference_store=reference_store,
                  checkpointer=open_checkpointer(tmp_path / "threads.sqlite"))


def test_a_missing_or_empty_store_is_named_when_the_run_starts(tmp_path) -> None:
    import json
    from pathlib import Path

    from tests.fakes import MemoryStore

    events: list = []
    typo = tmp_path / "stroe"
    runner = _runner(tmp_path, str(typo), events)
    result = runner.run("a cat", planner="fixed", max_rounds=1)
    runner.run("a dog", planner="fixed", max_rounds=1)
    told = [e for e in events if e["event"] == "store"]
    assert len(told) == 1 and told[0]["pictures"] is None and not typo.exists()  # once per runner; nothing created
    assert f"the store {typo} does not exist" in told[0]["warning"]
    trace = [json.loads(line) for line in (Path(result["run_dir"]) / "trace.jsonl").read_text().splitlines()]
    assert any(t.get("event") == "warning" and "does not exist" in t["warning"] for t in trace)
    console, buffer = terminal(100)
    print_store(told[0], console)
    assert buffer.getvalue().startswith("warning: the store")

    events.clear()  # a store that holds pictures: named, with its count, and no warning
    refs = tmp_path / "refs"
    refs.mkdir()
    _runner(tmp_path, str(typo), events, reference_store=MemoryStore(refs)).run("a cat", planner="fixed",
                                                                              max_rounds=1)
    told = [e for e in events if e["event"] == "store"]
    assert told[0]["pictures"] == 3 and told[0]["warning"] is None


def test_an_empty_embedded_store_is_counted_without_an_embedder(tmp_path) -> None:
    import chromadb

    from imgrag.store import store_census

    assert store_census(str(tmp_path / "none")) == (str(tmp_path / "none"), None)
    client = chromadb.PersistentClient(path=str(tmp_path / "empty"))
    client.create_collection("imgrag-x-4d-0", metadata={"imgrag_embedder": "x", "imgrag_dim": 4})
    assert store_census(str(tmp_path / "empty")) == (str(tmp_path / "empty"), 0)


def test_help_shows_no_value_for_flags() -> None:
    """--json, --prune, --help take no value: the help shows none (Typer's rich help showed ``<bool>``)."""
    from typer.testing import CliRunner

    from agent.frontends.cli.app import app

    for command in (["index"], ["run"], ["batch"], ["report"], ["models", "build-tiny"]):
        res = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "120"})
        assert res.exit_code == 0, res.output
        assert "--help" in res.output and "<bool>" not in res.output
        assert "<int>" in res.output or command != ["index"]  # options that take a value still say which

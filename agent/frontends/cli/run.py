"""``imgrag run`` and ``imgrag batch``: the agent from the command line, with live progress on stderr."""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from agent.frontends.cli.common import (
    ConfigOpt,
    FastOpt,
    GuidanceOpt,
    JsonOpt,
    LoraOpt,
    NegativeOpt,
    PerRoundOpt,
    ProfileOpt,
    RepairWithOpt,
    SchedulerOpt,
    StoreOpt,
    app,
    drawing_flags,
    drawing_options,
    err,
    lora_args,
    on_interrupt,
    out,
    prepare_models,
    print_json,
    repair_flags,
    settings_from_flags,
)
from agent.frontends.cli.terminal_images import TerminalPreview, preview_event_image
from agent.frontends.progress import activity
from agent.frontends.ray_batch import check_shared_services, run_batch
from imgrag.drawing.draw_options import check_guidance
from imgrag.errors import UserError, check_seed
from imgrag.records.runs import ensure_writable_dir
from tools.budget import check_rounds

PlannerOpt = Annotated[
    str, typer.Option("--planner", help="agent: the LLM chooses each tool; fixed: ImageRAG's pipeline, no LLM loaded.")
]


def _check_max_rounds(value: int | None) -> int | None:
    """Checked here (not with Typer's min=) so a bad value is the usual one-line error, before any work. A
    function of one argument: Typer hands the value to a callback's last parameter."""
    return check_rounds(value, "--max-rounds")


MaxRoundsOpt = Annotated[
    int | None, typer.Option("--max-rounds", callback=_check_max_rounds,
                             help="Pictures the run may draw (default: budget.max_rounds).")
]
# What a run may answer with (settings retrieval.allow_retrieved and safety.allow_flagged).
AllowRetrievedOpt = Annotated[bool | None, typer.Option(
    "--allow-retrieved/--no-allow-retrieved",
    help="Let a photo of your collection that shows the whole prompt be the answer instead of a drawing "
         "(default: retrieval.allow_retrieved, off).")]


AllowFlaggedOpt = Annotated[bool | None, typer.Option(
    "--allow-flagged/--no-allow-flagged",
    help="Let a drawing the safety gate flagged be the answer (default: safety.allow_flagged, off; flagged "
         "drawings are always kept on disk).")]


def gate_flags(allow_retrieved: bool | None, allow_flagged: bool | None = None) -> dict[str, Any]:
    """The settings overrides of the answer-gate flags (None: not given)."""
    return {"retrieval.allow_retrieved": allow_retrieved, "safety.allow_flagged": allow_flagged}


OutOpt = Annotated[Path | None, typer.Option("--out", help="Directory for run folders (default: output_dir).")]


NoMemoryOpt = Annotated[bool, typer.Option(
    "--no-memory", help="Do not use or update the concept memory (which references fixed which concept in earlier "
    "matched runs; retrieval.memory). `imgrag memory list` shows it.")]


def memory_flag(no_memory: bool) -> dict[str, Any]:
    """The settings override of ``--no-memory``."""
    return {"retrieval.memory": False} if no_memory else {}


def check_planner(planner: str) -> None:
    """--planner's value, checked before any model loads."""
    from agent.runner import PLANNERS

    if planner not in PLANNERS:
        raise UserError(f"--planner must be {' or '.join(PLANNERS)}, got {planner!r}")


def check_outputs(settings: Any) -> None:
    """The folders a run writes (its run folders, the thread store's), proven writable before any model loads."""
    ensure_writable_dir(settings.output_dir, "output folder")
    ensure_writable_dir(Path(settings.threads_db).parent, "thread store's folder")


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


def _shared_flags(profile: str | None, config: Path | None, store: str | None, out_dir: Path | None) -> list[str]:
    """The flags a resume needs to find the same settings, threads and run folders again."""
    flags: list[str] = []
    for name, value in (("--profile", profile), ("--config", config), ("--store", store), ("--out", out_dir)):
        if value is not None:
            flags += [name, str(value)]
    return flags


def _interrupted(stop: Any, command: list[str], as_json: bool) -> None:
    """After Ctrl-C: say where the partial record is and the exact command that continues, then exit 130.

    Exits with os._exit: a tool still busy in a worker thread (a drawing) would otherwise hold the process until
    it finished; everything worth keeping is already on disk (the checkpoint, the fsynced trace, result.json)."""
    result = stop.result
    if as_json:
        print_json(result)
    where = stop.batch_dir or result.get("run_dir")
    err.print(f"[yellow]interrupted[/]: partial record in {escape(str(where))}" if where else "[yellow]interrupted[/]",
              soft_wrap=True)
    err.print(f"resume with: {escape(shlex.join(command))}", soft_wrap=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def _full_disk(full: Any, command: list[str]) -> None:
    """A run or batch stopped by a full disk: its one line (what was kept) plus the command that continues."""
    raise UserError(f"{full}; free some space, then continue with: {shlex.join(command)}") from None


def _make_runner(profile, config, store, out_dir, on_event, fast=None, gates=None, check=None):
    """(runner, settings): the settings and the output folder checked, then ``check(settings)`` (the drawing options:
    ``--guidance``, the ``--lora`` files), all before the tiny kit is built or any model loads."""
    settings = settings_from_flags(profile, config, store=store, output_dir=str(out_dir) if out_dir else None,
                                   **{"generation.fast": fast, **(gates or {})})
    check_outputs(settings)
    if check is not None:
        check(settings)
    prepare_models(settings)
    from agent.runner import Runner

    previews = bool(getattr(getattr(on_event, "preview", None), "available", False))  # only where they are shown
    return Runner(settings, on_event=on_event, previews=previews), settings


class _Options:
    """The drawing options a command's flags give, made (and so checked) once by :func:`_make_runner`'s check."""

    def __init__(self, guidance: float | None, loras: list[str] | None) -> None:
        self.guidance, self.loras, self.options = guidance, loras, None

    def __call__(self, settings: Any) -> Any:
        if self.options is None:
            self.options = drawing_options(settings, self.guidance, self.loras)
        return self.options


def drawing_resume_flags(negative: str | None, guidance: float | None, scheduler: str | None,
                         per_round: int | None, loras: list[str] | None = None) -> list[str]:
    """The drawing flags a batch's resume command repeats (a run keeps its own in its state)."""
    flags: list[str] = []
    for name, value in (("--negative", negative), ("--guidance", guidance), ("--scheduler", scheduler),
                        ("--per-round", per_round)):
        if value is not None:
            flags += [name, str(value)]
    for text in loras or []:
        flags += ["--lora", text]
    return flags


@app.command()
def run(
    prompt: Annotated[str | None, typer.Argument(help="What the picture should show.")] = None,
    max_rounds: MaxRoundsOpt = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the first drawing.")] = None,
    planner: PlannerOpt = "agent",
    out_dir: OutOpt = None,
    resume: Annotated[
        str | None, typer.Option("--resume", help="Continue a killed run by its thread (run) id.")
    ] = None,
    per_round: PerRoundOpt = None,
    negative: NegativeOpt = None,
    guidance: GuidanceOpt = None,
    scheduler: SchedulerOpt = None,
    lora: LoraOpt = None,
    fast: FastOpt = None,
    repair_with: RepairWithOpt = None,
    allow_retrieved: AllowRetrievedOpt = None,
    allow_flagged: AllowFlaggedOpt = None,
    no_memory: NoMemoryOpt = False,
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Draw, judge, retrieve for what is missing and redraw, until a match or the budget.

    The best picture wins: a judge match first, then the best CLIP text-image score. With --per-round N each
    round draws N pictures (seeds in a row, one batched call), the judge critiques each, and the next round
    repairs the best of them. Where the terminal shows pictures (kitty, iTerm2, sixel), a live preview of each
    drawing appears; never with --json.

    Writes a run folder (candidates/, trace.jsonl, result.json). With --json, prints result.json.
    """
    check_planner(planner)
    if seed is not None:
        check_seed(seed, "--seed")
    if resume is None and not prompt:
        raise UserError("give a PROMPT, or --resume RUN_ID to continue a run")
    if resume is not None:  # a resumed run goes on with its own prompt, seed and budget: a flag here would do nothing
        given = [name for name, value in (("a PROMPT", prompt), ("--seed", seed), ("--max-rounds", max_rounds),
                                          ("--per-round", per_round), ("--negative", negative),
                                          ("--guidance", guidance), ("--scheduler", scheduler), ("--lora", lora))
                 if value is not None]
        if given:
            raise UserError(f"--resume continues run {resume} with its own prompt, seed, budget and drawing options; "
                            f"drop {' and '.join(given)} (or start a new run without --resume)")
    from agent.runner import DiskFull, RunInterrupted

    # Until the run's folder exists (models loading, the store checked), Ctrl-C leaves nothing behind.
    on_interrupt(f"run {resume} is as it was; continue it with the same command" if resume else
                 "the run had not started drawing, so nothing was kept; run the same command again")
    try:
        with ProgressPrinter(previews=not as_json) as progress:
            options = _Options(guidance, lora)
            runner, settings = _make_runner(
                profile, config, store, out_dir, progress, fast,
                {**gate_flags(allow_retrieved, allow_flagged), **memory_flag(no_memory), **repair_flags(repair_with),
                 **drawing_flags(negative, scheduler, per_round)}, options)
            if resume:
                result = runner.resume(resume)
            else:
                result = runner.run(prompt or "", seed=seed, max_rounds=max_rounds, planner=planner,
                                    options=options(settings))
    except RunInterrupted as stop:
        command = ["imgrag", "run", "--resume", stop.result["run_id"], *_shared_flags(profile, config, store, out_dir),
                   *(["--repair-with", repair_with] if repair_with else [])]
        _interrupted(stop, command, as_json)
    except DiskFull as full:
        run_id = (full.result or {}).get("run_id") or resume
        _full_disk(full, ["imgrag", "run", "--resume", str(run_id), *_shared_flags(profile, config, store, out_dir)])
    if as_json:
        print_json(result)
    else:
        out.print(f"[bold]{result['status']}[/] after {result['rounds']} round(s): {escape(answer_text(result))}",
                  soft_wrap=True)
        out.print(f"run folder: {escape(result['run_dir'])}   model loads: {result['model_loads']}", soft_wrap=True)
    if result["status"] == "failed":  # no answer at all: a script must see it
        raise typer.Exit(1)


@app.command()
def batch(
    file: Annotated[
        Path, typer.Argument(help='.txt (one prompt a line) or .jsonl ({"prompt", "seed", "max_rounds", "references": '
                    '[{"path", "weight", "mode"}], "negative_prompt", "guidance", "scheduler", "per_round", "loras": '
                    '[{"path", "weight"}]}; references guide the prompt\'s first round; the drawing keys override '
                    'the flags for that line, and its loras add to them).')
    ],
    resume: Annotated[bool, typer.Option("--resume", help="Continue the latest batch of this file; finished "
                                         "prompts are skipped.")] = False,
    max_rounds: MaxRoundsOpt = None,
    planner: PlannerOpt = "agent",
    out_dir: OutOpt = None,
    per_round: PerRoundOpt = None,
    negative: NegativeOpt = None,
    guidance: GuidanceOpt = None,
    scheduler: SchedulerOpt = None,
    lora: LoraOpt = None,
    fast: FastOpt = None,
    repair_with: RepairWithOpt = None,
    allow_retrieved: AllowRetrievedOpt = None,
    allow_flagged: AllowFlaggedOpt = None,
    no_memory: NoMemoryOpt = False,
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
    ray_address: Annotated[str | None, typer.Option(
        "--ray", metavar="[ADDRESS]", help="Spread the prompts over a Ray cluster (pip install 'imgrag\\[ray]'): "
        "ADDRESS is host:port, ray://host:port or auto; without one a local cluster starts. Needs --store "
        "http://host:port (a Chroma server).")] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="With --ray: how many workers "
                                                "(default: one per GPU of the cluster, 1 without GPUs).")] = None,
) -> None:
    """Run every prompt of a file in one process (models load once). One failing prompt never stops the batch.

    With --ray, one worker per GPU of a Ray cluster, each loading its models once; the record is the same."""
    from agent.runner import read_prompt_file

    check_planner(planner)
    check_guidance(guidance, "--guidance")
    lora_args(lora)  # a bad weight is said before the file is read
    items = read_prompt_file(file)  # a bad file fails before any model loads
    drawing = drawing_flags(negative, scheduler, per_round)
    again = drawing_resume_flags(negative, guidance, scheduler, per_round, lora)
    if ray_address is not None:
        summary, settings = _ray_batch(file, len(items), ray_address, workers, resume, planner, max_rounds,
                                       profile, config, store, out_dir, fast,
                                       {**gate_flags(allow_retrieved, allow_flagged), **memory_flag(no_memory),
                                        **repair_flags(repair_with), **drawing}, guidance, lora)
    else:
        if workers is not None:
            raise UserError("--workers goes with --ray (the in-process batch has one worker)")
        from agent.runner import DiskFull, RunInterrupted

        command = ["imgrag", "batch", str(file), "--resume", *_shared_flags(profile, config, store, out_dir),
                   *(["--planner", planner] if planner != "agent" else []),
                   *(["--max-rounds", str(max_rounds)] if max_rounds else []), *again]
        on_interrupt("prompts finished earlier are kept; continue with: " + " ".join(command))
        try:
            with ProgressPrinter(previews=False) as progress:  # a batch is a script's: no pictures on the terminal
                options = _Options(guidance, lora)
                runner, settings = _make_runner(
                    profile, config, store, out_dir, progress, fast,
                    {**gate_flags(allow_retrieved, allow_flagged), **memory_flag(no_memory),
                     **repair_flags(repair_with), **drawing}, options)
                summary = runner.batch(file, resume=resume, planner=planner, max_rounds=max_rounds,
                                       on_item=lambda item: err.print(f"prompt {item['index'] + 1}: {item['status']}"),
                                       options=options(settings))
        except RunInterrupted as stop:
            command = ["imgrag", "batch", str(file), "--resume", *_shared_flags(profile, config, store, out_dir),
                       *(["--planner", planner] if planner != "agent" else []),
                       *(["--repair-with", repair_with] if repair_with else []),
                       *(["--max-rounds", str(max_rounds)] if max_rounds else []), *again]
            _interrupted(stop, command, as_json)
        except DiskFull as full:
            _full_disk(full, command)
    if as_json:
        print_json(summary)
    else:
        print_batch(summary)
    failed = sum(item["status"] == "failed" for item in summary["items"])
    if failed:  # the record is complete; the exit code tells a script that some prompts have no answer
        err.print(f"[red]{failed} of {len(summary['items'])} prompt(s) failed[/]; their errors are in the record "
                  "(--resume runs them again)", soft_wrap=True)
        raise typer.Exit(1)


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


def _ray_batch(file, total, address, workers, resume, planner, max_rounds, profile, config, store, out_dir, fast,
               gates=None, guidance=None, loras=None):
    """``batch --ray``: settings and shared services checked, then the prompts spread over Ray workers."""
    settings = settings_from_flags(profile, config, store=store, output_dir=str(out_dir) if out_dir else None,
                                   **{"generation.fast": fast, **(gates or {})})
    check_outputs(settings)
    options = drawing_options(settings, guidance, loras)
    check_shared_services(settings)  # before the tiny kit is built or a cluster starts
    prepare_models(settings)
    try:
        with RayProgress(err, total) as progress:
            summary = run_batch(settings, file, address=address, workers=workers, resume=resume, planner=planner,
                                max_rounds=max_rounds, on_progress=progress, options=options)
    except KeyboardInterrupt:
        err.print(f"finished prompts are kept; continue with: imgrag batch {escape(str(file))} --ray --resume",
                  soft_wrap=True)
        raise
    return summary, settings


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

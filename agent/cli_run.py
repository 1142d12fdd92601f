"""``imgrag run`` and ``imgrag batch``: the agent from the command line, with live progress on stderr."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from agent.cli_common import (
    TINY_WARNING,
    ConfigOpt,
    JsonOpt,
    ProfileOpt,
    StoreOpt,
    app,
    err,
    out,
    prepare_models,
    print_json,
    settings_from_flags,
)

PlannerOpt = Annotated[
    str, typer.Option("--planner", help="agent: the LLM chooses each tool; fixed: ImageRAG's pipeline, no LLM loaded.")
]
MaxRoundsOpt = Annotated[
    int | None, typer.Option("--max-rounds", min=1, help="Pictures the run may draw (default: budget.max_rounds).")
]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Directory for run folders (default: output_dir).")]


def check_planner(planner: str) -> None:
    """--planner's value, checked before any model loads."""
    from agent.runner import PLANNERS
    from imgrag.errors import UserError

    if planner not in PLANNERS:
        raise UserError(f"--planner must be {' or '.join(PLANNERS)}, got {planner!r}")


def activity(event: dict[str, Any]) -> str | None:
    """What the agent is doing, for a live status line: the text of a tool, denoising or LLM event, else None."""
    kind = event["event"]
    if kind == "tool_start":
        return f"{event['tool']} …"
    if kind == "denoise":
        return f"drawing, step {event['step']}/{event['total']}"
    if kind == "llm_start":
        return f"the LLM chooses the next step (try {event['attempt']})"
    return None


def tool_line(event: dict[str, Any], elapsed: float) -> str:
    """The line kept on stderr when a tool finishes (its message escaped: captions may hold [brackets])."""
    mark = "[green]✓[/]" if event["ok"] else "[red]✗[/]"
    message = escape(event["message"][:110])
    return f"{elapsed:6.1f}s  {mark} {event['tool']:<10} {event['seconds']:6.2f}s  [dim]{message}[/]"


class ProgressPrinter:
    """Turns the runner's events into one live status line and a line per finished tool on stderr."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.round = 0
        self.status = err.status("starting", spinner="dots")

    def __enter__(self) -> ProgressPrinter:
        self.status.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.status.__exit__(*exc)

    def __call__(self, event: dict[str, Any]) -> None:
        seconds = time.monotonic() - self.start
        elapsed = f"{seconds:6.1f}s"
        kind = event["event"]
        if kind == "tool_start":
            self.round = event.get("round", self.round)
        text = activity(event)
        if text is not None:
            self.status.update(f"{elapsed}  round {self.round}  {text}")
        elif kind == "run_start":
            err.print(f"[dim]run {event['run_id']} → {event['run_dir']}[/]")
        elif kind == "tool_end":
            err.print(tool_line(event, seconds), soft_wrap=True)
        elif kind == "run_end":
            reason = f" ({event['stop_reason']})" if event.get("stop_reason") else ""
            err.print(f"{elapsed}  {event['status']}{reason}: {event['final_image']}", soft_wrap=True)


def _make_runner(profile, config, store, out_dir, on_event):
    settings = settings_from_flags(profile, config, store=store, output_dir=str(out_dir) if out_dir else None)
    prepare_models(settings)
    from agent.runner import Runner

    return Runner(settings, on_event=on_event), settings


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
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Draw, judge, retrieve for what is missing and redraw, until a match or the budget.

    The best picture wins: a judge match first, then the best CLIP text-image score.

    Writes a run folder (candidates/, trace.jsonl, result.json). With --json, prints result.json.
    """
    from imgrag.errors import UserError

    check_planner(planner)
    if resume is None and not prompt:
        raise UserError("give a PROMPT, or --resume RUN_ID to continue a run")
    with ProgressPrinter() as progress:
        runner, settings = _make_runner(profile, config, store, out_dir, progress)
        if resume:
            result = runner.resume(resume)
        else:
            result = runner.run(prompt or "", seed=seed, max_rounds=max_rounds, planner=planner)
    if as_json:
        print_json(result)
        return
    out.print(f"[bold]{result['status']}[/] after {result['rounds']} round(s): {result['final_image']}", soft_wrap=True)
    out.print(f"run folder: {result['run_dir']}   model loads: {result['model_loads']}", soft_wrap=True)
    if settings.is_tiny:
        out.print(f"[yellow]{TINY_WARNING}[/]")


@app.command()
def batch(
    file: Annotated[
        Path, typer.Argument(help='.txt (one prompt a line) or .jsonl ({"prompt", "seed", "max_rounds"}).')
    ],
    resume: Annotated[bool, typer.Option("--resume", help="Continue the latest batch of this file; finished "
                                         "prompts are skipped.")] = False,
    max_rounds: MaxRoundsOpt = None,
    planner: PlannerOpt = "agent",
    out_dir: OutOpt = None,
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
    items = read_prompt_file(file)  # a bad file fails before any model loads
    if ray_address is not None:
        summary, settings = _ray_batch(file, len(items), ray_address, workers, resume, planner, max_rounds,
                                       profile, config, store, out_dir)
    else:
        if workers is not None:
            from imgrag.errors import UserError

            raise UserError("--workers goes with --ray (the in-process batch has one worker)")
        with ProgressPrinter() as progress:
            runner, settings = _make_runner(profile, config, store, out_dir, progress)
            summary = runner.batch(file, resume=resume, planner=planner, max_rounds=max_rounds,
                                   on_item=lambda item: err.print(f"prompt {item['index'] + 1}: {item['status']}"))
    if as_json:
        print_json(summary)
        return
    table = Table(title=f"batch {summary['batch_dir']}")
    for column in ("#", "prompt", "status", "rounds", "seconds", "image or error"):
        table.add_column(column)
    for item in summary["items"]:
        table.add_row(str(item["index"] + 1), item["prompt"][:40], item["status"], str(item.get("rounds", "")),
                      str(item.get("seconds", "")), item.get("error") or item.get("final_image") or "")
    out.print(table)
    out.print(f"model loads: {summary['model_loads']}")
    if settings.is_tiny:
        out.print(f"[yellow]{TINY_WARNING}[/]")


def _ray_batch(file, total, address, workers, resume, planner, max_rounds, profile, config, store, out_dir):
    """``batch --ray``: settings and shared services checked, then the prompts spread over Ray workers."""
    from agent.ray_batch import RayProgress, check_shared_services, run_batch

    settings = settings_from_flags(profile, config, store=store, output_dir=str(out_dir) if out_dir else None)
    check_shared_services(settings)  # before the tiny kit is built or a cluster starts
    prepare_models(settings)
    try:
        with RayProgress(err, total) as progress:
            summary = run_batch(settings, file, address=address, workers=workers, resume=resume, planner=planner,
                                max_rounds=max_rounds, on_progress=progress)
    except KeyboardInterrupt:
        err.print(f"finished prompts are kept; continue with: imgrag batch {escape(str(file))} --ray --resume",
                  soft_wrap=True)
        raise
    return summary, settings

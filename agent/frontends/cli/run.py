"""``imgrag run`` and ``imgrag batch``: the agent from the command line, with live progress on stderr."""

from __future__ import annotations

import glob
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from agent.batch import batch_profile, latest_batch
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
    text_check,
)
from agent.frontends.cli.run_display import (
    ProgressPrinter,
    RayProgress,
    answer_text,
    print_batch,
)
from agent.frontends.ray_batch import check_shared_services, run_batch
from agent.run_lookup import recorded_profile
from imgrag.drawing.draw_options import check_guidance
from imgrag.errors import UserError, check_seed
from imgrag.records.runs import ensure_writable_dir
from tools.budget import check_rounds

PlannerOpt = Annotated[
    str | None,
    typer.Option("--planner", help="agent (the default): the LLM chooses each tool; fixed: ImageRAG's pipeline, "
                                   "no LLM loaded."),
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


def check_planner(planner: str | None) -> None:
    """--planner's value, checked before any model loads (None: not given, the command's default holds)."""
    from agent.runner import PLANNERS

    if planner is not None and planner not in PLANNERS:
        raise UserError(f"--planner must be {' or '.join(PLANNERS)}, got {planner!r}")


def check_outputs(settings: Any) -> None:
    """The folders a run writes (its run folders, the thread store's), proven writable before any model loads."""
    ensure_writable_dir(settings.output_dir, "output folder")
    ensure_writable_dir(Path(settings.threads_db).parent, "thread store's folder")


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
    err.print(f"[yellow]interrupted[/]: partial record in {escape(str(where))}" if where else "[yellow]interrupted[/]")
    err.print(f"resume with: {escape(shlex.join(command))}")
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


def _started_profile(run_id: str | None, batch_file: Path | None, out_dir: Path | None) -> str | None:
    """The profile a resumed run (``run_id``) or batch (``batch_file``'s latest) started with, when it is not the
    one the settings would give: ``--resume`` without ``--profile`` goes on as the run or batch began, said in a
    note. None when the settings' profile is the one, or nothing records it."""
    settings = settings_from_flags(None, None, output_dir=str(out_dir) if out_dir else None)
    root = Path(settings.output_dir)
    if batch_file is not None:
        folder = latest_batch(batch_file, root) if batch_file.is_file() else None
        started, what = (batch_profile(folder) if folder else None), f"the batch in {folder}"
    else:
        text = (run_id or "").strip()
        folders = sorted(root.glob(f"{glob.escape(text)}*")) if text else []
        folder = root / text if root / text in folders else (folders[0] if len(folders) == 1 else None)
        started, what = (recorded_profile(folder) if folder else None), f"run {folder.name if folder else text}"
    if started is None or started == settings.profile:
        return None
    err.print(f"note: {escape(what)} started with the {started} profile; resuming with it", soft_wrap=True)
    return started


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
    prompt: Annotated[str | None, typer.Argument(help="What the picture should show.",
                                                 callback=text_check("the PROMPT"))] = None,
    max_rounds: MaxRoundsOpt = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the first drawing.")] = None,
    planner: PlannerOpt = None,
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
    if resume is not None and not resume.strip():
        raise UserError("--resume needs the run id to continue (the stopped run's `resume with:` line names it)")
    if resume is not None:  # a resumed run goes on with its own recipe: a flag here would do nothing
        given = [name for name, value in (("a PROMPT", prompt), ("--seed", seed), ("--max-rounds", max_rounds),
                                          ("--planner", planner), ("--per-round", per_round),
                                          ("--negative", negative), ("--guidance", guidance),
                                          ("--scheduler", scheduler), ("--lora", lora))
                 if value is not None]
        if given:
            raise UserError(f"--resume continues run {resume} with its own prompt, seed, planner, budget and "
                            f"drawing options; "
                            f"drop {' and '.join(given)} (or start a new run without --resume)")
    planner = planner or "agent"
    if resume is not None and profile is None and config is None:
        profile = _started_profile(resume, None, out_dir)
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
        out.print(f"[bold]{result['status']}[/] after {result['rounds']} round(s): {escape(answer_text(result))}")
        out.print(f"run folder: {escape(result['run_dir'])}   model loads: {result['model_loads']}")
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
    planner: PlannerOpt = None,
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
    drawing = drawing_flags(negative, scheduler, per_round)
    # Read with the settings the batch will use (the exclusions), so every bad line, a missing reference among them,
    # is named in one error before any model loads.
    if resume and profile is None and config is None:
        profile = _started_profile(None, file, out_dir)
    if resume and file.is_file():
        output_dir = settings_from_flags(profile, config, output_dir=str(out_dir) if out_dir else None).output_dir
        if latest_batch(file, output_dir) is None:
            err.print(f"note: no earlier batch of {escape(str(file))} in {escape(str(output_dir))} (same file, same "
                      "content): starting a new one", soft_wrap=True)
    items = read_prompt_file(file, settings=settings_from_flags(
        profile, config, store=store, **{**gate_flags(allow_retrieved, allow_flagged), **repair_flags(repair_with),
                                         **drawing}))
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
                   *(["--planner", planner] if planner else []),
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
                       *(["--planner", planner] if planner else []),
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
                  "(--resume runs them again)")
        raise typer.Exit(1)


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
        err.print(f"finished prompts are kept; continue with: imgrag batch {escape(str(file))} --ray --resume")
        raise
    return summary, settings

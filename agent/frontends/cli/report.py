"""``imgrag report`` (one HTML page of a run, batch or eval folder) and ``imgrag eval`` (every arm against
plain generation on the same seeds, agent/evaluation.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.table import Table

from agent.frontends.cli.common import (
    ConfigOpt,
    JsonOpt,
    ProfileOpt,
    RepairWithOpt,
    StoreOpt,
    app,
    err,
    interrupted_line,
    on_interrupt,
    out,
    prepare_models,
    print_json,
    repair_flags,
    settings_from_flags,
)
from agent.frontends.cli.run import MaxRoundsOpt, OutOpt, check_outputs, check_planner
from agent.frontends.cli.run_display import print_store
from imgrag.errors import UserError
from imgrag.records.report import write_report
from imgrag.records.report_html import folder_kind
from imgrag.records.runs import ensure_writable_file


@app.command()
def report(
    folder: Annotated[Path, typer.Argument(help="A run folder, a batch folder or an eval folder.")],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Where to write the HTML page, a .html file (default: FOLDER/report.html)"),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a self-contained HTML page of a run, a batch or an eval folder.

    The page (images inlined) shows the prompt, every round's picture with the judge's verdict and missing
    concepts, the references retrieved with scores, the timing of
    every step and the model loads. A batch folder gets an index of its prompts with each run inlined."""
    kind = folder_kind(folder)  # a folder that is neither is a one-line UserError
    ensure_writable_file(output or folder / "report.html", "report", example="report.html")
    target = write_report(folder, output)
    if as_json:
        print_json({"report": str(target), "kind": kind, "bytes": target.stat().st_size})
        return
    out.print(f"{kind} report: {target}", markup=False)


def print_eval(doc: dict[str, Any]) -> None:
    """The evaluation's headline on the terminal: per metric and arm, the mean and the paired difference. The tiny
    profile's note comes first: it qualifies every number after it."""
    if doc.get("note"):
        out.print(doc["note"], markup=False)
    title = f"imgrag eval — {len(doc['items'])} prompts, arms {', '.join(doc['arms'])}"
    table = Table(title=title)
    for column in ("metric", "arm", "mean", "arm − plain [95% CI]", "improved/worsened", "n"):
        table.add_column(column)
    for m in doc["metrics"]:
        name = m["title"] + (" (agent selects with)" if m["agent_selects_with"] else "")
        for arm in doc["arms"]:
            entry = doc["summary"][arm][m["key"]]
            if not entry["n"]:
                continue
            vs = entry.get("vs_plain") or {}
            diff = (f"{vs['mean_diff']:+.4f} [{vs['ci_low']:+.4f}, {vs['ci_high']:+.4f}]"
                    if vs.get("mean_diff") is not None else "")
            shares = f"{vs['improved']:.2f}/{vs['worsened']:.2f}" if vs.get("improved") is not None else ""
            table.add_row(name, arm, f"{entry['mean']:.4f}", diff, shares, str(entry["n"]))
    out.print(table)
    times = ", ".join(f"{arm} {a['seconds_per_prompt']:.2f}s/{sum(a['model_loads'].values())} loads"
                      for arm, a in doc["per_arm"].items() if a["seconds_per_prompt"] is not None)
    out.print(f"per arm, seconds per prompt / model loads: {times}", markup=False)
    errors = sum(a["errors"] for a in doc["per_arm"].values())
    if errors:
        out.print(f"[red]{errors} arm run(s) had errors[/]: see eval.json")
    out.print(f"eval folder: {doc['eval_dir']} (eval.csv, eval.json, report.html)", markup=False)


def _stop_on_ctrl_c() -> NoReturn:
    """Ctrl-C while the arms run: the one ``interrupted:`` line (what was kept, see ``on_event``), then exit 130 at
    once with os._exit, as ``imgrag run`` does. A model call may still be running on the model thread (a daemon
    thread inside torch's C++ code): a normal interpreter exit would end that thread mid-call and abort with
    "terminate called without an active exception" (exit 134). Everything kept is on disk already."""
    err.print(interrupted_line())
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


ArmsOpt = Annotated[str | None, typer.Option(
    "--arms", help="Comma-separated arms (default: plain,imagerag,loop-fixed,loop-agent; --planner fixed: "
                   "the first three; --repair-with omnigen adds plain-omnigen,imagerag-o, ImageRAG-O's pass and its "
                   "baseline). plain is always run: every difference is against it.")]


@app.command("eval")
def eval_command(
    file: Annotated[Path | None, typer.Argument(
        help='.txt (one prompt a line) or .jsonl ({"prompt", "seed"?, "gold"?}); or give --classes.')] = None,
    classes: Annotated[Path | None, typer.Option(
        "--classes", help="A folder with one sub-folder of pictures per class (ImageFolder layout): ImageRAG's "
                          "protocol, gold pictures held out of retrieval.")] = None,
    arms: ArmsOpt = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Evaluate only the first N prompts.")] = None,
    max_rounds: MaxRoundsOpt = None,
    planner: Annotated[str | None, typer.Option(
        "--planner", help="fixed: only the arms that need no LLM (plain, imagerag, loop-fixed); agent: all.")] = None,
    out_dir: OutOpt = None,
    repair_with: RepairWithOpt = None,
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Every arm on the same prompts and seeds, scored by models the agent never selects with.

    Arms: plain SDXL; ImageRAG's single pass (critique, retrieve, redraw); imgrag's loop with the fixed and the
    agent planner; with --repair-with omnigen also plain OmniGen and ImageRAG-O's pass on it. Scores: DINO and
    CLIP image-image against gold pictures, SigLIP and CLIP text-image, the judge's match; the loop selects with
    the last two (marked). Per metric, the paired difference against plain with a bootstrap 95% interval and the
    shares improved/worsened. Writes eval.json, eval.csv (a row per prompt and arm) and report.html. With
    --classes DIR each class folder is split (eval.* settings) into retrieval pictures, indexed into the
    evaluation's own store, and gold pictures, never retrieved; the prompt is `a photo of a <class>`. With a
    prompt FILE the profile's store is used, its gold pictures excluded."""
    from agent.eval_inputs import read_eval_file
    from agent.evaluation import Evaluation, choose_arms, read_splits

    if (file is None) == (classes is None):
        raise UserError("give a prompt FILE or --classes DIR (one of the two)")
    if classes is not None and store is not None:
        raise UserError("--classes indexes its own store from the class folders; --store is for a prompt FILE")
    if planner is not None:
        check_planner(planner)
    on_interrupt("nothing was written yet; run the same command again")  # until the eval folder exists
    items = read_eval_file(file) if file is not None else None  # a bad file fails before any model loads
    settings = settings_from_flags(profile, config, store=store, output_dir=str(out_dir) if out_dir else None,
                                   **repair_flags(repair_with))
    # A contradiction (--planner fixed with an arm that needs the LLM) fails before any model loads.
    chosen = choose_arms(arms.split(",") if arms else None, planner, settings)

    def on_item(record: dict[str, Any]) -> None:
        done = ", ".join(f"{arm} {r.get('status') or 'failed'}" for arm, r in record["arms"].items())
        err.print(f"prompt {record['index'] + 1}: {done}", markup=False)

    def on_event(event: dict[str, Any]) -> None:
        if event["event"] == "store":
            print_store(event)
        elif event["event"] == "note":
            err.print(event["text"], style="yellow" if event["text"].startswith("skipped ") else None, markup=False)
        elif event["event"] == "eval_dir":
            on_interrupt(f"the eval folder {event['eval_dir']} is kept with what was drawn so far (the loop arms' "
                         "runs beside it), unscored; running the same command again starts a new evaluation")

    # A bad folder or split fails before any model loads too; its unreadable files are named as they are found.
    splits = read_splits(settings, classes, on_event) if classes is not None else None
    check_outputs(settings)
    prepare_models(settings)
    try:
        evaluation = Evaluation(settings, arms=chosen, max_rounds=max_rounds, on_event=on_event)
        if classes is not None:
            doc = evaluation.run_classes(classes, limit=limit, splits=splits, on_item=on_item)
        else:
            doc = evaluation.run(file, limit=limit, items=items, on_item=on_item)
    except KeyboardInterrupt:
        _stop_on_ctrl_c()
    if as_json:
        print_json(doc)
        return
    print_eval(doc)

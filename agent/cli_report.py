"""``imgrag report`` (one HTML page of a run, batch or eval folder) and ``imgrag eval`` (the agent
against plain generation on the same seeds)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from agent.cli_common import (
    ConfigOpt,
    JsonOpt,
    ProfileOpt,
    RepairWithOpt,
    StoreOpt,
    app,
    err,
    out,
    prepare_models,
    print_json,
    repair_flags,
    settings_from_flags,
)
from agent.cli_run import MaxRoundsOpt, OutOpt, PlannerOpt, check_outputs, check_planner, print_store


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
    from imgrag.report import folder_kind, write_report
    from imgrag.runs import ensure_writable_file

    kind = folder_kind(folder)  # a folder that is neither is a one-line UserError
    ensure_writable_file(output or folder / "report.html", "report")
    target = write_report(folder, output)
    if as_json:
        print_json({"report": str(target), "kind": kind, "bytes": target.stat().st_size})
        return
    out.print(f"{kind} report: {target}", soft_wrap=True, markup=False)


def _print_eval(doc: dict[str, Any]) -> None:
    from imgrag.report import EVAL_METRICS

    agg = doc["aggregate"]
    table = Table(title=f"imgrag eval — {len(doc['items'])} prompts, planner {doc['planner']}")
    for column in ("metric", "plain", "agent", "prompts"):
        table.add_column(column)
    for key, title in EVAL_METRICS:
        plain, agent = agg.get(f"plain_{key}"), agg.get(f"agent_{key}")
        if plain is None and agent is None:
            continue
        table.add_row(title, "" if plain is None else f"{plain:.4f}", "" if agent is None else f"{agent:.4f}",
                      str(agg.get(f"n_{key}", "")))
    out.print(table)
    stages = ", ".join(f"{k.removeprefix('seconds_')} {v:.2f}s" for k, v in agg.items() if k.startswith("seconds_"))
    out.print(f"mean seconds per prompt: {stages}")
    if agg.get("errors"):
        out.print(f"[red]{agg['errors']} prompt(s) had errors[/]: see eval.json")
    out.print(f"eval folder: {doc['eval_dir']} (eval.csv, eval.json, report.html)", soft_wrap=True, markup=False)


@app.command("eval")
def eval_command(
    file: Annotated[Path, typer.Argument(help='.txt (one prompt a line) or .jsonl ({"prompt", "seed"?, "gold"?}).')],
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Evaluate only the first N prompts.")] = None,
    max_rounds: MaxRoundsOpt = None,
    planner: PlannerOpt = "agent",
    out_dir: OutOpt = None,
    repair_with: RepairWithOpt = None,
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare plain generation with the agent on the same prompts and seeds.

    Scores: CLIP text-image, CLIP image-image against a gold picture, DINO (when models.dino is set), the
    judge's match
    rate, rounds and seconds per stage. Writes eval.csv, eval.json and report.html in an eval folder."""
    from agent.evaluation import Evaluation, read_eval_file

    check_planner(planner)
    items = read_eval_file(file)  # a bad file fails before any model loads
    settings = settings_from_flags(profile, config, store=store, output_dir=str(out_dir) if out_dir else None,
                                   **repair_flags(repair_with))
    check_outputs(settings)
    prepare_models(settings)
    total = min(len(items), limit or len(items))

    def on_item(record: dict[str, Any]) -> None:
        a = record["agent"]
        state = record["error"] or f"agent {a.get('status')} in {a.get('rounds')} round(s)"
        err.print(f"prompt {record['index'] + 1}/{total}: {state}", soft_wrap=True, markup=False)

    evaluation = Evaluation(settings, planner=planner, max_rounds=max_rounds,
                            on_event=lambda event: print_store(event) if event["event"] == "store" else None)
    doc = evaluation.run(file, limit=limit, items=items, on_item=on_item)
    if as_json:
        print_json(doc)
        return
    _print_eval(doc)

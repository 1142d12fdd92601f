"""An evaluation's report: every arm against plain generation on the same seeds, its paired differences drawn as
inline SVG, the best and worst prompt of the headline comparison, and every prompt's pictures and scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imgrag.records.report_html import cell_number, read_json, render_page
from imgrag.settings import TINY_WARNING

# Paired-difference plots: one inline SVG per metric, one row per arm (pixels).
PLOT_WIDTH, PLOT_ROW, PLOT_MARGIN = 520, 34, 110


def _run_href(eval_dir: Path, result: dict[str, Any]) -> str | None:
    """A relative link to a loop run's own report (beside the eval folder), or None when there is none."""
    report = result.get("report")
    if report and Path(report).is_file():
        try:
            return "../" + Path(report).resolve().relative_to(eval_dir.resolve().parent).as_posix()
        except ValueError:
            return None
    return None


def _diffs(doc: dict[str, Any], arm: str, metric: str) -> list[tuple[int, float]]:
    """(prompt index, arm - plain) of one metric, for the prompts where both were scored."""
    out = []
    for item in doc.get("items") or []:
        arms = item.get("arms") or {}
        a = ((arms.get(arm) or {}).get("scores") or {}).get(metric)
        b = ((arms.get(doc.get("baseline") or "plain") or {}).get("scores") or {}).get(metric)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            out.append((int(item.get("index", 0)), float(a) - float(b)))
    return out


def _plot(doc: dict[str, Any], metric: dict[str, Any], arms: list[str]) -> dict[str, Any] | None:
    """The SVG geometry of one metric's paired differences: per arm its prompts' differences as dots, the mean as
    a bar and its bootstrap interval as a line, on one axis with 0 marked. None when nothing was measured."""
    rows = []
    for arm in arms:
        stats = (((doc.get("summary") or {}).get(arm) or {}).get(metric["key"]) or {}).get("vs_plain") or {}
        rows.append({"arm": arm, "diffs": [d for _, d in _diffs(doc, arm, metric["key"])], "stats": stats})
    values = [d for r in rows for d in r["diffs"]] + [v for r in rows for v in (r["stats"].get("ci_low"),
                                                                               r["stats"].get("ci_high"))
                                                      if isinstance(v, (int, float))]
    if not values:
        return None
    span = max(abs(v) for v in values) or 1.0

    def x(value: float) -> float:
        return round(PLOT_MARGIN + (value + span) / (2 * span) * (PLOT_WIDTH - PLOT_MARGIN - 10), 1)

    for n, row in enumerate(rows):
        row["y"] = 20 + n * PLOT_ROW
        row["dots"] = [x(d) for d in row["diffs"]]
        st = row["stats"]
        row["mean_x"] = x(st["mean_diff"]) if isinstance(st.get("mean_diff"), (int, float)) else None
        row["ci"] = (x(st["ci_low"]), x(st["ci_high"])) if isinstance(st.get("ci_low"), (int, float)) else None
    return {"title": metric["title"], "marked": metric.get("agent_selects_with"), "rows": rows,
            "zero": x(0.0), "width": PLOT_WIDTH, "height": 30 + len(rows) * PLOT_ROW, "span": round(span, 4),
            "left": x(-span), "right": x(span)}


def _extremes(doc: dict[str, Any], arms: list[str], metrics: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best and the worst prompt of the headline comparison: the last arm's difference against plain on the
    first metric the agent does not select with that was measured."""
    if not arms:
        return None
    arm = arms[-1]
    for metric in [m for m in metrics if not m.get("agent_selects_with")] + metrics:
        diffs = _diffs(doc, arm, metric["key"])
        if diffs:
            items = {int(it.get("index", 0)): it for it in doc.get("items") or []}
            best, worst = max(diffs, key=lambda t: t[1]), min(diffs, key=lambda t: t[1])
            picks = [("best", best)] + ([("worst", worst)] if worst[0] != best[0] else [])
            return {"arm": arm, "metric": metric["title"],
                    "prompts": [{"label": label, "diff": d, "item": items[i],
                                 "pictures": [(name, (items[i]["arms"].get(name) or {}).get("image"))
                                              for name in doc.get("arms") or []]} for label, (i, d) in picks]}
    return None


def render_eval(eval_dir: str | Path) -> str:
    """The evaluation's summary: every arm against plain generation on the same seeds."""
    eval_dir = Path(eval_dir)
    doc = read_json(eval_dir / "eval.json")
    arms = list(doc.get("arms") or [])
    others = [a for a in arms if a != (doc.get("baseline") or "plain")]
    metrics = list(doc.get("metrics") or [])
    summary = doc.get("summary") or {}
    table = []
    for m in metrics:
        for arm in arms:
            entry = (summary.get(arm) or {}).get(m["key"]) or {}
            if entry.get("n"):
                table.append({"metric": m, "arm": arm, "mean": entry.get("mean"), "n": entry.get("n"),
                              "vs": entry.get("vs_plain") or {}})
    prompts = []
    for item in doc.get("items") or []:
        cells = []
        for arm in arms:
            result = (item.get("arms") or {}).get(arm) or {}
            cells.append({"arm": arm, "result": result, "scores": result.get("scores") or {},
                          "href": _run_href(eval_dir, result)})
        prompts.append({"item": item, "number": item.get("index", 0) + 1, "cells": cells})
    scorers = doc.get("scorers") or {}
    ev = {
        "name": eval_dir.name,
        "tiny_banner": (doc.get("note") or TINY_WARNING) if doc.get("profile") == "tiny" else None,
        "meta": [("mode", doc.get("mode")), ("source", doc.get("source")), ("prompts", len(doc.get("items") or [])),
                 ("arms", ", ".join(arms)), ("max rounds", doc.get("max_rounds")), ("profile", doc.get("profile")),
                 ("seconds", cell_number(doc.get("seconds"))),
                 ("store", (doc.get("store") or {}).get("location")),
                 ("gold pictures retrieved", len(doc.get("gold_retrieved") or []))],
        "selects": ", ".join(m["title"] for m in metrics if m.get("agent_selects_with")),
        "scorers": [(m["title"], scorers.get(m["key"]) or "not configured", m.get("measures"),
                     m.get("agent_selects_with")) for m in metrics],
        "table": table, "per_arm": doc.get("per_arm") or {}, "arms": arms,
        "plots": [p for p in (_plot(doc, m, others) for m in metrics) if p],
        "extremes": _extremes(doc, others, metrics),
        "prompts": prompts, "metrics": metrics,
        "split": doc.get("split"),
        "loads": list((doc.get("model_load_seconds") or {}).items()),
    }
    return render_page("eval.html", title=f"imgrag eval {eval_dir.name}", ev=ev)

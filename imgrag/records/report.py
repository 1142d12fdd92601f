"""HTML reports: one self-contained page for a run folder, a batch folder or an evaluation folder.

A page carries everything it shows: images are inlined as base64 data URIs (downscaled thumbnails,
so a page of twenty 1024x1024 candidates stays a few MB), styles are inline, there is no script and
no network access. It can be mailed, archived or opened from a CI artifact years later.

The pages are Jinja2 templates shipped in the package (``imgrag/templates/report/``), rendered with
autoescape on: every string that came from a run (prompt, verdict, model output, captions, file
names) is text, so a prompt like ``<script>`` or a judge that answers with markup renders inert, and
no interpolation can forget to escape. This module only reads the folders and shapes plain values
for the templates. Tiny-profile output gets a banner at the top of the page, because its pictures
are noise and its verdicts junk, and nobody should mistake them for a quality result.

    render_run(run_dir)        the prompt, each round's candidate with the judge's verdict and the
                               references it used, the references retrieved with scores, every
                               step of the trace with its timing, model loads
    render_batch(batch_dir)    an index table of the batch's prompts, then each run inlined
    render_eval(eval_dir)      the evaluation's aggregate table and per-prompt scores and images
    write_report(path, out)    detects which of the three ``path`` is and writes the page

Why ~420 lines: the three pages share one reading of run folders (trace, candidates, verdicts, images
inlined) that this module holds; the HTML itself is in the templates.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import time
from pathlib import Path
from typing import Any

import jinja2

from imgrag.atomic_files import atomic_path
from imgrag.candidate_ids import candidate_number
from imgrag.errors import UserError
from imgrag.file_names import display_name
from imgrag.images import UnreadableImage, open_image
from imgrag.records.runs import RunRecord
from imgrag.settings import TINY_WARNING
from imgrag.text import shorten

# Largest side of an inlined thumbnail, in pixels. Candidates are shown at up to this size.
THUMB_PX = 384
REFERENCE_THUMB_PX = 160
# Pictures at most this large are inlined as PNG, unscaled (the tiny profile's 64x64 noise); larger
# ones as JPEG thumbnails, which are a tenth of the size of a PNG for photographs and noise alike.
SMALL_IMAGE_PX = 256
JPEG_QUALITY = 85
# Characters of a trace step's arguments and message shown in the trace table (the trace file has all).
ARGS_CHARS = 400
DETAIL_CHARS = 1200


# Badge colour per run status; any other status (unfinished, unknown) is grey.
STATUS_KINDS = {"matched": "ok", "budget_exhausted": "warn", "interrupted": "warn", "failed": "bad"}

REPORT_FORMATS = (".html", ".htm")


def image_data_uri(path: str | Path | None, max_px: int = THUMB_PX) -> str | None:
    """The picture at ``path`` as a ``data:`` URI (a thumbnail no larger than ``max_px``), or None
    when the file is missing or unreadable. Never raises: a report of a broken run must still render.

    A page shows the same picture several times (the final picture is also a round's card; a reference
    appears in its table and in every card that used it): each is encoded once per file version."""
    if not path:
        return None
    try:
        version = Path(path).stat().st_mtime_ns
    except OSError:
        return None
    return _encoded_thumbnail(str(path), version, max_px)


@functools.lru_cache(maxsize=512)
def _encoded_thumbnail(path: str, version: int, max_px: int) -> str | None:  # version: the cache key only
    try:
        image = open_image(path)
    except UnreadableImage:
        return None
    buffer = io.BytesIO()
    if max(image.size) <= SMALL_IMAGE_PX:
        image.save(buffer, format="PNG")
        mime = "image/png"
    else:
        image.thumbnail((max_px, max_px))
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        mime = "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read as JSON ({exc})") from None


# ----------------------------------------------------------------------------------------------
# What a folder is
# ----------------------------------------------------------------------------------------------

def folder_kind(path: str | Path) -> str:
    """"run", "batch" or "eval"; a UserError for anything else."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such folder")
    if not path.is_dir():
        raise UserError(f"{path}: not a folder (give a run, batch or eval folder)")
    if (path / "eval.json").is_file():
        return "eval"
    if (path / "batch.json").is_file() or (path / "summary.json").is_file():
        return "batch"
    if (path / "result.json").is_file() or (path / "trace.jsonl").is_file():
        return "run"
    raise UserError(f"{path}: neither a run folder (result.json, trace.jsonl), a batch folder (batch.json) "
                    "nor an eval folder (eval.json)")


def _load_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]], bool]:
    """(result, trace, finished). A run killed before result.json exists is rebuilt from its trace
    and the candidate files, so the report of a crash still shows what was drawn."""
    trace = RunRecord(run_dir).read_steps()
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return _read_json(result_path), trace, True
    start = next((s for s in trace if s.get("event") == "start"), {})
    candidates = []
    for i, png in enumerate(sorted((run_dir / "candidates").glob("c*.png"), key=lambda p: candidate_number(p.stem))):
        candidates.append({"id": png.stem, "path": str(png), "round": i + 1, "verdict": None})
    result = {"run_id": run_dir.name, "status": "unfinished", "prompt": start.get("prompt", ""),
              "planner": start.get("planner"), "profile": start.get("profile"), "candidates": candidates,
              "references": {}, "rounds": len(candidates), "steps": [s for s in trace if "tool" in s and "args" in s]}
    return result, trace, False



# ----------------------------------------------------------------------------------------------
# Templates
# ----------------------------------------------------------------------------------------------

def _num(value: Any, digits: int = 3) -> Any:
    """A float rounded for a table cell; anything else as it is (None renders as an empty cell)."""
    if isinstance(value, float) and not isinstance(value, bool):
        return f"{value:.{digits}f}"
    return value


@functools.cache
def _environment() -> jinja2.Environment:
    """The report templates (package data), autoescaped; None renders as an empty string."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("imgrag", "templates/report"),
        autoescape=True,  # every file here is HTML (or CSS included into it): escape all of them
        # A report of a broken or older run must still render: a key its records lack is an empty cell.
        undefined=jinja2.Undefined,
        finalize=lambda value: "" if value is None else value,
        trim_blocks=True, lstrip_blocks=True,
    )
    env.filters["num"] = _num
    env.globals.update(data_uri=image_data_uri, THUMB_PX=THUMB_PX, REFERENCE_THUMB_PX=REFERENCE_THUMB_PX,
                       STATUS_KINDS=STATUS_KINDS, TINY_BANNER=TINY_WARNING)
    return env


def _render(template: str, **context: Any) -> str:
    return _environment().get_template(template).render(generated=time.strftime("%Y-%m-%d %H:%M:%S"), **context)


# ----------------------------------------------------------------------------------------------
# A run
# ----------------------------------------------------------------------------------------------

# Characters of a caption shown under a reference thumbnail (the whole caption is its tooltip and in the table).
CAPTION_CHARS = 80


def _reference_view(rid: str, ref: dict[str, Any]) -> dict[str, Any]:
    """A reference for the templates: its caption (else its file name) labels it; the query it answered
    (in a chat, possibly the whole accumulated prompt) is the tooltip, never the label."""
    path = ref.get("path")
    caption = ref.get("caption") or (Path(path).name if path else "")
    query = ref.get("query")
    title = f"{caption} — retrieved for: {query}" if query else caption
    return {"id": rid, "path": path, "caption": shorten(caption, CAPTION_CHARS, collapse=False),
            "full_caption": caption, "title": title, "query": query, "score": ref.get("score")}


def _candidate_view(c: dict[str, Any], references: dict[str, dict], final_id: str | None,
                    run_prompt: str) -> dict[str, Any]:
    return {
        "id": c.get("id"), "round": c.get("round", "?"), "path": c.get("path"), "is_final": c.get("id") == final_id,
        "seed": c.get("seed"), "clip_score": c.get("clip_score"), "ip_scale": c.get("ip_scale"),
        # The agent may rephrase, and a chat refines: show the prompt drawn only when it differs.
        "prompt_drawn": c.get("prompt") if c.get("prompt") and c.get("prompt") != run_prompt else None,
        "verdict": c.get("verdict") or None, "stale_verdict": c.get("stale_verdict") or None,
        "stale_prompt": c.get("stale_prompt"),
        "references": [{**_reference_view(rid, references.get(rid) or {}),
                        # how it steered this drawing (imgrag.drawing.steering): its weight and mode, and where it came
                        # from
                        "weight": (c.get("reference_weights") or {}).get(rid),
                        "mode": (c.get("reference_modes") or {}).get(rid),
                        "source": (references.get(rid) or {}).get("source") or "retrieved"}
                       for rid in c.get("reference_ids") or []],
        "guided_by_memory": "memory" in (c.get("guided_by") or []),
        "retrieved": c.get("source") == "retrieved",  # a photo of the collection, not a drawing
        "backbone": c.get("backbone"), "concepts": _concepts_view(c.get("concepts") or []),
        "sent_prompt": c.get("sent_prompt"),
        # how it was drawn (imgrag.drawing.draw_options): the sampler, the guidance, what it was to leave out, its
        # round's place
        "sampler": c.get("sampler"), "guidance": c.get("guidance"), "negative_prompt": c.get("negative_prompt") or None,
        "batch": c.get("batch") or None,
    }


def _concepts_view(concepts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Which reference stood for which concept in a drawing, for the templates: concept, reference ids with their
    image slot (OmniGen's ``<|image_N|>``; none for IP-Adapter, which blends them all), and those left out."""
    view = []
    for c in concepts:
        slots = list(c.get("images") or [])
        ids = list(c.get("reference_ids") or [])
        view.append({"concept": c.get("concept"),
                     "references": [{"id": rid, "slot": slots[n] if n < len(slots) else None}
                                    for n, rid in enumerate(ids)],
                     "left_out": list(c.get("left_out") or [])})
    return view


def _steps_view(trace: list[dict[str, Any]], result: dict[str, Any]) -> list[dict[str, Any]]:
    """The trace, step by step: events, planner decisions and tool calls with their timing and message."""
    rows = []
    t0 = next((s.get("time") for s in trace if isinstance(s.get("time"), (int, float))), None)
    source = trace or [dict(s) for s in result.get("steps") or []]
    for n, s in enumerate(source, start=1):
        at = f"{s['time'] - t0:.2f}" if t0 is not None and isinstance(s.get("time"), (int, float)) else ""
        row: dict[str, Any] = {"n": n, "at": at, "ok": None, "seconds": None, "args": "", "tool": None}
        if "event" in s:
            detail = ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("event", "time", "prompt"))
            rows.append({**row, "kind": "event", "event": s["event"], "detail": detail})
            continue
        if s.get("planner"):
            detail = s.get("error") or s.get("reason") or ""
            if s.get("raw"):
                detail = f"{detail}\n{s['raw']}" if detail else s["raw"]
            row.update(kind="planner", planner=s["planner"], tool=s.get("tool"))
        else:
            detail = s.get("message") or ""
            args = "" if s.get("args") is None else display_name(json.dumps(s["args"], ensure_ascii=False,
                                                                               default=str))
            row.update(kind="tool", tool=s.get("tool"), args=shorten(args, ARGS_CHARS, collapse=False))
        rows.append({**row, "ok": s.get("ok"), "seconds": s.get("seconds"),
                     "detail": shorten(detail, DETAIL_CHARS, collapse=False)})
    return rows


def _timing_view(trace: list[dict[str, Any]], result: dict[str, Any]) -> tuple[list[dict[str, Any]], float]:
    """Seconds per tool and per planner kind, summed, and the seconds they account for together."""
    totals: dict[str, list[float]] = {}
    for s in trace or result.get("steps") or []:
        if "event" in s or not isinstance(s.get("seconds"), (int, float)):
            continue
        key = f"planner: {s['planner']}" if s.get("planner") else str(s.get("tool"))
        totals.setdefault(key, []).append(float(s["seconds"]))
    rows = [{"step": k, "calls": len(v), "total": sum(v), "mean": sum(v) / len(v)} for k, v in sorted(totals.items())]
    return rows, sum(sum(v) for v in totals.values())


def _models_view(result: dict[str, Any]) -> list[dict[str, Any]]:
    stats = result.get("model_stats") or {}
    loads = result.get("model_loads") or {}
    rows = []
    for name in sorted(set(stats) | set(loads)):
        st = stats.get(name) or {}
        rows.append({"name": name, "loads": loads.get(name, st.get("loads")), "evictions": st.get("evictions"),
                     "load_seconds": st.get("load_seconds")})
    return rows


def run_view(run_dir: str | Path,
             loaded: tuple[dict[str, Any], list[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """A run folder as plain values for ``run_section.html``; ``loaded`` is the run's :func:`_load_run`
    when the caller has read it already."""
    run_dir = Path(run_dir)
    result, trace, finished = loaded or _load_run(run_dir)
    candidates = sorted(result.get("candidates") or [],
                        key=lambda c: (c.get("round") or 0, int(str(c.get("id", "c0"))[1:] or 0)))
    final_id = result.get("final_candidate")
    final = next((c for c in candidates if c.get("id") == final_id), None)
    references = result.get("references") or {}
    prompt = result.get("prompt") or ""
    status = result.get("status")
    meta = [("status", _status_badge(status)), ("rounds", result.get("rounds")),
            ("stop reason", result.get("stop_reason")), ("planner", result.get("planner")),
            ("policy fallback steps", result.get("fallback_steps")), ("seconds", _num(result.get("seconds"))),
            ("profile", result.get("profile")),
            ("answer", "a retrieved photo (not drawn)" if result.get("final_source") == "retrieved" else None)]
    timing, counted = _timing_view(trace, result)
    wall = result.get("seconds")
    if isinstance(wall, (int, float)) and timing:  # every second of the run in a named row
        timing.append({"step": "overhead (graph, checkpoints, trace)", "calls": None,
                       "total": max(0.0, float(wall) - counted), "mean": None})
    return {
        "run_id": result.get("run_id") or run_dir.name,
        "tiny_banner": (result.get("note") or TINY_WARNING) if result.get("profile") == "tiny" else None,
        "finished": finished, "prompt": prompt,
        "meta": [(k, v) for k, v in meta if v not in (None, "")],
        "final_path": (final.get("path") if final else None) or result.get("final_image"),
        "candidates": [_candidate_view(c, references, final_id, prompt) for c in candidates],
        "references": [_reference_view(rid, ref) for rid, ref in references.items()],
        "timing": timing, "counted": counted, "wall": float(wall) if isinstance(wall, (int, float)) else None,
        "models": _models_view(result), "trace_lines": len(trace), "steps": _steps_view(trace, result),
    }


def _status_badge(status: str | None) -> Any:
    return _environment().get_template("macros.html").module.status_badge(status)


def render_run(run_dir: str | Path) -> str:
    """A whole HTML page for one run folder."""
    run_dir = Path(run_dir)
    if folder_kind(run_dir) != "run":
        raise UserError(f"{run_dir}: not a run folder")
    return _render("run.html", title=f"imgrag run {run_dir.name}", run=run_view(run_dir))


# ----------------------------------------------------------------------------------------------
# A batch
# ----------------------------------------------------------------------------------------------

def render_batch(batch_dir: str | Path) -> str:
    """An index of the batch's prompts, then every run of it inlined (the page stays one file).

    Run folders live beside the batch folder, under the same output directory, named by run id.
    """
    batch_dir = Path(batch_dir)
    summary_path = batch_dir / "summary.json"
    doc = _read_json(summary_path if summary_path.is_file() else batch_dir / "batch.json")
    items = doc.get("items") or []
    run_dirs = {item.get("run_id"): batch_dir.parent / item["run_id"] for item in items if item.get("run_id")}
    loaded = {run_id: _load_run(d) for run_id, d in run_dirs.items() if d.is_dir()}  # each run read once
    counts: dict[str, int] = {}
    for item in items:
        counts[item.get("status") or "pending"] = counts.get(item.get("status") or "pending", 0) + 1
    rows = []
    for item in items:
        run_id = item.get("run_id")
        rows.append({"number": int(item.get("index", 0)) + 1, "prompt": item.get("prompt"),
                     "status": item.get("status"), "rounds": item.get("rounds"), "seconds": item.get("seconds"),
                     "final_image": item.get("final_image"), "error": item.get("error"), "run_id": run_id,
                     "run": run_view(run_dirs[run_id], loaded[run_id]) if run_id in loaded else None})
    batch = {
        "name": batch_dir.name, "finished": summary_path.is_file(), "rows": rows,
        "tiny": any(result.get("profile") == "tiny" for result, _, _ in loaded.values()),
        "meta": [("prompt file", doc.get("file")), ("prompts", len(items)),
                 ("statuses", ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))),
                 ("seconds", _num(doc.get("seconds"))), ("model loads", json.dumps(doc.get("model_loads") or {}))],
    }
    return _render("batch.html", title=f"imgrag batch {batch_dir.name}", batch=batch)


# ----------------------------------------------------------------------------------------------
# An evaluation
# ----------------------------------------------------------------------------------------------

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
    doc = _read_json(eval_dir / "eval.json")
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
                 ("seconds", _num(doc.get("seconds"))),
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
    return _render("eval.html", title=f"imgrag eval {eval_dir.name}", ev=ev)


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

def write_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Render the run, batch or eval folder at ``path`` into ``out`` (default ``path/report.html``).

    The page is HTML whatever ``out`` is called, so a suffix other than .html/.htm (``r.pdf``) is a
    UserError rather than an HTML file under a misleading name."""
    path = Path(path)
    target = Path(out) if out else path / "report.html"
    if target.suffix.lower() not in REPORT_FORMATS:
        raise UserError(f"{target}: the report is an HTML page; name the file .html (a browser can print it to PDF)")
    kind = folder_kind(path)
    page = {"run": render_run, "batch": render_batch, "eval": render_eval}[kind](path)
    with atomic_path(target) as tmp:  # a file name that is not UTF-8 appears with \x escapes (imgrag.file_names)
        tmp.write_text(display_name(page), encoding="utf-8")
    return target

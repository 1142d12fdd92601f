"""HTML reports: one self-contained page for a run folder, a batch folder or an evaluation folder.

A page carries everything it shows: images are inlined as base64 data URIs (downscaled thumbnails,
so a page of twenty 1024x1024 candidates stays a few MB), styles are inline, there is no script and
no network access. It can be mailed, archived or opened from a CI artifact years later.

Every string that came from a run (prompt, verdict, model output, file names) is escaped with
:func:`html.escape`: a prompt like ``<script>`` or a judge that answers with markup must render as
text. Tiny-profile output gets a banner at the top of the page, because its pictures are noise and
its verdicts junk, and nobody should mistake them for a quality result.

    render_run(run_dir)        the prompt, each round's candidate with the judge's verdict and the
                               references it used, the references retrieved with scores, every
                               step of the trace with its timing, model loads
    render_batch(batch_dir)    an index table of the batch's prompts, then each run inlined
    render_eval(eval_dir)      the evaluation's aggregate table and per-prompt scores and images
    write_report(path, out)    detects which of the three ``path`` is and writes the page
"""

from __future__ import annotations

import base64
import functools
import html
import io
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from imgrag.errors import UserError
from imgrag.runs import RunRecord, atomic_path

# Largest side of an inlined thumbnail, in pixels. Candidates are shown at up to this size.
THUMB_PX = 384
REFERENCE_THUMB_PX = 160
# Pictures at most this large are inlined as PNG, unscaled (the tiny profile's 64x64 noise); larger
# ones as JPEG thumbnails, which are a tenth of the size of a PNG for photographs and noise alike.
SMALL_IMAGE_PX = 256
JPEG_QUALITY = 85

TINY_BANNER = ("Tiny profile: random-weight models. The pictures are noise, the judge's verdicts and missing "
               "concepts are junk, and the scores mean nothing. This page shows that the plumbing works, "
               "not what imgrag draws.")

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
main{max-width:1150px;margin:0 auto;padding:18px 22px 60px}
h1{font-size:1.5em;margin:.2em 0 .4em}h2{font-size:1.2em;margin:1.6em 0 .5em;border-bottom:1px solid #d5d8de}
h3{font-size:1.05em;margin:.2em 0 .4em}
.prompt{font-size:1.15em;background:#fff;border-left:4px solid #3d6fd8;padding:10px 14px;margin:10px 0}
.banner{background:#fff3cd;border:2px solid #d39e00;color:#5c4400;padding:12px 16px;font-weight:600;margin:10px 0}
.meta{display:flex;flex-wrap:wrap;gap:8px 22px;margin:8px 0}.meta span b{color:#555;font-weight:600}
.badge{display:inline-block;padding:2px 9px;border-radius:10px;font-size:.85em;font-weight:700;color:#fff}
.ok{background:#2e8b57}.bad{background:#c0392b}.warn{background:#b8860b}.neutral{background:#6c757d}
.rounds{display:flex;flex-direction:column;gap:14px}
.card{background:#fff;border:1px solid #d5d8de;border-radius:6px;padding:12px;display:flex;gap:16px}
.card.final{border:2px solid #2e8b57}
.card .pic{flex:0 0 auto}.card .info{flex:1 1 auto;min-width:0}
img.cand{width:256px;height:auto;image-rendering:pixelated;border:1px solid #ccc;background:#eee}
img.ref{width:96px;height:auto;border:1px solid #ccc;background:#eee}
img.final{width:384px;height:auto;image-rendering:pixelated;border:2px solid #2e8b57}
.missingfile{width:256px;height:120px;display:flex;align-items:center;justify-content:center;background:#eee;
  color:#888;border:1px dashed #aaa;font-size:.85em;text-align:center;padding:4px}
.refs{display:flex;gap:8px;flex-wrap:wrap;margin-top:6px}.refs figure{margin:0;font-size:.75em;width:100px}
ul.missing{margin:4px 0 4px 18px;padding:0}
table{border-collapse:collapse;background:#fff;font-size:.88em;width:100%}
th,td{border:1px solid #d5d8de;padding:4px 7px;text-align:left;vertical-align:top}
th{background:#eceef2}td.num{text-align:right;font-variant-numeric:tabular-nums}
td code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em;white-space:pre-wrap;
  word-break:break-word}
pre{background:#f0f1f4;padding:6px;margin:4px 0}
details summary{cursor:pointer;color:#3d6fd8}
.run{background:#fff;border:1px solid #d5d8de;border-radius:6px;padding:10px 14px;margin:14px 0}
.small{font-size:.85em;color:#555}
"""


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------

def esc(value: Any) -> str:
    """Any value as escaped HTML text (None as an empty string)."""
    return "" if value is None else html.escape(str(value), quote=True)


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
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            image = im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
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


def _img(path: str | Path | None, css_class: str, alt: str, max_px: int = THUMB_PX) -> str:
    uri = image_data_uri(path, max_px)
    if uri is None:
        return f'<div class="missingfile">image not found:<br>{esc(path)}</div>'
    return f'<img class="{css_class}" src="{uri}" alt="{esc(alt)}" title="{esc(path)}">'


def _badge(text: str, kind: str) -> str:
    return f'<span class="badge {kind}">{esc(text)}</span>'


def _status_badge(status: str | None) -> str:
    kind = {"matched": "ok", "budget_exhausted": "warn", "failed": "bad"}.get(status or "", "neutral")
    return _badge(status or "unknown", kind)


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return esc(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return esc(value)


def _page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{_CSS}</style></head>\n<body><main>\n{body}\n"
            f"<p class=\"small\">Generated by imgrag report on {esc(time.strftime('%Y-%m-%d %H:%M:%S'))}.</p>"
            "</main></body></html>\n")


def _table(headers: Iterable[str], rows: Iterable[Iterable[str]], numeric: Iterable[int] = ()) -> str:
    """A table from already-escaped cell HTML; ``numeric`` column indexes are right-aligned."""
    numeric = set(numeric)
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


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
    for i, png in enumerate(sorted((run_dir / "candidates").glob("c*.png"), key=lambda p: int(p.stem[1:] or 0))):
        candidates.append({"id": png.stem, "path": str(png), "round": i + 1, "verdict": None})
    result = {"run_id": run_dir.name, "status": "unfinished", "prompt": start.get("prompt", ""),
              "planner": start.get("planner"), "profile": start.get("profile"), "candidates": candidates,
              "references": {}, "rounds": len(candidates), "steps": [s for s in trace if "tool" in s and "args" in s]}
    return result, trace, False


# ----------------------------------------------------------------------------------------------
# A run
# ----------------------------------------------------------------------------------------------

def _verdict_html(verdict: dict[str, Any] | None) -> str:
    if not verdict:
        return f"<p>{_badge('not judged', 'neutral')}</p>"
    match = bool(verdict.get("match"))
    parts = [f"<p><b>Judge:</b> {_badge('match' if match else 'no match', 'ok' if match else 'bad')}"]
    if not verdict.get("parsed", True):
        parts.append(" " + _badge("answer not parsed", "warn"))
    parts.append("</p>")
    missing = [m for m in verdict.get("missing") or []]
    if missing:
        parts.append("<b>Missing:</b><ul class=\"missing\">" + "".join(f"<li>{esc(m)}</li>" for m in missing)
                     + "</ul>")
    elif not match:
        parts.append("<p><b>Missing:</b> <i>none named</i></p>")
    if verdict.get("reason"):
        parts.append(f"<p><b>Reason:</b> {esc(verdict['reason'])}</p>")
    if verdict.get("raw"):
        parts.append(f"<details><summary>raw judge output</summary><pre>{esc(verdict['raw'])}</pre></details>")
    return "".join(parts)


def _candidate_card(c: dict[str, Any], references: dict[str, dict], final_id: str | None, run_prompt: str) -> str:
    is_final = c.get("id") == final_id
    title = f"Round {c.get('round', '?')} — candidate {c.get('id')}" + (" (final)" if is_final else "")
    facts = [f"<span><b>seed</b> {esc(c.get('seed'))}</span>",
             f"<span><b>CLIP text-image</b> {_num(c.get('clip_score'), 4)}</span>"]
    if c.get("reference_ids"):
        facts.append(f"<span><b>IP-Adapter scale</b> {_num(c.get('ip_scale'), 2)}</span>")
    if c.get("prompt") and c.get("prompt") != run_prompt:  # the agent may rephrase; show only when it did
        facts.append(f"<span><b>prompt drawn</b> {esc(c.get('prompt'))}</span>")
    refs = ""
    if c.get("reference_ids"):
        figures = []
        for rid in c["reference_ids"]:
            ref = references.get(rid) or {}
            figures.append(f"<figure>{_img(ref.get('path'), 'ref', rid, REFERENCE_THUMB_PX)}"
                           f"<figcaption>{esc(rid)}<br>{esc(ref.get('query') or ref.get('caption') or '')}"
                           "</figcaption></figure>")
        refs = "<p><b>Guided by references:</b></p><div class=\"refs\">" + "".join(figures) + "</div>"
    else:
        refs = "<p class=\"small\">Drawn from the prompt alone (no references).</p>"
    return (f'<div class="card{" final" if is_final else ""}" id="cand-{esc(c.get("id"))}">'
            f'<div class="pic">{_img(c.get("path"), "cand", c.get("id") or "candidate")}</div>'
            f'<div class="info"><h3>{esc(title)}</h3><div class="meta">{"".join(facts)}</div>'
            f"{_verdict_html(c.get('verdict'))}{refs}</div></div>")


def _references_html(references: dict[str, dict]) -> str:
    if not references:
        return "<p class=\"small\">No reference was retrieved in this run.</p>"
    rows = []
    for rid, ref in references.items():
        rows.append([_img(ref.get("path"), "ref", rid, REFERENCE_THUMB_PX), f"<code>{esc(rid)}</code>",
                     _num(ref.get("score"), 4), esc(ref.get("query")), esc(ref.get("caption")),
                     f"<code>{esc(ref.get('path'))}</code>"])
    return _table(["image", "id", "score", "query", "caption", "path"], rows, numeric=[2])


def _args_text(args: Any) -> str:
    if args is None:
        return ""
    return json.dumps(args, ensure_ascii=False, default=str)


def _steps_html(trace: list[dict[str, Any]], result: dict[str, Any]) -> str:
    """The trace, step by step: planner decisions and tool calls with their timing and message."""
    rows = []
    t0 = next((s.get("time") for s in trace if isinstance(s.get("time"), (int, float))), None)
    source = trace or [dict(s) for s in result.get("steps") or []]
    for n, s in enumerate(source, start=1):
        at = f"{s['time'] - t0:.2f}" if t0 is not None and isinstance(s.get("time"), (int, float)) else ""
        if "event" in s:
            what = f"<i>event: {esc(s['event'])}</i>"
            detail = esc(", ".join(f"{k}={v}" for k, v in s.items() if k not in ("event", "time", "prompt")))
            rows.append([str(n), at, what, "", "", f"<code>{detail}</code>"])
            continue
        if s.get("planner"):
            who = f"planner: {s['planner']}"
            detail = s.get("error") or s.get("reason") or ""
            if s.get("raw"):
                detail = f"{detail}\n{s['raw']}" if detail else s["raw"]
            what = f"{esc(who)} → {esc(s.get('tool') or '—')}"
        else:
            what = f"<b>{esc(s.get('tool'))}</b>"
            detail = s.get("message") or ""
            args = _args_text(s.get("args"))
            if args:
                what += f"<br><code>{esc(args[:400])}</code>"
        ok = s.get("ok")
        mark = _badge("ok", "ok") if ok else (_badge("error", "bad") if ok is False else "")
        rows.append([str(n), at, what, mark, _num(s.get("seconds"), 3),
                     f"<code>{esc(str(detail)[:1200])}</code>"])
    if not rows:
        return "<p class=\"small\">No step was recorded.</p>"
    return _table(["#", "t (s)", "step", "ok", "seconds", "message / error"], rows, numeric=[0, 1, 4])


def _timing_html(trace: list[dict[str, Any]], result: dict[str, Any]) -> str:
    """Seconds per tool and per planner kind, summed, beside the run's wall time."""
    totals: dict[str, list[float]] = {}
    for s in trace or result.get("steps") or []:
        if "event" in s or not isinstance(s.get("seconds"), (int, float)):
            continue
        key = f"planner: {s['planner']}" if s.get("planner") else str(s.get("tool"))
        totals.setdefault(key, []).append(float(s["seconds"]))
    rows = [[esc(k), str(len(v)), _num(sum(v)), _num(sum(v) / len(v))] for k, v in sorted(totals.items())]
    table = _table(["step", "calls", "total s", "mean s"], rows, numeric=[1, 2, 3]) if rows else ""
    counted = sum(sum(v) for v in totals.values())
    wall = result.get("seconds")
    note = ""
    if isinstance(wall, (int, float)):
        note = (f"<p class=\"small\">Run wall time {_num(float(wall))} s; the steps above account for "
                f"{_num(counted)} s; the rest is the graph, checkpoints and the trace itself.</p>")
    return table + note


def _models_html(result: dict[str, Any]) -> str:
    stats = result.get("model_stats") or {}
    loads = result.get("model_loads") or {}
    names = sorted(set(stats) | set(loads))
    if not names:
        return "<p class=\"small\">No model statistics were recorded.</p>"
    rows = []
    for name in names:
        st = stats.get(name) or {}
        rows.append([esc(name), esc(loads.get(name, st.get("loads"))), esc(st.get("evictions", "")),
                     _num(st.get("load_seconds"))])
    return (_table(["model", "loads", "evictions", "load seconds"], rows, numeric=[1, 2, 3])
            + "<p class=\"small\">Counts are per process: in a batch they cover every run so far.</p>")


def run_section(run_dir: str | Path, *, heading_level: int = 1,
                loaded: tuple[dict[str, Any], list[dict[str, Any]], bool] | None = None) -> str:
    """The body of a run's report (without the page around it), for run pages and batch pages; ``loaded`` is
    the run's :func:`_load_run` when the caller has read it already."""
    run_dir = Path(run_dir)
    result, trace, finished = loaded or _load_run(run_dir)
    h = f"h{heading_level}"
    parts = [f"<{h}>Run {esc(result.get('run_id') or run_dir.name)}</{h}>"]
    if result.get("profile") == "tiny":
        parts.append(f'<div class="banner">{esc(result.get("note") or TINY_BANNER)}</div>')
    if not finished:
        parts.append('<div class="banner">This run has no result.json: it was killed or is still running. '
                     "What follows is rebuilt from its trace and candidate files.</div>")
    parts.append(f'<div class="prompt"><b>Prompt:</b> {esc(result.get("prompt"))}</div>')
    meta = [("status", _status_badge(result.get("status"))), ("rounds", esc(result.get("rounds"))),
            ("stop reason", esc(result.get("stop_reason"))), ("planner", esc(result.get("planner"))),
            ("policy fallback steps", esc(result.get("fallback_steps"))),
            ("seconds", _num(result.get("seconds"))), ("profile", esc(result.get("profile")))]
    parts.append('<div class="meta">' + "".join(f"<span><b>{esc(k)}:</b> {v}</span>" for k, v in meta
                                                  if v not in ("", "None")) + "</div>")
    candidates = sorted(result.get("candidates") or [],
                        key=lambda c: (c.get("round") or 0, int(str(c.get("id", "c0"))[1:] or 0)))
    final_id = result.get("final_candidate")
    final = next((c for c in candidates if c.get("id") == final_id), None)
    if final or result.get("final_image"):
        path = final.get("path") if final else result.get("final_image")
        parts.append(f"<h2>Final picture</h2><p>{_img(path, 'final', 'final picture')}</p>"
                     f"<p class=\"small\"><code>{esc(path)}</code></p>")
    parts.append(f"<h2>Rounds ({len(candidates)})</h2>")
    references = result.get("references") or {}
    if candidates:
        cards = [_candidate_card(c, references, final_id, result.get("prompt") or "") for c in candidates]
        parts.append('<div class="rounds">' + "".join(cards) + "</div>")
    else:
        parts.append("<p class=\"small\">Nothing was drawn.</p>")
    parts.append(f"<h2>References retrieved ({len(references)})</h2>{_references_html(references)}")
    parts.append(f"<h2>Timings</h2>{_timing_html(trace, result)}")
    parts.append(f"<h2>Model loads</h2>{_models_html(result)}")
    parts.append(f"<h2>Trace ({len(trace)} lines)</h2>{_steps_html(trace, result)}")
    return "\n".join(parts)


def render_run(run_dir: str | Path) -> str:
    """A whole HTML page for one run folder."""
    run_dir = Path(run_dir)
    if folder_kind(run_dir) != "run":
        raise UserError(f"{run_dir}: not a run folder")
    return _page(f"imgrag run {run_dir.name}", run_section(run_dir))


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
    finished = summary_path.is_file()
    run_dirs = {item.get("run_id"): batch_dir.parent / item["run_id"] for item in items if item.get("run_id")}
    loaded = {run_id: _load_run(d) for run_id, d in run_dirs.items() if d.is_dir()}  # each run read once
    tiny = any(result.get("profile") == "tiny" for result, _, _ in loaded.values())
    parts = [f"<h1>Batch {esc(batch_dir.name)}</h1>"]
    if tiny:
        parts.append(f'<div class="banner">{esc(TINY_BANNER)}</div>')
    if not finished:
        parts.append('<div class="banner">This batch has no summary.json yet: it was interrupted or is still '
                     "running (imgrag batch --resume continues it).</div>")
    counts: dict[str, int] = {}
    for item in items:
        counts[item.get("status") or "pending"] = counts.get(item.get("status") or "pending", 0) + 1
    meta = [("prompt file", esc(doc.get("file"))), ("prompts", str(len(items))),
            ("statuses", esc(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))),
            ("seconds", _num(doc.get("seconds"))), ("model loads", esc(json.dumps(doc.get("model_loads") or {})))]
    parts.append('<div class="meta">' + "".join(f"<span><b>{k}:</b> {v}</span>" for k, v in meta) + "</div>")
    rows = []
    for item in items:
        run_dir = run_dirs.get(item.get("run_id"))
        exists = run_dir is not None and run_dir.is_dir()
        link = f'<a href="#run-{esc(item["run_id"])}">{esc(item["run_id"])}</a>' if exists else esc(item.get("run_id"))
        rows.append([str(int(item.get("index", 0)) + 1), esc(item.get("prompt")), _status_badge(item.get("status")),
                     esc(item.get("rounds")), _num(item.get("seconds")),
                     _img(item.get("final_image"), "ref", "final", REFERENCE_THUMB_PX) if item.get("final_image")
                     else esc(item.get("error") or ""), link])
    parts.append("<h2>Prompts</h2>" + _table(["#", "prompt", "status", "rounds", "seconds", "final / error", "run"],
                                              rows, numeric=[0, 3, 4]))
    for item in items:
        if item.get("run_id") not in loaded:
            continue
        section = run_section(run_dirs[item["run_id"]], heading_level=2, loaded=loaded[item["run_id"]])
        parts.append(f'<div class="run" id="run-{esc(item["run_id"])}"><details open><summary>prompt '
                     f"{int(item.get('index', 0)) + 1}: {esc(item.get('prompt'))}</summary>{section}</details></div>")
    return _page(f"imgrag batch {batch_dir.name}", "\n".join(parts))


# ----------------------------------------------------------------------------------------------
# An evaluation
# ----------------------------------------------------------------------------------------------

# (key in the eval's aggregate/item documents, column title); absent metrics are left out of the table.
EVAL_METRICS = [
    ("clip_text", "CLIP text-image"),
    ("clip_gold", "CLIP image-image vs gold"),
    ("dino_gold", "DINO image-image vs gold"),
    ("judge_match", "judge match rate"),
    ("rounds", "rounds"),
    ("seconds", "seconds"),
]


def _run_link(eval_dir: Path, agent: dict[str, Any]) -> str:
    """A relative link to an agent run's own report (beside the eval folder), or its id when there is none."""
    report = agent.get("report")
    if report and Path(report).is_file():
        try:
            href = Path(report).resolve().relative_to(eval_dir.resolve().parent)
            return f'<a href="../{esc(href.as_posix())}"><code>{esc(agent.get("run_id"))}</code></a>'
        except ValueError:
            pass
    return f'<code>{esc(agent.get("run_id"))}</code>'


def render_eval(eval_dir: str | Path) -> str:
    """The evaluation's summary: plain generation against the agent on the same seeds."""
    eval_dir = Path(eval_dir)
    doc = _read_json(eval_dir / "eval.json")
    agg = doc.get("aggregate") or {}
    parts = [f"<h1>Evaluation {esc(eval_dir.name)}</h1>"]
    if doc.get("profile") == "tiny":
        parts.append(f'<div class="banner">{esc(doc.get("note") or TINY_BANNER)}</div>')
    meta = [("prompt file", esc(doc.get("file"))), ("prompts", esc(len(doc.get("items") or []))),
            ("planner", esc(doc.get("planner"))), ("max rounds", esc(doc.get("max_rounds"))),
            ("profile", esc(doc.get("profile"))), ("seconds", _num(doc.get("seconds"))),
            ("embedder", esc(doc.get("embedder"))), ("DINO", esc(doc.get("dino") or "not configured"))]
    parts.append('<div class="meta">' + "".join(f"<span><b>{k}:</b> {v}</span>" for k, v in meta) + "</div>")
    rows = []
    for key, title in EVAL_METRICS:
        plain, agent = agg.get(f"plain_{key}"), agg.get(f"agent_{key}")
        if plain is None and agent is None:
            continue
        delta = agent - plain if isinstance(plain, (int, float)) and isinstance(agent, (int, float)) else None
        rows.append([esc(title), _num(plain, 4), _num(agent, 4), _num(delta, 4),
                     esc(agg.get(f"n_{key}", ""))])
    parts.append("<h2>Means over prompts</h2>" + _table(["metric", "plain generation", "agent", "agent − plain",
                                                          "prompts counted"], rows, numeric=[1, 2, 3, 4]))
    stage_rows = [[esc(k.removeprefix("seconds_")), _num(v)] for k, v in sorted(agg.items())
                  if k.startswith("seconds_")]
    if stage_rows:
        loads = doc.get("model_load_seconds") or {}
        note = ("<p class=\"small\">Models were loaded before timing (" + esc(", ".join(
            f"{k} {v:.2f} s" for k, v in loads.items())) + ").</p>") if loads else ""
        parts.append("<h2>Seconds per stage (mean per prompt)</h2>" + _table(["stage", "seconds"], stage_rows,
                                                                             numeric=[1]) + note)
    item_rows = []
    for item in doc.get("items") or []:
        p, a = item.get("plain") or {}, item.get("agent") or {}
        item_rows.append([
            str(item.get("index", 0) + 1), esc(item.get("prompt")), esc(item.get("seed")),
            _img(p.get("image"), "ref", "plain", REFERENCE_THUMB_PX) if p.get("image") else esc(p.get("error")),
            _img(a.get("image"), "ref", "agent", REFERENCE_THUMB_PX) if a.get("image") else esc(a.get("error")),
            _img(item.get("gold"), "ref", "gold", REFERENCE_THUMB_PX) if item.get("gold") else "",
            f"{_num(p.get('clip_text'), 4)} / {_num(a.get('clip_text'), 4)}",
            f"{_num(p.get('clip_gold'), 4)} / {_num(a.get('clip_gold'), 4)}" if item.get("gold") else "",
            f"{esc(p.get('judge_match'))} / {esc(a.get('judge_match'))}",
            esc(a.get("rounds")), esc(a.get("status")),
            _run_link(eval_dir, a)])
    parts.append("<h2>Per prompt</h2>" + _table(
        ["#", "prompt", "seed", "plain", "agent", "gold", "CLIP-T plain/agent", "CLIP-I plain/agent",
         "judge plain/agent", "rounds", "status", "agent run"], item_rows, numeric=[0, 2, 9]))
    parts.append("<p class=\"small\">Files: eval.csv (one row per prompt), eval.json (everything on this page). "
                 "Each agent run has its own folder and report under the output directory.</p>")
    return _page(f"imgrag eval {eval_dir.name}", "\n".join(parts))


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

def write_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Render the run, batch or eval folder at ``path`` into ``out`` (default ``path/report.html``)."""
    path = Path(path)
    kind = folder_kind(path)
    page = {"run": render_run, "batch": render_batch, "eval": render_eval}[kind](path)
    target = Path(out) if out else path / "report.html"
    with atomic_path(target) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return target

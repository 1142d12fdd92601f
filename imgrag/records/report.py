"""HTML reports: one self-contained page for a run folder, a batch folder or an evaluation folder.

A page carries everything it shows: images are inlined as base64 data URIs (downscaled thumbnails,
so a page of twenty 1024x1024 candidates stays a few MB), styles are inline, there is no script and
no network access. It can be mailed, archived or opened from a CI artifact years later.

The pages are Jinja2 templates shipped in the package (``imgrag/templates/report/``), rendered with
autoescape on: every string that came from a run (prompt, verdict, model output, captions, file
names) is text, so a prompt like ``<script>`` or a judge that answers with markup renders inert, and
no interpolation can forget to escape. These modules only read the folders and shape plain values
for the templates. Tiny-profile output gets a banner at the top of the page, because its pictures
are noise and its verdicts junk, and nobody should mistake them for a quality result.

    render_run(run_dir)        the prompt, each round's candidate with the judge's verdict and the
                               references it used, the references retrieved with scores, every
                               step of the trace with its timing, model loads
    render_batch(batch_dir)    an index table of the batch's prompts, then each run inlined
    render_eval(eval_dir)      the evaluation's aggregate table and per-prompt scores and images
    write_report(path, out)    detects which of the three ``path`` is and writes the page

The shared machinery (thumbnails, templates, what a folder is) is :mod:`imgrag.records.report_html`; a run's page
:mod:`imgrag.records.run_report`, an evaluation's :mod:`imgrag.records.eval_report`; a batch's is here, over its runs'.
"""

from __future__ import annotations

import json
from pathlib import Path

from imgrag.atomic_files import atomic_path
from imgrag.errors import UserError
from imgrag.file_names import display_name
from imgrag.records.eval_report import render_eval
from imgrag.records.report_html import cell_number, folder_kind, read_json, render_page
from imgrag.records.run_report import load_run, render_run, run_view

REPORT_FORMATS = (".html", ".htm")


def render_batch(batch_dir: str | Path) -> str:
    """An index of the batch's prompts, then every run of it inlined (the page stays one file).

    Run folders live beside the batch folder, under the same output directory, named by run id.
    """
    batch_dir = Path(batch_dir)
    summary_path = batch_dir / "summary.json"
    doc = read_json(summary_path if summary_path.is_file() else batch_dir / "batch.json")
    items = doc.get("items") or []
    run_dirs = {item.get("run_id"): batch_dir.parent / item["run_id"] for item in items if item.get("run_id")}
    loaded = {run_id: load_run(d) for run_id, d in run_dirs.items() if d.is_dir()}  # each run read once
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
                 ("seconds", cell_number(doc.get("seconds"))),
                 ("model loads", json.dumps(doc.get("model_loads") or {}))],
    }
    return render_page("batch.html", title=f"imgrag batch {batch_dir.name}", batch=batch)

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

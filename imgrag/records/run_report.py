"""A run's report: its folder (result, trace, candidate files) shaped into plain values for ``run_section.html``,
and the page of one run. A batch's page inlines each of its runs through :func:`run_view`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imgrag.candidate_ids import candidate_number
from imgrag.errors import UserError
from imgrag.file_names import display_name
from imgrag.records.report_html import cell_number, folder_kind, read_json, render_page, status_badge
from imgrag.records.runs import RunRecord
from imgrag.settings import TINY_WARNING
from imgrag.text import shorten

# Characters of a trace step's arguments and message shown in the trace table (the trace file has all).
ARGS_CHARS = 400
DETAIL_CHARS = 1200


def load_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]], bool]:
    """(result, trace, finished). A run killed before result.json exists is rebuilt from its trace
    and the candidate files, so the report of a crash still shows what was drawn."""
    trace = RunRecord(run_dir).read_steps()
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return read_json(result_path), trace, True
    start = next((s for s in trace if s.get("event") == "start"), {})
    candidates = []
    for i, png in enumerate(sorted((run_dir / "candidates").glob("c*.png"), key=lambda p: candidate_number(p.stem))):
        candidates.append({"id": png.stem, "path": str(png), "round": i + 1, "verdict": None})
    result = {"run_id": run_dir.name, "status": "unfinished", "prompt": start.get("prompt", ""),
              "planner": start.get("planner"), "profile": start.get("profile"), "candidates": candidates,
              "references": {}, "rounds": len(candidates), "steps": [s for s in trace if "tool" in s and "args" in s]}
    return result, trace, False




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
    """A run folder as plain values for ``run_section.html``; ``loaded`` is the run's :func:`load_run`
    when the caller has read it already."""
    run_dir = Path(run_dir)
    result, trace, finished = loaded or load_run(run_dir)
    candidates = sorted(result.get("candidates") or [],
                        key=lambda c: (c.get("round") or 0, int(str(c.get("id", "c0"))[1:] or 0)))
    final_id = result.get("final_candidate")
    final = next((c for c in candidates if c.get("id") == final_id), None)
    references = result.get("references") or {}
    prompt = result.get("prompt") or ""
    status = result.get("status")
    meta = [("status", status_badge(status)), ("rounds", result.get("rounds")),
            ("stop reason", result.get("stop_reason")), ("planner", result.get("planner")),
            ("policy fallback steps", result.get("fallback_steps")), ("seconds", cell_number(result.get("seconds"))),
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


def render_run(run_dir: str | Path) -> str:
    """A whole HTML page for one run folder."""
    run_dir = Path(run_dir)
    if folder_kind(run_dir) != "run":
        raise UserError(f"{run_dir}: not a run folder")
    return render_page("run.html", title=f"imgrag run {run_dir.name}", run=run_view(run_dir))

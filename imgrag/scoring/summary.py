"""What ``imgrag eval`` reports of its records: the metrics, each arm's means and its paired difference
against plain generation (eval.json's ``summary`` and ``per_arm``), and eval.csv.

A record is one prompt as :class:`agent.evaluation.Evaluation` writes it: ``{"index", "prompt", "seed", "class",
"gold", "arms": {arm: {"status", "rounds", "seconds", "model_loads", "image", "retrieved", "scores", ...}}}``.
The paired statistics are :mod:`imgrag.scoring.paired_stats`'s (bootstrap intervals over the prompts).
"""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import Any

from imgrag.atomic_files import atomic_path
from imgrag.management.manager import add_loads
from imgrag.scoring.paired_stats import summarise as paired

# Every difference is against plain SDXL on the same prompt and seed.
BASELINE = "plain"


@dataclasses.dataclass(frozen=True)
class Metric:
    """One score column: its key in eval.json/eval.csv, its title, what it measures, and whether the agent's loop
    selects its answer with it (then it is not evidence that the loop helps: the loop maximises it)."""

    key: str
    title: str
    measures: str
    agent_selects_with: bool = False

    @property
    def column(self) -> str:
        """Its eval.csv header: marked when the agent selects with it."""
        return f"{self.key} (agent selects with)" if self.agent_selects_with else self.key


METRICS = (
    Metric("dino_gold", "DINO image-image vs gold",
           "mean cosine of the drawing's DINO embedding with each gold picture of its class: does it look like "
           "the real thing (ImageRAG's DINO column)"),
    Metric("siglip_text", "SigLIP text-image",
           "cosine of the drawing's SigLIP embedding with the prompt's: a second text-image family, not the "
           "agent's own"),
    Metric("clip_text", "CLIP text-image",
           "cosine of the drawing's CLIP embedding (the profile's embedder) with the prompt's", True),
    Metric("clip_gold", "CLIP image-image vs gold",
           "mean cosine of the drawing's CLIP embedding with each gold picture (the embedder the store retrieves "
           "with)"),
    Metric("judge_match", "judge match rate", "the share of answers the judge (Qwen2.5-VL) says match the prompt",
           True),
)


def metric_values(records: list[dict[str, Any]], arm: str, metric: str) -> list[float | None]:
    """One arm's values of one metric, aligned with ``records`` (None where not measured)."""
    values = []
    for record in records:
        value = ((record["arms"].get(arm) or {}).get("scores") or {}).get(metric)
        values.append(float(value) if isinstance(value, (int, float)) else None)
    return values


def summarise(records: list[dict[str, Any]], arms: list[str], *, seed: int = 0) -> dict[str, Any]:
    """Per arm and metric: the arm's mean, and for every arm but plain the paired difference against plain
    (:func:`imgrag.scoring.paired_stats.summarise`: mean, bootstrap 95 % interval, shares improved and worsened)."""
    out: dict[str, Any] = {}
    for arm in arms:
        out[arm] = {}
        for m in METRICS:
            values = metric_values(records, arm, m.key)
            measured = [v for v in values if v is not None]
            entry: dict[str, Any] = {"mean": round(sum(measured) / len(measured), 4) if measured else None,
                                     "n": len(measured)}
            if arm != BASELINE:
                entry["vs_plain"] = paired(m.key, arm, values, metric_values(records, BASELINE, m.key),
                                           seed=seed).to_dict()
            out[arm][m.key] = entry
    return out


def per_arm(records: list[dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    """Per arm: mean seconds per prompt, total model loads, mean rounds, errors."""
    out = {}
    for arm in arms:
        results = [r["arms"][arm] for r in records if arm in r["arms"]]
        seconds = [r["seconds"] for r in results if isinstance(r.get("seconds"), (int, float))]
        rounds = [r["rounds"] for r in results if isinstance(r.get("rounds"), (int, float))]
        loads = add_loads(*(r.get("model_loads") for r in results))
        out[arm] = {"seconds_per_prompt": round(sum(seconds) / len(seconds), 3) if seconds else None,
                    "rounds": round(sum(rounds) / len(rounds), 3) if rounds else None,
                    "model_loads": loads, "errors": sum(1 for r in results if r.get("error")),
                    "prompts": len(results)}
    return out


# "profile" first: a tiny-profile file says so in every row (its numbers are plumbing), in a column any CSV reader
# takes as such, where a comment line would be read as the header.
CSV_FIXED = ["profile", "index", "prompt", "seed", "class", "arm", "status", "rounds", "seconds", "model_loads",
             "image", "retrieved", "run_id"]


def csv_columns() -> list[str]:
    """eval.csv's header: the fixed columns (the profile first), each metric (marked when the agent selects with
    it), each metric's difference against plain on the same seed, and the error."""
    return [*CSV_FIXED, *(m.column for m in METRICS), *(f"{m.key}_minus_plain" for m in METRICS), "error"]


def csv_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per prompt and arm."""
    rows = []
    for record in doc["items"]:
        plain = (record["arms"].get(BASELINE) or {}).get("scores") or {}
        for arm, res in record["arms"].items():
            scores = res.get("scores") or {}
            row = {"profile": doc.get("profile"), "index": record["index"], "prompt": record["prompt"],
                   "seed": record["seed"], "class": record.get("class"), "arm": arm, "status": res.get("status"),
                   "rounds": res.get("rounds"),
                   "seconds": res.get("seconds"), "model_loads": sum((res.get("model_loads") or {}).values()),
                   "image": res.get("image"), "retrieved": len(res.get("retrieved") or []),
                   "run_id": res.get("run_id") or (Path(res["run_dir"]).name if res.get("run_dir") else None),
                   "error": res.get("error")}
            for m in METRICS:
                value, base = scores.get(m.key), plain.get(m.key)
                row[m.column] = value
                both = isinstance(value, (int, float)) and isinstance(base, (int, float))
                row[f"{m.key}_minus_plain"] = round(float(value) - float(base), 4) if both and arm != BASELINE \
                    else None
            rows.append(row)
    return rows


def write_csv(path: Path, doc: dict[str, Any]) -> None:
    """eval.csv, one row per prompt and arm (written to a temporary file, then renamed): a plain CSV whose first
    line is the header. Each row's ``profile`` says which models drew it (``tiny``: noise, the numbers are
    plumbing; eval.json's ``note`` and the report say it in words)."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=csv_columns())
        writer.writeheader()
        for row in csv_rows(doc):
            writer.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                             for k, v in row.items()})

"""``imgrag eval``: the agent against plain generation on the same prompts and seeds.

For every prompt of a file, in one process (each model loads once):

1. plain generation: one SDXL call with the prompt and the seed, as a user without imgrag would get;
2. the judge on that picture (the same Qwen2.5-VL call the agent makes), so both sides get a match rate;
3. the agent: :meth:`agent.runner.Runner.run` with the same prompt and seed (its first drawing is
   the plain picture again, so any gain comes from the loop);
4. scores for both final pictures: the CLIP text-image cosine (the embedder of the profile), the
   CLIP image-image cosine against the gold reference when the prompt has one, and the DINO
   image-image cosine when ``models.dino`` names a DINOv2 checkpoint (ImageRAG, arXiv 2502.09411,
   reports these on ImageNet, iNaturalist, CUB and Aircraft subsets).

It writes ``<output_dir>/eval-<file>-<time>/`` with ``eval.csv`` (one row per prompt), ``eval.json``
(every number, per prompt and averaged), ``report.html``, and ``plain/NNN.png``; the agent's runs are
ordinary run folders beside it (run id ``<eval folder>-NNN``), each with its own trace.

This lives in ``agent/`` because it drives the agent's runner; the scoring itself only needs
the model manager and, for DINO, transformers.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.runner import PLANNERS, TINY_NOTE, Runner, read_prompt_file
from imgrag.dino import DinoScorer  # noqa: F401  (its old home; imported from here by callers)
from imgrag.errors import UserError, read_user_text
from imgrag.images import open_image
from imgrag.runs import RunRecord, atomic_path, write_json_atomic
from imgrag.settings import Settings

# Columns of eval.csv, in order. Empty cells mean "not measured" (no gold image, no DINO checkpoint, an error).
CSV_COLUMNS = [
    "index", "prompt", "seed", "gold",
    "plain_image", "plain_clip_text", "plain_clip_gold", "plain_dino_gold", "plain_judge_match",
    "plain_seconds_generate", "plain_seconds_judge",
    "agent_run_id", "agent_status", "agent_image", "agent_rounds", "agent_clip_text", "agent_clip_gold",
    "agent_dino_gold", "agent_judge_match", "agent_seconds", "seconds_scoring", "error",
]


# ----------------------------------------------------------------------------------------------
# The prompt file
# ----------------------------------------------------------------------------------------------

def read_eval_file(path: str | Path) -> list[dict[str, Any]]:
    """Prompts to evaluate: ``.txt`` (one a line) or ``.jsonl`` objects ``{"prompt", "seed"?, "gold"?,
    "max_rounds"?}``. A ``gold`` path is taken relative to the prompt file's folder, else to the current
    folder; a gold file that exists in neither is an error naming the line."""
    path = Path(path)
    items = read_prompt_file(path)  # validates prompt, seed and max_rounds; errors name file and line
    if path.suffix != ".jsonl":
        return [{**item, "gold": None} for item in items]
    lines = [(n, line) for n, line in enumerate(read_user_text(path, "prompt file").splitlines(), start=1)
             if line.strip() and not line.strip().startswith("#")]
    for item, (number, line) in zip(items, lines, strict=True):
        gold = json.loads(line).get("gold")
        if gold in (None, ""):
            item["gold"] = None
            continue
        if not isinstance(gold, str):
            raise UserError(f"{path}:{number}: \"gold\" must be the path of an image")
        candidates = [Path(gold).expanduser()] if Path(gold).is_absolute() else [path.parent / gold, Path(gold)]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise UserError(f"{path}:{number}: gold image {gold!r} not found (looked in "
                            f"{', '.join(str(c) for c in candidates)})")
        item["gold"] = str(found.resolve())
    return items


# ----------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------

def cosine(a: Any, b: Any) -> float:
    """Cosine of two vectors (the embedders' rows are unit length already; normalising again is cheap
    and keeps this right for any scorer)."""
    import numpy as np

    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / denom) if denom else 0.0


# ----------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------

class Evaluation:
    """Runs one prompt file through plain generation and the agent, and writes the eval folder."""

    def __init__(self, settings: Settings, *, manager: Any = None, runner: Runner | None = None,
                 planner: str = "agent", max_rounds: int | None = None,
                 on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        if planner not in PLANNERS:
            raise UserError(f"unknown planner {planner!r} (use {' or '.join(PLANNERS)})")
        if max_rounds is not None and max_rounds < 1:
            raise UserError(f"--max-rounds must be at least 1, got {max_rounds}")
        self.settings = settings
        self.on_event = on_event or (lambda event: None)
        if runner is None:
            runner = Runner(settings, manager=manager, on_event=self.on_event)
        self.runner = runner
        self.manager = runner.manager  # one manager for plain generation, the agent and the scores
        self.planner = planner
        self.max_rounds = max_rounds

    # ----- the whole file -----
    def run(self, path: str | Path, *, limit: int | None = None, items: list[dict[str, Any]] | None = None,
            on_item: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Evaluate the first ``limit`` prompts of ``path`` (``items``: its :func:`read_eval_file`, when the
        caller has read it already); return eval.json's document."""
        path = Path(path)
        items = read_eval_file(path) if items is None else items
        if limit is not None:
            if limit < 1:
                raise UserError(f"--limit must be at least 1, got {limit}")
            items = items[:limit]
        base = Path(self.settings.output_dir) / f"eval-{path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        eval_dir, n = base, 1
        while eval_dir.exists():  # two evaluations of one file in the same second
            n += 1
            eval_dir = base.with_name(f"{base.name}-{n}")
        (eval_dir / "plain").mkdir(parents=True)
        load_seconds = self._load_models()
        start = time.perf_counter()
        records = []
        for index, item in enumerate(items):
            record = self._one(eval_dir, index, item)
            records.append(record)
            if on_item:
                on_item(record)
        self._score_dino(records)
        doc = {
            "eval_dir": str(eval_dir), "file": str(path), "profile": self.settings.profile,
            "planner": self.planner,
            "max_rounds": self.max_rounds or self.settings.budget.max_rounds,
            "embedder": self.settings.models.embedder, "dino": self.settings.models.dino or None,
            "generator": self.settings.models.generator, "judge": self.settings.models.judge,
            "items": records, "aggregate": aggregate(records),
            "model_loads": self.manager.load_counts(), "model_load_seconds": load_seconds,
            "seconds": round(time.perf_counter() - start, 3),
        }
        if self.settings.is_tiny:
            doc["note"] = TINY_NOTE + " The scores below are of noise and mean nothing."
        write_json_atomic(eval_dir / "eval.json", doc)
        write_csv(eval_dir / "eval.csv", records)
        from imgrag.report import write_report

        write_report(eval_dir)
        return doc

    def _load_models(self) -> dict[str, float]:
        """Load every model the evaluation uses before timing anything, so the first prompt's stages do not
        carry the loads (reported apart, in seconds per model)."""
        names = ["generator", "judge", "embedder"] + (["llm"] if self.planner == "agent" else [])
        seconds = {}
        for name in names:
            start = time.perf_counter()
            self.manager.run(name, lambda model: None)
            seconds[name] = round(time.perf_counter() - start, 3)
        return seconds

    # ----- one prompt -----
    def _one(self, eval_dir: Path, index: int, item: dict[str, Any]) -> dict[str, Any]:
        prompt = item["prompt"]
        seed = self.settings.generation.seed if item.get("seed") is None else int(item["seed"])
        record: dict[str, Any] = {"index": index, "prompt": prompt, "seed": seed, "gold": item.get("gold"),
                                  "plain": {}, "agent": {}, "error": None}
        self.on_event({"event": "eval_item", "index": index, "prompt": prompt})
        plain_image = agent_image = None
        try:
            plain_image = self._plain(eval_dir, index, prompt, seed, record["plain"])
        except Exception as exc:  # one broken prompt must not stop the evaluation; the error is kept
            record["plain"]["error"] = f"{type(exc).__name__}: {exc}"
        try:
            agent_image = self._agent(eval_dir, index, item, seed, record["agent"])
        except Exception as exc:
            record["agent"]["error"] = f"{type(exc).__name__}: {exc}"
        start = time.perf_counter()
        try:
            self._score_clip(record, plain_image, agent_image)
        except Exception as exc:
            record["error"] = f"scoring: {type(exc).__name__}: {exc}"
        record["seconds_scoring"] = round(time.perf_counter() - start, 3)
        errors = [e for e in (record["plain"].get("error"), record["agent"].get("error"), record["error"]) if e]
        record["error"] = "; ".join(errors) or None
        return record

    def _plain(self, eval_dir: Path, index: int, prompt: str, seed: int, out: dict[str, Any]) -> Any:
        """One generator call and one judge call, timed separately."""
        start = time.perf_counter()
        image = self.manager.run("generator", lambda generator: generator.generate(prompt, seed=seed))
        out["seconds_generate"] = round(time.perf_counter() - start, 3)
        path = eval_dir / "plain" / f"{index:03d}.png"
        from imgrag.provenance import for_drawing, save_image  # issue 18: every written picture says how

        save_image(image, path, for_drawing(self.settings, prompt=prompt, seed=seed, references=None, ip_scale=None,
                                            run_id=eval_dir.name, candidate_id=f"plain-{index:03d}"))
        out["image"] = str(path)
        start = time.perf_counter()
        verdict = self.manager.run("judge", lambda judge: judge.judge(image, prompt).to_dict())
        out["seconds_judge"] = round(time.perf_counter() - start, 3)
        out["verdict"] = verdict
        out["judge_match"] = bool(verdict.get("match"))
        out["seconds"] = round(out["seconds_generate"] + out["seconds_judge"], 3)
        return image

    def _agent(self, eval_dir: Path, index: int, item: dict[str, Any], seed: int, out: dict[str, Any]) -> Any:
        """The agent's run on the same prompt and seed; its own folder sits beside the eval folder."""
        run_id = f"{eval_dir.name}-{index:03d}"
        out["run_id"] = run_id
        result = self.runner.run(item["prompt"], seed=seed, max_rounds=self.max_rounds or item.get("max_rounds"),
                                 planner=self.planner, run_id=run_id)
        final = next((c for c in result.get("candidates") or [] if c["id"] == result.get("final_candidate")), None)
        by_tool = stage_seconds(RunRecord(result["run_dir"]).read_steps(), result.get("seconds"))
        out.update(run_dir=result.get("run_dir"), status=result.get("status"), rounds=result.get("rounds"),
                   seconds=result.get("seconds"), seconds_by_tool=by_tool, image=result.get("final_image"),
                   judge_match=bool(((final or {}).get("verdict") or {}).get("match")),
                   verdict=(final or {}).get("verdict"), fallback_steps=result.get("fallback_steps"))
        if result.get("run_dir"):
            from imgrag.report import write_report

            out["report"] = str(write_report(result["run_dir"]))  # each run's own page, linked from the summary
        return open_image(result["final_image"]) if result.get("final_image") else None

    def _score_clip(self, record: dict[str, Any], plain: Any, agent: Any) -> None:
        """CLIP text-image for both pictures; CLIP image-image against the gold picture when there is one."""
        pictures = [(side, image) for side, image in (("plain", plain), ("agent", agent)) if image is not None]
        if not pictures:
            return
        gold = open_image(record["gold"]) if record.get("gold") else None
        images = [image for _, image in pictures] + ([gold] if gold else [])
        vectors, texts = self.manager.run("embedder", lambda e: (e.embed_images(images),
                                                                 e.embed_texts([record["prompt"]])))
        text = texts[0]
        for i, (side, _) in enumerate(pictures):
            record[side]["clip_text"] = round(cosine(vectors[i], text), 4)
            if gold is not None:
                record[side]["clip_gold"] = round(cosine(vectors[i], vectors[-1]), 4)

    def _score_dino(self, records: list[dict[str, Any]]) -> None:
        """DINO image-image against the gold pictures, when models.dino is set (loaded once, at the end)."""
        checkpoint = (self.settings.models.dino or "").strip()
        todo = [r for r in records if r.get("gold")]
        if not checkpoint or not todo:
            return
        if "dino" not in self.manager.names():  # a manager built without models.dino (or a test's)
            from imgrag.engine import register_dino

            register_dino(self.manager, self.settings)
        for record in todo:
            sides = [s for s in ("plain", "agent") if record[s].get("image")]
            if not sides:
                continue
            images = [open_image(record[s]["image"]) for s in sides] + [open_image(record["gold"])]
            vectors = self.manager.run("dino", lambda dino, pictures: dino.embed(pictures), images)
            for i, side in enumerate(sides):
                record[side]["dino_gold"] = round(cosine(vectors[i], vectors[-1]), 4)


def stage_seconds(trace: list[dict[str, Any]], total: float | None) -> dict[str, float]:
    """A run's seconds by stage, from its trace: each tool by name, each planner as ``plan_<kind>`` (the LLM
    choosing a step: ``plan_llm``), and ``overhead`` for the rest of ``total`` (the graph, checkpoints, the trace
    itself), so the stages add up to the run's seconds. Tools run in parallel can add up to more; overhead is
    then 0."""
    stages: dict[str, float] = {}
    for step in trace:
        if "event" in step or not isinstance(step.get("seconds"), (int, float)):
            continue
        name = f"plan_{step['planner']}" if step.get("planner") else str(step.get("tool"))
        stages[name] = stages.get(name, 0.0) + float(step["seconds"])
    if isinstance(total, (int, float)):
        stages["overhead"] = max(0.0, float(total) - sum(stages.values()))
    return {name: round(seconds, 3) for name, seconds in stages.items()}


# ----------------------------------------------------------------------------------------------
# Aggregates and files
# ----------------------------------------------------------------------------------------------

def _mean(values: list[float]) -> float | None:
    values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return round(sum(values) / len(values), 4) if values else None


def aggregate(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over the prompts that have each metric (n_<metric> says how many), and seconds per stage."""
    agg: dict[str, Any] = {}
    for metric in ("clip_text", "clip_gold", "dino_gold", "judge_match", "rounds", "seconds"):
        for side in ("plain", "agent"):
            values = [float(r[side][metric]) for r in records if r[side].get(metric) is not None]
            mean = _mean(values)
            if mean is not None:
                agg[f"{side}_{metric}"] = mean
                agg[f"n_{metric}"] = len(values)
    # Plain generation is always one round.
    if any(r["plain"].get("image") for r in records):
        agg["plain_rounds"] = 1.0
    stages = {"seconds_plain_generate": [r["plain"].get("seconds_generate") for r in records],
              "seconds_plain_judge": [r["plain"].get("seconds_judge") for r in records],
              "seconds_agent_total": [r["agent"].get("seconds") for r in records],
              "seconds_scoring": [r.get("seconds_scoring") for r in records]}
    tools = sorted({t for r in records for t in (r["agent"].get("seconds_by_tool") or {})})
    for tool in tools:
        stages[f"seconds_agent_{tool}"] = [(r["agent"].get("seconds_by_tool") or {}).get(tool, 0.0)
                                           for r in records if r["agent"].get("seconds_by_tool") is not None]
    for key, values in stages.items():
        mean = _mean([v for v in values if v is not None])
        if mean is not None:
            agg[key] = mean
    agg["errors"] = sum(1 for r in records if r.get("error"))
    return agg


def csv_row(record: dict[str, Any]) -> dict[str, Any]:
    """One prompt's record flattened to eval.csv's columns."""
    p, a = record["plain"], record["agent"]
    return {
        "index": record["index"], "prompt": record["prompt"], "seed": record["seed"], "gold": record.get("gold"),
        "plain_image": p.get("image"), "plain_clip_text": p.get("clip_text"), "plain_clip_gold": p.get("clip_gold"),
        "plain_dino_gold": p.get("dino_gold"), "plain_judge_match": p.get("judge_match"),
        "plain_seconds_generate": p.get("seconds_generate"), "plain_seconds_judge": p.get("seconds_judge"),
        "agent_run_id": a.get("run_id"), "agent_status": a.get("status"), "agent_image": a.get("image"),
        "agent_rounds": a.get("rounds"), "agent_clip_text": a.get("clip_text"), "agent_clip_gold": a.get("clip_gold"),
        "agent_dino_gold": a.get("dino_gold"), "agent_judge_match": a.get("judge_match"),
        "agent_seconds": a.get("seconds"), "seconds_scoring": record.get("seconds_scoring"),
        "error": record.get("error"),
    }


def write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    """eval.csv, one row per prompt (written to a temporary file, then renamed)."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for record in records:
            writer.writerow({k: ("" if v is None else v) for k, v in csv_row(record).items()})

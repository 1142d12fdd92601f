"""The arms of ``imgrag eval``: each draws one prompt on one seed its own way and says what it retrieved.

- ``plain``: one SDXL call, what a user without imgrag gets (the baseline every other arm is paired with);
- ``imagerag``: ImageRAG's fixed single pass for SDXL (Shalev-Arkushin et al., arXiv 2502.09411, section 3):
  draw, ask the judge whether the picture matches, and if not retrieve one reference per missing concept
  (the prompt itself when the judge names none) and redraw once with them through the IP-Adapter; its answer is
  the redraw, never chosen by a score;
- ``plain-omnigen`` and ``imagerag-o``: the same two on OmniGen, ImageRAG-O's way: OmniGen draws the first
  picture from the prompt alone, and the redraw places each missing concept's reference beside it in OmniGen's
  prompt (:func:`imgrag.drawing.concept_refs.concept_prompt`). Paired with plain SDXL like every arm; their own
  baseline is ``plain-omnigen`` (ImageRAG's table compares OmniGen with ImageRAG-O);
- ``loop-fixed`` / ``loop-agent``: imgrag's loop (:class:`agent.runner.Runner`) with the fixed policy or the LLM
  planner, within the run budget; its answer is the loop's own choice (judge match, then CLIP text-image).

Every arm leaves a run folder with ``result.json`` whose ``references`` and ``candidates`` name every picture it
retrieved, so the evaluation can check from the records that no gold picture was seen. An arm is a function
``(ArmContext, EvalItem) -> ArmResult`` in :data:`ARMS`; :func:`register_arm` adds one (an in-context repair
backbone registers its arm there).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.policy import repair_queries
from imgrag.drawing.concept_refs import ConceptReferences, concept_prompt, merge_concepts
from imgrag.images import open_image
from imgrag.management.engine import ManagedEmbedder
from imgrag.models.safety import excluded_by
from imgrag.records.provenance import for_drawing, for_omnigen_drawing
from imgrag.records.report import write_report
from imgrag.records.runs import RunRecord
from imgrag.settings import Settings
from tools.budget import MAX_REFERENCES
from tools.records import Verdict


@dataclass
class EvalItem:
    """One prompt of an evaluation: its text and seed, its class (class-folder mode) and gold pictures."""

    index: int
    prompt: str
    seed: int
    gold: list[str] = field(default_factory=list)
    class_folder: str | None = None
    max_rounds: int | None = None


@dataclass
class ArmResult:
    """What one arm made of one item. ``image`` is its answer (None when it failed, ``error`` says why);
    ``seconds`` its wall time; ``model_loads`` the loads it caused; ``retrieved`` every reference it was given,
    as ``{"id", "path"}``; ``verdict`` the judge's verdict on the answer when the arm made one."""

    arm: str
    image: str | None = None
    seconds: float | None = None
    model_loads: dict[str, int] = field(default_factory=dict)
    rounds: int | None = None
    status: str | None = None
    run_id: str | None = None
    run_dir: str | None = None
    report: str | None = None
    retrieved: list[dict[str, str]] = field(default_factory=list)
    verdict: dict[str, Any] | None = None
    error: str | None = None
    scores: dict[str, Any] = field(default_factory=dict)
    seconds_by_stage: dict[str, float] = field(default_factory=dict)  # a loop run's: each tool, the planner

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ArmContext:
    """What the arms share: the settings the runs see (gold excluded), the one model manager, the runner for the
    loop arms, the store the single pass retrieves from, and the eval folder."""

    settings: Settings
    manager: Any
    runner: Any
    store: Any
    eval_dir: Path
    max_rounds: int | None = None


ArmFunction = Callable[[ArmContext, EvalItem], ArmResult]
ARMS: dict[str, ArmFunction] = {}
# Arms and the models they need besides generator, judge and embedder (loaded before timing).
ARM_MODELS: dict[str, tuple[str, ...]] = {}


def register_arm(name: str, function: ArmFunction, models: tuple[str, ...] = ()) -> None:
    """Add an arm under ``name`` (its column in eval.csv); ``models`` names the extra models it loads."""
    ARMS[name] = function
    ARM_MODELS[name] = models


def run_dir_references(run_dir: str | Path) -> list[dict[str, str]]:
    """Every picture a run was given from the store, from its ``result.json``: its ``references`` and its
    candidates that are retrieved photos; ``[{"id", "path"}]`` (empty when the run wrote no result)."""
    result = RunRecord(run_dir).read_result() or {}
    seen = [{"id": str(rid), "path": str((ref or {}).get("path") or "")}
            for rid, ref in (result.get("references") or {}).items()]
    seen += [{"id": str(c.get("id")), "path": str(c.get("path") or "")} for c in result.get("candidates") or []
             if c.get("source") == "retrieved"]
    return seen


def _loads(manager: Any, before: dict[str, int]) -> dict[str, int]:
    """The loads since ``before`` (a :meth:`load_counts`), only the models that loaded: Counter's ``-`` keeps the
    positive differences, and a count never falls."""
    return dict(Counter(manager.load_counts()) - Counter(before))


def _save(ctx: ArmContext, record: RunRecord, candidate_id: str, image: Any, prompt: str, seed: int,
          references: list[dict[str, Any]] | None, ip_scale: float | None, drawn: dict[str, Any] | None = None) -> str:
    """Save one candidate with its provenance: SDXL's, or OmniGen's when ``drawn`` (what :func:`_draw` added)
    says OmniGen drew it."""
    if (drawn or {}).get("backbone") == "omnigen":
        doc = for_omnigen_drawing(ctx.settings, prompt=prompt, sent_prompt=drawn["sent_prompt"], seed=seed,
                                  references=references, concepts=drawn.get("concepts"), run_id=record.dir.name,
                                  candidate_id=candidate_id)
    else:
        doc = for_drawing(ctx.settings, prompt=prompt, seed=seed, references=references, ip_scale=ip_scale,
                          run_id=record.dir.name, candidate_id=candidate_id)
    return str(record.save_candidate(candidate_id, image, doc))


def plain_arm(ctx: ArmContext, item: EvalItem) -> ArmResult:
    """One generator call with the prompt and the seed; saved as ``<eval>/plain/NNN/candidates/c0.png``."""
    out = ArmResult("plain", rounds=1, status="drawn")
    record = RunRecord(ctx.eval_dir / "plain" / f"{item.index:03d}")
    before, start = ctx.manager.load_counts(), time.perf_counter()
    image = ctx.manager.run("generator", lambda g: g.generate(item.prompt, seed=item.seed))
    out.image = _save(ctx, record, "c0", image, item.prompt, item.seed, None, None)
    out.seconds = round(time.perf_counter() - start, 3)
    out.model_loads = _loads(ctx.manager, before)
    record.append_step({"tool": "generate", "args": {"prompt": item.prompt, "seed": item.seed}, "ok": True,
                        "seconds": out.seconds})
    record.write_result({"run_id": record.dir.name, "status": "drawn", "final_image": out.image,
                         "candidates": [{"id": "c0", "path": out.image, "seed": item.seed, "reference_ids": []}],
                         "references": {}, "seconds": out.seconds, "profile": ctx.settings.profile})
    out.run_dir = str(record.dir)
    return out


def _draw(ctx: ArmContext, backbone: str, prompt: str, seed: int, chosen: list[dict[str, Any]],
          concepts: dict[str, str]) -> tuple[Any, dict[str, Any]]:
    """One drawing of an arm on ``backbone`` ("sdxl": SDXL, guided through the IP-Adapter by ``chosen``;
    "omnigen": each of ``chosen`` placed beside the concept it was retrieved for, ``concepts[id]``). Returns the
    picture and what the candidate record adds (the scale, or the mapping and the prompt OmniGen read)."""
    images = [open_image(r["path"]) for r in chosen]
    if backbone == "sdxl":
        scale = ctx.settings.generation.ip_scale if chosen else None
        picture = ctx.manager.run("generator", lambda g: g.generate(prompt, seed=seed, references=images or None,
                                                                    ip_scale=scale))
        return picture, ({"ip_scale": scale} if chosen else {})
    mapping = merge_concepts([ConceptReferences(concept=concepts.get(r["id"]) or prompt, reference_ids=[r["id"]])
                              for r in chosen])
    planned = concept_prompt(prompt, mapping, ctx.settings.omnigen.max_references)
    by_id = {r["id"]: image for r, image in zip(chosen, images, strict=True)}
    picture = ctx.manager.run("omnigen", lambda o: o.generate(
        planned.text, seed=seed, input_images=[by_id[i] for i in planned.image_ids] or None))
    return picture, {"backbone": "omnigen", "sent_prompt": planned.text,
                     **({"concepts": planned.mapping()} if chosen else {})}


def plain_omnigen_arm(ctx: ArmContext, item: EvalItem) -> ArmResult:
    """One OmniGen drawing from the prompt alone (ImageRAG-O's baseline); in ``<eval>/plain-omnigen/NNN/``."""
    out = ArmResult("plain-omnigen")
    record = RunRecord(ctx.eval_dir / "plain-omnigen" / f"{item.index:03d}")
    before, start = ctx.manager.load_counts(), time.perf_counter()
    picture, extra = _draw(ctx, "omnigen", item.prompt, item.seed, [], {})
    path = _save(ctx, record, "c0", picture, item.prompt, item.seed, None, None, extra)
    out.seconds = round(time.perf_counter() - start, 3)
    out.model_loads = _loads(ctx.manager, before)
    out.image, out.status, out.rounds, out.run_dir = path, "drawn", 1, str(record.dir)
    record.write_result({"run_id": record.dir.name, "status": "drawn", "final_image": path, "final_candidate": "c0",
                         "prompt": item.prompt, "rounds": 1, "references": {}, "seconds": out.seconds,
                         "candidates": [{"id": "c0", "path": path, "seed": item.seed, "reference_ids": [], **extra}],
                         "profile": ctx.settings.profile})
    return out


def imagerag_arm(ctx: ArmContext, item: EvalItem) -> ArmResult:
    """ImageRAG's single pass on SDXL + IP-Adapter (see the module docstring); in ``<eval>/imagerag/NNN/``."""
    return single_pass(ctx, item, "imagerag", "sdxl")


def imagerag_o_arm(ctx: ArmContext, item: EvalItem) -> ArmResult:
    """ImageRAG-O's single pass on OmniGen (see the module docstring); in ``<eval>/imagerag-o/NNN/``."""
    return single_pass(ctx, item, "imagerag-o", "omnigen")


def single_pass(ctx: ArmContext, item: EvalItem, name: str, backbone: str) -> ArmResult:
    """Draw, judge, retrieve one reference per missing concept (the prompt itself when none is named), redraw once
    on ``backbone`` ("sdxl" or "omnigen"); the answer is the redraw, never chosen by a score (ImageRAG,
    arXiv 2502.09411, section 3). Its trace and result go to ``<eval>/<name>/NNN/``."""
    out = ArmResult(name)
    record = RunRecord(ctx.eval_dir / name / f"{item.index:03d}")
    out.run_dir = str(record.dir)
    before, start = ctx.manager.load_counts(), time.perf_counter()
    s = ctx.settings
    first, extra = _draw(ctx, backbone, item.prompt, item.seed, [], {})
    candidates = [{"id": "c0", "path": _save(ctx, record, "c0", first, item.prompt, item.seed, None, None, extra),
                   "seed": item.seed, "reference_ids": [], "round": 1, **extra}]
    record.append_step({"tool": "generate", "args": {"prompt": item.prompt, "seed": item.seed}, "ok": True})
    verdict = ctx.manager.run("judge", lambda j: j.judge(first, item.prompt).to_dict())
    candidates[0]["verdict"] = verdict
    record.append_step({"tool": "critique", "args": {"candidate_id": "c0"}, "ok": True, "verdict": verdict})
    references: dict[str, dict[str, Any]] = {}
    concept_of: dict[str, str] = {}
    final, status = candidates[0], "matched"
    if not verdict.get("match"):
        queries = repair_queries({"prompt": item.prompt}, Verdict.of(verdict))[:MAX_REFERENCES]
        found = [] if ctx.store is None or ctx.store.count() == 0 else ctx.store.retrieve(
            ManagedEmbedder(ctx.manager), queries, k=1, rerank_lambda=0.0, min_score=s.retrieval.min_score)
        for ref in found:  # the same exclusion as the agent's tools: gold pictures and safety.exclude
            pattern = excluded_by(ref.path, s.safety.exclude)
            if pattern:
                record.append_step({"event": "safety", "tool": "retrieve", "dropped": ref.id, "path": ref.path,
                                    "reason": f"excluded by safety.exclude {pattern!r}"})
            else:
                references.setdefault(ref.id, ref.to_dict())
                concept_of.setdefault(ref.id, ref.to_dict().get("query") or item.prompt)
        chosen = list(references.values())[:MAX_REFERENCES]
        record.append_step({"tool": "retrieve", "args": {"queries": queries, "k": 1}, "ok": True,
                            "reference_ids": [r["id"] for r in chosen]})
        if chosen:
            redraw, extra = _draw(ctx, backbone, item.prompt, item.seed, chosen, concept_of)
            scale = extra.get("ip_scale")
            final = {"id": "c1", "path": _save(ctx, record, "c1", redraw, item.prompt, item.seed, chosen, scale,
                                               extra),
                     "seed": item.seed, "reference_ids": [r["id"] for r in chosen], "round": 2, **extra}
            candidates.append(final)
            record.append_step({"tool": "regenerate", "args": {"reference_ids": final["reference_ids"],
                                                               "seed": item.seed, **extra}, "ok": True})
            status = "redrawn"
        else:
            status = "no_reference"  # nothing to redraw with: the first picture is the answer, as in ImageRAG
    out.seconds = round(time.perf_counter() - start, 3)
    out.model_loads = _loads(ctx.manager, before)
    out.image, out.status, out.rounds = final["path"], status, len(candidates)
    out.verdict = final.get("verdict")
    out.retrieved = [{"id": r["id"], "path": r["path"]} for r in references.values()]
    record.write_result({"run_id": record.dir.name, "status": status, "final_image": out.image,
                         "final_candidate": final["id"], "prompt": item.prompt, "rounds": out.rounds,
                         "candidates": candidates, "references": references, "seconds": out.seconds,
                         "profile": s.profile})
    return out


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


def loop_arm(planner: str) -> ArmFunction:
    """imgrag's loop with ``planner`` ("fixed" or "agent"); its run folder sits beside the eval folder."""

    def arm(ctx: ArmContext, item: EvalItem) -> ArmResult:
        out = ArmResult(f"loop-{planner}")
        out.run_id = f"{ctx.eval_dir.name}-{planner}-{item.index:03d}"
        before = ctx.manager.load_counts()
        result = ctx.runner.run(item.prompt, seed=item.seed, max_rounds=ctx.max_rounds or item.max_rounds,
                                planner=planner, run_id=out.run_id)
        out.model_loads = _loads(ctx.manager, before)
        final = next((c for c in result.get("candidates") or [] if c["id"] == result.get("final_candidate")), None)
        out.image, out.status, out.rounds = result.get("final_image"), result.get("status"), result.get("rounds")
        out.seconds, out.run_dir = result.get("seconds"), result.get("run_dir")
        out.verdict = (final or {}).get("verdict")
        if out.run_dir:
            out.retrieved = run_dir_references(out.run_dir)
            out.seconds_by_stage = stage_seconds(RunRecord(out.run_dir).read_steps(), out.seconds)
            out.report = str(write_report(out.run_dir))  # each run's own page, linked from the summary
        return out

    return arm


register_arm("plain", plain_arm)
register_arm("imagerag", imagerag_arm)
register_arm("plain-omnigen", plain_omnigen_arm, models=("omnigen",))
register_arm("imagerag-o", imagerag_o_arm, models=("omnigen",))
register_arm("loop-fixed", loop_arm("fixed"))
register_arm("loop-agent", loop_arm("agent"), models=("llm",))

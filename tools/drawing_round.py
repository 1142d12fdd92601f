"""One round of drawings for the generate and regenerate tools: the seeds checked, the pictures drawn (SDXL, SDXL +
IP-Adapter or OmniGen), scored with CLIP against the user's prompt, saved with their provenance, and described for
the LLM and the trace.
"""

from __future__ import annotations

import json
from typing import Any

from imgrag.drawing.concept_refs import ConceptReferences
from imgrag.drawing.draw_options import MAX_PER_ROUND, DrawOptions, options_of
from imgrag.drawing.steering import MAX_WEIGHT, MODES
from imgrag.errors import UserError, check_seed
from imgrag.images import open_image
from imgrag.models.previews import strip
from imgrag.records.provenance import file_sha256, for_drawing
from tools.context import ToolContext
from tools.failures import ToolArgumentError
from tools.records import Candidate, Reference
from tools.repair import BACKBONE_OMNIGEN, backbone_for, concepts_for, draw_omnigen
from tools.safety_gate import check_output, screen_drawing_references


def check_tool_seed(state: dict, seed: Any) -> int:
    """The seed to draw with: the run's seed when the LLM gave none; torch's range is checked here."""
    try:
        return check_seed(state.get("seed", 0) if seed is None else seed)
    except UserError as exc:
        raise ToolArgumentError(f"{exc}; pick another seed") from None


def round_seeds(seed: int, n: int) -> list[int]:
    """The seeds of a round of ``n`` drawings: ``seed`` and the ones after it (each checked: the last may pass the
    range)."""
    try:
        return [check_seed(seed + k) for k in range(n)]
    except UserError as exc:
        raise ToolArgumentError(f"{exc}; pick a smaller seed") from None


def check_count(n: Any, options: DrawOptions) -> int:
    """How many drawings a round makes: ``n``, else the run's ``per_round``; 1..MAX_PER_ROUND."""
    if n is None:
        return options.per_round
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_PER_ROUND:
        raise ToolArgumentError(f"n must be a whole number from 1 to {MAX_PER_ROUND} (drawings this round), got {n!r}")
    return n


def draw_round(ctx: ToolContext, state: dict, round_no: int, prompt: str, seeds: list[int], records: list[Reference],
          ip_scale: float | None, steers: dict[str, tuple[float, str]] | None = None,
          concepts: list[ConceptReferences] | None = None) -> list[Candidate]:
    """Draw one round: a candidate per seed of ``seeds`` (SDXL draws them in one batched call), each scored with CLIP
    against the user's prompt and saved; return their records, in the order of ``seeds``. ``records`` are the
    state's references; the drawing reads them as plain dicts (the form imgrag's drawing and provenance code takes).

    The backbone (SDXL, SDXL + IP-Adapter or OmniGen: :func:`tools.repair.backbone_for`) and which reference stands for
    which concept (``concepts``, filled from each reference's retrieval query) are recorded with each. ``steers`` maps a
    reference id to its (weight, mode) (:mod:`imgrag.drawing.steering`); a reference not in it steers at 1.0, "both"
    (IP-Adapter only: OmniGen places each reference in its prompt instead). The run's drawing options (negative prompt,
    guidance, scheduler, LoRAs: :func:`imgrag.drawing.draw_options.options_of`) apply to SDXL's drawings; OmniGen has
    its own guidance and sampler, and no LoRA. The score is always measured against ``state["prompt"]`` (what the user
    asked for), never the text the LLM chose to draw, nor the negative prompt: every candidate of a run is measured with
    one yardstick. With ``ctx.previews`` on, SDXL's drawing sends ``preview`` events (a small picture from the latents
    every ``generation.preview_every`` steps, :mod:`imgrag.models.previews`)."""
    plain = [ref.model_dump() for ref in records]
    images = [open_image(ref["path"]) for ref in plain]
    plain, images = screen_drawing_references(ctx, plain, images)  # no flagged reference guides a drawing
    ids = [ctx.allocate_candidate_id(state.get("candidates") or {}) for _ in seeds]
    options = options_of(state, ctx.settings)
    steers = steers or {}
    references = [{**ref, "weight": steers.get(ref["id"], (1.0, "both"))[0],
                   "mode": steers.get(ref["id"], (1.0, "both"))[1]} for ref in plain]
    keys = [file_sha256(ref["path"]) for ref in references]  # the embedding cache's key: the file's content

    def on_step(step: int, total: int) -> None:
        ctx.on_event({"event": "denoise", "step": step, "total": total})

    def on_preview(step: int, total: int, pictures: list[Any]) -> None:
        ctx.on_event({"event": "preview", "step": step, "total": total, "image": strip(pictures),
                      "candidates": list(ids)})

    def draw(generator: Any) -> tuple[list[Any], dict[str, Any], str | None]:
        calls = getattr(generator, "encoder_calls", 0)
        steering = {"weights": [r["weight"] for r in references], "modes": [r["mode"] for r in references],
                    "reference_keys": keys} if references else {}
        previews = {"on_preview": on_preview} if ctx.previews else {}
        drawing = {"references": images or None, "ip_scale": ip_scale, "on_step": on_step,
                   "negative_prompt": options.negative_prompt, "scheduler": options.scheduler,
                   "guidance": options.guidance, "loras": options.loras, **previews, **steering, **limit}
        # One drawing is the generator's generate; a round of several its batched call (one pipeline call).
        pictures = ([generator.generate(prompt, seed=seeds[0], **drawing)] if len(seeds) == 1
                    else generator.generate_batch(prompt, seeds=seeds, **drawing))
        guidance = dict(getattr(generator, "last_guidance", {}) or {}) if references else {}
        encoder = {"image_encoder_calls": getattr(generator, "encoder_calls", 0) - calls,
                   "embeddings_cached": int(guidance.get("cached", 0))} if references else {}
        return pictures, encoder, getattr(generator, "last_scheduler", None)

    # Model calls run on the device's model thread (imgrag.management.manager), not in this tool's thread.
    limit = {"deadline": ctx.deadline} if ctx.deadline is not None else {}
    mapping = concepts_for(state, references, concepts)
    backbone = backbone_for(ctx, bool(references))
    batch = len(seeds)
    drawn: list[tuple[Any, dict[str, Any], dict[str, Any]]] = []  # (picture, provenance, record fields) per seed
    if backbone == BACKBONE_OMNIGEN:  # OmniGen draws a round's pictures one after another
        for candidate_id, seed in zip(ids, seeds, strict=True):
            drawing = draw_omnigen(ctx, prompt=prompt, seed=seed, references=references, images=images,
                                   concepts=mapping, candidate_id=candidate_id, on_step=on_step)
            provenance = {**drawing.provenance, **({"batch": {"size": batch, "index": len(drawn)}} if batch > 1
                                                   else {})}
            drawn.append((drawing.image, provenance, {
                "reference_ids": [ref["id"] for ref in drawing.references],
                **({"concepts": drawing.concepts} if drawing.concepts else {}), "sent_prompt": drawing.sent_prompt}))
    else:
        pictures, encoder, sampler = ctx.manager.run("generator", draw)
        # IP-Adapter blends every reference into one embedding: each stands for its concept in the record only.
        placed = [c.to_dict() for c in mapping] if references else []
        steering = {"reference_weights": {r["id"]: r["weight"] for r in references},
                    "reference_modes": {r["id"]: r["mode"] for r in references},
                    "guided_by": sorted({r.get("source") or "retrieved" for r in references}),
                    "encoder": encoder} if references else {}
        for k, (candidate_id, seed, picture) in enumerate(zip(ids, seeds, pictures, strict=True)):
            provenance = for_drawing(ctx.settings, prompt=prompt, seed=seed, references=references,
                                     ip_scale=ip_scale, run_id=ctx.record.dir.name,  # how it was made
                                     candidate_id=candidate_id, concepts=placed or None, backbone=backbone,
                                     guidance=options.guidance, negative_prompt=options.negative_prompt,
                                     scheduler=options.scheduler, sampler=sampler, loras=options.loras,
                                     batch={"size": batch, "index": k} if batch > 1 else None)
            drawn.append((picture, provenance, {
                "reference_ids": [ref["id"] for ref in references], **({"concepts": placed} if placed else {}),
                "negative_prompt": options.negative_prompt, "guidance": provenance["guidance"],
                "sampler": sampler, **({"loras": [{"name": c.label, "weight": c.weight} for c in options.loras]}
                                       if options.loras else {}), **steering}))
    image_vectors = ctx.manager.run("embedder", lambda embedder: embedder.embed_images([d[0] for d in drawn]))
    text_vector = ctx.manager.run("embedder", lambda embedder: embedder.embed_texts([state["prompt"]]))
    candidates = []
    for k, (candidate_id, seed, (image, provenance, fields)) in enumerate(zip(ids, seeds, drawn, strict=True)):
        path = ctx.record.save_candidate(candidate_id, image, provenance)
        adapter = bool(fields["reference_ids"]) and backbone != BACKBONE_OMNIGEN
        clip_score = float((image_vectors[k:k + 1] @ text_vector.T)[0, 0])
        candidates.append(Candidate.of({
            "id": candidate_id, "path": str(path), "prompt": prompt, "seed": seed,
            "ip_scale": ip_scale if adapter else None, "round": round_no, "clip_score": round(clip_score, 4),
            "verdict": None, "backbone": backbone, **fields,
            **({"batch": {"size": batch, "index": k, "candidates": list(ids)}} if batch > 1 else {}),
            **check_output(ctx, image_vectors[k])}))  # flagged outputs are kept for the record, never the answer
    return candidates


def steers_of(ids: list[str], known: dict[str, Reference], weights: Any, modes: Any) -> dict[str, tuple[float, str]]:
    """(weight, mode) per reference id: the call's lists (aligned with ``ids``), else what the reference's record
    says (a weight the user gave, a remembered one), else 1.0 and "both"; a ToolArgumentError for a bad value."""
    for name, values in (("weights", weights), ("modes", modes)):
        if values is not None and (not isinstance(values, list) or len(values) != len(ids)):
            raise ToolArgumentError(f"{name} must be a list with one entry per reference id ({len(ids)}), got "
                                    f"{values!r}")
    steers = {}
    for n, rid in enumerate(ids):
        record = known.get(rid)
        weight = weights[n] if weights is not None else (1.0 if record is None or record.weight is None
                                                          else record.weight)
        mode = modes[n] if modes is not None else (record.mode if record and record.mode else "both")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= MAX_WEIGHT:
            raise ToolArgumentError(f"the weight of {rid} must be a number between 0 and {MAX_WEIGHT:g}, got "
                                    f"{weight!r}")
        if mode not in MODES:
            raise ToolArgumentError(f"the mode of {rid} must be one of {', '.join(MODES)}, got {mode!r}")
        steers[rid] = (float(weight), str(mode))
    return steers


def _describe(candidate: Candidate) -> str:
    shown = {"candidate_id": candidate.id, "round": candidate.round, "clip_score": candidate.clip_score,
             "references": candidate.reference_ids}
    if candidate.concepts:
        shown["concepts"] = [{"concept": c["concept"], "reference_ids": c["reference_ids"]}
                             for c in candidate.concepts]
    return json.dumps(shown)


def describe_round(candidates: list[Candidate]) -> str:
    """The tool's answer for a round: one candidate as before, several as a list with what to do next."""
    if len(candidates) == 1:
        return _describe(candidates[0])
    return json.dumps({"candidates": [json.loads(_describe(c)) for c in candidates],
                       "note": f"{len(candidates)} drawings this round: critique each, then go on from the best"})


def drawing_trace(candidates: list[Candidate]) -> dict[str, Any]:
    """What the trace line of a drawing adds: its candidates, its backbone, the sampler, negative prompt and guidance
    it drew with and, for a repair, which reference stood for which concept (and the in-context prompt OmniGen
    read)."""
    first = candidates[0].model_dump()
    return {"candidates": [c.id for c in candidates], "seeds": [c.seed for c in candidates],
            **{k: first[k] for k in ("backbone", "concepts", "sent_prompt", "sampler", "negative_prompt", "guidance")
               if first.get(k) is not None}}


def round_update(candidates: list[Candidate]) -> dict[str, Any]:
    """The state update of a round: every candidate it drew, and the one round it used."""
    return {"candidates": {c.id: c for c in candidates}, "rounds": 1}

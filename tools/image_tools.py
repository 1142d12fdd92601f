"""The five tools the agent calls: generate, critique, retrieve, regenerate, finish.

Each takes arguments an LLM can write (ids, strings, numbers), checks them against the run's state,
runs its model under the model manager, appends a step to the run's trace, and answers with a
ToolMessage plus a state update. A bad argument (an unknown id, an empty query, a scale out of
range) is answered with an error message the LLM can act on, never an exception.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from langchain_core.messages import ToolMessage
from langchain_core.tools import BaseTool, tool
from langgraph.prebuilt import ToolRuntime
from langgraph.types import Command

from imgrag.candidate_ids import candidate_number
from imgrag.drawing.concept_refs import ConceptMapError, ConceptReferences, parse_concepts
from imgrag.drawing.draw_options import MAX_PER_ROUND, DrawOptions, options_of
from imgrag.drawing.steering import MAX_WEIGHT, MODES
from imgrag.errors import UserError, check_seed
from imgrag.images import open_image
from imgrag.management.engine import ManagedEmbedder
from imgrag.models.previews import strip
from imgrag.records.provenance import file_sha256, for_drawing
from imgrag.records.runs import is_disk_full
from imgrag.store.memory import ConceptMemory, recall_references
from imgrag.text import shorten
from tools.answers import can_finish, finish_refusal
from tools.budget import MAX_IP_SCALE, MAX_REFERENCES
from tools.context import ToolContext
from tools.failures import ToolArgumentError, step_failure
from tools.records import (
    Candidate,
    FailedStep,
    Finished,
    Reference,
    Retrieval,
    Verdict,
    from_state,
    references_of,
    to_plain,
)
from tools.repair import BACKBONE_OMNIGEN, backbone_for, concepts_for, draw_omnigen
from tools.safety_gate import check_output, screen_drawing_references, screen_references

MAX_QUERIES = 6
MAX_K = 8
MAX_CAPTION_CHARS = 160  # of a reference's caption, in what the LLM reads


def _known(ids: Any) -> str:
    ids = list(ids)
    return ", ".join(ids) if ids else "none yet"


def _candidate(state: dict, candidate_id: str) -> Candidate:
    candidates = state.get("candidates") or {}
    if candidate_id not in candidates:
        raise ToolArgumentError(f"unknown candidate_id {candidate_id!r}; known candidates: {_known(candidates)}")
    return candidates[candidate_id]


def _check_prompt(prompt: str) -> str:
    prompt = (prompt or "").strip()
    if not prompt:
        raise ToolArgumentError("prompt is empty; pass the picture's description")
    return prompt


# The checkpointer (msgpack) stores integers of 64 bits at most; an LLM writes any number.
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


def checkpoint_safe(value: Any) -> Any:
    """``value`` with every integer the checkpointer cannot store written as text (lists and dicts walked)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and not _INT_MIN <= value <= _INT_MAX:
        return str(value)
    if isinstance(value, dict):
        return {k: checkpoint_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [checkpoint_safe(v) for v in value]
    return value


def run_tool_call(ctx: ToolContext, name: str, args: dict, tool_call_id: str, state: dict, body, *,
         draws: bool = False) -> Command:
    """Run one tool body, time it, trace it, and turn its outcome into a ToolMessage + state update.

    The call first claims its share of the budget (:meth:`ToolContext.claim`); a call past it is refused
    and costs nothing. ``body(round_no)`` gets the round a drawing claimed. Whatever the body raises
    becomes an error message the planner can act on and a failed step in the trace and the state
    (``failed_steps``, which the fixed policy reads so it never repeats a step that failed)."""
    args = checkpoint_safe(args)  # recorded in the trace and the state
    kept = ctx.finished_call(tool_call_id, name, args, state)
    if kept is not None:
        return _replay(ctx, name, tool_call_id, state, kept, draws)
    finishing = _finishing(state) if name != "finish" else None
    if finishing:  # a valid finish in the same turn ends the run: the calls beside it would be wasted work
        round_no, refusal = 0, f"this turn also finished the run with {finishing}"
    else:
        round_no, refusal = ctx.claim(state, draws=draws)
    if refusal is not None:
        ctx.record.append_step({"tool": name, "args": args, "ok": False, "seconds": 0.0, "refused": True,
                                "round": state.get("rounds", 0), "message": f"Not run: {refusal}"})
        message = ToolMessage(f"Error: not run: {refusal}.", tool_call_id=tool_call_id, name=name, status="error")
        return Command(update={"messages": [message]})
    ctx.on_event({"event": "tool_start", "tool": name, "args": args, "round": state.get("rounds", 0)})
    start = time.perf_counter()
    step: dict[str, Any] = {}  # more fields for the trace: a body may return them third (the judge's tokens)
    try:
        text, update, *more = body(round_no)
        step.update(more[0] if more else {})
        ok = True
    except Exception as exc:  # what a step catches (tools/failures.py): the run goes on without this step
        if draws and is_disk_full(exc):  # raised again below: the round it claimed is given back first
            ctx.release_round(state)
        failure = step_failure(name, exc)
        text, update, ok = failure.text, {}, False
        step.update(failure.trace)
        if failure.kind == "argument":
            step["kind"] = "argument"
    if not ok:
        if draws:
            ctx.release_round(state)
        # The candidate the call was for: named in its arguments, else the latest drawn (None before any).
        candidates = state.get("candidates") or {}
        target = args.get("candidate_id") or args.get("avoid_candidate_id") or max(
            candidates, key=candidate_number, default=None)
        update = {"failed_steps": [FailedStep(tool=name, target=target, args=args, error=text[:300],
                                              kind=step.get("kind", "error"))]}
    seconds = round(time.perf_counter() - start, 3)
    if ok:  # the step's result, durable before the checkpoint that records it: a resume replays it (below)
        step["replay"] = {"text": text, "update": to_plain(update)}  # read back as dicts: the reducers convert
    ctx.record.append_step({"tool": name, "args": args, "ok": ok, "seconds": seconds, "call_id": tool_call_id,
                            "round": round_no or state.get("rounds", 0), "message": text[:2000], **step})
    ctx.on_event({"event": "tool_end", "tool": name, "ok": ok, "seconds": seconds, "message": text[:300]})
    message = ToolMessage(text, tool_call_id=tool_call_id, name=name, status="success" if ok else "error")
    return Command(update={"messages": [message], "tool_calls": 1, **update})


def _replay(ctx: ToolContext, name: str, tool_call_id: str, state: dict, kept: dict, draws: bool) -> Command:
    """Answer a call that already finished in an earlier process with the result its trace step kept.

    A run stopped after a tool finished but before LangGraph checkpointed its result (Ctrl-C, a kill, a full
    disk) runs that tool call again on resume; drawing it again would make a second candidate of the same
    round and seed and orphan the first. The call's share of the budget is claimed as the first time."""
    ctx.claim(state, draws=draws)
    ctx.on_event({"event": "tool_start", "tool": name, "args": kept.get("args") or {}, "round": state.get("rounds", 0)})
    text, update = kept["replay"]["text"], kept["replay"]["update"]
    ctx.record.append_step({"event": "replayed", "tool": name, "call_id": tool_call_id,
                            "note": "finished before the interruption; its result is reused, not redone"})
    ctx.on_event({"event": "tool_end", "tool": name, "ok": True, "seconds": 0.0,
                  "message": f"kept from before the interruption: {text[:250]}"})
    message = ToolMessage(text, tool_call_id=tool_call_id, name=name, status="success")
    return Command(update={"messages": [message], "tool_calls": 1, **update})


def _finishing(state: dict) -> str | None:
    """The candidate a ``finish`` call of the current turn ends the run with, when that call will succeed (the same
    rule as ``finish``: :func:`tools.answers.can_finish`)."""
    messages = state.get("messages") or []
    candidates = state.get("candidates") or {}
    for call in getattr(messages[-1], "tool_calls", None) or [] if messages else []:
        cid = (call.get("args") or {}).get("candidate_id")
        if call.get("name") == "finish" and can_finish(candidates.get(cid)):
            return cid
    return None


def _check_seed(state: dict, seed: Any) -> int:
    """The seed to draw with: the run's seed when the LLM gave none; torch's range is checked here."""
    try:
        return check_seed(state.get("seed", 0) if seed is None else seed)
    except UserError as exc:
        raise ToolArgumentError(f"{exc}; pick another seed") from None


def _seeds(seed: int, n: int) -> list[int]:
    """The seeds of a round of ``n`` drawings: ``seed`` and the ones after it (each checked: the last may pass the
    range)."""
    try:
        return [check_seed(seed + k) for k in range(n)]
    except UserError as exc:
        raise ToolArgumentError(f"{exc}; pick a smaller seed") from None


def _check_n(n: Any, options: DrawOptions) -> int:
    """How many drawings a round makes: ``n``, else the run's ``per_round``; 1..MAX_PER_ROUND."""
    if n is None:
        return options.per_round
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_PER_ROUND:
        raise ToolArgumentError(f"n must be a whole number from 1 to {MAX_PER_ROUND} (drawings this round), got {n!r}")
    return n


def _draw(ctx: ToolContext, state: dict, round_no: int, prompt: str, seeds: list[int], records: list[Reference],
          ip_scale: float | None, steers: dict[str, tuple[float, str]] | None = None,
          concepts: list[ConceptReferences] | None = None) -> list[Candidate]:
    """Draw one round: a candidate per seed of ``seeds`` (SDXL draws them in one batched call), each scored with CLIP
    against the user's prompt and saved; return their records, in the order of ``seeds``. ``records`` are the
    state's references; the drawing reads them as plain dicts (the form imgrag's drawing and provenance code takes).

    The backbone (SDXL, SDXL + IP-Adapter or OmniGen: :func:`tools.repair.backbone_for`) and which reference stands
    for which concept (``concepts``, filled from each reference's retrieval query) are recorded with each.
    ``steers`` maps a reference id to its (weight, mode) (:mod:`imgrag.drawing.steering`); a reference not in it steers
    at 1.0, "both" (IP-Adapter only: OmniGen places each reference in its prompt instead). The run's drawing options
    (negative prompt, guidance, scheduler, LoRAs: :func:`imgrag.drawing.draw_options.options_of`) apply to SDXL's
    drawings;
    OmniGen has its own guidance and sampler, and no LoRA. The score is always measured against ``state["prompt"]``
    (what the user asked for), never the text the LLM chose to draw, nor the negative prompt: every candidate of a run
    is measured with one yardstick. With ``ctx.previews`` on, SDXL's drawing sends ``preview`` events (a small picture
    from the latents every ``generation.preview_every`` steps, :mod:`imgrag.models.previews`)."""
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


MAX_REMEMBERED = 2  # remembered references a retrieval adds per call, before the store's own results


def _remembered(ctx: ToolContext, embedder: Any, queries: list[str]) -> dict[str, Reference]:
    """References the concept memory holds for concepts these queries name (imgrag/store/memory.py), as records
    marked ``source: "memory"``; none when ``retrieval.memory`` is off. A memory that cannot be read costs only
    itself: the store's results still come."""
    r = ctx.settings.retrieval
    if not r.memory:
        return {}
    memory = ConceptMemory.for_settings(ctx.settings)
    found: dict[str, dict] = {}
    try:
        for query in queries:
            got, _ = recall_references(memory, query, embedder, r.memory_min_score, MAX_REMEMBERED - len(found))
            found.update(got)
    except UserError:
        return {}
    return references_of(found)


def _steers(ids: list[str], known: dict[str, Reference], weights: Any, modes: Any) -> dict[str, tuple[float, str]]:
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


def _describe_round(candidates: list[Candidate]) -> str:
    """The tool's answer for a round: one candidate as before, several as a list with what to do next."""
    if len(candidates) == 1:
        return _describe(candidates[0])
    return json.dumps({"candidates": [json.loads(_describe(c)) for c in candidates],
                       "note": f"{len(candidates)} drawings this round: critique each, then go on from the best"})


def _drawing_trace(candidates: list[Candidate]) -> dict[str, Any]:
    """What the trace line of a drawing adds: its candidates, its backbone, the sampler, negative prompt and guidance
    it drew with and, for a repair, which reference stood for which concept (and the in-context prompt OmniGen
    read)."""
    first = candidates[0].model_dump()
    return {"candidates": [c.id for c in candidates], "seeds": [c.seed for c in candidates],
            **{k: first[k] for k in ("backbone", "concepts", "sent_prompt", "sampler", "negative_prompt", "guidance")
               if first.get(k) is not None}}


def _round_update(candidates: list[Candidate]) -> dict[str, Any]:
    """The state update of a round: every candidate it drew, and the one round it used."""
    return {"candidates": {c.id: c for c in candidates}, "rounds": 1}


def _check_concepts(concepts: Any, known: dict[str, Reference]) -> list[ConceptReferences]:
    """The ``concepts`` argument as records; every reference id must be one the run knows."""
    try:
        records = parse_concepts(concepts)
    except ConceptMapError as exc:
        example = '[{"concept": "a red fox", "reference_ids": ["..."]}, ...]'
        raise ToolArgumentError(f"{exc}; pass {example}") from None
    unknown = [i for c in records for i in c.reference_ids if i not in known]
    if unknown:
        raise ToolArgumentError(f"unknown reference ids {unknown} in concepts; known references: {_known(known)}")
    return records


# Each tool's ``runtime: ToolRuntime[Any, dict]`` is injected by the ToolNode and left out of the schema the LLM
# sees; its context is the run's ToolContext. Typed Any there because langchain builds a pydantic model of the
# tool's arguments from these hints, and the context's fields (the manager, a lock) are no pydantic types.
def make_tools() -> list[BaseTool]:
    """The agent's tools. Each reads its run's :class:`ToolContext`, the state and its call id from the injected
    ``ToolRuntime`` (the graph's runtime context, given at invoke time), so the tools are made once per graph."""

    @tool
    def generate(
        prompt: str,
        seed: int | None = None,
        n: int | None = None,
        *,
        runtime: ToolRuntime[Any, dict],
    ) -> Command:
        """Draw a new picture from the text prompt alone (no references). Returns a candidate_id.
        Use a different seed to get a different composition. n (1..8, default the run's drawings per round) draws
        n pictures on seeds seed, seed+1, ... in one round: critique each and go on from the best."""
        args = {"prompt": prompt, "seed": seed}
        if n is not None:  # only when given, so the fixed policy's steps keep their arguments
            args["n"] = n
        ctx: ToolContext = runtime.context
        state, tool_call_id = from_state(runtime.state), runtime.tool_call_id

        def body(round_no: int):
            text = _check_prompt(prompt)
            count = _check_n(n, options_of(state, ctx.settings))
            candidates = _draw(ctx, state, round_no, text, _seeds(_check_seed(state, seed), count), [], None)
            return _describe_round(candidates), _round_update(candidates), _drawing_trace(candidates)

        return run_tool_call(ctx, "generate", args, tool_call_id, state, body, draws=True)

    @tool
    def critique(
        candidate_id: str,
        *,
        runtime: ToolRuntime[Any, dict],
    ) -> Command:
        """Ask the vision judge whether a candidate shows everything the user's prompt asks for.
        Returns {match, missing: [concepts], reason}."""
        args = {"candidate_id": candidate_id}
        ctx: ToolContext = runtime.context
        state, tool_call_id = from_state(runtime.state), runtime.tool_call_id

        def body(_: int):
            candidate = _candidate(state, candidate_id)
            image = open_image(candidate.path)
            limit = {"deadline": ctx.deadline} if ctx.deadline is not None else {}
            judged, tokens = ctx.manager.run("judge", lambda judge: (
                judge.judge(image, state["prompt"], **limit).to_dict(), getattr(judge, "last_tokens", None)))
            verdict = Verdict.of(judged)
            updated = candidate.replace(verdict=verdict)
            shown = {k: judged[k] for k in ("match", "missing", "reason", "parsed")}
            if not verdict.parsed:
                shown["note"] = "the judge's answer could not be parsed; retrieve with the prompt itself"
            return (json.dumps({"candidate_id": candidate_id, **shown}), {"candidates": {candidate_id: updated}},
                    {"tokens": tokens})

        return run_tool_call(ctx, "critique", args, tool_call_id, state, body)

    @tool
    def retrieve(
        queries: list[str],
        k: int | None = None,
        avoid_candidate_id: str | None = None,
        *,
        runtime: ToolRuntime[Any, dict],
    ) -> Command:
        """Find real reference photos in the user's image collection: one query per missing concept, written as
        a caption of the photo you want (what it shows and looks like: "a photo of a wooden baby cradle with
        curved rockers"), not just its name. Pass the failed candidate as avoid_candidate_id to prefer references
        unlike what was already drawn.
        Returns reference ids with captions and scores."""
        args = {"queries": queries, "k": k, "avoid_candidate_id": avoid_candidate_id}
        ctx: ToolContext = runtime.context
        state, tool_call_id = from_state(runtime.state), runtime.tool_call_id

        def body(_: int):
            if state.get("retrieval_off"):
                raise ToolArgumentError(f"retrieval is unavailable in this run ({state['retrieval_off']}); draw "
                                        "without references (generate)")
            cleaned = [q.strip() for q in (queries or []) if isinstance(q, str) and q.strip()]
            cleaned = list(dict.fromkeys(cleaned))
            if not cleaned:
                raise ToolArgumentError("queries is empty; pass one short description per missing concept")
            if len(cleaned) > MAX_QUERIES:
                raise ToolArgumentError(f"at most {MAX_QUERIES} queries at once, got {len(cleaned)}")
            top_k = ctx.settings.retrieval.k if k is None else int(k)
            if not 1 <= top_k <= MAX_K:
                raise ToolArgumentError(f"k must be between 1 and {MAX_K}, got {k}")
            avoid_image = None
            if avoid_candidate_id:
                avoid_image = open_image(_candidate(state, avoid_candidate_id).path)
            r = ctx.settings.retrieval
            # Embeddings run on the model thread; the store's query holds no device lock.
            embedder = ManagedEmbedder(ctx.manager)
            store = ctx.store(embedder)
            empty_store = store.count() == 0
            found = [] if empty_store else store.retrieve(
                embedder, cleaned, k=top_k, avoid=avoid_image, rerank_lambda=r.rerank_lambda,
                min_score=r.min_score)
            matched = len(found)
            found = screen_references(ctx, store, embedder, found, "retrieve")  # flagged photos never reach the planner
            found_refs = {ref.id: Reference.of(ref.to_dict()) for ref in found}
            remembered = _remembered(ctx, embedder, cleaned)
            paths = {str(Path(ref.path).resolve()) for ref in remembered.values()}  # one picture, one record
            refs = {**remembered, **{rid: ref for rid, ref in found_refs.items()
                                     if rid not in remembered and str(Path(ref.path).resolve()) not in paths}}
            known = state.get("references") or {}
            for rid, ref in refs.items():  # a weight or mode the user gave this reference survives its retrieval
                before = known[rid].model_dump() if rid in known else {}
                kept = {k: before[k] for k in ("weight", "mode", "source") if k in before}
                if kept:
                    refs[rid] = ref.replace(**kept)
            # Recorded even when empty, so the planner knows this repair was tried.
            candidates = state.get("candidates") or {}
            repairing = avoid_candidate_id or max(candidates, key=candidate_number, default=None)
            retrieval = Retrieval(for_=repairing, queries=cleaned, reference_ids=list(refs))
            # Captions are cut short: indexed captions run to 2,000 characters, and every one stays in the thread.
            listing = [{"reference_id": ref.id, "caption": shorten(ref.caption, MAX_CAPTION_CHARS),
                        "query": ref.query, "score": round(float(ref.score or 0.0), 4),
                        **({"remembered": True} if ref.source == "memory" else {})} for ref in refs.values()]
            if empty_store and not remembered:
                text = "The reference store is empty (the user can add images with `imgrag index`); draw without."
            elif not listing and matched:  # found, then dropped: other queries would meet the same gate
                text = (f"{matched} reference(s) matched but the safety gate dropped them all (excluded by "
                        "safety.exclude, or flagged as unsafe); draw without references or try other queries.")
            else:
                text = json.dumps(listing) if listing else "No reference matched these queries; try broader ones."
            return text, {"references": refs, "retrievals": [retrieval]}, (
                {"remembered": list(remembered)} if remembered else {})

        return run_tool_call(ctx, "retrieve", args, tool_call_id, state, body)

    @tool
    def regenerate(
        prompt: str,
        reference_ids: list[str] | None = None,
        ip_scale: float | None = None,
        seed: int | None = None,
        weights: list[float] | None = None,
        modes: list[str] | None = None,
        concepts: list[dict[str, Any]] | None = None,
        n: int | None = None,
        *,
        runtime: ToolRuntime[Any, dict],
    ) -> Command:
        """Draw again guided by reference photos. reference_ids come from retrieve. concepts says which
        reference shows which concept: [{"concept": "a red fox", "reference_ids": ["..."]}, ...] in the order the
        prompt names them; references left out of it stand for the query that found them. With OmniGen each
        concept's references go into the prompt where it is named. With IP-Adapter all are blended: ip_scale
        (0..1, default from settings) sets how strongly they steer and, optional, one per reference id in the same
        order: weights (0..2, default 1; 2 = that reference steers twice as strongly) and modes ("both" = subject
        and look, "style" = only its look, "content" = only its subject and layout). n (1..8, default the run's
        drawings per round) draws n pictures on seeds seed, seed+1, ...: critique each. Returns a candidate_id."""
        args = {"prompt": prompt, "reference_ids": reference_ids, "ip_scale": ip_scale, "seed": seed}
        if n is not None:
            args["n"] = n
        if weights is not None:
            args["weights"] = weights
        if modes is not None:
            args["modes"] = modes
        if concepts is not None:  # only when given, so the fixed policy's IP-Adapter steps keep their arguments
            args["concepts"] = concepts
        ctx: ToolContext = runtime.context
        state, tool_call_id = from_state(runtime.state), runtime.tool_call_id

        def body(round_no: int):
            text = _check_prompt(prompt)
            known = state.get("references") or {}
            mapping = _check_concepts(concepts, known)
            ids = list(dict.fromkeys([*(reference_ids or []), *(i for c in mapping for i in c.reference_ids)]))
            if not ids:
                raise ToolArgumentError("reference_ids is empty; call retrieve first, or generate for a plain picture")
            unknown = [i for i in ids if i not in known]
            if unknown:
                raise ToolArgumentError(f"unknown reference ids {unknown}; known references: {_known(known)}")
            if len(ids) > MAX_REFERENCES:
                raise ToolArgumentError(f"at most {MAX_REFERENCES} references per drawing")
            scale = ctx.settings.generation.ip_scale if ip_scale is None else float(ip_scale)
            if not 0.0 <= scale <= MAX_IP_SCALE:
                raise ToolArgumentError(f"ip_scale must be between 0 and {MAX_IP_SCALE:g}, got {ip_scale}")
            count = _check_n(n, options_of(state, ctx.settings))
            seeds = _seeds(_check_seed(state, seed), count)
            steers = _steers(ids, known, weights, modes)
            candidates = _draw(ctx, state, round_no, text, seeds, [known[i] for i in ids], scale, steers, mapping)
            return (_describe_round(candidates), _round_update(candidates),
                    {**(candidates[0].encoder or {}), "guided_by": candidates[0].guided_by,
                     **_drawing_trace(candidates)})

        return run_tool_call(ctx, "regenerate", args, tool_call_id, state, body, draws=True)

    @tool
    def finish(
        candidate_id: str,
        reason: str = "",
        *,
        runtime: ToolRuntime[Any, dict],
    ) -> Command:
        """End the run with this candidate as the answer. Only a candidate the judge has matched can finish
        the run early; otherwise the run goes on until its budget is spent."""
        args = {"candidate_id": candidate_id, "reason": reason}
        ctx: ToolContext = runtime.context
        state, tool_call_id = from_state(runtime.state), runtime.tool_call_id

        def body(_: int):
            refusal = finish_refusal(_candidate(state, candidate_id))  # the one rule (tools/answers.py)
            if refusal:
                raise ToolArgumentError(refusal)
            return f"Finished with {candidate_id}.", {"finished": Finished(candidate_id=candidate_id, reason=reason)}

        return run_tool_call(ctx, "finish", args, tool_call_id, state, body)

    return [generate, critique, retrieve, regenerate, finish]


TOOL_NAMES = ("generate", "critique", "retrieve", "regenerate", "finish")

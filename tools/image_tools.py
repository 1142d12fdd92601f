"""The five tools the agent calls: generate, critique, retrieve, regenerate, finish.

Each takes arguments an LLM can write (ids, strings, numbers), checks them against the run's state,
runs its model under the model manager, appends a step to the run's trace, and answers with a
ToolMessage plus a state update. A bad argument (an unknown id, an empty query, a scale out of
range) is answered with an error message the LLM can act on, never an exception.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from langchain_core.tools import BaseTool, tool
from langgraph.prebuilt import ToolRuntime
from langgraph.types import Command

from imgrag.candidate_ids import candidate_number
from imgrag.drawing.concept_refs import ConceptMapError, ConceptReferences, parse_concepts
from imgrag.drawing.draw_options import options_of
from imgrag.errors import UserError
from imgrag.images import open_image
from imgrag.management.engine import ManagedEmbedder
from imgrag.store.memory import ConceptMemory, recall_references
from imgrag.text import shorten
from tools.answers import finish_refusal
from tools.budget import MAX_IP_SCALE, MAX_REFERENCES
from tools.context import ToolContext
from tools.drawing_round import (
    check_count,
    check_tool_seed,
    describe_round,
    draw_round,
    drawing_trace,
    round_seeds,
    round_update,
    steers_of,
)
from tools.failures import ToolArgumentError
from tools.records import (
    Candidate,
    Finished,
    Reference,
    Retrieval,
    Verdict,
    from_state,
    references_of,
)
from tools.safety_gate import screen_references
from tools.tool_calls import run_tool_call

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
        count = check_count(n, options_of(state, ctx.settings))
        candidates = draw_round(ctx, state, round_no, text, round_seeds(check_tool_seed(state, seed), count), [], None)
        return describe_round(candidates), round_update(candidates), drawing_trace(candidates)

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
        count = check_count(n, options_of(state, ctx.settings))
        seeds = round_seeds(check_tool_seed(state, seed), count)
        steers = steers_of(ids, known, weights, modes)
        candidates = draw_round(ctx, state, round_no, text, seeds, [known[i] for i in ids], scale, steers, mapping)
        return (describe_round(candidates), round_update(candidates),
                {**(candidates[0].encoder or {}), "guided_by": candidates[0].guided_by,
                 **drawing_trace(candidates)})

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


def make_tools() -> list[BaseTool]:
    """The agent's five tools, in the order the LLM is shown them."""
    return [generate, critique, retrieve, regenerate, finish]


TOOL_NAMES = ("generate", "critique", "retrieve", "regenerate", "finish")

"""The five tools the agent calls: generate, critique, retrieve, regenerate, finish.

Each takes arguments an LLM can write (ids, strings, numbers), checks them against the run's state,
runs its model under the model manager, appends a step to the run's trace, and answers with a
ToolMessage plus a state update. A bad argument (an unknown id, an empty query, a scale out of
range) is answered with an error message the LLM can act on, never an exception.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

from langchain_core.messages import ToolMessage
from langchain_core.tools import BaseTool, InjectedToolCallId, tool
from langgraph.prebuilt import InjectedState
from langgraph.types import Command

from imgrag.engine import ManagedEmbedder
from imgrag.errors import UserError
from imgrag.images import open_image
from tools.context import ToolContext

MAX_REFERENCES_PER_DRAWING = 4
MAX_QUERIES = 6
MAX_K = 8


class ToolArgumentError(Exception):
    """An argument the LLM got wrong; the message goes back to it."""


def _known(ids: Any) -> str:
    ids = list(ids)
    return ", ".join(ids) if ids else "none yet"


def _candidate(state: dict, candidate_id: str) -> dict:
    candidates = state.get("candidates") or {}
    if candidate_id not in candidates:
        raise ToolArgumentError(f"unknown candidate_id {candidate_id!r}; known candidates: {_known(candidates)}")
    return candidates[candidate_id]


def _check_prompt(prompt: str) -> str:
    prompt = (prompt or "").strip()
    if not prompt:
        raise ToolArgumentError("prompt is empty; pass the picture's description")
    return prompt


def _check_budget(ctx: ToolContext, state: dict) -> None:
    used = state.get("rounds", 0)
    limit = int((state.get("budget") or {}).get("max_rounds", ctx.settings.budget.max_rounds))
    if used >= limit:
        raise ToolArgumentError(f"the drawing budget is spent ({used} of {limit} rounds); call finish with the best "
                                "candidate")


def _run(ctx: ToolContext, name: str, args: dict, tool_call_id: str, state: dict, body) -> Command:
    """Run one tool body, time it, trace it, and turn its outcome into a ToolMessage + state update."""
    ctx.on_event({"event": "tool_start", "tool": name, "args": args, "round": state.get("rounds", 0)})
    start = time.perf_counter()
    extra: dict = {}  # a body may return a third item: more fields for the trace (the judge's tokens)
    try:
        text, update, *more = body()
        extra = more[0] if more else {}
        ok = True
    except (ToolArgumentError, UserError) as exc:
        text, update, ok = f"Error: {exc}", {}, False
    seconds = round(time.perf_counter() - start, 3)
    ctx.record.append_step({"tool": name, "args": args, "ok": ok, "seconds": seconds,
                            "round": state.get("rounds", 0) + update.get("rounds", 0), "message": text[:2000],
                            **extra})
    ctx.on_event({"event": "tool_end", "tool": name, "ok": ok, "seconds": seconds, "message": text[:300]})
    message = ToolMessage(text, tool_call_id=tool_call_id, name=name, status="success" if ok else "error")
    return Command(update={"messages": [message], "tool_calls": 1, **update})


def _draw(ctx: ToolContext, state: dict, prompt: str, seed: int, references: list[dict], ip_scale: float | None):
    """Draw one candidate, score it with CLIP against the prompt, save it; return the candidate record."""
    images = [open_image(ref["path"]) for ref in references]
    candidate_id = ctx.allocate_candidate_id(state.get("candidates") or {})

    def on_step(step: int, total: int) -> None:
        ctx.on_event({"event": "denoise", "step": step, "total": total})

    # Model calls run on the device's model thread (imgrag.manager), not in this tool's thread.
    image = ctx.manager.run("generator", lambda generator: generator.generate(
        prompt, seed=seed, references=images or None, ip_scale=ip_scale, on_step=on_step))
    clip_score = ctx.manager.run("embedder", lambda embedder: float(
        (embedder.embed_images([image]) @ embedder.embed_texts([prompt]).T)[0, 0]))
    path = ctx.record.candidate_path(candidate_id)
    image.save(path)
    return {"id": candidate_id, "path": str(path), "prompt": prompt, "seed": seed,
            "reference_ids": [ref["id"] for ref in references], "ip_scale": ip_scale if references else None,
            "round": state.get("rounds", 0) + 1, "clip_score": round(clip_score, 4), "verdict": None}


def _describe(candidate: dict) -> str:
    return json.dumps({"candidate_id": candidate["id"], "round": candidate["round"],
                       "clip_score": candidate["clip_score"], "references": candidate["reference_ids"]})


def make_tools(ctx: ToolContext) -> list[BaseTool]:
    """The agent's tools, bound to one run's context."""

    @tool
    def generate(
        prompt: str,
        seed: int | None = None,
        *,
        state: Annotated[dict, InjectedState],
        tool_call_id: Annotated[str, InjectedToolCallId],
    ) -> Command:
        """Draw a new picture from the text prompt alone (no references). Returns a candidate_id.
        Use a different seed to get a different composition."""
        args = {"prompt": prompt, "seed": seed}

        def body():
            _check_budget(ctx, state)
            text = _check_prompt(prompt)
            candidate = _draw(ctx, state, text, state.get("seed", 0) if seed is None else int(seed), [], None)
            return _describe(candidate), {"candidates": {candidate["id"]: candidate}, "rounds": 1}

        return _run(ctx, "generate", args, tool_call_id, state, body)

    @tool
    def critique(
        candidate_id: str,
        *,
        state: Annotated[dict, InjectedState],
        tool_call_id: Annotated[str, InjectedToolCallId],
    ) -> Command:
        """Ask the vision judge whether a candidate shows everything the user's prompt asks for.
        Returns {match, missing: [concepts], reason}."""
        args = {"candidate_id": candidate_id}

        def body():
            candidate = _candidate(state, candidate_id)
            image = open_image(candidate["path"])
            verdict, tokens = ctx.manager.run("judge", lambda judge: (judge.judge(image, state["prompt"]).to_dict(),
                                                                      getattr(judge, "last_tokens", None)))
            updated = {**candidate, "verdict": verdict}
            shown = {k: verdict[k] for k in ("match", "missing", "reason", "parsed")}
            if not verdict["parsed"]:
                shown["note"] = "the judge's answer could not be parsed; retrieve with the prompt itself"
            return (json.dumps({"candidate_id": candidate_id, **shown}), {"candidates": {candidate_id: updated}},
                    {"tokens": tokens})

        return _run(ctx, "critique", args, tool_call_id, state, body)

    @tool
    def retrieve(
        queries: list[str],
        k: int | None = None,
        avoid_candidate_id: str | None = None,
        *,
        state: Annotated[dict, InjectedState],
        tool_call_id: Annotated[str, InjectedToolCallId],
    ) -> Command:
        """Find real reference photos in the user's image collection: one short query per missing concept.
        Pass the failed candidate as avoid_candidate_id to prefer references unlike what was already drawn.
        Returns reference ids with captions and scores."""
        args = {"queries": queries, "k": k, "avoid_candidate_id": avoid_candidate_id}

        def body():
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
                avoid_image = open_image(_candidate(state, avoid_candidate_id)["path"])
            r = ctx.settings.retrieval
            # Embeddings run on the model thread; the store's query holds no device lock.
            embedder = ManagedEmbedder(ctx.manager)
            store = ctx.store(embedder)
            empty_store = store.count() == 0
            found = [] if empty_store else store.retrieve(
                embedder, cleaned, k=top_k, avoid=avoid_image, rerank_lambda=r.rerank_lambda,
                min_score=r.min_score)
            refs = {ref.id: ref.to_dict() for ref in found}
            # Recorded even when empty, so the planner knows this repair was tried.
            candidates = state.get("candidates") or {}
            repairing = avoid_candidate_id or max(candidates, key=lambda c: int(c[1:]), default=None)
            retrieval = {"for": repairing, "queries": cleaned, "reference_ids": list(refs)}
            listing = [{"reference_id": ref["id"], "caption": ref.get("caption") or "", "query": ref.get("query"),
                        "score": round(float(ref["score"]), 4)} for ref in refs.values()]
            if empty_store:
                text = "The reference store is empty (the user can add images with `imgrag index`); draw without."
            else:
                text = json.dumps(listing) if listing else "No reference matched these queries; try broader ones."
            return text, {"references": refs, "retrievals": [retrieval]}

        return _run(ctx, "retrieve", args, tool_call_id, state, body)

    @tool
    def regenerate(
        prompt: str,
        reference_ids: list[str],
        ip_scale: float | None = None,
        seed: int | None = None,
        *,
        state: Annotated[dict, InjectedState],
        tool_call_id: Annotated[str, InjectedToolCallId],
    ) -> Command:
        """Draw again guided by reference photos (IP-Adapter). reference_ids come from retrieve; ip_scale
        (0..1, default from settings) sets how strongly the references steer the picture. Returns a candidate_id."""
        args = {"prompt": prompt, "reference_ids": reference_ids, "ip_scale": ip_scale, "seed": seed}

        def body():
            _check_budget(ctx, state)
            text = _check_prompt(prompt)
            known = state.get("references") or {}
            ids = list(dict.fromkeys(reference_ids or []))
            if not ids:
                raise ToolArgumentError("reference_ids is empty; call retrieve first, or generate for a plain picture")
            unknown = [i for i in ids if i not in known]
            if unknown:
                raise ToolArgumentError(f"unknown reference ids {unknown}; known references: {_known(known)}")
            if len(ids) > MAX_REFERENCES_PER_DRAWING:
                raise ToolArgumentError(f"at most {MAX_REFERENCES_PER_DRAWING} references per drawing")
            scale = ctx.settings.generation.ip_scale if ip_scale is None else float(ip_scale)
            if not 0.0 <= scale <= 1.0:
                raise ToolArgumentError(f"ip_scale must be between 0 and 1, got {ip_scale}")
            draw_seed = state.get("seed", 0) if seed is None else int(seed)
            candidate = _draw(ctx, state, text, draw_seed, [known[i] for i in ids], scale)
            return _describe(candidate), {"candidates": {candidate["id"]: candidate}, "rounds": 1}

        return _run(ctx, "regenerate", args, tool_call_id, state, body)

    @tool
    def finish(
        candidate_id: str,
        reason: str = "",
        *,
        state: Annotated[dict, InjectedState],
        tool_call_id: Annotated[str, InjectedToolCallId],
    ) -> Command:
        """End the run with this candidate as the answer. Only a candidate the judge has matched can finish
        the run early; otherwise the run goes on until its budget is spent."""
        args = {"candidate_id": candidate_id, "reason": reason}

        def body():
            candidate = _candidate(state, candidate_id)
            verdict = candidate.get("verdict")
            if not verdict:
                raise ToolArgumentError(f"{candidate_id} has not been critiqued yet; call critique first")
            if not verdict.get("match"):
                raise ToolArgumentError(f"the judge did not match {candidate_id} (missing: {verdict.get('missing')}); "
                                        "repair it with retrieve and regenerate")
            return f"Finished with {candidate_id}.", {"finished": {"candidate_id": candidate_id, "reason": reason}}

        return _run(ctx, "finish", args, tool_call_id, state, body)

    return [generate, critique, retrieve, regenerate, finish]


TOOL_NAMES = ("generate", "critique", "retrieve", "regenerate", "finish")

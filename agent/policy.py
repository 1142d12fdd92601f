"""The deterministic policy: ImageRAG's pipeline as a function of the state.

generate → critique → retrieve (one query per missing concept, avoiding the failed candidate) →
regenerate with the references → critique → ... It drives `--planner fixed` on its own, and takes
the next step whenever the LLM fails to produce a usable tool call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from imgrag.candidate_ids import candidate_number
from imgrag.drawing.steering import mode_for_verdict, policy_weights
from tools.answers import can_finish, is_matched
from tools.budget import MAX_IP_SCALE, MAX_REFERENCES, rounds_spent
from tools.records import Candidate, Reference, Retrieval, Verdict

# Each guided round that still misses something pushes the references harder (up to MAX_IP_SCALE).
IP_SCALE_STEP = 0.15


def round_best(candidates: list[Candidate]) -> Candidate:
    """The best of one round's candidates: a judge match first, then the best CLIP score, then the first drawn."""
    return max(candidates, key=lambda c: (is_matched(c), c.clip_score or 0.0, -candidate_number(c.id)))


def latest_candidate(state: Mapping[str, Any]) -> Candidate | None:
    """The candidate the run works on: of the latest round's candidates (several when a round draws several,
    ``--per-round``), the first one not judged yet, so every drawing is critiqued before the run goes on; once all
    are judged (or their critique failed), the round's best (:func:`round_best`), which the repair starts from."""
    candidates = list((state.get("candidates") or {}).values())
    if not candidates:
        return None
    last = max(c.round for c in candidates)
    this_round = sorted((c for c in candidates if c.round == last), key=lambda c: candidate_number(c.id))
    waiting = [c for c in this_round if c.verdict is None
               and not failed_for(state, "critique", c.id, {"candidate_id": c.id})]
    if waiting:
        return waiting[0]
    judged = [c for c in this_round if c.verdict is not None]
    return round_best(judged) if judged else this_round[-1]


def retrieval_for(state: Mapping[str, Any], candidate_id: str) -> Retrieval | None:
    """The last retrieval made to repair this candidate."""
    for retrieval in reversed(state.get("retrievals") or []):
        if retrieval.for_ == candidate_id:
            return retrieval
    return None


def repair_queries(state: Mapping[str, Any], verdict: Verdict) -> list[str]:
    """What to retrieve for: the missing concepts, or the prompt itself when the judge's answer was
    unparseable or named nothing (ImageRAG's own fallback)."""
    missing = [m for m in verdict.missing if isinstance(m, str) and m.strip()]
    return missing if verdict.parsed and missing else [state["prompt"]]


def failed_for(state: Mapping[str, Any], tool: str, target: str | None, args: dict[str, Any] | None = None) -> bool:
    """Whether a ``tool`` call for this candidate (``target``; None: before any was drawn) failed the way this
    one would: any failure of the step itself (a model, the store, a file), or an argument refused for exactly
    these ``args`` (another seed or query is another step)."""
    def same(recorded: dict[str, Any]) -> bool:
        drop = {k: v for k, v in (args or {}).items() if v is not None}
        return args is not None and {k: v for k, v in recorded.items() if v is not None} == drop

    return any(f.tool == tool and f.target == target and (f.kind != "argument" or same(f.args))
               for f in state.get("failed_steps") or [])


def concept_mapping(state: Mapping[str, Any], retrieval: Retrieval, kept: list[str],
                    limit: int = MAX_REFERENCES) -> list[dict[str, Any]]:
    """Which reference stands for which concept in a repair: each reference under the query that found it
    (a missing concept, or its caption), concepts in the order the retrieval asked for them, then those of
    references kept from the round before. At most ``limit`` references in all, taken round robin over the
    concepts so that every concept gets one before any gets two. ``[{"concept", "reference_ids"}]``."""
    references = state.get("references") or {}
    order = list(retrieval.queries)
    groups: dict[str, list[str]] = {}
    for rid in list(dict.fromkeys(retrieval.reference_ids + kept)):
        if rid not in references:
            continue
        concept = references[rid].query or state["prompt"]
        if concept not in order:
            order.append(concept)
        groups.setdefault(concept, []).append(rid)
    taken: dict[str, list[str]] = {c: [] for c in order if groups.get(c)}
    depth, count = 0, 0
    while count < limit and any(depth < len(groups[c]) for c in taken):
        for concept in taken:
            if depth < len(groups[concept]) and count < limit:
                taken[concept].append(groups[concept][depth])
                count += 1
        depth += 1
    return [{"concept": c, "reference_ids": ids} for c, ids in taken.items()]


def reference_steering(references: Mapping[str, Reference], chosen: list[str],
                       verdict: Verdict | None) -> dict[str, list]:
    """The fixed policy's ``weights`` and ``modes`` for a guided drawing with ``chosen``.

    A reference whose record carries a weight or mode (the user's, or a remembered one) keeps it. The others
    are weighed by :func:`imgrag.drawing.steering.policy_weights` from their retrieval scores (the best one 1.0, each
    other its score relative to the best, at least 0.5), and take the mode of the judge's verdict
    (:func:`imgrag.drawing.steering.mode_for_verdict`: "style" when only the look is wrong, else "both")."""
    if not chosen:
        return {}
    records = [references.get(rid) for rid in chosen]
    scored = [float((ref.score if ref else None) or 0.0) for ref in records]
    derived = policy_weights(scored)
    mode = mode_for_verdict(verdict.model_dump() if verdict else None)
    weights = [float(w if ref is None or ref.weight is None else ref.weight)
               for ref, w in zip(records, derived, strict=True)]
    modes = [str(mode if ref is None or ref.mode is None else ref.mode) for ref in records]
    return {"weights": weights, "modes": modes}


def next_step(state: Mapping[str, Any], base_ip_scale: float, repair_with: str = "ip-adapter",
              per_round: int = 1) -> tuple[str, dict[str, Any]] | None:
    """The next tool call (name, arguments), or None when the policy has nothing left to do.

    ``per_round``: the drawings each round makes (the tools draw them; each is critiqued, and the repair goes on
    from the round's best, :func:`latest_candidate`). Round r draws on seeds ``seed + (r-1) * per_round`` onwards, so
    no two rounds share a seed.

    With ``repair_with = "omnigen"`` a repair passes ``concepts`` (:func:`concept_mapping`): each missing
    concept with the references retrieved for it, which OmniGen places in its prompt (ImageRAG-O's way).

    A step that already failed for the same candidate is never issued again: a failed retrieval (or one that
    cannot work in this run, ``retrieval_off``) is followed by a drawing without references, a failed guided
    drawing by a plain one; a failed plain drawing or critique leaves nothing to do."""
    prompt, seed = state["prompt"], state.get("seed", 0)
    rounds = state.get("rounds", 0)
    latest = latest_candidate(state)
    if latest is None:
        start = [rid for rid in (state.get("start_guidance") or {}).get("reference_ids") or []
                 if rid in (state.get("references") or {})][:MAX_REFERENCES]
        if start:  # the user's references or remembered ones (agent/memory_guide.py): round 1 is guided
            guided = {"prompt": prompt, "reference_ids": start, "ip_scale": round(base_ip_scale, 2), "seed": seed,
                      **reference_steering(state.get("references") or {}, start, None)}
            if not failed_for(state, "regenerate", None, guided):
                return "regenerate", guided
        first = {"prompt": prompt, "seed": seed}
        return None if failed_for(state, "generate", None, first) else ("generate", first)
    verdict = latest.verdict
    if verdict is None:
        ask = {"candidate_id": latest.id}
        return None if failed_for(state, "critique", latest.id, ask) else ("critique", ask)
    if can_finish(latest):  # the finish tool's own rule (tools/answers.py): a match that may be the answer
        return "finish", {"candidate_id": latest.id, "reason": "the judge reports a match"}
    if rounds_spent(state):
        return None
    retrieval = retrieval_for(state, latest.id)
    if retrieval is None:
        ask = {"queries": repair_queries(state, verdict), "avoid_candidate_id": latest.id}
        if not state.get("retrieval_off") and not failed_for(state, "retrieve", latest.id, ask):
            return "retrieve", ask
        retrieval = Retrieval(for_=latest.id)  # retrieval cannot help this candidate: draw without references
    # Keep references whose concept the judge no longer misses: they helped.
    references = state.get("references") or {}
    still_missing = set(verdict.missing)
    kept = [rid for rid in latest.reference_ids if rid in references and references[rid].query not in still_missing]
    chosen = list(dict.fromkeys(retrieval.reference_ids + kept))[:MAX_REFERENCES]
    next_seed = seed + rounds * max(1, int(per_round))
    # Guided rounds, not drawings: a round of several drawings pushes the references once.
    guided_so_far = len({c.round for c in (state.get("candidates") or {}).values() if c.reference_ids})
    scale = min(MAX_IP_SCALE, base_ip_scale + IP_SCALE_STEP * guided_so_far)
    guided = {"prompt": prompt, "reference_ids": chosen, "ip_scale": round(scale, 2), "seed": next_seed,
              **reference_steering(references, chosen, verdict)}
    if repair_with == "omnigen" and chosen:  # OmniGen has no per-reference weight or mode: each concept's own slots
        mapping = concept_mapping(state, retrieval, kept)
        chosen = [rid for c in mapping for rid in c["reference_ids"]]
        guided = {"prompt": prompt, "reference_ids": chosen, "concepts": mapping, "seed": next_seed}
    if chosen and not failed_for(state, "regenerate", latest.id, guided):
        return "regenerate", guided
    plain = {"prompt": prompt, "seed": next_seed}
    return None if failed_for(state, "generate", latest.id, plain) else ("generate", plain)

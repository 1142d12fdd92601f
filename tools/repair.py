"""Which backbone draws a picture, which reference stands for which concept, and OmniGen's drawing.

A drawing without references goes to ``generation.draw_with`` (SDXL, or OmniGen); a drawing with references (a
repair) to ``generation.repair_with``: SDXL + IP-Adapter (every reference blended into one image embedding,
ImageRAG-SD's way; drawn by :func:`tools.drawing_round.draw_round` itself) or OmniGen (each concept's references written
into the prompt where the concept is named, ImageRAG-O's way: :func:`imgrag.drawing.concept_refs.concept_prompt`, drawn
by :func:`draw_omnigen`). Either way the drawing records which reference stood for which concept, so the trace,
the candidate, its provenance and the report can say so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imgrag.drawing.concept_refs import ConceptReferences, concept_prompt, concepts_from_references
from imgrag.records.provenance import for_omnigen_drawing
from tools.context import ToolContext

BACKBONE_SDXL = "sdxl"
BACKBONE_IP_ADAPTER = "sdxl+ip-adapter"
BACKBONE_OMNIGEN = "omnigen"


@dataclass(frozen=True)
class OmniGenDrawing:
    """One OmniGen drawing: the picture, the references it used (in image-slot order: ``references[0]`` is
    ``<|image_1|>``), the concept mapping as placed, the prompt OmniGen read and the provenance document."""

    image: Any
    references: list[dict[str, Any]]
    concepts: list[dict[str, Any]]
    sent_prompt: str
    provenance: dict[str, Any]


def backbone_for(ctx: ToolContext, guided: bool) -> str:
    """The backbone that draws: ``repair_with`` for a guided drawing, ``draw_with`` for a plain one."""
    g = ctx.settings.generation
    if guided:
        return BACKBONE_OMNIGEN if g.repair_with == "omnigen" else BACKBONE_IP_ADAPTER
    return BACKBONE_OMNIGEN if g.draw_with == "omnigen" else BACKBONE_SDXL


def concepts_for(state: dict[str, Any], references: list[dict[str, Any]],
                 concepts: list[ConceptReferences] | None) -> list[ConceptReferences]:
    """The mapping of a drawing with ``references`` (records, already screened by the safety gate): ``concepts``
    as the caller gave them, keeping only references still here, then each other reference under the concept it
    was retrieved for (its ``query``)."""
    ids = [ref["id"] for ref in references]
    known = {ref["id"]: ref for ref in references}
    given = [ConceptReferences(concept=c.concept, reference_ids=[i for i in c.reference_ids if i in known])
             for c in concepts or []]
    recorded = {rid: ref.model_dump() for rid, ref in (state.get("references") or {}).items()}
    return concepts_from_references(ids, {**recorded, **known}, given,
                                    fallback=state.get("prompt") or "the prompt")


def draw_omnigen(ctx: ToolContext, *, prompt: str, seed: int, references: list[dict[str, Any]], images: list[Any],
                 concepts: list[ConceptReferences], candidate_id: str,
                 on_step: Callable[[int, int], None]) -> OmniGenDrawing:
    """Draw ``prompt`` on OmniGen (the model thread, through the manager) with each concept's references in
    place, at most ``omnigen.max_references`` of them (:func:`imgrag.drawing.concept_refs.concept_prompt`); ``images``
    are the opened pictures of ``references``, in the same order."""
    planned = concept_prompt(prompt, concepts, ctx.settings.omnigen.max_references)
    by_id = {ref["id"]: (ref, image) for ref, image in zip(references, images, strict=True)}
    inputs = [by_id[i][1] for i in planned.image_ids]
    limit = {"deadline": ctx.deadline} if ctx.deadline is not None else {}
    image = ctx.manager.run("omnigen", lambda omnigen: omnigen.generate(
        planned.text, seed=seed, input_images=inputs or None, on_step=on_step, **limit))
    # OmniGen has no per-reference weight or style/content mode: its records do not claim one.
    used = [{k: v for k, v in by_id[i][0].items() if k not in ("weight", "mode")} for i in planned.image_ids]
    placed = planned.mapping() if references else []
    provenance = for_omnigen_drawing(ctx.settings, prompt=prompt, sent_prompt=planned.text, seed=seed,
                                     references=used, concepts=placed, run_id=ctx.record.dir.name,
                                     candidate_id=candidate_id)
    return OmniGenDrawing(image, used, placed, planned.text, provenance)

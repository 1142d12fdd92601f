"""Which backbone draws a picture, and with which concept -> reference mapping.

A drawing without references goes to ``generation.draw_with`` (SDXL, or OmniGen); a drawing with references (a
repair) to ``generation.repair_with``: SDXL + IP-Adapter (every reference blended into one image embedding,
ImageRAG-SD's way) or OmniGen (each concept's references written into the prompt where the concept is named,
ImageRAG-O's way: :func:`imgrag.concept_refs.concept_prompt`). Either way the drawing records which reference
stood for which concept, so the trace, the candidate, its provenance and the report can say so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imgrag.concept_refs import ConceptPrompt, ConceptReferences, concept_prompt, concepts_from_references
from imgrag.provenance import for_drawing, for_omnigen_drawing
from tools.context import ToolContext

BACKBONE_SDXL = "sdxl"
BACKBONE_IP_ADAPTER = "sdxl+ip-adapter"
BACKBONE_OMNIGEN = "omnigen"


@dataclass(frozen=True)
class Drawing:
    """One drawing's result: the picture, what drew it, the references it used (in OmniGen's image-slot order),
    the concept mapping as placed, the in-context prompt (OmniGen only) and the provenance document."""

    image: Any
    backbone: str
    references: list[dict[str, Any]]
    concepts: list[dict[str, Any]]
    sent_prompt: str | None
    provenance: dict[str, Any]


def backbone_for(ctx: ToolContext, guided: bool) -> str:
    """The backbone that draws: ``repair_with`` for a guided drawing, ``draw_with`` for a plain one."""
    g = ctx.settings.generation
    if guided:
        return BACKBONE_OMNIGEN if g.repair_with == "omnigen" else BACKBONE_IP_ADAPTER
    return BACKBONE_OMNIGEN if g.draw_with == "omnigen" else BACKBONE_SDXL


def draw(ctx: ToolContext, state: dict[str, Any], *, prompt: str, seed: int, references: list[dict[str, Any]],
         images: list[Any], ip_scale: float | None, concepts: list[ConceptReferences] | None, candidate_id: str,
         on_step: Callable[[int, int], None]) -> Drawing:
    """Draw ``prompt`` with ``references`` (records, already screened) and their opened ``images`` on the backbone
    :func:`backbone_for` picks, on the model thread. ``concepts`` is the mapping the caller gave (None: each
    reference stands for the concept it was retrieved for)."""
    ids = [ref.get("id") or ref["path"] for ref in references]
    known = {i: ref for i, ref in zip(ids, references, strict=True)}
    # Only references that are still here after the safety gate can stand for a concept.
    given = [ConceptReferences(concept=c.concept, reference_ids=[i for i in c.reference_ids if i in known])
             for c in concepts or []]
    mapping = concepts_from_references(ids, {**(state.get("references") or {}), **known}, given)
    backbone = backbone_for(ctx, bool(references))
    limit = {"deadline": ctx.deadline} if ctx.deadline is not None else {}
    run_id = ctx.record.dir.name
    if backbone == BACKBONE_OMNIGEN:
        planned: ConceptPrompt = concept_prompt(prompt, mapping, ctx.settings.omnigen.max_references)
        inputs = [images[ids.index(i)] for i in planned.image_ids]
        image = ctx.manager.run("omnigen", lambda omnigen: omnigen.generate(
            planned.text, seed=seed, input_images=inputs or None, on_step=on_step, **limit))
        used = [known[i] for i in planned.image_ids]
        placed = planned.mapping()
        provenance = for_omnigen_drawing(ctx.settings, prompt=prompt, sent_prompt=planned.text, seed=seed,
                                         references=used, concepts=placed, run_id=run_id, candidate_id=candidate_id)
        return Drawing(image, backbone, used, placed, planned.text, provenance)
    image = ctx.manager.run("generator", lambda generator: generator.generate(
        prompt, seed=seed, references=images or None, ip_scale=ip_scale, on_step=on_step, **limit))
    # IP-Adapter takes every reference into one embedding: each stands for its concept only in the record.
    placed = [c.to_dict() for c in mapping] if references else []
    provenance = for_drawing(ctx.settings, prompt=prompt, seed=seed, references=references, ip_scale=ip_scale,
                             run_id=run_id, candidate_id=candidate_id, concepts=placed or None,
                             backbone=backbone)
    return Drawing(image, backbone, references, placed, None, provenance)

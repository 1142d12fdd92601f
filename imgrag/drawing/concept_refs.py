"""Which reference stands for which concept, and the in-context prompt that says so.

:class:`ConceptReferences` is the record: one concept (a phrase the judge said was missing, or the caption the
store was searched with) and the store ids of the references that show it, in order. A drawing's mapping is a
list of them, in concept order. The agent's ``regenerate`` tool takes it, the fixed policy builds it from the
retrieval's per-concept results, and the trace, each candidate, its picture's provenance and the report carry it
(``[{"concept": "a red fox", "reference_ids": ["3f2a…"]}, …]``).

:func:`concept_prompt` turns a mapping into OmniGen's multimodal prompt the way ImageRAG-O does
(rotem-shalev/ImageRAG, ``imageRAG_OmniGen.py``; read in the fork Tonkic/ImageRAG at commit 0a0bb09)::

    According to these images of {caption 1}: <img><|image_1|></img>, {caption 2}: <img><|image_2|></img>,
    generate {prompt}

ImageRAG-O retrieves one picture per caption and keeps the first three ("can use up to 3 images in prompt with
omnigen"). Here a concept may have several references; the cap (``omnigen.max_references``, 3) is filled round
robin in concept order, so every concept gets its first reference before any gets a second. With at most one
reference per concept that is exactly ImageRAG-O's "first k". A concept without references is named by the prompt
itself, as in ImageRAG-O, and left out of the image list; the plan records why. The templates are
``prompts/omnigen_repair.md`` and ``prompts/omnigen_example.md``.

Text imgrag did not write (the prompt, concepts, captions) reaches OmniGen as content: OmniGen's processor reads
``<|image_N|>`` anywhere in the text as an image slot and Phi-3's tokenizer reads ``<|user|>``, ``<|end|>`` as
control tokens, so :func:`as_content` breaks every ``<|``/``|>`` pair and drops ``<img>`` tags in such text first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

import prompts

MAX_CONCEPT_CHARS = 200
PLACEHOLDER = "<img><|image_{index}|></img>"  # OmniGen's image slot; numbered from 1 in input_images order

Concept = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_CONCEPT_CHARS)]


class ConceptReferences(BaseModel):
    """One concept and the references that show it (store ids, in order; may be empty).

    The shape other records and tools share: ``{"concept": str, "reference_ids": [str, ...]}``. Unknown keys are
    refused, so a caller's typo is an error, not a silently ignored field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    concept: Concept
    reference_ids: list[str] = Field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The plain form kept in the graph's state, the trace and provenance."""
        return {"concept": self.concept, "reference_ids": list(self.reference_ids)}


class ConceptMapError(ValueError):
    """A mapping that cannot be read (not a list of {concept, reference_ids}); the message is one line."""


def parse_concepts(raw: Any) -> list[ConceptReferences]:
    """A mapping from what a caller wrote (a list of dicts or records) as records; duplicates of one concept are
    merged in first-seen order. Raises :class:`ConceptMapError` naming the first bad entry."""
    if raw is None:
        return []
    if not isinstance(raw, (list, tuple)):
        raise ConceptMapError(f"concepts must be a list of {{concept, reference_ids}}, got {type(raw).__name__}")
    records: list[ConceptReferences] = []
    for number, entry in enumerate(raw, 1):
        try:
            records.append(entry if isinstance(entry, ConceptReferences) else ConceptReferences.model_validate(entry))
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(p) for p in error["loc"]) or "entry"
            raise ConceptMapError(f"concepts entry {number}: {where}: {error['msg']}") from None
    return merge_concepts(records)


def merge_concepts(records: list[ConceptReferences]) -> list[ConceptReferences]:
    """One record per concept (case and spacing ignored), references in first-seen order, none twice."""
    merged: dict[str, tuple[str, list[str]]] = {}
    for record in records:
        key = " ".join(record.concept.lower().split())
        name, ids = merged.setdefault(key, (record.concept, []))
        ids.extend(i for i in record.reference_ids if i not in ids)
    return [ConceptReferences(concept=name, reference_ids=ids) for name, ids in merged.values()]


def concepts_from_references(reference_ids: list[str], references: dict[str, dict[str, Any]],
                             concepts: list[ConceptReferences] | None = None,
                             fallback: str = "the prompt") -> list[ConceptReferences]:
    """The mapping for a drawing: ``concepts`` as given, then every id of ``reference_ids`` no concept names, under
    the concept it was retrieved for (its ``query``; ``fallback`` when it has none). ``references`` is the run's
    store id -> reference record map."""
    given = list(concepts or [])
    named = {i for c in given for i in c.reference_ids}
    extra = [ConceptReferences(concept=(references.get(i) or {}).get("query") or fallback, reference_ids=[i])
             for i in reference_ids if i not in named]
    return merge_concepts(given + extra)


def as_content(text: str) -> str:
    """``text`` with nothing OmniGen's processor or tokenizer would read as markup: ``<img>``/``</img>`` dropped,
    every ``<|`` and ``|>`` broken apart (so ``<|image_2|>`` and ``<|end|>`` stay text), whitespace collapsed."""
    text = re.sub(r"</?img>", " ", str(text), flags=re.IGNORECASE)
    text = text.replace("<|", "< |").replace("|>", "| >")
    return " ".join(text.split())


@dataclass(frozen=True)
class PlacedConcept:
    """One concept as the drawing used it: its references that made it into the prompt and their image slots
    (1-based ``<|image_N|>`` numbers), and those left out with why."""

    concept: str
    reference_ids: list[str]
    images: list[int]
    left_out: list[dict[str, str]] = field(default_factory=list)  # {"reference_id", "why"}

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"concept": self.concept, "reference_ids": self.reference_ids, "images": self.images}
        if self.left_out:
            doc["left_out"] = self.left_out
        if not self.reference_ids and not self.left_out:
            doc["note"] = "no reference: named by the prompt only"
        return doc


@dataclass(frozen=True)
class ConceptPrompt:
    """The in-context prompt of one drawing: its ``text``, the reference ids in image-slot order (``image_ids[0]``
    is ``<|image_1|>``) and, per concept, what was placed."""

    text: str
    image_ids: list[str]
    concepts: list[PlacedConcept]

    def mapping(self) -> list[dict[str, Any]]:
        """The concept -> reference record of this drawing, as kept in the trace, the candidate and provenance."""
        return [c.to_dict() for c in self.concepts]


def concept_prompt(prompt: str, concepts: list[ConceptReferences], max_images: int) -> ConceptPrompt:
    """ImageRAG-O's prompt for ``prompt`` with each concept's references in place (see the module docstring).

    ``concepts`` in order; at most ``max_images`` references over all of them, filled round robin in concept
    order; a reference named twice is used once (for its first concept). No reference at all: the plain prompt
    (OmniGen then draws text-to-image). Raises ValueError for ``max_images < 1`` or an empty prompt."""
    if max_images < 1:
        raise ValueError(f"max_images must be at least 1, got {max_images}")
    text = as_content(prompt)
    if not text:
        raise ValueError("the prompt is empty: say what to draw")
    seen: set[str] = set()
    queues: list[list[str]] = []
    duplicates: list[list[dict[str, str]]] = []
    for c in concepts:
        own = [i for i in c.reference_ids if i not in seen]
        seen.update(own)
        queues.append(own)
        duplicates.append([{"reference_id": i, "why": "already stands for an earlier concept"}
                           for i in c.reference_ids if i not in own])
    placed: list[list[str]] = [[] for _ in concepts]
    order: list[tuple[int, str]] = []  # (concept index, reference id) in image-slot order, filled round robin
    depth = 0
    while len(order) < max_images and any(depth < len(q) for q in queues):
        for index, queue in enumerate(queues):
            if depth < len(queue) and len(order) < max_images:
                order.append((index, queue[depth]))
        depth += 1
    # Slots are numbered concept by concept so that each concept's placeholders read in order in the prompt.
    order.sort(key=lambda pair: pair[0])
    image_ids: list[str] = []
    slots: list[list[int]] = [[] for _ in concepts]
    for index, ref in order:
        image_ids.append(ref)
        placed[index].append(ref)
        slots[index].append(len(image_ids))
    records: list[PlacedConcept] = []
    examples: list[str] = []
    for index, c in enumerate(concepts):
        over = [{"reference_id": i, "why": f"over the cap of {max_images} input images"}
                for i in queues[index] if i not in placed[index]]
        records.append(PlacedConcept(c.concept, placed[index], slots[index], duplicates[index] + over))
        if slots[index]:
            images = " and ".join(PLACEHOLDER.format(index=n) for n in slots[index])
            examples.append(prompts.render("omnigen_example", concept=as_content(c.concept), images=images).strip())
    if not examples:
        return ConceptPrompt(text, [], records)
    rendered = prompts.render("omnigen_repair", examples=", ".join(examples), prompt=text).strip()
    return ConceptPrompt(rendered, image_ids, records)

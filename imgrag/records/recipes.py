"""Reading a recipe back (``imgrag generate --from-image``): the provenance document a picture carries
(:mod:`imgrag.records.provenance`), read strictly through :class:`Recipe`. The picture's metadata is untrusted
input: anyone can write it, so every field is typed and every number bounded as the command line's flags are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from imgrag.drawing.draw_options import check_guidance
from imgrag.drawing.loras import MAX_LORA_WEIGHT, check_name
from imgrag.drawing.steering import check_mode, check_weight
from imgrag.errors import UserError, check_seed
from imgrag.file_names import FilePath
from imgrag.records.provenance import read_provenance
from imgrag.settings import MAX_IP_SCALE, check_drawing_bounds
from imgrag.text import shorten


class RecipeReference(BaseModel):
    """One reference of a recipe, as :func:`imgrag.records.provenance.reference_entries` writes it."""

    model_config = ConfigDict(extra="ignore", strict=True)

    path: FilePath
    id: str | None = None
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = None
    weight: float = 1.0
    mode: str = "both"


class RecipeLora(BaseModel):
    """One LoRA of a recipe, as :func:`imgrag.records.provenance.lora_entries` writes it."""

    model_config = ConfigDict(extra="ignore", strict=True)

    path: FilePath
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = None
    weight: float = 1.0
    name: str = ""


class RecipeGeneratorFile(BaseModel):
    """The single-file checkpoint a recipe was drawn with, as
    :func:`imgrag.records.provenance.generator_file_entry` writes it."""

    model_config = ConfigDict(extra="ignore", strict=True)

    path: FilePath
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = None
    config: str = ""


class RecipeConcept(BaseModel):
    """One concept of an OmniGen recipe and the references that stood for it (the ``concepts`` field)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    concept: str
    reference_ids: list[str] = Field(default_factory=list)


class Recipe(BaseModel):
    """A picture's provenance document (:data:`imgrag.records.provenance.SCHEMA`) read strictly: what
    ``--from-image`` redraws from.

    Accepts what :func:`imgrag.records.provenance.describe` writes for SDXL and OmniGen drawings (``backbone``,
    ``concepts``, ``omnigen``, references with a store ``id``); fields it does not use are ignored, the ones it uses
    must have their type. The numbers are bounded by :meth:`check_bounds` with the same checks as the command line's
    flags."""

    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)

    schema_id: Literal["imgrag.records.provenance/1"] = Field(alias="schema")
    prompt: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    ip_scale: float | None = None
    fast: str | None = None
    profile: str | None = None
    references: list[RecipeReference] = Field(default_factory=list)
    loras: list[RecipeLora] = Field(default_factory=list)
    backbone: str | None = None  # "omnigen", "sdxl+ip-adapter", ...: what drew it
    concepts: list[RecipeConcept] | None = None
    omnigen: dict[str, Any] | None = None
    generator_file: RecipeGeneratorFile | None = None

    def check_bounds(self, generation: Any, where: str) -> None:
        """Raise a UserError starting with ``where`` (``"PICTURE's recipe"``) for a value the command line would
        refuse as a flag: the seed range, ``generation.max_side``/``max_steps``, sides in multiples of 8, at least
        one step, ``ip_scale`` within 0..MAX_IP_SCALE, the guidance range
        (:func:`imgrag.drawing.draw_options.check_guidance`), a known fast mode, and each reference's weight and
        mode."""
        if self.seed is not None:
            check_seed(self.seed, f"{where}: seed")
        try:
            check_drawing_bounds(self.width, self.height, self.steps, generation)
        except ValueError as exc:
            raise UserError(f"{where}: {exc}") from None
        for name, value in (("width", self.width), ("height", self.height)):
            if value is not None and (value < 8 or value % 8):
                raise UserError(f"{where}: {name} must be a positive multiple of 8, got {value}")
        if self.steps is not None and self.steps < 1:
            raise UserError(f"{where}: steps must be at least 1, got {self.steps}")
        if self.ip_scale is not None and not 0.0 <= self.ip_scale <= MAX_IP_SCALE:
            raise UserError(f"{where}: ip_scale must be within 0..{MAX_IP_SCALE:g}, got {self.ip_scale}")
        check_guidance(self.guidance, f"{where}: guidance")
        if self.fast is not None and self.fast not in ("off", "lcm-lora", "distilled"):
            raise UserError(f"{where}: fast must be off, lcm-lora or distilled, got {self.fast!r}")
        for n, ref in enumerate(self.references, 1):
            check_weight(ref.weight, f"{where}: reference {n}'s weight")
            check_mode(ref.mode, f"{where}: reference {n}'s mode")
        for n, lora in enumerate(self.loras, 1):
            if not abs(lora.weight) <= MAX_LORA_WEIGHT:
                raise UserError(f"{where}: LoRA {n}'s weight must be within -{MAX_LORA_WEIGHT:g}..{MAX_LORA_WEIGHT:g}, "
                                f"got {lora.weight}")
            try:
                check_name(lora.name, f"{where}: LoRA {n}'s name")
            except ValueError as exc:
                raise UserError(str(exc)) from None


def _recipe_error(exc: ValidationError, where: str) -> str:
    """The first schema error of a recipe as one line: the field (references counted from 1, as the command line
    counts them) and what is wrong with it."""
    error = exc.errors()[0]
    loc = [str(p) for p in error.get("loc", ())]
    kind = error.get("type")
    owner, field_name = "", ".".join(loc) or "the document"
    if len(loc) >= 2 and loc[0] == "references" and loc[1].isdigit():
        owner, field_name = f"reference {int(loc[1]) + 1}", ".".join(loc[2:])
        if not field_name and kind in ("model_type", "model_attributes_type", "dict_type"):
            got = type(error.get("input")).__name__
            return f"{where}: {owner} must be an object {{\"path\", \"sha256\", ...}}, got a {got}"
    if kind == "missing":
        return f"{where}: {owner} has no {field_name}" if owner else f"{where}: it has no {field_name}"
    value = error.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    shown = shorten(shown, 80, collapse=False)
    label = f"{owner}'s {field_name}" if owner and field_name else owner or field_name
    return f"{where}: {label}: {error.get('msg', 'invalid').lower()} (got {shown})"


def read_recipe(picture: str | Path) -> Recipe | None:
    """The recipe embedded in ``picture`` read through :class:`Recipe`, or None when it carries no imgrag
    provenance. Raises a one-line UserError naming the picture's recipe as the source of a bad value (a reference
    given as a string, no prompt, a wrong type); bounds are :meth:`Recipe.check_bounds`'s."""
    doc = read_provenance(picture)
    if doc is None:
        return None
    where = f"{picture}'s recipe"
    try:
        return Recipe.model_validate(doc)
    except ValidationError as exc:
        raise UserError(_recipe_error(exc, where)) from None

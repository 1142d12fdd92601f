"""``--from-image PICTURE``: reading the recipe a picture imgrag drew carries, as untrusted input.

A recipe (the provenance in the picture's metadata, see :mod:`imgrag.records.provenance`) names the prompt, seed,
steps, size, references, LoRAs, scheduler, backbone and checkpoint that drew the picture. Each reader here takes
one part of it, checks it as the matching flag would be checked (types, bounds, files still there with the same
sha256, the safety gate), and raises a one-line UserError naming the picture's recipe when it does not hold.
``generate --from-image`` combines them; a flag given beside the picture replaces the recipe's value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.frontends.cli.common import err, prepare_models
from agent.memory_guide import check_user_references
from imgrag.drawing.draw_options import parse_options
from imgrag.drawing.loras import LoraChoice, check_lora_file, stem_name
from imgrag.drawing.steering import ReferenceSteer
from imgrag.errors import UserError
from imgrag.images import open_image
from imgrag.management.engine import build_manager
from imgrag.models.safety import SafetyGate
from imgrag.records.provenance import checkpoint_sha256, file_sha256, read_provenance
from imgrag.records.recipes import read_recipe
from imgrag.text import shorten


def screen_recipe_references(settings: Any, picture: Path, paths: list[Path]) -> None:
    """The safety gate on the references a picture's recipe names (the user did not choose them here): each is
    embedded and checked against ``safety.concepts`` like a drawing's references in a run; a flagged one is a
    one-line UserError naming the picture's recipe. Only called when ``safety.enabled``."""
    prepare_models(settings)
    manager = build_manager(settings)

    class _Texts:  # what SafetyGate needs of an embedder: the concepts' text vectors, on the model thread
        model_id = "embedder"

        @staticmethod
        def embed_texts(texts: list[str]) -> Any:
            return manager.run("embedder", lambda e: e.embed_texts(texts))

    images = [open_image(path) for path in paths]
    vectors = manager.run("embedder", lambda e: e.embed_images(images))
    for path, flag in zip(paths, SafetyGate(settings.safety, _Texts()).check(vectors), strict=True):
        if flag is not None:
            raise UserError(f"{picture}'s recipe: its reference {path} is flagged by the safety gate as "
                            f"{flag.concept!r} (similarity {flag.score:.3f}); pass --ref to draw with others")


def recipe_drawing(picture: Path) -> tuple[str | None, str | None]:
    """The negative prompt and scheduler choice a picture's provenance names, checked as a flag would be (a recipe
    is untrusted input): a scheduler outside the list or a negative prompt that is not text is one UserError naming
    the picture. (None, None) for a picture drawn before recipes kept them."""
    doc = read_provenance(picture) or {}
    given = {k: doc[k] for k in ("negative_prompt", "scheduler") if doc.get(k) is not None}
    checked = parse_options(given, f"{picture}'s recipe")
    return (checked.negative_prompt if "negative_prompt" in given else None,
            checked.scheduler if "scheduler" in given else None)


def recipe_loras(picture: Path) -> tuple[Any, ...]:
    """The LoRAs a picture's recipe drew with, as :class:`~imgrag.drawing.loras.LoraChoice` records.

    Each file is checked as a ``--lora`` would be and against the sha256 the recipe kept: a LoRA that vanished or
    changed since is one UserError naming the picture's recipe (``--lora`` with the same name or file replaces its
    weight; ``--lora none`` drops them). () for a recipe without LoRAs."""
    recipe = read_recipe(picture)
    where = f"{picture}'s recipe: LoRA"
    chosen = []
    for entry in recipe.loras if recipe is not None else []:
        path = check_lora_file(entry.path, where)
        if entry.sha256 and checkpoint_sha256(path) != entry.sha256:
            raise UserError(f"{where} {path} has changed since (sha256 differs); pass --lora none and --lora "
                            f"{path}:{entry.weight:g} to draw with it as it is now")
        try:
            chosen.append(LoraChoice(path=path, weight=entry.weight,
                                     name="" if entry.name == stem_name(path) else entry.name))
        except ValidationError as exc:
            raise UserError(f"{where} {path}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    return tuple(chosen)


def recipe_generator(picture: Path) -> dict[str, str]:
    """The settings that redraw ``picture`` with the single-file checkpoint its recipe names (``generator_file``:
    ``models.generator`` and ``models.generator_config``), or {} when a folder or hub id drew it. The file must still
    be there with the same sha256 (:func:`imgrag.records.provenance.checkpoint_sha256`); otherwise one UserError
    naming the picture's recipe and saying how to redraw with another checkpoint."""
    recipe = read_recipe(picture)
    entry = recipe.generator_file if recipe is not None else None
    if entry is None:
        return {}
    where, path = f"{picture}'s recipe", Path(entry.path)
    instead = "give --config with models.generator to redraw it with another checkpoint"
    if not path.is_file():
        raise UserError(f"{where}: it was drawn by the single-file checkpoint {path}, which is no longer there; "
                        f"{instead}")
    if entry.sha256 and checkpoint_sha256(path) != entry.sha256:
        raise UserError(f"{where}: its checkpoint {path} has changed since (sha256 differs); {instead}")
    return {"models.generator": str(path), **({"models.generator_config": entry.config} if entry.config else {})}


def recipe_backbone(picture: Path) -> str | None:
    """The backbone a picture's provenance names ("omnigen", "sdxl+ip-adapter", ...), or None."""
    try:
        doc = read_provenance(picture) or {}
    except Exception:  # an unreadable recipe: from_provenance says why, in one line
        return None
    backbone = doc.get("backbone") if isinstance(doc, dict) else None
    return backbone if isinstance(backbone, str) else None


def recipe_concepts(picture: Path) -> list[str] | None:
    """The concept each of an OmniGen picture's references stood for, in the recipe's reference order; None when
    the recipe has no complete mapping (each reference then stands for the whole prompt)."""
    try:
        doc = read_provenance(picture) or {}
    except Exception:
        return None
    by_id: dict[str, str] = {}
    for entry in doc.get("concepts") or []:
        if isinstance(entry, dict) and isinstance(entry.get("concept"), str):
            for ref_id in entry.get("reference_ids") or []:
                if isinstance(ref_id, str):
                    by_id.setdefault(ref_id, entry["concept"])
    refs = [r for r in doc.get("references") or [] if isinstance(r, dict)]
    named = [by_id.get(r.get("id")) for r in refs]
    return named if refs and all(isinstance(n, str) for n in named) else None


def from_provenance(picture: Path, prompt: str | None, ref: list[tuple[Path, ReferenceSteer]] | None,
                    seed: int | None, steps: int | None, fast: str | None, ip_scale: float | None,
                    width: int | None, height: int | None, *, settings: Any, guidance: float | None = None) -> tuple:
    """The drawing values of ``picture``'s recipe (its provenance), each replaced by the flag the user gave for it.

    The recipe is untrusted input: it is read through :class:`imgrag.records.recipes.Recipe` (types, a prompt),
    held to the command line's bounds under ``settings`` (:meth:`~imgrag.records.recipes.Recipe.check_bounds`), and
    each of its references goes through the same check as a batch line's (missing, not a picture,
    ``safety.exclude``; see :func:`agent.memory_guide.check_user_references`). Every error is one UserError naming
    the picture's recipe as the source: no provenance, a bad field, a value past a bound, a reference that
    vanished, changed since (its sha256 differs) or is excluded. A PROMPT given beside the picture replaces the
    recipe's prompt, and a note on stderr says so (a positional argument is easy to leave in by accident).

    Returns (prompt, references, seed, steps, guidance, fast, ip_scale, width, height)."""
    recipe = read_recipe(picture)
    if recipe is None:
        raise UserError(f"{picture}: carries no imgrag provenance (not drawn by imgrag, or its metadata was "
                        "stripped); give the prompt and settings instead")
    where = f"{picture}'s recipe"
    if prompt is not None and prompt != recipe.prompt:
        err.print(f"note: drawing the PROMPT given, not the recipe's own ({shorten(recipe.prompt, 60)!r}); "
                  "leave PROMPT out to redraw the picture as it was", markup=False)
    flags = {"seed": seed, "steps": steps, "fast": fast, "ip_scale": ip_scale, "width": width, "height": height,
             "guidance": guidance}
    # Only what the drawing will use is held to the bounds: a flag given beside the picture replaces its value.
    used = recipe.model_copy(update={k: None for k, v in flags.items() if v is not None}
                             | ({"references": []} if ref is not None else {}))
    used.check_bounds(settings.generation, where)
    if ref is None:
        ref = []
        for entry in recipe.references:
            path = Path(entry.path)
            if not path.exists():
                raise UserError(f"{where}: its reference {path} no longer exists; pass --ref to replace it")
            if entry.sha256 and file_sha256(path) != entry.sha256:
                raise UserError(f"{where}: its reference {path} has changed since (sha256 differs); "
                                "pass --ref to use it anyway")
            ref.append((path, ReferenceSteer(entry.weight, entry.mode)))
        check_user_references([{"path": str(path), "weight": s.weight, "mode": s.mode} for path, s in ref],
                              settings, where=where)
    return (recipe.prompt if prompt is None else prompt, ref,
            recipe.seed if seed is None else seed, recipe.steps if steps is None else steps,
            recipe.guidance if fast is None else None, recipe.fast if fast is None else fast,
            recipe.ip_scale if ip_scale is None else ip_scale,
            recipe.width if width is None else width, recipe.height if height is None else height)

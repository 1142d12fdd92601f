"""Provenance: every picture imgrag writes says how it was made, inside the file itself.

A PNG carries two text chunks (``tEXt``/``iTXt``, written with Pillow's ``PngInfo``):

- ``imgrag``: one JSON document (:data:`SCHEMA`): the prompt, negative prompt, seed, steps, guidance, size,
  adapter scale, fast mode and scheduler (the choice, ``scheduler``, "" for the checkpoint's own, and what drew,
  ``sampler``); for a round of several drawings its batch (size and place); the model ids that drew it; the
  imgrag version; the run and candidate ids; for a single-file checkpoint as the generator, ``generator_file``
  (its path, sha256 and the configuration folder it was read with); for a guided picture, the path, store id and
  sha256 of every reference photo that steered it; and the path, sha256, weight and name of every LoRA it was drawn
  with (``loras``). ``imgrag generate --from-image`` reads it back and redraws.
- ``parameters``: the same settings as one human-readable line in the style AUTOMATIC1111 and ComfyUI users
  know (``prompt <lora:name:0.8>\\nNegative prompt: ...\\nSteps: 30, Sampler: Euler, CFG scale: 5, Seed: 7,
  Size: 1024x1024, Model: ...``), for tools that show it. LoRAs are written into the prompt text as A1111 users
  type them there (``<lora:NAME:WEIGHT>``).

A JPEG or WebP has no text chunks; the JSON goes into its EXIF ``ImageDescription`` tag instead. Writing goes
through :func:`imgrag.atomic_files.atomic_path`, so the metadata arrives with the picture or not at all.

What it cannot do: metadata is not a signature. Anyone can strip it (most sites do on upload) or write false
metadata; it records how imgrag made a picture, it does not prove it.

Reading a recipe back strictly (``imgrag generate --from-image``) is :mod:`imgrag.records.recipes`.
"""

from __future__ import annotations

import hashlib
import json
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from imgrag.atomic_files import atomic_path, write_json_atomic
from imgrag.drawing.loras import settings_loras
from imgrag.errors import UserError
from imgrag.file_names import display_name, is_text_name
from imgrag.images import open_image, probe_image, reading_image
from imgrag.models.fast import draw_plan
from imgrag.settings import imgrag_home
from imgrag.weights.single_file import find_single_file

PROVENANCE_KEY = "imgrag"
PARAMETERS_KEY = "parameters"
SCHEMA = "imgrag.records.provenance/1"
# EXIF ImageDescription: the one free-text tag every reader keeps for JPEG and WebP.
_EXIF_DESCRIPTION = 0x010E


def imgrag_version() -> str:
    """The installed imgrag's version (package metadata), or ``"unknown"`` when run from a bare checkout."""
    try:
        return version("imgrag")
    except PackageNotFoundError:
        return "unknown"


def file_sha256(path: str | Path) -> str | None:
    """sha256 of a file's bytes (hex), or None when it cannot be read (a reference that vanished since)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


# sha256 of checkpoint files already hashed, by resolved path, size and modification time (a real SDXL file is ~7 GB,
# all of which hashing reads): kept under IMGRAG_HOME as A1111 keeps its cache.json of model hashes.
HASH_CACHE_NAME = "checkpoint_hashes.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def checkpoint_sha256(path: str | Path) -> str | None:
    """sha256 of a checkpoint file (:func:`file_sha256`), hashed once per file version: the digest is kept in
    ``IMGRAG_HOME/checkpoint_hashes.json`` beside the file's size and modification time, and hashed again when either
    changed. None when the file cannot be read. A cache that is not what imgrag writes is ignored and rewritten."""
    try:
        resolved = Path(path).expanduser().resolve()
        stat = resolved.stat()
    except OSError:
        return None
    key = str(resolved)
    cache_path = imgrag_home() / HASH_CACHE_NAME
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    entry = cache.get(key)
    if (isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns
            and isinstance(entry.get("sha256"), str) and _SHA256.match(entry["sha256"])):
        return entry["sha256"]
    digest = file_sha256(resolved)
    if digest is None:
        return None
    cache = {k: v for k, v in cache.items() if isinstance(k, str) and isinstance(v, dict)}
    cache[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache_path, cache)
    except OSError:
        pass  # a read-only home: the digest is still right, only hashed again next time
    return digest


def generator_file_entry(settings: Any) -> dict[str, Any] | None:
    """``{"path", "sha256", "config"}`` of a single-file generator (:mod:`imgrag.weights.single_file`): the checkpoint
    file (absolute, resolved) and its hash, and the configuration it was read with; None for a folder or hub id."""
    try:
        path = find_single_file(settings.models.generator)
    except UserError:
        return None
    if path is None:
        return None
    return {"path": absolute_path(path), "sha256": checkpoint_sha256(path), "config": settings.models.generator_config}


def absolute_path(path: str | Path) -> str:
    """``path`` made absolute and resolved (``~`` expanded, links and ``..`` followed), so a recipe read from another
    folder finds the same file."""
    return str(Path(path).expanduser().resolve())


def reference_entries(references: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``[{"path", "id", "sha256"}]`` for references given as dicts with a ``path`` (and a store ``id`` when
    they came from the store), plus ``weight`` and ``mode`` (imgrag.drawing.steering) where the reference has them. The
    path is stored absolute and resolved (:func:`absolute_path`); the hash is of the file's bytes as they are now,
    when the picture is drawn."""
    return [{"path": absolute_path(ref["path"]), "id": ref.get("id"), "sha256": file_sha256(ref["path"]),
             **{k: ref[k] for k in ("weight", "mode") if ref.get(k) is not None}} for ref in references]


def lora_entries(loras: list[Any]) -> list[dict[str, Any]]:
    """What a picture's provenance keeps of each LoRA it was drawn with (:class:`imgrag.drawing.loras.LoraChoice`
    records):
    ``{"path", "sha256", "weight", "name"}``, ``name`` the one its A1111 line shows, in the order given. A LoRA is
    hundreds of MB: its hash is :func:`checkpoint_sha256`'s, computed once per file version."""
    return [{"path": c.path, "sha256": checkpoint_sha256(c.path), "weight": float(c.weight), "name": c.label}
            for c in loras]


def recipe_profile(picture: str | Path) -> str | None:
    """The profile a picture's provenance names (``"tiny"``, ``"default"``), or None when it carries none: what
    ``imgrag generate --from-image`` loads when no ``--profile`` is given."""
    try:
        doc = read_provenance(picture)
    except Exception:  # an unreadable picture: the recipe reader says why, in one line
        return None
    profile = (doc or {}).get("profile")
    return profile if isinstance(profile, str) and profile else None


def describe(settings: Any, *, prompt: str, seed: int, steps: int, guidance: float, width: int, height: int,
             ip_scale: float | None = None, fast: str = "off", references: list[dict[str, Any]] | None = None,
             run_id: str | None = None, candidate_id: str | None = None, negative_prompt: str = "",
             scheduler: str = "", sampler: str | None = None, loras: list[dict[str, Any]] | None = None,
             **extra: Any) -> dict[str, Any]:
    """The provenance document of one drawing (see the module docstring for its fields).

    ``settings`` is an :class:`imgrag.settings.Settings` (for the model ids and profile); ``references`` come
    from :func:`reference_entries`, ``loras`` from :func:`lora_entries`. ``ip_scale`` is kept only for
    a guided drawing (it does nothing otherwise)."""
    m = settings.models
    refs = list(references or [])
    models: dict[str, str] = {"generator": m.generator}
    generator_file = generator_file_entry(settings) if "models" not in extra else None  # an OmniGen drawing: none
    if generator_file is not None:
        models["generator"] = generator_file["path"]
    if refs:
        models["ip_adapter"] = f"{m.ip_adapter}/{m.ip_adapter_subfolder}/{m.ip_adapter_weight}"
    if fast == "lcm-lora":
        models["lcm_lora"] = m.lcm_lora
    doc: dict[str, Any] = {
        "schema": SCHEMA, "prompt": prompt, "seed": int(seed), "steps": int(steps), "guidance": float(guidance),
        "width": int(width), "height": int(height), "ip_scale": float(ip_scale) if refs and ip_scale is not None
        else None, "fast": fast, "models": models, "profile": settings.profile, "imgrag_version": imgrag_version(),
        "run_id": run_id, "candidate_id": candidate_id, "references": refs,
        "negative_prompt": negative_prompt or "", "scheduler": scheduler or "", "sampler": sampler,
        "loras": list(loras or []),
    }
    if generator_file is not None:
        doc["generator_file"] = generator_file
    doc.update({k: v for k, v in extra.items() if v is not None})
    return doc


def parameters_line(doc: dict[str, Any]) -> str:
    """The AUTOMATIC1111-style summary: the prompt, a ``Negative prompt:`` line when there is one, then ``Key: value``
    pairs on one line (A1111's own keys where it has one: ``Sampler``, ``CFG scale``, ``Batch size``, ``Batch pos``)."""
    pairs = [f"Steps: {doc['steps']}"]
    if doc.get("sampler"):
        pairs.append(f"Sampler: {doc['sampler']}")
    pairs += [f"CFG scale: {doc['guidance']:g}", f"Seed: {doc['seed']}", f"Size: {doc['width']}x{doc['height']}",
              f"Model: {doc['models'].get('generator') or doc['models'].get('omnigen')}"]
    file_hash = (doc.get("generator_file") or {}).get("sha256")
    if isinstance(file_hash, str) and file_hash:
        pairs.append(f"Model hash: {file_hash[:10]}")  # A1111's short form of the checkpoint's sha256
    batch = doc.get("batch") or {}
    if int(batch.get("size") or 1) > 1:
        pairs += [f"Batch size: {batch['size']}", f"Batch pos: {batch.get('index', 0)}"]
    if doc.get("backbone") == "omnigen":
        pairs.append(f"Image guidance: {(doc.get('omnigen') or {}).get('img_guidance_scale')}")
    if doc.get("references"):
        if doc.get("backbone") != "omnigen":
            pairs.append(f"IP-Adapter scale: {doc.get('ip_scale')}")
        pairs.append("References: " + " ".join(r["path"] for r in doc["references"]))
        if any(r.get("weight", 1.0) != 1.0 or r.get("mode", "both") != "both" for r in doc["references"]):
            pairs.append("Reference steering: " + " ".join(
                f"{r.get('weight', 1.0):g}:{r.get('mode', 'both')}" for r in doc["references"]))
    if doc.get("fast") not in (None, "off"):
        pairs.append(f"Fast: {doc['fast']}")
    pairs.append(f"Version: imgrag {doc.get('imgrag_version')}")
    # On one line, as A1111 writes it: a reader splits the block at its line breaks.
    negative = " ".join(str(doc.get("negative_prompt") or "").split())
    negative = f"Negative prompt: {negative}\n" if negative else ""
    # A1111 users type a LoRA into the prompt as <lora:NAME:WEIGHT>; readers of this line find it there.
    tags = "".join(f" <lora:{lora.get('name')}:{float(lora.get('weight', 1.0)):g}>" for lora in doc.get("loras") or []
                   if isinstance(lora, dict))
    return doc["prompt"] + tags + "\n" + negative + ", ".join(pairs)


# The formats a picture imgrag writes may have: the ones whose metadata keeps its recipe (PNG's iTXt, JPEG's and
# WebP's EXIF). A GIF, BMP or TIFF would lose how the picture was made.
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def check_picture_suffix(path: str | Path, what: str = "the output") -> Path:
    """``path`` when its suffix is one of :data:`PICTURE_SUFFIXES`; else a one-line UserError naming ``what``."""
    path = Path(path)
    if path.suffix.lower() not in PICTURE_SUFFIXES:
        shown = f"{path.suffix!r}" if path.suffix else "no suffix"
        raise UserError(f"{path}: {what} must end in one of {', '.join(PICTURE_SUFFIXES)} (the formats that keep "
                        f"the picture's recipe), not {shown}")
    return path


def save_kwargs(path: Path, doc: dict[str, Any] | None) -> dict[str, Any]:
    """The keyword arguments for ``Image.save`` that embed ``doc`` in a file of ``path``'s format."""
    if doc is None:
        return {}
    text = json.dumps(doc, ensure_ascii=False, default=str)
    if not is_text_name(text):  # a path that is not UTF-8 (imgrag.file_names): JSON's \u escapes keep it whole
        text = json.dumps(doc, ensure_ascii=True, default=str)
    if path.suffix.lower() == ".png":
        info = PngInfo()
        info.add_itxt(PROVENANCE_KEY, text)  # iTXt: UTF-8, so any prompt survives
        info.add_itxt(PARAMETERS_KEY, display_name(parameters_line(doc)))
        return {"pnginfo": info}
    exif = Image.Exif()
    # EXIF text is ASCII: JSON's \u escapes carry any prompt through it intact.
    exif[_EXIF_DESCRIPTION] = json.dumps(doc, ensure_ascii=True, default=str)
    return {"exif": exif}


def save_image(image: Image.Image, path: str | Path, doc: dict[str, Any] | None) -> Path:
    """Write ``image`` to ``path`` atomically (:func:`imgrag.atomic_files.atomic_path`) with ``doc`` embedded; the
    format follows the suffix, one of :data:`PICTURE_SUFFIXES` when there is a ``doc`` (UserError otherwise).
    Returns the path."""
    path = check_picture_suffix(path) if doc is not None else Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, **save_kwargs(path, doc))
    return path


def read_provenance(path: str | Path) -> dict[str, Any] | None:
    """The provenance document embedded in a picture, or None when it carries none (not made by imgrag, or
    its metadata was stripped). Raises UserError when the file cannot be opened as a picture."""
    probe_image(path)
    with reading_image(path), Image.open(path) as im:
        text = im.info.get(PROVENANCE_KEY) if hasattr(im, "info") else None
        if text is None:
            text = im.getexif().get(_EXIF_DESCRIPTION)
    if not text:
        return None
    try:
        doc = json.loads(text)
    except (TypeError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) and doc.get("schema") == SCHEMA else None


def copy_with_provenance(source: str | Path, target: str | Path, **changes: Any) -> Path:
    """Copy a picture to ``target`` (format by suffix), keeping its provenance (updated with ``changes``):
    a chat ``/save`` to .jpg must not lose how the picture was made."""
    doc = read_provenance(source)
    if doc is not None:
        doc = {**doc, **changes}
    return save_image(open_image(source), target, doc)


def for_drawing(settings: Any, *, prompt: str, seed: int, references: list[dict[str, Any]] | None,
                ip_scale: float | None, run_id: str | None = None, candidate_id: str | None = None,
                steps: int | None = None, guidance: float | None = None, fast: str | None = None,
                width: int | None = None, height: int | None = None, negative_prompt: str | None = None,
                scheduler: str | None = None, sampler: str | None = None, loras: Any = None,
                **extra: Any) -> dict[str, Any]:
    """The provenance of a drawing made with ``settings.generation`` (what the generator uses for every value not given
    here: the same rules as :meth:`imgrag.models.generator.Generator.generate_batch`). ``sampler`` is what drew (the
    generator's ``last_scheduler``); ``loras`` the :class:`~imgrag.drawing.loras.LoraChoice` records it drew with
    (default ``[[models.loras]]``). ``extra`` keys (None ones dropped) join the document: ``backbone``, ``concepts``
    (which reference stood for which concept), ``batch`` (``{"size", "index"}`` of a round's drawings)."""
    g = settings.generation
    plan = draw_plan(g, fast)
    refs = reference_entries(references or [])
    extra["loras"] = lora_entries(settings_loras(settings) if loras is None else list(loras))
    return describe(settings, prompt=prompt, seed=seed, steps=plan.steps if steps is None else steps,
                    guidance=plan.guidance if guidance is None else guidance, width=width or g.width,
                    height=height or g.height, ip_scale=(g.ip_scale if ip_scale is None else ip_scale) if refs
                    else None, fast=plan.mode, references=refs, run_id=run_id, candidate_id=candidate_id,
                    negative_prompt=g.negative_prompt if negative_prompt is None else negative_prompt,
                    scheduler=g.scheduler if scheduler is None else scheduler, sampler=sampler, **extra)


def for_omnigen_drawing(settings: Any, *, prompt: str, sent_prompt: str, seed: int,
                        references: list[dict[str, Any]] | None, concepts: list[dict[str, Any]] | None,
                        run_id: str | None = None, candidate_id: str | None = None, steps: int | None = None,
                        width: int | None = None, height: int | None = None) -> dict[str, Any]:
    """The provenance of an OmniGen drawing (:mod:`imgrag.models.omnigen`) made with ``settings.omnigen``: the user's
    ``prompt``, the multimodal ``sent_prompt`` OmniGen read, the references in image-slot order (``references[0]``
    is ``<|image_1|>``) and the ``concepts`` they stood for. ``fast`` is always "off": few-step modes are SDXL's."""
    o, g = settings.omnigen, settings.generation
    refs = reference_entries(references or [])
    return describe(settings, prompt=prompt, seed=seed, steps=o.steps if steps is None else steps,
                    guidance=o.guidance_scale, width=width or g.width, height=height or g.height, ip_scale=None,
                    fast="off", references=refs, run_id=run_id, candidate_id=candidate_id, backbone="omnigen",
                    models={"omnigen": settings.models.omnigen}, concepts=concepts or None,
                    omnigen={"sent_prompt": sent_prompt, "img_guidance_scale": o.img_guidance_scale,
                             "max_input_image_size": o.max_input_image_size})

"""LoRAs: the user's own style and subject adapters for SDXL, loaded once into the pipeline and switched by name.

Where they come from, each way adding to the ones before it (:func:`merge_loras`): ``[[models.loras]]`` in the
settings (``path``, ``weight``, optional ``name``), ``--lora PATH[:WEIGHT]`` on ``generate``, ``run`` and ``batch``,
a batch line's ``"loras": [{"path", "weight"}]``, the chat's ``/lora`` and the web page's LoRA field. One naming a
LoRA already there (the same file, or the ``name`` a settings entry gives it) sets that one's weight instead; weight
0 switches it off. A run keeps its LoRAs with its drawing options (:mod:`imgrag.drawing.draw_options`).

What is checked, before any model loads (:func:`check_lora_file`): the file exists and is a ``.safetensors`` file
(a pickled ``.ckpt``/``.pt`` can run code when it is read), its header is whole
(:func:`imgrag.weight_files.weight_file_problem`), and its tensors are LoRA halves in a layout diffusers reads:
diffusers/PEFT (``unet.<module>.lora_A.weight`` / ``lora_B``, or the older ``lora.down``/``lora.up``) or kohya
(``lora_unet_<module>.lora_down.weight`` / ``lora_up``, with ``.alpha``; ``lora_te1_``/``lora_te2_`` for the two
text encoders). LyCORIS files (LoHa, LoKr) are named as such: diffusers does not read them. When the LoRA loads
(the first drawing that uses it), its shapes must fit this generator: a LoRA made for another base model (SD 1.5,
SD 2, Flux, another width) is one :class:`~imgrag.errors.ModelLoadError` line naming the file, and nothing of it
stays in the pipeline.

How they draw (:class:`imgrag.drawing.lora_switch.LoraSwitch`): diffusers' PEFT backend. Each file is read once, as a
state dict handed to ``load_lora_weights(state_dict, adapter_name=...)`` (diffusers converts kohya keys and alphas
itself), and every drawing activates the adapters it uses with ``set_adapters(names, weights)``, together with the
fast mode's LCM-LoRA (:mod:`imgrag.models.fast`). Never fused (in float16, ``fuse_lora`` + ``unfuse_lora`` leaves
rounding error in SDXL's weights: imgrag.models.fast's test shows it) and never reloaded: switching is setting each
LoRA layer's active adapters and scales. A LoRA at weight 0 is left out of the active set, so its drawing is the one
made without it; with no adapter active the LoRA layers are switched off (``disable_lora``), bit for bit the plain
pipeline.

Memory: a LoRA's parameters join the UNet and the text encoders (in their dtype). Before one loads, the model
manager is asked for room (the generator's ``before_adapter_load``, as for the IP-Adapter) with the size read from
the file's header, and after the drawing the manager measures the generator with it.

This module chooses and checks LoRAs (no model library is imported); loading and switching them in the pipeline is
:mod:`imgrag.drawing.lora_switch`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from imgrag.errors import UserError
from imgrag.file_names import FilePath, display_name
from imgrag.weight_files import safetensors_header, weight_file_problem

# A weight bounds a typo (10 for 1.0) without refusing the negative weights that slider LoRAs are made for.
MAX_LORA_WEIGHT = 4.0
# LoRAs one drawing may name: every active one adds its matmuls at every layer it adapts, at every step.
MAX_LORAS = 16
LORA_SUFFIX = ".safetensors"
# What a name may hold: it is written into the A1111 line as <lora:NAME:WEIGHT>, so never ':', '<' or '>'.
NAME_PATTERN = re.compile(r"^[\w][\w .+()\[\]-]{0,63}$")
# Key parts of a LoRA's halves in the layouts diffusers reads (diffusers/PEFT, the older diffusers one, kohya).
_LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", ".lora_down.", ".lora_up.", "lora_linear_layer")
# LyCORIS (LoHa, LoKr, ...): other factorisations, which diffusers' loader does not read.
_LYCORIS_MARKERS = (".hada_w1", ".hada_w2", ".lokr_w1", ".lokr_w2", ".oft_blocks", ".boft_blocks")
EXPECTED = ("an SDXL LoRA in diffusers/PEFT (unet.<module>.lora_A.weight) or kohya (lora_unet_<module>.lora_down."
            "weight) layout, as a .safetensors file")


class LoraChoice(BaseModel):
    """One LoRA a drawing uses: its file (absolute once checked), its weight and the name the A1111 line shows.

    ``name`` "": the file's stem (:attr:`label`), as A1111 names a LoRA."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: FilePath
    weight: Annotated[float, Field(ge=-MAX_LORA_WEIGHT, le=MAX_LORA_WEIGHT)] = 1.0
    name: str = ""

    @field_validator("path", mode="before")
    @classmethod
    def _a_path(cls, value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, str) and not value.strip():
            raise ValueError("a LoRA needs the path of its .safetensors file")
        return value

    @field_validator("weight", mode="before")
    @classmethod
    def _a_number(cls, value: Any) -> Any:
        if isinstance(value, bool):  # pydantic would read true as 1.0
            raise ValueError("a LoRA's weight must be a number")
        return value

    @field_validator("name")
    @classmethod
    def _a_name(cls, value: str) -> str:
        return check_name(value)

    @property
    def label(self) -> str:
        """The name shown in the A1111 line and the chat: ``name``, else the file's stem made printable."""
        return self.name or stem_name(self.path)


def check_name(value: str, where: str = "a LoRA's name") -> str:
    """``value`` stripped, if it is "" or a name :data:`NAME_PATTERN` allows; else ValueError saying why."""
    value = value.strip()
    if value and not NAME_PATTERN.match(value):
        raise ValueError(f"{where} may hold letters, digits, spaces and . _ - + ( ) [ ] (up to 64; never ':', '<' "
                         f"or '>', which the <lora:NAME:WEIGHT> text of the A1111 line uses), got {value!r}")
    return value


def stem_name(path: str | Path) -> str:
    """A file's stem as a LoRA name: printable (:func:`imgrag.file_names.display_name`), with every character a
    name may not hold (``:``, ``<``, ``>``, ...) replaced by ``_``, at most 64 characters."""
    stem = display_name(Path(path).name).removesuffix(LORA_SUFFIX) or "lora"
    cleaned = re.sub(r"[^\w .+()\[\]-]", "_", stem).strip() or "lora"
    if not re.match(r"\w", cleaned[0]):
        cleaned = "_" + cleaned
    return cleaned[:64]


def parse_lora_arg(text: str, where: str = "--lora") -> tuple[str, float | None]:
    """``PATH[:WEIGHT]`` -> (PATH, WEIGHT or None when not given). The text is split at its last ``:`` only when
    what follows reads as a number, so a path holding ``:`` stays whole. Raises a one-line UserError for an
    empty path or a weight outside -:data:`MAX_LORA_WEIGHT`..:data:`MAX_LORA_WEIGHT`."""
    text = str(text).strip()
    path, sep, tail = text.rpartition(":")
    weight: float | None = None
    if sep:
        try:
            weight = float(tail)
        except ValueError:
            path = text
        else:
            if not math.isfinite(weight) or abs(weight) > MAX_LORA_WEIGHT:
                raise UserError(f"{where} {text}: the weight must be a number from -{MAX_LORA_WEIGHT:g} to "
                                f"{MAX_LORA_WEIGHT:g} (1 is the LoRA as trained, 0 switches it off), got {tail}")
    else:
        path = text
    if not path.strip():
        raise UserError(f"{where} {text!r}: give the LoRA's file: {where} style.safetensors[:WEIGHT]")
    return path.strip(), weight


def merge_loras(base: Sequence[LoraChoice], given: Iterable[tuple[str, float | None]],
                where: str = "--lora", relative_to: Path | None = None) -> tuple[LoraChoice, ...]:
    """``base`` with each of ``given`` (``(PATH or NAME, WEIGHT or None)``, as :func:`parse_lora_arg` reads them)
    added, or, when it names a LoRA of ``base`` (its file, or its ``name``/label when no such file exists), that
    LoRA's weight set (None keeps it). The text ``none`` (or ``off``) alone clears the LoRAs before it. Every new
    file is checked (:func:`check_lora_file`; relative paths read from ``relative_to``, default the working
    folder); an error is one UserError naming ``where``."""
    out = list(base)
    for text, weight in given:
        if text.strip().lower() in ("none", "off") and weight is None:
            out = []
            continue
        candidate = Path(text).expanduser()
        if relative_to is not None and not candidate.is_absolute():
            candidate = relative_to / candidate
        found = None
        if candidate.exists():
            resolved = str(candidate.resolve())
            found = next((n for n, c in enumerate(out) if c.path == resolved), None)
        else:
            found = next((n for n, c in enumerate(out) if text in (c.name, c.label)), None)
        if found is not None:
            if weight is not None:
                out[found] = out[found].model_copy(update={"weight": weight})
            continue
        path = check_lora_file(candidate, where)
        out.append(LoraChoice(path=path, weight=1.0 if weight is None else weight))
    if len(out) > MAX_LORAS:
        raise UserError(f"{where}: {len(out)} LoRAs; one drawing takes at most {MAX_LORAS}")
    return tuple(out)


def check_loras(loras: Sequence[LoraChoice], where: str = "LoRA") -> tuple[LoraChoice, ...]:
    """Each LoRA's file checked (:func:`check_lora_file`) and made absolute, names made unique; a UserError naming
    ``where`` for the first problem. What every list of LoRAs goes through before it draws."""
    if len(loras) > MAX_LORAS:
        raise UserError(f"{where}: {len(loras)} LoRAs; one drawing takes at most {MAX_LORAS}")
    checked = [c.model_copy(update={"path": check_lora_file(c.path, where)}) for c in loras]
    labels = [c.label for c in checked]
    for n, c in enumerate(checked):
        if labels.count(c.label) > 1 and labels.index(c.label) != n:
            raise UserError(f"{where}: two LoRAs are named {c.label!r} ({checked[labels.index(c.label)].path} and "
                            f"{c.path}); give one a name (name = \"...\" in [[models.loras]])")
    return tuple(checked)


def check_lora_file(path: str | Path, where: str = "LoRA") -> str:
    """The absolute, resolved path of a LoRA file that passes the checks of the module docstring (existence,
    ``.safetensors``, a whole header, LoRA keys in a layout diffusers reads); else a one-line UserError reading
    ``<where> <file>: <why>`` (``where``: "LoRA", "--lora", "PICTURE's recipe: LoRA"). Reads the header only."""
    file = Path(path).expanduser()
    shown = display_name(file)
    if not file.exists():
        raise UserError(f"{where} {shown}: no such file (a LoRA is one .safetensors file)")
    if file.is_dir():
        inside = sorted(p.name for p in file.glob(f"*{LORA_SUFFIX}"))
        hint = f"; it holds {', '.join(inside[:3])}" if inside else ""
        raise UserError(f"{where} {shown} is a folder; name the LoRA's .safetensors file in it{hint}")
    if file.suffix.lower() != LORA_SUFFIX:
        raise UserError(f"{where} {shown}: imgrag reads LoRAs as .safetensors only (a pickled .ckpt, .pt or .bin "
                        "can run code when it is opened); convert it or fetch the .safetensors release")
    problem = weight_file_problem(file)
    if problem:
        raise UserError(f"{where} {shown}: {problem}")
    keys = _header_keys(file)
    if not any(marker in key for key in keys for marker in _LORA_MARKERS):
        if any(marker in key for key in keys for marker in _LYCORIS_MARKERS):
            raise UserError(f"{where} {shown} is a LyCORIS file (LoHa/LoKr), which diffusers does not load; use "
                            "a LoRA (lora_down/lora_up or lora_A/lora_B weights)")
        sample = ", ".join(sorted(keys)[:2]) or "none"
        raise UserError(f"{where} {shown} holds no LoRA weights (its tensors are named like {sample}); expected "
                        f"{EXPECTED}")
    return str(file.resolve())


def _header_keys(file: Path) -> list[str]:
    """The tensor names of a safetensors file whose header :func:`~imgrag.weight_files.weight_file_problem` found
    whole (read again here: a few KB)."""
    return [k for k in safetensors_header(file) if k != "__metadata__"]


def lora_parameters(path: str | Path) -> int:
    """How many parameters a LoRA file holds, from its header (no tensor is read)."""
    header = safetensors_header(path)
    return sum(math.prod(info.get("shape") or [1]) for key, info in header.items()
               if key != "__metadata__" and isinstance(info, dict))


def settings_loras(settings: Any) -> tuple[LoraChoice, ...]:
    """The LoRAs ``[[models.loras]]`` names, as :class:`LoraChoice` records (not yet checked on disk)."""
    return tuple(LoraChoice(path=entry.path, weight=entry.weight, name=entry.name)
                 for entry in getattr(settings.models, "loras", None) or [])

"""The settings' sections: one pydantic dataclass per TOML table (``[models]``, ``[generation]``, ...), each field
with its bounds and the comment saying what it does; the drawing bounds every way of asking for a drawing shares,
and the device check. imgrag/settings.py puts them together into ``Settings`` and loads them; import them from there.
"""

from __future__ import annotations

import os
import re
from dataclasses import field
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator
from pydantic.dataclasses import dataclass as _pydantic_dataclass

from imgrag.drawing.draw_options import MAX_NEGATIVE_CHARS, MAX_PER_ROUND
from imgrag.drawing.loras import MAX_LORA_WEIGHT, check_name
from imgrag.drawing.schedulers import check_scheduler
from imgrag.errors import SEED_MAX, UserError
from imgrag.file_names import FilePath

# Every section is a pydantic dataclass: validated (types, ranges, choices) when it is built, still a plain
# dataclass for ``dataclasses.replace`` and ``asdict``. Unknown keys are refused; numbers read from TOML or the
# environment become strings where a string is expected (an API key of digits).
_CONFIG = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
dataclass = _pydantic_dataclass(config=_CONFIG)  # type: ignore[assignment]

# IP-Adapter's reference scale, shared by the settings, the generator and the tools: 0 ignores the references,
# 1 follows them as strongly as the adapter was trained to (above it SDXL copies the reference and breaks).
MAX_IP_SCALE = 1.0
Positive = Annotated[int, Field(ge=1)]
# Upper bounds of one drawing, raisable on purpose (generation.max_side, generation.max_steps). SDXL was trained
# at about 1024x1024: at 2048 a side it already repeats its subject, and memory and time grow with the pixel count
# (16384x16384 is 256 times 1024x1024). Past ~150 steps no sampler imgrag uses changes the picture; 100,000 steps is
# a typo that would run for days. Recipes (--from-image) and every other way a size or step count arrives use
# these same bounds (check_drawing_bounds).
DEFAULT_MAX_SIDE = 2048
DEFAULT_MAX_STEPS = 150

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device(device: str, available: bool = True) -> str:
    """Return ``device`` if torch can use it here; raise ValueError saying why not (a typo, no CUDA, no such GPU).

    "auto" is always fine (cuda when present, else cpu). torch is imported only to check a GPU device. With
    ``available=False`` only the spelling is checked (for commands that run no model here, such as a download
    for a GPU preset made on another machine)."""
    device = device.strip().lower()
    if not DEVICE_PATTERN.match(device):
        raise ValueError(f"unknown device {device!r} (use auto, cpu, cuda, cuda:N or mps)")
    if device in ("auto", "cpu") or not available:
        return device
    import torch

    if device == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("device 'mps' is not available on this machine (use auto or cpu)")
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here (torch {torch.__version__}"
                         f"{'' if torch.version.cuda else ', a CPU-only build'}); use auto or cpu")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device



@dataclass
class LoraSettings:
    """One ``[[models.loras]]`` entry: a LoRA every SDXL drawing uses (imgrag/drawing/loras.py). ``path``: its
    .safetensors file (``~`` expanded; relative to the working folder); ``weight``: its strength, 1 as trained,
    0 off (-4..4); ``name``: what the A1111 line's ``<lora:NAME:WEIGHT>`` and ``--lora NAME:WEIGHT`` call it
    (default: the file's stem). The file itself is checked when a drawing command starts, not here (``imgrag
    search`` needs no LoRA)."""

    path: FilePath
    weight: Annotated[float, Field(ge=-MAX_LORA_WEIGHT, le=MAX_LORA_WEIGHT)] = 1.0
    name: str = ""

    @field_validator("name")
    @classmethod
    def _printable_name(cls, value: str) -> str:
        return check_name(value, "name")


@dataclass
class ModelSettings:
    """Checkpoints: a hub id or a local directory each."""

    # A diffusers folder or hub id, or a single-file checkpoint (.safetensors in the A1111/ComfyUI layout, or a folder
    # holding one): imgrag/weights/single_file.py.
    generator: str = "stabilityai/stable-diffusion-xl-base-1.0"
    # Where a single-file generator's configuration (component configs, tokenizers, scheduler; no weights) comes from:
    # a diffusers SDXL folder, or a hub id in the local cache (`imgrag models download` fetches its configs).
    generator_config: str = "stabilityai/stable-diffusion-xl-base-1.0"
    ip_adapter: str = "h94/IP-Adapter"
    ip_adapter_subfolder: str = "sdxl_models"
    ip_adapter_weight: str = "ip-adapter_sdxl_vit-h.safetensors"
    # Relative to ip_adapter; the ViT-H encoder lives outside sdxl_models in h94/IP-Adapter.
    ip_adapter_image_encoder: str = "models/image_encoder"
    judge: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    llm: str = "Qwen/Qwen2.5-7B-Instruct"
    # "local": transformers in this process; "openai": an OpenAI-compatible endpoint (vLLM, Ollama).
    llm_backend: Literal["local", "openai"] = "local"
    llm_base_url: str = ""
    llm_api_key: str = "not-needed"
    # open_clip name: "hf-hub:org/repo", "local-dir:/path", or "ARCH" with embedder_pretrained.
    embedder: str = "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    embedder_pretrained: str = ""
    # `imgrag eval`'s scorers, never what the agent selects with (imgrag/scoring/scorers.py); empty: that score is
    # not taken. ImageRAG's: "facebook/dino-vits16" (DINO ViT-S/16; a DINOv2 such as "facebook/dinov2-base" also
    # loads) and "hf-hub:timm/ViT-SO400M-14-SigLIP-384" (SigLIP, an open_clip name like embedder).
    dino: str = ""
    siglip: str = ""
    lcm_lora: str = "latent-consistency/lcm-lora-sdxl"  # for generation.fast = "lcm-lora" (imgrag.models.fast)
    # The in-context repair backbone (generation.repair_with / draw_with = "omnigen"): ImageRAG-O's model.
    omnigen: str = "Shitao/OmniGen-v1-diffusers"
    # Your own LoRAs, each a [[models.loras]] table (path, weight, name): loaded once into SDXL, used by every
    # drawing; --lora adds to them or changes a weight (imgrag/drawing/loras.py).
    loras: list[LoraSettings] = field(default_factory=list)


@dataclass
class GenerationSettings:
    # SDXL's latents are 1/8 of the picture: sides are multiples of 8 (checked below).
    width: Positive = 1024
    height: Positive = 1024
    steps: Positive = 30
    guidance: Annotated[float, Field(ge=0.0)] = 5.0
    ip_scale: Annotated[float, Field(ge=0.0, le=MAX_IP_SCALE)] = 0.5
    seed: Annotated[int, Field(ge=0, le=SEED_MAX)] = 0
    # Few-step drawing (imgrag.models.fast): "off", "lcm-lora" or "distilled"; steps/guidance unset = the method's
    # defaults.
    fast: Literal["off", "lcm-lora", "distilled"] = "off"
    fast_steps: Annotated[int, Field(ge=1)] | None = None
    fast_guidance: Annotated[float, Field(ge=0.0)] | None = None
    fast_final_redraw: bool = False  # after a matched fast run, redraw its answer at full steps (tools/final_redraw.py)
    # Which backbone draws a repair (a drawing with references): "ip-adapter" (SDXL + IP-Adapter, ImageRAG-SD's way,
    # the references blended into one image embedding) or "omnigen" (each concept's references placed in the prompt
    # where the concept is named, ImageRAG-O's way; settings in [omnigen]). draw_with: which draws without references.
    repair_with: Literal["ip-adapter", "omnigen"] = "ip-adapter"
    draw_with: Literal["sdxl", "omnigen"] = "sdxl"
    # The largest side and step count a drawing may ask for (see DEFAULT_MAX_SIDE); raise them to draw past them.
    max_side: Positive = DEFAULT_MAX_SIDE
    max_steps: Positive = DEFAULT_MAX_STEPS
    # Keep the IP-Adapter image encoder's embedding of each reference (imgrag/models/embed_cache.py): a reference
    # used again is not encoded again. Stored beside the store (ip_embeds/), keyed by content hash and encoder identity.
    embed_cache: bool = True
    # What every SDXL drawing should leave out (--negative); the judge never sees it (imgrag/drawing/draw_options.py).
    negative_prompt: Annotated[str, Field(max_length=MAX_NEGATIVE_CHARS)] = ""
    # The sampler by its A1111 name ("Euler a", "DPM++ 2M Karras"; imgrag/drawing/schedulers.py); "": the
    # checkpoint's own.
    scheduler: str = ""
    # Drawings per round, on consecutive seeds in one batched call, each judged; the round goes on from the best.
    per_round: Annotated[int, Field(ge=1, le=MAX_PER_ROUND)] = 1
    # A live preview from the latents every this many denoising steps (imgrag/models/previews.py); 0: none.
    preview_every: Annotated[int, Field(ge=0)] = 5

    @field_validator("scheduler", mode="before")
    @classmethod
    def _known_scheduler(cls, value: Any) -> str:
        try:
            return check_scheduler(value if value is None or isinstance(value, str) else str(value))
        except UserError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError("must be a multiple of 8 (SDXL's latents are 1/8 size)")
        return value

    @model_validator(mode="after")
    def _omnigen_sides(self) -> GenerationSettings:
        if "omnigen" in (self.repair_with, self.draw_with) and (self.width % 16 or self.height % 16):
            raise ValueError(f"width and height must be multiples of 16 when OmniGen draws (its latents are 1/8 "
                             f"size in 2x2 patches), got {self.width}x{self.height}")
        return self


    @model_validator(mode="after")
    def _within_bounds(self) -> GenerationSettings:
        check_drawing_bounds(self.width, self.height, self.steps, self)
        if self.fast_steps is not None:
            check_drawing_bounds(None, None, self.fast_steps, self)
        return self


def check_drawing_bounds(width: int | None, height: int | None, steps: int | None, generation: Any) -> None:
    """Raise ValueError (one line naming the setting that raises the bound) when a drawing's size or step count
    exceeds ``generation.max_side`` / ``generation.max_steps``; None skips that check.

    The one bounds check for every way a drawing is asked for: settings and flags (``--size``, ``--steps``), a
    recipe read back with ``--from-image``, a batch line."""
    side = int(getattr(generation, "max_side", DEFAULT_MAX_SIDE))
    most = int(getattr(generation, "max_steps", DEFAULT_MAX_STEPS))
    for name, value in (("width", width), ("height", height)):
        if value is not None and value > side:
            raise ValueError(f"{name} {value} is above generation.max_side = {side} (SDXL draws best near 1024; "
                             f"memory and time grow with the pixels); set generation.max_side (or "
                             f"IMGRAG_GENERATION_MAX_SIDE) higher to draw that large on purpose")
    if steps is not None and steps > most:
        raise ValueError(f"{steps} steps is above generation.max_steps = {most} (more steps no longer change the "
                         f"picture, only the time); set generation.max_steps (or IMGRAG_GENERATION_MAX_STEPS) higher "
                         "to use more on purpose")


@dataclass
class OmniGenSettings:
    """OmniGen's own knobs (imgrag/models/omnigen.py); the defaults are diffusers' OmniGenPipeline's and
    ImageRAG-O's."""

    guidance_scale: Annotated[float, Field(ge=0.0)] = 2.5  # text guidance
    img_guidance_scale: Annotated[float, Field(ge=0.0)] = 1.6  # how strongly the input images steer
    # Input images are cropped/resized to at most this side (a multiple of 16); each costs (side/16)^2 tokens.
    max_input_image_size: Annotated[int, Field(ge=16, le=2048)] = 1024
    steps: Positive = 50
    # Reference pictures one in-context drawing takes, over all concepts: ImageRAG-O's 3 ("can use up to 3 images
    # in prompt with omnigen"); each adds up to 4096 tokens to a 1024^2 drawing's 4096 (imgrag/models/omnigen.py).
    max_references: Annotated[int, Field(ge=1, le=8)] = 3

    @field_validator("max_input_image_size")
    @classmethod
    def _multiple_of_16(cls, value: int) -> int:
        if value % 16:
            raise ValueError("must be a multiple of 16 (OmniGen's VAE is 8x and its patches 2x2)")
        return value


@dataclass
class JudgeSettings:
    # Qwen2.5-VL pixel bounds: the image is resized to fit within them before the processor sees it.
    min_pixels: Positive = 256 * 28 * 28
    max_pixels: Positive = 1024 * 28 * 28
    # A JSON verdict takes about 60 tokens; the judge stops at its closing brace (imgrag.models.stopping).
    max_new_tokens: Positive = 128

    @model_validator(mode="after")
    def _bounds_in_order(self) -> JudgeSettings:
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})")
        return self


@dataclass
class LLMSettings:
    max_new_tokens: Positive = 512
    temperature: Annotated[float, Field(ge=0.0)] = 0.0


@dataclass
class BudgetSettings:
    max_rounds: Positive = 3
    max_tool_calls: Positive = 20
    max_seconds: Annotated[float, Field(gt=0.0)] = 1800.0
    # Consecutive unusable LLM replies before the fixed policy takes the next step.
    max_llm_failures: Positive = 2


@dataclass
class RetrievalSettings:
    k: Positive = 2
    min_score: Annotated[float, Field(ge=-1.0, le=1.0)] = -1.0  # cosine similarity
    # RealRAG-style reflective re-ranking: score = sim(query, ref) - rerank_lambda * sim(candidate, ref).
    rerank_lambda: Annotated[float, Field(ge=0.0)] = 0.3
    # ImageRAG's caption step (imgrag/models/concepts.py): the LLM turns each missing concept into a descriptive
    # retrieval caption before the fixed planner retrieves. Off by default, so the fixed planner stays LLM-free
    # (24 GB cards).
    rewrite_queries: bool = False
    # TIGeR's choice (tools/retrieved_tools.py): the store's best matches for the whole prompt become candidates the
    # judge critiques, and a matched photo may be the run's answer. Off by default: a run draws (--allow-retrieved).
    allow_retrieved: bool = False
    photo_candidates: Annotated[int, Field(ge=1, le=8)] = 2  # how many of the best matches are considered
    # Concept memory (imgrag/store/memory.py): which references fixed which concept in a matched run, kept in the
    # store's folder; a later prompt naming the concept starts guided by them (the fixed policy's round 1).
    memory: bool = True
    # A remembered reference guides round 1 only when CLIP's cosine of it and the concept passes this.
    memory_min_score: Annotated[float, Field(ge=-1.0, le=1.0)] = 0.2


# What the safety gate (imgrag/models/safety.py) checks for by default: written as CLIP captions.
DEFAULT_UNSAFE_CONCEPTS = ("nudity", "sexual content", "graphic violence and gore", "a dead body", "self-harm",
                           "a hate symbol", "a passport or identity card", "a credit card")


@dataclass
class SafetySettings:
    """The safety gate (imgrag/models/safety.py): zero-shot CLIP check of references and outputs; excluded folders."""

    # Off by default: the threshold must suit your CLIP model (imgrag/models/safety.py says how to check it). Excluded
    # folders and globs apply whether it is on or not.
    enabled: bool = False
    concepts: list[str] = field(default_factory=lambda: list(DEFAULT_UNSAFE_CONCEPTS))
    # Flagged when cosine(image, concept text) >= threshold; see imgrag/models/safety.py for how it was chosen.
    threshold: Annotated[float, Field(ge=-1.0, le=1.0)] = 0.26
    # Folders (or files) never retrieved from: literal paths, or "glob:PATTERN" (imgrag/models/safety.py, excluded_by).
    exclude: list[str] = field(default_factory=list)
    skip_flagged_at_index: bool = False  # `imgrag index` leaves flagged pictures out of the store
    allow_flagged: bool = False  # a flagged output may be the answer (--allow-flagged)

    @field_validator("exclude")
    @classmethod
    def _literal_or_glob(cls, entries: list[str]) -> list[str]:
        # An entry is literal unless it says glob:. One with * or ? that names no path was surely meant as a
        # pattern (older settings wrote globs bare): refusing it beats excluding nothing without a word.
        for entry in entries:
            if not entry.strip():
                raise ValueError("an empty entry would exclude nothing; remove it")
            if (not entry.startswith("glob:") and any(ch in entry for ch in "*?")
                    and not os.path.lexists(os.path.expanduser(entry))):
                raise ValueError(f"{entry!r} names no file or folder but looks like a pattern: write "
                                 f"'glob:{entry}' for a glob (entries are literal paths otherwise)")
        return entries


@dataclass
class EvalSettings:
    """`imgrag eval --classes` (agent/evaluation.py): ImageRAG's protocol on a folder per class."""

    gold_per_class: Positive = 5  # real pictures each class is scored against, never retrieved
    retrieval_per_class: Annotated[int, Field(ge=0)] = 0  # pictures indexed for retrieval; 0: all that are not gold
    prompts_per_class: Positive = 1  # drawings per class, on seeds generation.seed, +1, ...
    split_seed: Annotated[int, Field(ge=0)] = 0  # which pictures are gold (imgrag/scoring/class_folders.py)
    # "{class_name}" is filled in; empty: prompts/eval_class.md ("a photo of a {class_name}", ImageRAG's).
    prompt_template: str = ""
    bootstrap_seed: Annotated[int, Field(ge=0)] = 0  # the paired intervals' resampling (imgrag/scoring/paired_stats.py)

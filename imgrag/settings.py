"""Settings: one typed object, resolved from four layers.

Precedence, lowest first: the profile's defaults, a TOML file, ``IMGRAG_*`` environment variables,
command-line flags. A profile is ``default`` (the real checkpoints), ``tiny`` (the offline kit that
``imgrag models build-tiny`` makes), a built-in hardware preset (``gpu-80gb``, ``gpu-24gb``, ``cpu``: TOML
files in ``imgrag/profiles/``) or the path of a TOML file. A TOML file may itself name a
``profile`` to start from.

Environment variables: ``IMGRAG_<KEY>`` for top-level keys (``IMGRAG_DEVICE=cpu``) and
``IMGRAG_<SECTION>_<KEY>`` for keys in a section (``IMGRAG_GENERATION_STEPS=20``).
``IMGRAG_HOME`` moves everything imgrag keeps by default (store, outputs, tiny kit, threads).

Why ~400 lines in one module: it is the settings' schema (one pydantic class per section, each field with
its bounds and its comment) and their one loader; the schema reads best whole, as the profiles do.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from contextvars import ContextVar
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass as _pydantic_dataclass

from imgrag.drawing.draw_options import MAX_NEGATIVE_CHARS, MAX_PER_ROUND
from imgrag.drawing.loras import MAX_LORA_WEIGHT
from imgrag.drawing.schedulers import check_scheduler
from imgrag.errors import SEED_MAX, UserError


class SettingsError(ValueError):
    """A user mistake in settings: a bad file, key, value or profile. The message is one line."""


# Every section is a pydantic dataclass: validated (types, ranges, choices) when it is built, still a plain
# dataclass for ``dataclasses.replace`` and ``asdict``. Unknown keys are refused; numbers read from TOML or the
# environment become strings where a string is expected (an API key of digits).
_CONFIG = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
dataclass = _pydantic_dataclass(config=_CONFIG)  # type: ignore[assignment]

# IP-Adapter's reference scale, shared by the settings, the generator and the tools: 0 ignores the references,
# 1 follows them as strongly as the adapter was trained to (above it SDXL copies the reference and breaks).
MAX_IP_SCALE = 1.0
# Said once by every command, kept in result.json's note and shown on the report when the profile is "tiny".
TINY_WARNING = ("tiny profile: random-weight models — the images are noise and the verdicts junk; "
                "this checks the plumbing, not quality.")
# The same, short enough to stand beside each answer the chat and the web page show.
TINY_MARK = "tiny profile: random weights, the picture is noise and the verdict junk"
Positive = Annotated[int, Field(ge=1)]
# Upper bounds of one drawing, raisable on purpose (generation.max_side, generation.max_steps). SDXL was trained
# at about 1024x1024: at 2048 a side it already repeats its subject, and memory and time grow with the pixel count
# (16384x16384 is 256 times 1024x1024). Past ~150 steps no sampler imgrag uses changes the picture; 100,000 steps is
# a typo that would run for days. Recipes (--from-image) and every other way a size or step count arrives use
# these same bounds (check_drawing_bounds).
DEFAULT_MAX_SIDE = 2048
DEFAULT_MAX_STEPS = 150
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def imgrag_home() -> Path:
    """Where imgrag keeps its own files unless told otherwise."""
    return Path(os.environ.get("IMGRAG_HOME", Path.home() / ".imgrag")).expanduser()


@dataclass
class LoraSettings:
    """One ``[[models.loras]]`` entry: a LoRA every SDXL drawing uses (imgrag/drawing/loras.py). ``path``: its
    .safetensors
    file (``~`` expanded; relative to the working folder); ``weight``: its strength, 1 as trained, 0 off (-4..4);
    ``name``: what the A1111 line's ``<lora:NAME:WEIGHT>`` and ``--lora NAME:WEIGHT`` call it (default: the file's
    stem). The file itself is checked when a drawing command starts, not here (``imgrag search`` needs no LoRA)."""

    path: Annotated[str, Field(min_length=1)]
    weight: Annotated[float, Field(ge=-MAX_LORA_WEIGHT, le=MAX_LORA_WEIGHT)] = 1.0
    name: str = ""

    @field_validator("name")
    @classmethod
    def _printable_name(cls, value: str) -> str:
        from imgrag.drawing.loras import check_name

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
    # `imgrag eval`'s scorers, never what the agent selects with (imgrag/scoring/scorers.py); empty: that score is not
    # taken.
    # ImageRAG's: "facebook/dino-vits16" (DINO ViT-S/16; a DINOv2 such as "facebook/dinov2-base" also loads) and
    # "hf-hub:timm/ViT-SO400M-14-SigLIP-384" (SigLIP, an open_clip name like embedder).
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
    # Keep the IP-Adapter image encoder's embedding of each reference (imgrag/models/embed_cache.py): a reference used
    # again
    # is not encoded again. Stored beside the store (ip_embeds/), keyed by content hash and encoder identity.
    embed_cache: bool = True
    # What every SDXL drawing should leave out (--negative); the judge never sees it (imgrag/drawing/draw_options.py).
    negative_prompt: Annotated[str, Field(max_length=MAX_NEGATIVE_CHARS)] = ""
    # The sampler by its A1111 name ("Euler a", "DPM++ 2M Karras"; imgrag/drawing/schedulers.py); "": the checkpoint's
    # own.
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
    # retrieval
    # caption before the fixed planner retrieves. Off by default, so the fixed planner stays LLM-free (24 GB cards).
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
        import os

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


@dataclass
class Settings:
    profile: str = "default"
    # "auto" picks cuda when present, else cpu.
    device: str = "auto"
    # "auto": float16 on cuda, float32 on cpu.
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # GPU memory the model manager may fill, in GiB; 0 means no limit (everything stays resident).
    gpu_memory_gb: Annotated[float, Field(ge=0.0)] = 0.0
    # What eviction does to a model: "cpu" (move to CPU RAM) or "drop" (free it; reload later).
    offload: Literal["cpu", "drop"] = "cpu"
    # A directory (embedded Chroma) or http://host:port (a Chroma server).
    store: str = ""
    output_dir: str = ""
    threads_db: str = ""
    # Seconds a write to threads_db waits while another process (a chat, a page, a batch) holds its lock; sqlite3's
    # own default is 5. A write that still fails ends the run with its result.json (agent/thread_store.py).
    threads_busy_timeout: Annotated[float, Field(gt=0.0, le=3600.0)] = 30.0
    tiny_kit_dir: str = ""
    models: ModelSettings = field(default_factory=ModelSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    omnigen: OmniGenSettings = field(default_factory=OmniGenSettings)
    judge: JudgeSettings = field(default_factory=JudgeSettings)
    llm: LLMSettings = field(default_factory=LLMSettings)
    budget: BudgetSettings = field(default_factory=BudgetSettings)
    retrieval: RetrievalSettings = field(default_factory=RetrievalSettings)
    safety: SafetySettings = field(default_factory=SafetySettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    @field_validator("device")
    @classmethod
    def _device_is_there(cls, value: str) -> str:
        return check_device(value, available=_CHECK_DEVICE_AVAILABLE.get())

    # ----- derived values -----
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "float16" if self.resolved_device().startswith("cuda") else "float32"

    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.resolved_dtype())

    @property
    def is_tiny(self) -> bool:
        return self.profile == "tiny"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTION_CLASSES = {
    "models": ModelSettings, "generation": GenerationSettings, "omnigen": OmniGenSettings, "judge": JudgeSettings,
    "llm": LLMSettings, "budget": BudgetSettings, "retrieval": RetrievalSettings, "safety": SafetySettings,
    "eval": EvalSettings,
}
PROFILES = ("default", "tiny")
# Built-in presets: documented TOML files shipped in the package, named by their stem (gpu-80gb, gpu-24gb, cpu).
PRESETS_DIR = Path(__file__).parent / "profiles"


def builtin_presets() -> dict[str, Path]:
    """The built-in hardware presets: name -> its TOML file (each starts from the default profile)."""
    return {path.stem: path for path in sorted(PRESETS_DIR.glob("*.toml"))}



TINY_KIT_PLACEHOLDER = "{tiny_kit}"


def _tiny_profile() -> dict[str, Any]:
    # Paths hold a placeholder, filled with the final tiny_kit_dir once every layer is applied.
    kit = TINY_KIT_PLACEHOLDER
    return {
        "profile": "tiny",
        "models": {
            "generator": f"{kit}/sdxl",
            "generator_config": f"{kit}/sdxl",
            "ip_adapter": f"{kit}/ip-adapter",
            "judge": f"{kit}/qwen2.5-vl",
            "llm": f"{kit}/qwen2.5-instruct",
            "embedder": f"local-dir:{kit}/open-clip",
            "lcm_lora": f"{kit}/lcm-lora",
            "dino": f"{kit}/dino",
            "siglip": f"local-dir:{kit}/siglip",
            "omnigen": f"{kit}/omnigen",
        },
        # Small enough that a CPU finishes a whole run in seconds.
        # A preview at every step: the tiny drawings have only two.
        "generation": {"width": 64, "height": 64, "steps": 2, "guidance": 5.0, "preview_every": 1},
        "omnigen": {"steps": 2, "max_input_image_size": 64},
        "judge": {"min_pixels": 4 * 28 * 28, "max_pixels": 16 * 28 * 28, "max_new_tokens": 24},
        "llm": {"max_new_tokens": 32},
        "eval": {"gold_per_class": 2},
    }


# Whether load_settings checks that the device is present on this machine (see its check_device argument).
_CHECK_DEVICE_AVAILABLE: ContextVar[bool] = ContextVar("imgrag_check_device_available", default=True)


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


def _section_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _merge(merged: dict[str, Any], sources: dict[str, str], layer: dict[str, Any], source: str) -> None:
    """Merge one layer into ``merged`` (a TOML-shaped dict), refusing unknown keys; ``sources`` remembers which
    layer set each dotted key, so a value refused later is blamed on the right file or flag."""
    top = _section_keys(Settings)
    for key, value in layer.items():
        if key in _SECTION_CLASSES:
            if not isinstance(value, dict):
                raise SettingsError(f"{source}: [{key}] must be a table")
            known = _section_keys(_SECTION_CLASSES[key])
            for sub, subvalue in value.items():
                if sub not in known:
                    raise SettingsError(f"{source}: unknown key '{key}.{sub}' (known: {', '.join(known)})")
                merged.setdefault(key, {})[sub] = subvalue
                sources[f"{key}.{sub}"] = source
        elif key in top:
            merged[key] = value
            sources[key] = source
        else:
            raise SettingsError(f"{source}: unknown key '{key}' (known: {', '.join(top)})")


def _validate(merged: dict[str, Any], sources: dict[str, str]) -> Settings:
    """Build Settings from the merged layers; the first refused value becomes one line naming its source."""
    try:
        return Settings(**merged)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        # A section's own check (min_pixels <= max_pixels) is blamed on whoever set one of its keys.
        source = sources.get(where) or next((v for k, v in sources.items() if k.startswith(where + ".")), "defaults")
        got = f", got {error['input']!r}" if error["type"] not in ("value_error", "missing") else ""
        raise SettingsError(f"{source}: {where}: {message}{got}") from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise SettingsError(f"{path}: settings file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: malformed TOML: {exc}") from None
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read: {exc.strerror}") from None


def _env_layer(environ: dict[str, str]) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    top = set(_section_keys(Settings)) - set(_SECTION_CLASSES) - {"profile"}
    for name, value in environ.items():
        if not name.startswith("IMGRAG_") or name in ("IMGRAG_HOME", "IMGRAG_PROFILE", "IMGRAG_CONFIG"):
            continue
        key = name[len("IMGRAG_"):].lower()
        if key in top:
            layer[key] = value
            continue
        for section in _SECTION_CLASSES:
            if key.startswith(section + "_"):
                layer.setdefault(section, {})[key[len(section) + 1:]] = value
                break
        else:
            raise SettingsError(f"environment: unknown variable {name}")
    return layer


def load_settings(
    profile: str | None = None,
    config: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
    check_device: bool = True,
) -> Settings:
    """Resolve the settings: profile defaults < TOML file < IMGRAG_* environment < ``overrides``.

    ``profile`` is "default", "tiny" or a TOML path (falls back to ``IMGRAG_PROFILE``);
    ``config`` is an extra TOML file layered on top (falls back to ``IMGRAG_CONFIG``);
    ``overrides`` are the command-line flags, as a dict in the TOML shape (None values are ignored);
    ``check_device=False`` checks the device's spelling but not that this machine has it (downloads, dry runs).
    """
    environ = dict(os.environ if environ is None else environ)
    home = Path(environ.get("IMGRAG_HOME", imgrag_home())).expanduser()
    profile = profile or environ.get("IMGRAG_PROFILE") or "default"
    config = config or environ.get("IMGRAG_CONFIG") or None

    layers: list[tuple[dict[str, Any], str]] = []
    if profile not in PROFILES:
        path = builtin_presets().get(profile) or Path(profile).expanduser()
        if path.suffix != ".toml" and not path.exists():
            names = ", ".join([*PROFILES, *builtin_presets()])
            raise SettingsError(f"unknown profile '{profile}' (use one of {names} or the path of a .toml file)")
        file_layer = _read_toml(path)
        base = file_layer.pop("profile", "default")
        if base not in PROFILES:
            raise SettingsError(f"{path}: profile must be one of {', '.join(PROFILES)}, got {base!r}")
        layers.append((file_layer, str(path)))
        profile = base
    merged: dict[str, Any] = {"profile": profile}
    sources: dict[str, str] = {}
    if profile == "tiny":
        _merge(merged, sources, _tiny_profile(), "tiny profile")
    for layer, source in layers:
        _merge(merged, sources, layer, source)
    if config:
        file_layer = _read_toml(Path(config).expanduser())
        if "profile" in file_layer and file_layer.pop("profile") != profile:
            raise SettingsError(f"{config}: 'profile' in a --config file must match the chosen profile")
        _merge(merged, sources, file_layer, str(config))
    _merge(merged, sources, _env_layer(environ), "environment")
    if overrides:
        _merge(merged, sources, _drop_none(overrides), "command line")
    token = _CHECK_DEVICE_AVAILABLE.set(check_device)
    try:
        settings = _validate(merged, sources)
    finally:
        _CHECK_DEVICE_AVAILABLE.reset(token)

    # Paths that default to imgrag's home; per profile so the tiny store never mixes with real embeddings.
    suffix = "" if settings.profile == "default" else f"-{settings.profile}"
    settings.store = settings.store or str(home / f"store{suffix}")
    settings.output_dir = settings.output_dir or str(home / "runs")
    settings.threads_db = settings.threads_db or str(home / "threads.sqlite")
    settings.tiny_kit_dir = settings.tiny_kit_dir or str(home / "tiny-models")
    for f in dataclasses.fields(ModelSettings):
        value = getattr(settings.models, f.name)
        if isinstance(value, str) and TINY_KIT_PLACEHOLDER in value:
            setattr(settings.models, f.name, value.replace(TINY_KIT_PLACEHOLDER, settings.tiny_kit_dir))
    return settings


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            sub = _drop_none(v)
            if sub:
                out[k] = sub
        elif v is not None:
            out[k] = v
    return out

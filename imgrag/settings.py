"""Settings: one typed object, resolved from four layers.

Precedence, lowest first: the profile's defaults, a TOML file, ``IMGRAG_*`` environment variables,
command-line flags. A profile is ``default`` (the real checkpoints), ``tiny`` (the offline kit that
``imgrag models build-tiny`` makes) or the path of a TOML file. A TOML file may itself name a
``profile`` to start from.

Environment variables: ``IMGRAG_<KEY>`` for top-level keys (``IMGRAG_DEVICE=cpu``) and
``IMGRAG_<SECTION>_<KEY>`` for keys in a section (``IMGRAG_GENERATION_STEPS=20``).
``IMGRAG_HOME`` moves everything imgrag keeps by default (store, outputs, tiny kit, threads).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class SettingsError(ValueError):
    """A user mistake in settings: a bad file, key, value or profile. The message is one line."""


def imgrag_home() -> Path:
    """Where imgrag keeps its own files unless told otherwise."""
    return Path(os.environ.get("IMGRAG_HOME", Path.home() / ".imgrag")).expanduser()


@dataclass
class ModelSettings:
    """Checkpoints: a hub id or a local directory each."""

    generator: str = "stabilityai/stable-diffusion-xl-base-1.0"
    ip_adapter: str = "h94/IP-Adapter"
    ip_adapter_subfolder: str = "sdxl_models"
    ip_adapter_weight: str = "ip-adapter_sdxl_vit-h.safetensors"
    # Relative to ip_adapter; the ViT-H encoder lives outside sdxl_models in h94/IP-Adapter.
    ip_adapter_image_encoder: str = "models/image_encoder"
    judge: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    llm: str = "Qwen/Qwen2.5-7B-Instruct"
    # "local": transformers in this process; "openai": an OpenAI-compatible endpoint (vLLM, Ollama).
    llm_backend: str = "local"
    llm_base_url: str = ""
    llm_api_key: str = "not-needed"
    # open_clip name: "hf-hub:org/repo", "local-dir:/path", or "ARCH" with embedder_pretrained.
    embedder: str = "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    embedder_pretrained: str = ""
    dino: str = ""  # DINOv2 checkpoint for `imgrag eval`'s image-image scores (AutoModel); empty: no DINO score


@dataclass
class GenerationSettings:
    width: int = 1024
    height: int = 1024
    steps: int = 30
    guidance: float = 5.0
    ip_scale: float = 0.5
    seed: int = 0


@dataclass
class JudgeSettings:
    # Qwen2.5-VL pixel bounds: the image is resized to fit within them before the processor sees it.
    min_pixels: int = 256 * 28 * 28
    max_pixels: int = 1024 * 28 * 28
    # A JSON verdict takes about 60 tokens; the judge stops at its closing brace (imgrag.stopping).
    max_new_tokens: int = 128


@dataclass
class LLMSettings:
    max_new_tokens: int = 512
    temperature: float = 0.0


@dataclass
class BudgetSettings:
    max_rounds: int = 3
    max_tool_calls: int = 20
    max_seconds: float = 1800.0
    # Consecutive unusable LLM replies before the fixed policy takes the next step.
    max_llm_failures: int = 2


@dataclass
class RetrievalSettings:
    k: int = 2
    min_score: float = -1.0
    # RealRAG-style reflective re-ranking: score = sim(query, ref) - rerank_lambda * sim(candidate, ref).
    rerank_lambda: float = 0.3


@dataclass
class Settings:
    profile: str = "default"
    # "auto" picks cuda when present, else cpu.
    device: str = "auto"
    # "auto": float16 on cuda, float32 on cpu.
    dtype: str = "auto"
    # GPU memory the model manager may fill, in GiB; 0 means no limit (everything stays resident).
    gpu_memory_gb: float = 0.0
    # What eviction does to a model: "cpu" (move to CPU RAM) or "drop" (free it; reload later).
    offload: str = "cpu"
    # A directory (embedded Chroma) or http://host:port (a Chroma server).
    store: str = ""
    output_dir: str = ""
    threads_db: str = ""
    tiny_kit_dir: str = ""
    models: ModelSettings = field(default_factory=ModelSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    judge: JudgeSettings = field(default_factory=JudgeSettings)
    llm: LLMSettings = field(default_factory=LLMSettings)
    budget: BudgetSettings = field(default_factory=BudgetSettings)
    retrieval: RetrievalSettings = field(default_factory=RetrievalSettings)

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
    "models": ModelSettings, "generation": GenerationSettings, "judge": JudgeSettings,
    "llm": LLMSettings, "budget": BudgetSettings, "retrieval": RetrievalSettings,
}
PROFILES = ("default", "tiny")
CHOICES = {"offload": ("cpu", "drop"), "models.llm_backend": ("local", "openai"),
           "dtype": ("auto", "float32", "float16", "bfloat16")}


TINY_KIT_PLACEHOLDER = "{tiny_kit}"


def _tiny_profile() -> dict[str, Any]:
    # Paths hold a placeholder, filled with the final tiny_kit_dir once every layer is applied.
    kit = TINY_KIT_PLACEHOLDER
    return {
        "profile": "tiny",
        "models": {
            "generator": f"{kit}/sdxl",
            "ip_adapter": f"{kit}/ip-adapter",
            "judge": f"{kit}/qwen2.5-vl",
            "llm": f"{kit}/qwen2.5-instruct",
            "embedder": f"local-dir:{kit}/open-clip",
        },
        # Small enough that a CPU finishes a whole run in seconds.
        "generation": {"width": 64, "height": 64, "steps": 2, "guidance": 5.0},
        "judge": {"min_pixels": 4 * 28 * 28, "max_pixels": 16 * 28 * 28, "max_new_tokens": 24},
        "llm": {"max_new_tokens": 32},
    }


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Turn a TOML or environment value into the field's type, or raise a one-line error."""
    if isinstance(typ, types.UnionType):
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{where}: expected {typ.__name__}, got {value!r}") from None
    return value


def _apply(settings: Settings, layer: dict[str, Any], source: str) -> None:
    """Apply one layer of values onto settings, checking every key and type."""
    top_types = _field_types(Settings)
    for key, value in layer.items():
        if key in _SECTION_CLASSES:
            if not isinstance(value, dict):
                raise SettingsError(f"{source}: [{key}] must be a table")
            section = getattr(settings, key)
            types_ = _field_types(_SECTION_CLASSES[key])
            for sub, subvalue in value.items():
                if sub not in types_:
                    raise SettingsError(f"{source}: unknown key '{key}.{sub}' (known: {', '.join(types_)})")
                setattr(section, sub, _coerce(subvalue, types_[sub], f"{source}: {key}.{sub}"))
        elif key in top_types:
            setattr(settings, key, _coerce(value, top_types[key], f"{source}: {key}"))
        else:
            known = ", ".join(list(top_types))
            raise SettingsError(f"{source}: unknown key '{key}' (known: {known})")


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
    top = set(_field_types(Settings)) - set(_SECTION_CLASSES) - {"profile"}
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


def _check_choices(settings: Settings) -> None:
    for dotted, allowed in CHOICES.items():
        obj: Any = settings
        parts = dotted.split(".")
        for part in parts[:-1]:
            obj = getattr(obj, part)
        value = getattr(obj, parts[-1])
        if value not in allowed:
            raise SettingsError(f"{dotted} must be one of {', '.join(allowed)}, got {value!r}")
    if settings.gpu_memory_gb < 0:
        raise SettingsError(f"gpu_memory_gb must be >= 0, got {settings.gpu_memory_gb}")
    if not 0.0 <= settings.generation.ip_scale <= 2.0:
        raise SettingsError(f"generation.ip_scale must be within 0..2, got {settings.generation.ip_scale}")
    for name in ("max_rounds", "max_tool_calls"):
        if getattr(settings.budget, name) < 1:
            raise SettingsError(f"budget.{name} must be at least 1")


def load_settings(
    profile: str | None = None,
    config: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Resolve the settings: profile defaults < TOML file < IMGRAG_* environment < ``overrides``.

    ``profile`` is "default", "tiny" or a TOML path (falls back to ``IMGRAG_PROFILE``);
    ``config`` is an extra TOML file layered on top (falls back to ``IMGRAG_CONFIG``);
    ``overrides`` are the command-line flags, as a dict in the TOML shape (None values are ignored).
    """
    environ = dict(os.environ if environ is None else environ)
    home = Path(environ.get("IMGRAG_HOME", imgrag_home())).expanduser()
    profile = profile or environ.get("IMGRAG_PROFILE") or "default"
    config = config or environ.get("IMGRAG_CONFIG") or None

    layers: list[tuple[dict[str, Any], str]] = []
    if profile not in PROFILES:
        path = Path(profile).expanduser()
        if path.suffix != ".toml" and not path.exists():
            raise SettingsError(
                f"unknown profile '{profile}' (use one of {', '.join(PROFILES)} or the path of a .toml file)")
        file_layer = _read_toml(path)
        base = file_layer.pop("profile", "default")
        if base not in PROFILES:
            raise SettingsError(f"{path}: profile must be one of {', '.join(PROFILES)}, got {base!r}")
        layers.append((file_layer, str(path)))
        profile = base
    settings = Settings(profile=profile)
    if profile == "tiny":
        _apply(settings, _tiny_profile(), "tiny profile")
    for layer, source in layers:
        _apply(settings, layer, source)
    if config:
        file_layer = _read_toml(Path(config).expanduser())
        if "profile" in file_layer and file_layer.pop("profile") != settings.profile:
            raise SettingsError(f"{config}: 'profile' in a --config file must match the chosen profile")
        _apply(settings, file_layer, str(config))
    _apply(settings, _env_layer(environ), "environment")
    if overrides:
        cleaned = _drop_none(overrides)
        _apply(settings, cleaned, "command line")

    # Paths that default to imgrag's home; per profile so the tiny store never mixes with real embeddings.
    suffix = "" if settings.profile == "default" else f"-{settings.profile}"
    settings.store = settings.store or str(home / f"store{suffix}")
    settings.output_dir = settings.output_dir or str(home / "runs")
    settings.threads_db = settings.threads_db or str(home / "threads.sqlite")
    settings.tiny_kit_dir = settings.tiny_kit_dir or str(home / "tiny-models")
    for f in dataclasses.fields(ModelSettings):
        value = getattr(settings.models, f.name)
        if TINY_KIT_PLACEHOLDER in value:
            setattr(settings.models, f.name, value.replace(TINY_KIT_PLACEHOLDER, settings.tiny_kit_dir))
    _check_choices(settings)
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

"""Settings: one typed object, resolved from four layers.

Precedence, lowest first: the profile's defaults, a TOML file, ``IMGRAG_*`` environment variables,
command-line flags. A profile is ``default`` (the real checkpoints), ``tiny`` (the offline kit that
``imgrag models build-tiny`` makes), a built-in hardware preset (``gpu-80gb``, ``gpu-24gb``, ``cpu``: TOML
files in ``imgrag/profiles/``) or the path of a TOML file. A TOML file may itself name a
``profile`` to start from.

Environment variables: ``IMGRAG_<KEY>`` for top-level keys (``IMGRAG_DEVICE=cpu``) and
``IMGRAG_<SECTION>_<KEY>`` for keys in a section (``IMGRAG_GENERATION_STEPS=20``).
``IMGRAG_HOME`` moves everything imgrag keeps by default (store, outputs, tiny kit, threads).

How: pydantic-settings reads and merges the layers (``_Layers``: its environment source with the ``IMGRAG_`` prefix
and ``_`` as the nested delimiter, split once so ``IMGRAG_GENERATION_MAX_SIDE`` is ``generation.max_side``; its TOML
source for the profile file and ``--config``; their order in ``settings_customise_sources``). The schema validates
the merged result: ``Settings`` here, its sections in imgrag/settings_sections.py, the profiles in
imgrag/presets.py. ``Settings`` is not itself a ``BaseSettings``: it and its sections are pydantic dataclasses
the code copies with ``dataclasses.replace``, and a ``BaseSettings`` is a model. What is ours is thin: each layer
remembers which keys it gave, so a refused value is blamed in one line on the file, variable or flag that said it
(pydantic-settings' own errors do not say which source a value came from), and an ``IMGRAG_*`` variable that
names no setting is refused (pydantic-settings only looks up the names it knows, so a typo would go unheard).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from contextvars import ContextVar
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, create_model, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from imgrag.presets import PRESETS_DIR, PROFILES, TINY_KIT_PLACEHOLDER, builtin_presets, tiny_profile
from imgrag.settings_sections import (
    DEFAULT_MAX_SIDE,
    DEFAULT_MAX_STEPS,
    DEFAULT_UNSAFE_CONCEPTS,
    DEVICE_PATTERN,
    MAX_IP_SCALE,
    BudgetSettings,
    EvalSettings,
    GenerationSettings,
    JudgeSettings,
    LLMSettings,
    LoraSettings,
    ModelSettings,
    OmniGenSettings,
    RetrievalSettings,
    SafetySettings,
    check_device,
    check_drawing_bounds,
)
from imgrag.settings_sections import dataclass as settings_dataclass

# The names other modules import from here: the schema's live in imgrag/settings_sections.py and imgrag/presets.py.
__all__ = [
    "DEFAULT_MAX_SIDE", "DEFAULT_MAX_STEPS", "DEFAULT_UNSAFE_CONCEPTS", "DEVICE_PATTERN", "MAX_IP_SCALE", "PRESETS_DIR",
    "PROFILES", "TINY_KIT_PLACEHOLDER", "TINY_MARK", "TINY_WARNING", "BudgetSettings", "EvalSettings",
    "GenerationSettings", "JudgeSettings", "LLMSettings", "LoraSettings", "ModelSettings", "OmniGenSettings",
    "RetrievalSettings", "SafetySettings", "Settings", "SettingsError", "builtin_presets", "check_device",
    "check_drawing_bounds", "imgrag_home", "load_settings",
]


class SettingsError(ValueError):
    """A user mistake in settings: a bad file, key, value or profile. The message is one line."""


# Said once by every command, kept in result.json's note and shown on the report when the profile is "tiny".
TINY_WARNING = ("tiny profile: random-weight models — the images are noise and the verdicts junk; "
                "this checks the plumbing, not quality.")
# The same, short enough to stand beside each answer the chat and the web page show.
TINY_MARK = "tiny profile: random weights, the picture is noise and the verdict junk"


def imgrag_home() -> Path:
    """Where imgrag keeps its own files unless told otherwise."""
    return Path(os.environ.get("IMGRAG_HOME", Path.home() / ".imgrag")).expanduser()


# Whether load_settings checks that the device is present on this machine (see its check_device argument).
_CHECK_DEVICE_AVAILABLE: ContextVar[bool] = ContextVar("imgrag_check_device_available", default=True)


@settings_dataclass
class Settings:
    """Everything a command runs with: the top-level keys, then one section per TOML table."""

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
# Variables that choose the layers, or where imgrag keeps its files, rather than set a value.
_NOT_SETTINGS = ("IMGRAG_HOME", "IMGRAG_PROFILE", "IMGRAG_CONFIG")
# Refused while the layers merge, before any value is checked: reported ahead of a bad value.
_UNKNOWN_KEY = ("extra_forbidden", "unexpected_keyword_argument")


def _section_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


@dataclasses.dataclass
class _Call:
    """One load_settings call, as its layers need it: pydantic-settings builds them in a classmethod, with no
    arguments of ours, so they are handed over in a ContextVar (safe across threads and asyncio tasks)."""

    profile: str  # "default", "tiny", or what ``profile_file`` starts from once it is read
    profile_file: Path | None
    config: str | None
    environ: dict[str, str]
    blame: dict[str, str] = field(default_factory=dict)  # dotted key -> the layer whose value won


_CALL: ContextVar[_Call] = ContextVar("imgrag_settings_call")


class _TomlFile(TomlConfigSettingsSource):
    """pydantic-settings' TOML source for one file, with errors that name the file: its own skips a missing file
    without a word and lets a TOMLDecodeError out. The file's ``profile`` key chose the layers under it rather than
    set a value: it is kept in ``self.profile`` (None when absent) and taken out of the layer."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        self.profile: Any = None
        if not path.is_file():
            # The source reads only regular files; say why this one is not read rather than skip it.
            reason = "cannot read: Is a directory" if path.is_dir() else (
                "cannot read: not a regular file" if path.exists() else "settings file not found")
            raise SettingsError(f"{path}: {reason}")
        super().__init__(settings_cls, toml_file=path)

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        try:
            data = super()._read_file(file_path)
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"{file_path}: malformed TOML: {exc}") from None
        except OSError as exc:
            raise SettingsError(f"{file_path}: cannot read: {exc.strerror}") from None
        self.profile = data.pop("profile", None)
        return data


class _Blamed(PydanticBaseSettingsSource):
    """One layer as pydantic-settings merges it, writing into ``blame`` which dotted keys it gave ("device",
    "generation.steps"), so that a value refused later is blamed on this layer's ``name``."""

    def __init__(self, source: PydanticBaseSettingsSource, name: str, blame: dict[str, str]) -> None:
        super().__init__(source.settings_cls)
        self.source, self.name, self.blame = source, name, blame

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.source.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        layer = self.source()
        for key, value in layer.items():
            # pydantic-settings calls the highest layer first: the first to give a key is the one whose value won.
            self.blame.setdefault(key, self.name)
            if key in _SECTION_CLASSES and isinstance(value, dict):
                for sub in value:
                    self.blame.setdefault(f"{key}.{sub}", self.name)
        return layer


class _LayersBase(BaseSettings):
    """The layers as pydantic-settings merges them; ``_Layers`` adds one field per setting. The values are not
    checked here (each field takes anything, each section any table): ``Settings`` checks the merged whole, so
    one schema says what a value may be."""

    # TOML keys match exactly; the environment's names are lowered before they are matched (see below).
    model_config = SettingsConfigDict(env_prefix="imgrag_", env_nested_delimiter="_", env_nested_max_split=1,
                                      case_sensitive=True, extra="forbid")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The layers, highest first: flags (the init arguments), environment, --config, the profile's file, the
        profile's defaults. No .env file and no secrets directory are read. Raises SettingsError for a file that
        cannot be read, a profile file that starts from no known profile, and an unknown ``IMGRAG_*`` variable."""
        call = _CALL.get()
        files: list[tuple[PydanticBaseSettingsSource, str]] = []
        if call.profile_file is not None:
            preset = _TomlFile(settings_cls, call.profile_file)
            call.profile = preset.profile or "default"
            if call.profile not in PROFILES:
                raise SettingsError(f"{call.profile_file}: profile must be one of {', '.join(PROFILES)}, "
                                    f"got {call.profile!r}")
            files.append((preset, str(call.profile_file)))
        if call.config:
            extra = _TomlFile(settings_cls, Path(call.config).expanduser())
            if extra.profile is not None and extra.profile != call.profile:
                raise SettingsError(f"{call.config}: 'profile' in a --config file must match the chosen profile")
            files.append((extra, call.config))
        assert isinstance(env_settings, EnvSettingsSource)
        # The given environment, not os.environ; only IMGRAG_* in capitals, lowered as the source matches them.
        env_settings.env_vars = {name.lower(): value for name, value in _setting_variables(call.environ).items()}
        defaults = InitSettingsSource(settings_cls, tiny_profile() if call.profile == "tiny" else {})
        layers = [(init_settings, "command line"), (env_settings, "environment"), *reversed(files),
                  (defaults, "tiny profile")]
        return tuple(_Blamed(source, name, call.blame) for source, name in layers)


_Layers = create_model(  # one field per setting but ``profile``, which chooses the layers and is no layer's value
    "_Layers", __base__=_LayersBase,
    **{key: (dict[str, Any] | None if key in _SECTION_CLASSES else Any, None)
       for key in _section_keys(Settings) if key != "profile"},
)


def _setting_variables(environ: dict[str, str]) -> dict[str, str]:
    """The ``IMGRAG_*`` variables that set a value; SettingsError naming the first that names no setting."""
    top = set(_section_keys(Settings)) - set(_SECTION_CLASSES) - {"profile"}
    found: dict[str, str] = {}
    for name, value in environ.items():
        if not name.startswith("IMGRAG_") or name in _NOT_SETTINGS:
            continue
        key = name[len("IMGRAG_"):].lower()
        if key not in top and not any(key.startswith(section + "_") for section in _SECTION_CLASSES):
            raise SettingsError(f"environment: unknown variable {name}")
        found[name] = value
    return found


def _blamed_error(exc: ValidationError, blame: dict[str, str]) -> SettingsError:
    """The first refused value as one line, ``SOURCE: KEY: WHY[, got VALUE]``; unknown keys and sections that are
    no table come first. SOURCE is the layer that gave the key, or a table holding it (a ``[[models.loras]]`` entry),
    or for a section's own check (min_pixels <= max_pixels) one of the keys in it."""
    errors = exc.errors()
    error = next((e for e in errors if e["type"] in _UNKNOWN_KEY or (e["type"] == "dict_type" and len(e["loc"]) == 1)),
                 errors[0])
    loc = [str(part) for part in error["loc"]]
    where = ".".join(loc)
    source = next((blame[".".join(loc[:n])] for n in range(len(loc), 0, -1) if ".".join(loc[:n]) in blame), None)
    source = source or next((v for k, v in blame.items() if k.startswith(where + ".")), "defaults")
    if error["type"] in _UNKNOWN_KEY and len(loc) <= 2:
        known = _section_keys(_SECTION_CLASSES[loc[0]] if len(loc) == 2 else Settings)
        return SettingsError(f"{source}: unknown key '{where}' (known: {', '.join(known)})")
    if error["type"] == "dict_type" and len(loc) == 1:
        return SettingsError(f"{source}: [{where}] must be a table")
    message = error["msg"].removeprefix("Value error, ")
    got = f", got {error['input']!r}" if error["type"] not in ("value_error", "missing") else ""
    return SettingsError(f"{source}: {where}: {message}{got}")


def load_settings(
    profile: str | None = None,
    config: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
    check_device: bool = True,
) -> Settings:
    """Resolve the settings: profile defaults < TOML file < IMGRAG_* environment < ``overrides``.

    ``profile`` is "default", "tiny", a built-in preset or a TOML path (falls back to ``IMGRAG_PROFILE``);
    ``config`` is an extra TOML file layered on top (falls back to ``IMGRAG_CONFIG``);
    ``overrides`` are the command-line flags, as a dict in the TOML shape (None values are ignored);
    ``environ`` replaces os.environ (tests); ``check_device=False`` checks the device's spelling but not that this
    machine has it (downloads, dry runs). Raises SettingsError, one line naming the source of the bad value.
    """
    environ = dict(os.environ if environ is None else environ)
    home = Path(environ.get("IMGRAG_HOME", imgrag_home())).expanduser()
    profile = profile or environ.get("IMGRAG_PROFILE") or "default"
    config = config or environ.get("IMGRAG_CONFIG") or None
    profile_file = None
    if profile not in PROFILES:
        profile_file = builtin_presets().get(profile) or Path(profile).expanduser()
        if profile_file.suffix != ".toml" and not profile_file.exists():
            names = ", ".join([*PROFILES, *builtin_presets()])
            raise SettingsError(f"unknown profile '{profile}' (use one of {names} or the path of a .toml file)")
    call = _Call(profile, profile_file, str(config) if config else None, environ)
    call_token, device_token = _CALL.set(call), _CHECK_DEVICE_AVAILABLE.set(check_device)
    try:
        layers = _Layers(**_drop_none(overrides or {}))
        settings = Settings(profile=call.profile, **layers.model_dump(exclude_unset=True))
    except ValidationError as exc:
        raise _blamed_error(exc, call.blame) from None
    finally:
        _CALL.reset(call_token)
        _CHECK_DEVICE_AVAILABLE.reset(device_token)

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

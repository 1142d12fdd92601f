"""The model roles and which files each needs: the roles a profile loads, what each role's setting names (a hub
id, a local folder, an architecture with a weights file), the ``allow_patterns`` that select exactly the files its
loader reads from a hub repository, and the records :mod:`imgrag.weights.model_files` fills in when it looks for
them (:class:`RoleFiles`, one :class:`FileStatus` per file).

open_clip is imported inside the function that uses it: it takes seconds, and ``imgrag --help`` imports this
module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub.utils import filter_repo_objects

from imgrag.hub_cache import is_local_ref
from imgrag.settings import Settings
from imgrag.weights.adapters import adapter_patterns
from imgrag.weights.hub_layouts import RepoFile

ROLES = ("generator", "ip_adapter", "judge", "llm", "embedder", "lcm_lora", "omnigen")
ROLE_SETTING = {"generator": "models.generator", "ip_adapter": "models.ip_adapter", "judge": "models.judge",
                "llm": "models.llm", "embedder": "models.embedder", "lcm_lora": "models.lcm_lora",
                "omnigen": "models.omnigen"}
LCM_LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name (latent-consistency/lcm-lora-sdxl)


def active_roles(settings: Settings) -> list[str]:
    """The roles this profile loads: the LCM-LoRA only when ``generation.fast = "lcm-lora"``, OmniGen only when
    ``generation.repair_with`` or ``draw_with`` is "omnigen"."""
    g = settings.generation
    wanted = {"lcm_lora": g.fast == "lcm-lora", "omnigen": "omnigen" in (g.repair_with, g.draw_with)}
    return [r for r in ROLES if wanted.get(r, True)]

# SDXL's diffusers folders: the weights are fetched as the "fp16" variant (half the bytes); the generator
# loads that variant when it is what the folder holds and casts to the settings' dtype.
SDXL_MODEL_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae")
# The base repository's vae_1_0/ (the 1.0 VAE, kept beside the 0.9 VAE in vae/) is no pipeline component, but
# diffusers' download counts every folder's weights of the variant among the files a cached pipeline must hold:
# without it, the first load of a hub id downloads it (167 MB) in the middle of a run.
SDXL_EXTRA_WEIGHTS = ("vae_1_0/diffusion_pytorch_model.fp16.safetensors",)
SDXL_PATTERNS = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/*", "tokenizer_2/*",
                 *[p for c in SDXL_MODEL_COMPONENTS for p in (f"{c}/config.json", f"{c}/*.fp16.safetensors")],
                 *SDXL_EXTRA_WEIGHTS]
# transformers folders (Qwen): configs, tokenizer, chat template, safetensors shards and their index.
# "*.jinja" is for repositories saved by transformers 5 (chat_template.jinja); Qwen's keep it in JSON today.
OPTIONAL_PATTERNS = ("*.jinja",)
TRANSFORMERS_PATTERNS = ["*.json", "*.safetensors", "merges.txt", *OPTIONAL_PATTERNS]
OPEN_CLIP_PATTERNS = ["open_clip_config.json", "open_clip_model.safetensors"]
FP16_UNET = "unet/diffusion_pytorch_model.fp16.safetensors"
# OmniGen's diffusers folders: its weights are stored once (the transformer in bfloat16), with no fp16 variant.
OMNIGEN_COMPONENTS = ("transformer", "vae")
OMNIGEN_PATTERNS = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/*",
                    *[p for c in OMNIGEN_COMPONENTS for p in (f"{c}/config.json", f"{c}/*.safetensors")]]


@dataclass
class FileStatus:
    """One needed file: its path in the repository or folder, approximate size if known, whether it is here."""

    path: str
    present: bool
    size: int | None = None
    approx_only: bool = False
    where: Path | None = None  # the file on disk, when it is here (for reading its header)
    local: bool = False  # a file of the user's own in a role whose other files come from the hub: never fetched


@dataclass
class RoleFiles:
    """What one role needs and what of it is here.

    ``source`` is "hub" (a hub id: files in the HF cache), "local" (a folder or file), "remote" (the LLM
    served over HTTP: no files) or "unset". ``problems`` are one-line findings beyond missing files (a wrong
    adapter file name, an encoder of the wrong width); ``notes`` are harmless ones. A local role may still take
    some files from the hub: a single-file generator's configuration (``repo_id`` and ``patterns`` then name
    them, and the checkpoint file itself is ``local``); :attr:`to_fetch` is what a download can bring.
    """

    role: str
    ref: str
    source: str
    repo_id: str | None = None
    patterns: list[str] = field(default_factory=list)
    files: list[FileStatus] = field(default_factory=list)
    recorded: bool = False  # the repository's layout is written down in imgrag.weights.hub_layouts
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def missing(self) -> list[FileStatus]:
        return [f for f in self.files if not f.present]

    @property
    def ok(self) -> bool:
        return self.source in ("remote", "unset") or (bool(self.files) and not self.missing and not self.problems)

    @property
    def to_fetch(self) -> list[FileStatus]:
        """The missing files ``imgrag models download`` can fetch (none without a hub repository)."""
        return [f for f in self.missing if not f.local] if self.repo_id else []

    @property
    def downloadable(self) -> bool:
        """Whether ``imgrag models download`` has something to fetch for this role (a hub repository whose layout
        is not recorded is fetched to be sure: its files are known only once it is cached)."""
        if self.source == "hub":
            return bool(self.missing) or not self.recorded
        return bool(self.to_fetch)

    @property
    def fetch_bytes(self) -> int:
        return sum(f.size or 0 for f in self.to_fetch)

    @property
    def total_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files)

    @property
    def missing_bytes(self) -> int:
        return sum(f.size or 0 for f in self.missing)

    @property
    def approx_only(self) -> bool:
        return any(f.approx_only for f in self.files) or (self.source == "hub" and not self.recorded)

    def as_dict(self) -> dict[str, Any]:
        return {"role": self.role, "ref": self.ref, "source": self.source, "repo_id": self.repo_id,
                "allow_patterns": self.patterns, "recorded_layout": self.recorded, "ok": self.ok,
                "files": [{"path": f.path, "size": f.size, "present": f.present, "size_approximate": f.approx_only}
                          for f in self.files],
                "total_bytes": self.total_bytes, "missing_bytes": self.missing_bytes,
                "missing": [f.path for f in self.missing], "to_fetch_bytes": self.fetch_bytes,
                "problems": self.problems, "notes": self.notes}


# ----------------------------------------------------------------------------------------------
# Where a role's checkpoint lives
# ----------------------------------------------------------------------------------------------


def embedder_hub_repo(settings: Settings) -> tuple[str | None, str | None]:
    """(repo id, weights file name) the embedder setting reads from the hub, or (None, None) when none.

    ``hf-hub:org/repo`` reads open_clip's files of that repository; an architecture with an open_clip
    pretrained *tag* (``ViT-B-32`` + ``laion2b_s34b_b79k``) reads the repository open_clip's table names.
    """
    name = settings.models.embedder.strip()
    if name.startswith("hf-hub:"):
        return name[len("hf-hub:"):], "open_clip_model.safetensors"
    pretrained = settings.models.embedder_pretrained.strip()
    if name.startswith("local-dir:") or not pretrained or looks_like_file(pretrained):
        return None, None
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name.replace("/", "-"), pretrained) or {}
    repo = (cfg.get("hf_hub") or "").strip("/")
    if not repo:
        return None, None
    filename = cfg.get("hf_hub_filename") or "open_clip_pytorch_model.bin"
    if filename.endswith(".bin"):
        filename = "open_clip_model.safetensors" if filename == "open_clip_pytorch_model.bin" else filename[:-4] + \
            ".safetensors"
    return repo, filename


def looks_like_file(pretrained: str) -> bool:
    """Whether ``models.embedder_pretrained`` names a weights file (a path or a weights suffix), not an open_clip
    pretrained tag."""
    return "/" in pretrained or "\\" in pretrained or pretrained.endswith((".safetensors", ".bin", ".pth", ".pt"))


def hub_patterns(role: str, settings: Settings) -> list[str]:
    """The ``allow_patterns`` that fetch exactly what ``role``'s loader reads from a hub repository."""
    if role == "generator":
        return list(SDXL_PATTERNS)
    if role == "ip_adapter":
        return adapter_patterns(settings)
    if role in ("judge", "llm"):
        return list(TRANSFORMERS_PATTERNS)
    if role == "lcm_lora":
        return [LCM_LORA_FILE]
    if role == "omnigen":
        return list(OMNIGEN_PATTERNS)
    if role == "embedder":
        _, filename = embedder_hub_repo(settings)
        if settings.models.embedder.strip().startswith("hf-hub:"):
            return ["open_clip_config.json", filename or "open_clip_model.safetensors"]
        return [filename or "open_clip_model.safetensors"]  # a pretrained tag: the config is open_clip's own
    raise ValueError(f"unknown role {role!r}")


def role_ref(role: str, settings: Settings) -> tuple[str, str, str | None]:
    """(what the settings say, source kind, hub repo id or None) for one role."""
    m = settings.models
    if role == "llm" and m.llm_backend != "local":
        return f"{m.llm} @ {m.llm_base_url}", "remote", None
    if role == "embedder":
        ref = m.embedder.strip()
        repo, _ = embedder_hub_repo(settings)
        if repo:
            return ref, "hub", repo
        if not ref:
            return ref, "unset", None
        return ref if not m.embedder_pretrained else f"{ref} + {m.embedder_pretrained}", "local", None
    ref = getattr(m, role).strip()
    if not ref:
        return ref, "unset", None
    return (ref, "local", None) if is_local_ref(ref) else (ref, "hub", ref)


def select_files(layout: list[RepoFile], patterns: list[str]) -> list[RepoFile]:
    """The files of a recorded repository that ``patterns`` select, matched exactly as the hub client does."""
    return list(filter_repo_objects(layout, allow_patterns=patterns, key=lambda f: f.path))


"""Whether the files each model role needs are here.

A role (generator, IP-Adapter, judge, agent LLM, embedder) names a checkpoint in the settings: a hub id,
a local folder, or (the embedder) an architecture with a weights file. For a hub id, :mod:`imgrag.weights.roles`
gives the ``allow_patterns`` that select the files the loaders read, and, for the repositories recorded in
:mod:`imgrag.weights.hub_layouts`, the exact files and their approximate sizes, with no network. For a local folder
this module lists what the loaders will open (reading ``model_index.json`` and shard indexes to find the rest).

:func:`check_roles` looks at every needed file (the HF cache through ``try_to_load_from_cache``, or the
folder) and never touches the network; ``imgrag doctor`` prints it. :func:`imgrag.weights.downloads.download`
fetches one role's files with ``huggingface_hub.snapshot_download(allow_patterns=...)`` (resumable, with the hub
client's progress bars); only ``imgrag models download`` calls it: imgrag never downloads during a run.

IP-Adapter weights are inspected, not only looked for: :mod:`imgrag.weights.adapters` finds which adapter a folder
holds and checks its image encoder (and names its hub files); ``imgrag doctor`` reports it through
:func:`check_roles`. Whether a setting is local and what the hub cache holds is :mod:`imgrag.hub_cache`'s.

The roles, their hub patterns and the records filled in here are :mod:`imgrag.weights.roles`; fetching is
:mod:`imgrag.weights.downloads`. huggingface_hub's ``snapshot_download`` is imported inside the function that uses
it (its import takes ~0.3 s, and ``imgrag --help`` imports this module).
"""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

from imgrag.errors import UserError
from imgrag.hub_cache import cached_file, is_local_ref, read_json_object
from imgrag.settings import Settings
from imgrag.weight_files import weight_file_problem
from imgrag.weights.adapters import resolve_ip_adapter
from imgrag.weights.hub_layouts import LAYOUTS
from imgrag.weights.roles import (
    FP16_UNET,
    LCM_LORA_FILE,
    OMNIGEN_PATTERNS,
    ROLE_SETTING,
    SDXL_PATTERNS,
    TRANSFORMERS_PATTERNS,
    FileStatus,
    RoleFiles,
    active_roles,
    hub_patterns,
    looks_like_file,
    role_ref,
    select_files,
)
from imgrag.weights.single_file import (
    CONFIG_PATTERNS,
    checkpoint_problem,
    config_files,
    config_problem,
    find_single_file,
)


def check_roles(settings: Settings, roles: list[str] | None = None) -> list[RoleFiles]:
    """Check every file each role needs, without the network; see :class:`RoleFiles`."""
    return [check_role(role, settings) for role in (roles or active_roles(settings))]


def check_role(role: str, settings: Settings) -> RoleFiles:
    """One role's needed files and whether each is in the HF cache or its folder (no network)."""
    ref, source, repo = role_ref(role, settings)
    result = RoleFiles(role, ref, source, repo)
    if source in ("remote", "unset"):
        return result
    if source == "hub":
        result.patterns = hub_patterns(role, settings)
        layout = LAYOUTS.get(repo or "")
        if layout is not None:
            result.recorded = True
            result.files = []
            for f in select_files(layout, result.patterns):
                cached = cached_file(repo, f.path)
                result.files.append(FileStatus(f.path, cached is not None, f.size, f.approx_only,
                                               Path(cached) if cached else None))
            known = {f.path for f in layout}
            for pattern in result.patterns:
                if not any(ch in pattern for ch in "*?[") and pattern not in known:
                    result.problems.append(f"{repo} has no file {pattern}: check {ROLE_SETTING[role]} and the "
                                           "settings next to it")
        else:
            folder = _cached_snapshot(repo or "")
            if folder is None:
                result.files = [FileStatus(p, False) for p in result.patterns]
            else:
                _check_folder(role, folder, settings, result)
    elif role == "generator" and _single_file_generator(settings, result):
        pass  # checked there: the file, its keys and its configuration folder
    else:
        _check_local(role, settings, result)
    if role == "llm" and _is_gptq(ref, result) and importlib.util.find_spec("gptqmodel") is None:
        result.problems.append("a GPTQ checkpoint: install the gptq extra (pip install -e '.[gptq]': gptqmodel + "
                               "optimum) to load it")
    if role == "ip_adapter" and (not result.missing or (source == "local" and Path(ref).expanduser().is_dir())):
        _check_adapter(settings, result)
    for f in result.files:
        problem = weight_file_problem(f.where) if f.present and f.where is not None else None
        if problem:
            result.problems.append(f"{f.path}: {problem}")
    return result


# The role names the loaders give imgrag.weights.checkpoints.loading, and the roles here they stand for.
_LOADER_ROLES = {"generator": "generator", "judge": "judge", "agent LLM": "llm", "OmniGen": "omnigen"}


def missing_hub_files(repo: str, loader_role: str) -> list[str]:
    """Files a loader will read from a *recorded* hub repository that are not in the cache (no network).

    Empty for repositories not recorded in :mod:`imgrag.weights.hub_layouts` and for an SDXL cached in full
    precision (the generator then loads those files, not the fp16 ones).
    """
    role = _LOADER_ROLES.get(loader_role)
    layout = LAYOUTS.get(repo)
    if role is None or layout is None:
        return []
    if role == "generator" and cached_file(repo, "unet/diffusion_pytorch_model.safetensors"):
        return []
    patterns = {"generator": SDXL_PATTERNS, "omnigen": OMNIGEN_PATTERNS}.get(role, TRANSFORMERS_PATTERNS)
    return [f.path for f in select_files(layout, patterns) if cached_file(repo, f.path) is None]


def _is_gptq(ref: str, result: RoleFiles) -> bool:
    """A GPTQ checkpoint, by its name or its config's quantization_config."""
    if "gptq" in ref.lower():
        return True
    folder = Path(ref).expanduser()
    config = read_json_object(folder / "config.json") if folder.is_dir() else {}
    return str((config.get("quantization_config") or {}).get("quant_method", "")).lower() == "gptq"

def _cached_snapshot(repo: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # not cached, or not a valid repository id
        return None


def _single_file_generator(settings: Settings, result: RoleFiles) -> bool:
    """Check a single-file generator (:mod:`imgrag.weights.single_file`) into ``result``: the file (its integrity by the
    final header check of :func:`check_role`, then whether its keys are an SDXL base checkpoint's) and the files of
    its configuration, ``models.generator_config`` (a folder, or a hub id in the cache: then ``result.repo_id`` and
    the configuration's ``allow_patterns``, which ``imgrag models download`` fetches). False when the generator is
    not a single file."""
    try:
        path = find_single_file(settings.models.generator)
    except UserError as exc:
        result.problems.append(str(exc))
        return True
    if path is None:
        return False
    here = path.is_file()
    result.files.append(FileStatus(str(path), here, _size(path) if here else None, where=path if here else None,
                                   local=True))
    config = settings.models.generator_config.strip()
    if here and weight_file_problem(path) is None:  # a damaged file is reported by check_role's header check
        try:
            kind = checkpoint_problem(path)
        except UserError as exc:
            kind = str(exc)
        if kind:
            result.problems.append(f"{path.name}: {kind}")
        else:
            result.notes.append(f"a single-file SDXL checkpoint (original layout), configured by {config or '?'}")
    if not config:
        result.problems.append("models.generator_config is empty: a single-file checkpoint needs SDXL's diffusers "
                               "configuration (stabilityai/stable-diffusion-xl-base-1.0, or a local folder of it)")
        return True
    folder: Path | None = None
    if is_local_ref(config):
        folder = Path(config).expanduser()
        if not folder.is_dir():
            result.files.append(FileStatus(str(folder), False, local=True))
            result.problems.append(f"no such folder: {folder} (models.generator_config)")
            return True
    else:
        result.repo_id, result.patterns = config, list(CONFIG_PATTERNS)
        layout = LAYOUTS.get(config)
        if layout is not None:
            result.recorded = True
            for f in select_files(layout, result.patterns):
                cached = cached_file(config, f.path)
                result.files.append(FileStatus(f"{config}:{f.path}", cached is not None, f.size, f.approx_only,
                                               Path(cached) if cached else None))
            folder = _cached_snapshot(config) if all(f.present for f in result.files) else None
        else:
            folder = _cached_snapshot(config)
            if folder is None:
                result.files += [FileStatus(f"{config}:{p}", False) for p in result.patterns]
                return True
    if folder is not None:
        problem = config_problem(folder)
        if problem:
            result.problems.append(problem)
        if not result.recorded:
            for item in config_files(folder):
                names = (item,) if isinstance(item, str) else item
                found = next((n for n in names if (folder / n).is_file()), None)
                name = found or " or ".join(names)
                shown = f"{config}:{name}" if result.repo_id else str(folder / name)
                result.files.append(FileStatus(shown, found is not None, _size(folder / found) if found else None,
                                               where=folder / found if found else None, local=not result.repo_id))
    return True


def _check_local(role: str, settings: Settings, result: RoleFiles) -> None:
    m = settings.models
    if role == "embedder":
        name = m.embedder.strip()
        if name.startswith("local-dir:"):
            _check_folder(role, Path(name[len("local-dir:"):]).expanduser(), settings, result)
            return
        if not m.embedder_pretrained.strip():
            result.problems.append(f"models.embedder {name!r} names an architecture without weights: set "
                                   "models.embedder_pretrained to a weights file, or use hf-hub:/local-dir:")
            return
        if not looks_like_file(m.embedder_pretrained.strip()):
            result.problems.append(f"open_clip has no hub repository for {name!r} with pretrained tag "
                                   f"{m.embedder_pretrained!r}: use an hf-hub: name or a weights file")
            return
        pretrained = Path(m.embedder_pretrained).expanduser()
        result.files = [FileStatus(str(pretrained), pretrained.is_file(), _size(pretrained), where=pretrained)]
        if pretrained.is_file() and is_torchscript_archive(pretrained):
            result.notes.append("an OpenAI CLIP TorchScript archive: loaded with open_clip's OpenAI loader")
        return
    _check_folder(role, Path(getattr(m, role)).expanduser(), settings, result)


def _check_folder(role: str, folder: Path, settings: Settings, result: RoleFiles) -> None:
    """The files ``role``'s loader opens in ``folder`` (a local checkpoint or a cached hub snapshot)."""
    if not folder.is_dir():
        result.files = [FileStatus(str(folder), False)]
        result.problems.append(f"no such folder: {folder} ({ROLE_SETTING[role]})")
        return
    needed: list[str | tuple[str, ...]] = []
    if role in ("generator", "omnigen"):  # a diffusers pipeline folder: what its model_index.json names
        needed.append("model_index.json")
        index = read_json_object(folder / "model_index.json")
        for name, spec in index.items():
            if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
                continue
            if name.startswith("scheduler"):
                needed.append(f"{name}/scheduler_config.json")
            elif name.startswith("tokenizer"):
                needed.append(f"{name}/tokenizer_config.json")
            else:
                needed.append(f"{name}/config.json")
                needed.extend(_weights(folder, name, ("diffusion_pytorch_model", "model")))
    elif role == "ip_adapter":
        m = settings.models
        weight = m.ip_adapter_weight
        try:  # the adapter file the folder really holds, when the setting names another (TinyIMGRAG's plus one)
            weight = resolve_ip_adapter(settings).weight
        except UserError:
            pass  # reported by _check_adapter
        needed.append(str(Path(m.ip_adapter_subfolder) / weight))
        encoder = m.ip_adapter_image_encoder.strip("/")
        needed += [f"{encoder}/config.json", (f"{encoder}/model.safetensors", f"{encoder}/pytorch_model.bin")]
    elif role in ("judge", "llm"):
        needed += ["config.json", "tokenizer_config.json", *_weights(folder, "", ("model",))]
        if role == "judge":
            needed.append(("preprocessor_config.json", "processor_config.json"))
    elif role == "lcm_lora":
        needed.append(LCM_LORA_FILE)
    elif role == "embedder":
        needed.append("open_clip_config.json")
        weights = tuple(p.name for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", ".bin", ".pth", ".pt"))
        needed.append(weights or ("open_clip_model.safetensors",))
    for item in needed:
        names = (item,) if isinstance(item, str) else item
        here = next((n for n in names if (folder / n).is_file()), None)
        shown = here or " or ".join(names)
        result.files.append(FileStatus(shown, here is not None, _size(folder / here) if here else None,
                                       where=folder / here if here else None))


def _weights(folder: Path, component: str, stems: tuple[str, ...]) -> list[str | tuple[str, ...]]:
    """A component's safetensors weights: one file (any variant) or every shard its index names."""
    base = folder / component if component else folder
    prefix = f"{component}/" if component else ""
    for stem in stems:
        for variant in ("", ".fp16"):
            index = base / f"{stem}{variant}.safetensors.index.json"
            if index.is_file():
                shards = sorted(set(read_json_object(index).get("weight_map", {}).values()))
                return [f"{prefix}{index.name}", *[f"{prefix}{s}" for s in shards]]
    return [tuple(f"{prefix}{stem}{variant}.safetensors" for stem in stems for variant in ("", ".fp16"))]


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _check_adapter(settings: Settings, result: RoleFiles) -> None:
    try:
        resolved = resolve_ip_adapter(settings)
    except UserError as exc:
        result.problems.append(str(exc))
        return
    if resolved.note:
        result.notes.append(resolved.note)
    elif resolved.kind:
        result.notes.append(f"{resolved.kind} adapter")


def is_torchscript_archive(path: Path) -> bool:
    """Whether a ``.pt`` file is a TorchScript archive (OpenAI's CLIP checkpoints are) rather than a pickle.

    TorchScript archives are zip files holding compiled ``code/`` and ``constants.pkl``; ``torch.save`` zips
    hold neither.
    """
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())
    except OSError:
        return False


def generator_variant(ref: str) -> str | None:
    """"fp16" when the SDXL checkpoint holds the fp16 weights but not the full-precision ones, else None.

    ``imgrag models download`` fetches the fp16 variant only (half the bytes); diffusers then needs
    ``variant="fp16"`` to find it and casts to the requested dtype (float32 on a CPU).
    """
    full = "unet/diffusion_pytorch_model.safetensors"
    if is_local_ref(ref):
        folder = Path(ref).expanduser()
        return "fp16" if (folder / FP16_UNET).is_file() and not (folder / full).is_file() else None
    return "fp16" if cached_file(ref, FP16_UNET) and not cached_file(ref, full) else None

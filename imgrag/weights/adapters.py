"""IP-Adapter weights, inspected rather than only looked for: which adapter a file holds (the plain
``ip-adapter_sdxl_vit-h`` or the "plus" one with its Resampler, as TinyIMGRAG ships) and whether its image
encoder has the width the adapter expects. The generator loads what :func:`resolve_ip_adapter` resolves;
``imgrag doctor`` reports it (:mod:`imgrag.weights.model_files`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imgrag.errors import ModelLoadError
from imgrag.hub_cache import cached_file, is_local_ref, read_json_object
from imgrag.settings import Settings


@dataclass
class AdapterInfo:
    """What an IP-Adapter weights file is: "plain" (one pooled image embedding, ``image_proj.proj``) or
    "plus" (a Resampler over the encoder's hidden states, ``image_proj.latents``/``proj_in``), and the
    image-encoder width it takes (projection_dim for plain, hidden_size for plus)."""

    path: Path
    kind: str
    input_dim: int


def inspect_adapter(path: Path) -> AdapterInfo | None:
    """Read an IP-Adapter safetensors file's header (no weights) and say which kind it is; None if it is none."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = set(fh.keys())
            if not any(k.startswith("ip_adapter.") for k in keys):
                return None
            if "image_proj.proj.weight" in keys:
                return AdapterInfo(path, "plain", int(fh.get_slice("image_proj.proj.weight").get_shape()[1]))
            if "image_proj.proj_in.weight" in keys and "image_proj.latents" in keys:
                return AdapterInfo(path, "plus", int(fh.get_slice("image_proj.proj_in.weight").get_shape()[1]))
    except Exception:  # not a safetensors file, or a damaged one
        return None
    return None


def adapter_patterns(settings: Settings) -> list[str]:
    """The files of ``models.ip_adapter`` on the hub that the generator loads: the weights in their subfolder, and
    the image encoder's config and weights (``imgrag models download``'s ``allow_patterns`` for the role)."""
    m = settings.models
    weight = f"{m.ip_adapter_subfolder.strip('/')}/{m.ip_adapter_weight}".lstrip("/")
    encoder = m.ip_adapter_image_encoder.strip("/")
    return [weight, f"{encoder}/config.json", f"{encoder}/model.safetensors"]


@dataclass
class ResolvedAdapter:
    """Arguments for ``pipe.load_ip_adapter``: where the weights are and what they are."""

    ref: str
    subfolder: str
    weight: str
    image_encoder: str
    kind: str | None = None
    note: str = ""


def resolve_ip_adapter(settings: Settings) -> ResolvedAdapter:
    """The adapter files to load, checked before any drawing.

    In a local folder: when ``models.ip_adapter_weight`` is not there but the subfolder holds exactly one
    IP-Adapter file (TinyIMGRAG ships ``ip-adapter-plus_sdxl_vit-h.safetensors``), that file is used and
    ``note`` says so; with none or several, :class:`ModelLoadError` names the setting and the candidates.
    The adapter's input width is checked against the image encoder's config. A hub id is checked in the
    HF cache. Raises ModelLoadError; returns the resolved names otherwise.
    """
    m = settings.models
    resolved = ResolvedAdapter(m.ip_adapter, m.ip_adapter_subfolder, m.ip_adapter_weight, m.ip_adapter_image_encoder)
    if not m.ip_adapter_weight.endswith(".safetensors"):
        raise ModelLoadError(f"models.ip_adapter_weight must be a .safetensors file, got {m.ip_adapter_weight!r}")
    if not is_local_ref(m.ip_adapter):
        for pattern in adapter_patterns(settings):
            if cached_file(m.ip_adapter, pattern) is None:
                raise ModelLoadError(f"IP-Adapter: {pattern} of {m.ip_adapter} is not in the local Hugging Face "
                                     "cache; fetch it with `imgrag models download --role ip_adapter`")
        weight_file = Path(cached_file(m.ip_adapter, adapter_patterns(settings)[0]) or "")
        encoder_config = Path(cached_file(m.ip_adapter, adapter_patterns(settings)[1]) or "")
    else:
        folder = Path(m.ip_adapter).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(f"IP-Adapter folder not found: {folder} (models.ip_adapter)")
        sub = folder / m.ip_adapter_subfolder
        weight_file = sub / m.ip_adapter_weight
        if not weight_file.is_file():
            found = [info for p in sorted(sub.glob("*.safetensors")) if (info := inspect_adapter(p))] \
                if sub.is_dir() else []
            if len(found) != 1:
                names = ", ".join(i.path.name for i in found) or "none"
                raise ModelLoadError(
                    f"IP-Adapter: no {m.ip_adapter_weight} in {sub}; IP-Adapter files there: {names}. "
                    "Set models.ip_adapter_weight (and models.ip_adapter_subfolder) to the one to use")
            weight_file = found[0].path
            resolved.weight = weight_file.name
            resolved.note = (f"using {weight_file.name} ({found[0].kind} adapter) found in {sub}: "
                             f"models.ip_adapter_weight names {m.ip_adapter_weight}, which is not there")
        encoder_config = folder / m.ip_adapter_image_encoder / "config.json"
        if not encoder_config.is_file():
            raise ModelLoadError(f"IP-Adapter: no image encoder at {encoder_config.parent} "
                                 "(models.ip_adapter_image_encoder, relative to models.ip_adapter)")
    info = inspect_adapter(weight_file)
    if info is None:
        raise ModelLoadError(f"IP-Adapter: {weight_file} is not IP-Adapter weights (no image_proj./ip_adapter. keys)")
    resolved.kind = info.kind
    config = read_json_object(encoder_config)
    width = config.get("projection_dim") if info.kind == "plain" else config.get("hidden_size")
    if width is not None and int(width) != info.input_dim:
        raise ModelLoadError(
            f"IP-Adapter: {weight_file.name} ({info.kind}) takes {info.input_dim}-wide image features but the image "
            f"encoder at {encoder_config.parent} gives {width}: set models.ip_adapter_image_encoder to the "
            "encoder it was trained with (ViT-H, models/image_encoder, for the *_vit-h adapters)")
    return resolved

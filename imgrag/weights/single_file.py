"""Single-file SDXL checkpoints: the one ``.safetensors`` file most community SDXL models ship as.

AUTOMATIC1111, ComfyUI and the model sites keep an SDXL model as one file in the *original* (Stability AI /
``sgm``) key layout: the UNet under ``model.diffusion_model.``, the VAE under ``first_stage_model.``, the CLIP ViT-L
text encoder under ``conditioner.embedders.0.transformer.`` and the OpenCLIP ViT-bigG one under
``conditioner.embedders.1.model.``. diffusers reads such a file with ``StableDiffusionXLPipeline.from_single_file``,
converting the keys as it loads; what the file does not hold (every component's configuration, the tokenizers, the
scheduler) it takes from a diffusers folder of the same architecture, the ``config`` argument. Without one it would
infer a hub id and fetch that repository's configuration files, so imgrag always passes a local folder
(``models.generator_config``: a folder, or a hub id resolved in the local Hugging Face cache), with
``local_files_only=True``: nothing is downloaded during a run. ``imgrag models download`` fetches the configuration
alone (:data:`CONFIG_PATTERNS`, no weights).

This module recognises such a file (:func:`find_single_file`), says from its header alone whether it is an SDXL base
checkpoint and, if not, what it is instead (:func:`checkpoint_problem`: a LoRA, an SD 1.x or 2.x model, a refiner, an
inpainting model, a lone UNet or VAE), finds the configuration folder (:func:`resolve_config`) and names what it
lacks (:func:`missing_config_files`). :func:`original_layout` goes the other way, from a diffusers pipeline to the
original keys (the tiny kit writes its SDXL so, to test the loader); the loading itself is
:func:`imgrag.models.generator.load_sdxl_pipeline`, the one loader of both forms.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imgrag.errors import ModelLoadError, UserError
from imgrag.hub_cache import is_local_ref, read_json_object

SUFFIX = ".safetensors"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
# What each part of an SDXL base checkpoint is called in the messages, by its key prefix.
SDXL_PARTS = {UNET_PREFIX: "the UNet", VAE_PREFIX: "the VAE", CLIP_L_PREFIX: "the CLIP ViT-L text encoder",
              OPEN_CLIP_PREFIX: "the OpenCLIP ViT-bigG text encoder"}
# SDXL's UNet has the "text_time" added embedding (label_emb); SD 1.x and 2.x UNets do not.
SDXL_UNET_KEY = UNET_PREFIX + "label_emb.0.0.weight"
# The configuration from_single_file reads from its config folder: every component's config, the tokenizers and the
# scheduler; never weights. The same patterns select them from the hub (imgrag models download).
CONFIG_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae")
CONFIG_PATTERNS = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/*", "tokenizer_2/*",
                   *[f"{c}/config.json" for c in CONFIG_COMPONENTS]]
PIPELINE_CLASS = "StableDiffusionXLPipeline"
EXPECTED = ("a single-file SDXL checkpoint (.safetensors in the original A1111/ComfyUI layout) or a folder holding "
            "exactly one")


def find_single_file(ref: str) -> Path | None:
    """The single-file checkpoint ``ref`` names: a path ending in ``.safetensors`` (whether or not it is there yet),
    or a folder without ``model_index.json`` or ``config.json`` that holds exactly one ``.safetensors`` file. None
    for a diffusers folder, a hub id, or anything else (the folder loader reports those).

    A folder without ``model_index.json`` holding several ``.safetensors`` files is a UserError naming them: which
    one is the checkpoint cannot be guessed."""
    ref = ref.strip()
    if not ref:
        return None
    path = Path(ref).expanduser()
    if path.suffix.lower() == SUFFIX and not path.is_dir():
        return path
    # A diffusers pipeline folder, or a model folder of transformers or diffusers (its config.json beside the
    # weights): not a checkpoint file's folder; the folder loader says what it is.
    if not path.is_dir() or (path / "model_index.json").exists() or (path / "config.json").exists():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == SUFFIX and p.is_file())
    if len(files) == 1:
        return files[0]
    if len(files) > 1:
        names = ", ".join(p.name for p in files[:4]) + (f" and {len(files) - 4} more" if len(files) > 4 else "")
        raise UserError(f"{path} holds {len(files)} .safetensors files ({names}) and no model_index.json: set "
                        "models.generator to the checkpoint file itself")
    return None


def header_shapes(path: Path) -> dict[str, list[int]]:
    """Every tensor's name and shape in a safetensors file, read from its header alone (nothing is loaded).
    Raises UserError when the file cannot be read as safetensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for every malformed header
        raise UserError(f"{path}: not a readable safetensors file ({type(exc).__name__}); fetch it again") from None


def checkpoint_problem(path: Path) -> str | None:
    """Why the safetensors file ``path`` is not a single-file SDXL base checkpoint, in words, or None when it is one.

    Decided by the key names and shapes of its header (see the module docstring for the four prefixes an SDXL base
    checkpoint holds): a LoRA (kohya ``lora_unet_``/``lora_te``, or ``lora_A``/``lora_down`` keys), an SD 1.x
    (``cond_stage_model.transformer.``) or 2.x (``cond_stage_model.model.``) checkpoint, an SDXL refiner (the OpenCLIP
    encoder alone, as ``embedders.0``), an inpainting UNet (9 input channels), a UNet or VAE saved on its own in
    diffusers' layout, another architecture (SD3, Flux), or an SDXL checkpoint lacking one of its four parts. The
    caller checks the file's integrity first (:func:`imgrag.weight_files.weight_file_problem`)."""
    shapes = header_shapes(path)
    keys = list(shapes)
    if not keys:
        return "holds no tensors"
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k or ".lora_A." in k or ".lora.down." in k
           for k in keys):
        return ("a LoRA, not a whole checkpoint: load it beside the generator (--lora, or [[models.loras]]), and set "
                "models.generator to an SDXL checkpoint")
    if any(k.startswith(("joint_blocks.", "double_blocks.", UNET_PREFIX + "joint_blocks.",
                         UNET_PREFIX + "double_blocks.")) for k in keys):
        return "another architecture (SD3 or Flux keys), not SDXL: imgrag draws with SDXL"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "an SD 1.x checkpoint (one CLIP text encoder), not SDXL: imgrag draws with SDXL"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "an SD 2.x checkpoint (one OpenCLIP text encoder), not SDXL: imgrag draws with SDXL"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        return "an SDXL refiner checkpoint (one OpenCLIP text encoder): imgrag draws with an SDXL base model"
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        if any(k.startswith(("down_blocks.", "add_embedding.")) for k in keys):
            return ("a diffusers UNet saved alone, not a whole checkpoint: set models.generator to its pipeline folder "
                    "(model_index.json)")
        if any(k.startswith(("encoder.down", "decoder.up", "decoder.conv_in")) for k in keys):
            return "a VAE alone, not a whole checkpoint"
        return (f"no SDXL keys ({', '.join(p + '*' for p in SDXL_PARTS)}): not an SDXL checkpoint in the original "
                "layout")
    if SDXL_UNET_KEY not in shapes:
        return "a Stable Diffusion UNet without SDXL's added embedding (label_emb): not SDXL"
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight") or []
    if len(conv_in) == 4 and conv_in[1] != 4:
        return (f"an SDXL UNet with {conv_in[1]} input channels (an inpainting or edit model), not a text-to-image "
                "checkpoint")
    lacking = [prefix for prefix in SDXL_PARTS if not any(k.startswith(prefix) for k in keys)]
    if lacking:
        return (f"an SDXL checkpoint without {' and '.join(SDXL_PARTS[p] for p in lacking)} (no "
                f"{', '.join(p + '*' for p in lacking)} keys): imgrag loads whole checkpoints")
    return None


# ----------------------------------------------------------------------------------------------
# The configuration folder
# ----------------------------------------------------------------------------------------------


def config_files(folder: Path) -> list[str | tuple[str, ...]]:
    """The files from_single_file reads in the configuration folder ``folder`` (a tuple: any one of them):
    ``model_index.json``, the scheduler's config, each tokenizer's config and vocabulary, each model component's
    ``config.json``; the components are the ones ``model_index.json`` names (the SDXL ones when it is absent)."""
    names: list[str] = []
    index = read_json_object(folder / "model_index.json")
    for name, spec in index.items():
        if not name.startswith("_") and isinstance(spec, list) and spec and spec[0] is not None:
            names.append(name)
    names = names or ["scheduler", "tokenizer", "tokenizer_2", *CONFIG_COMPONENTS]
    needed: list[str | tuple[str, ...]] = ["model_index.json"]
    for name in sorted(names):
        if name.startswith("scheduler"):
            needed.append(f"{name}/scheduler_config.json")
        elif name.startswith("tokenizer"):
            needed += [f"{name}/tokenizer_config.json", (f"{name}/tokenizer.json", f"{name}/vocab.json")]
        else:
            needed.append(f"{name}/config.json")
    return needed


def missing_config_files(folder: Path) -> list[str]:
    """The files of :func:`config_files` not in ``folder`` ("a or b" for a choice), in order."""
    missing = []
    for item in config_files(folder):
        names = (item,) if isinstance(item, str) else item
        if not any((folder / n).is_file() for n in names):
            missing.append(" or ".join(names))
    return missing


def config_problem(folder: Path) -> str | None:
    """Why the configuration folder holds another pipeline's configuration, or None (absent files are
    :func:`missing_config_files`'s)."""
    index = read_json_object(folder / "model_index.json")
    kind = index.get("_class_name")
    if index and kind != PIPELINE_CLASS:
        return (f"models.generator_config {folder} holds a {kind or 'pipeline of no class'}'s configuration, not "
                f"{PIPELINE_CLASS}'s")
    return None


def resolve_config(ref: str) -> Path:
    """The local configuration folder ``models.generator_config`` names: a folder, or a hub id's snapshot in the
    local Hugging Face cache (never fetched). Raises a one-line ModelLoadError naming what is missing and how to get
    it (``imgrag models download --role generator``)."""
    ref = ref.strip()
    fetch = "`imgrag models download --role generator` fetches its configuration files (no weights)"
    if not ref:
        raise ModelLoadError("models.generator_config is empty: a single-file checkpoint needs the diffusers "
                             "configuration of SDXL (e.g. stabilityai/stable-diffusion-xl-base-1.0, or a local "
                             "folder of it)")
    if is_local_ref(ref):
        folder = Path(ref).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(f"models.generator_config {ref}: no such folder (a diffusers SDXL folder, or a hub id "
                                 "such as stabilityai/stable-diffusion-xl-base-1.0)")
    else:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(ref, local_files_only=True))
        except Exception:  # not cached, or not a valid repository id
            raise ModelLoadError(f"the configuration of the single-file checkpoint, {ref} (models.generator_config), "
                                 f"is not in the local Hugging Face cache: {fetch}") from None
    problem = config_problem(folder)
    if problem:
        raise ModelLoadError(problem)
    missing = missing_config_files(folder)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        hint = fetch if not is_local_ref(ref) else "copy them from a diffusers SDXL folder"
        raise ModelLoadError(f"the configuration {ref} (models.generator_config) lacks {', '.join(missing[:3])}{more}: "
                             f"{hint}")
    return folder


# ----------------------------------------------------------------------------------------------
# Writing one: a diffusers SDXL pipeline in the original key layout
# ----------------------------------------------------------------------------------------------

# Inside a UNet resnet: diffusers' names -> the original's.
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
             "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
             "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
# Inside the VAE's mid-block attention: diffusers' linear layers -> the original's 1x1 convolutions.
_VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
# Inside an OpenCLIP transformer layer: diffusers' (transformers') names -> open_clip's.
_OPEN_CLIP_LAYER = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.c_fc.",
                    "mlp.fc2.": "mlp.c_proj.", "self_attn.out_proj.": "attn.out_proj."}


def original_layout(pipe: Any) -> dict[str, Any]:
    """The state dict of an SDXL diffusers pipeline under the original single-file key names (module docstring),
    the inverse of diffusers' single-file conversion (``diffusers.loaders.single_file_utils``: the UNet's
    ``input_blocks``/``middle_block``/``output_blocks`` numbering, the VAE's reversed ``up`` blocks and 1x1
    attention convolutions, OpenCLIP's fused ``in_proj`` and transposed ``text_projection``). Any block and layer
    count the UNet config describes, as long as ``layers_per_block`` is one number (what diffusers' converter reads).
    Raises ValueError for a weight this mapping does not place, so a layout it does not know is never written half."""
    state: dict[str, Any] = {}
    state.update({UNET_PREFIX + k: v for k, v in _unet_original(pipe.unet).items()})
    state.update({VAE_PREFIX + k: v for k, v in _vae_original(pipe.vae).items()})
    state.update({CLIP_L_PREFIX + "text_model." + k.removeprefix("text_model."): v
                  for k, v in pipe.text_encoder.state_dict().items()})
    state.update({OPEN_CLIP_PREFIX + k: v for k, v in _open_clip_original(pipe.text_encoder_2).items()})
    return {k: v.detach().contiguous() for k, v in state.items()}


def _rename(key: str, prefixes: dict[str, str], inner: dict[str, str] | None = None) -> str:
    """``key`` with the longest matching diffusers prefix swapped for the original one, and (``inner``) the first
    name after it renamed; ValueError when no prefix matches."""
    for old in sorted(prefixes, key=len, reverse=True):
        if key.startswith(old):
            rest = key[len(old):]
            for a, b in (inner or {}).items():
                if rest.startswith(a):
                    rest = b + rest[len(a):]
                    break
            return prefixes[old] + rest
    raise ValueError(f"no original-layout name for the weight {key!r}")


def _unet_original(unet: Any) -> dict[str, Any]:
    config = unet.config
    per_block = config.layers_per_block
    if not isinstance(per_block, int):
        raise ValueError(f"layers_per_block {per_block!r}: the original layout numbers blocks by one count")
    blocks = len(config.down_block_types)
    resnets: dict[str, str] = {"mid_block.resnets.0.": "middle_block.0.", "mid_block.resnets.1.": "middle_block.2."}
    others: dict[str, str] = {"mid_block.attentions.0.": "middle_block.1.", **_UNET_TOP}
    for b in range(blocks):
        for j in range(per_block):
            index = 1 + b * (per_block + 1) + j
            resnets[f"down_blocks.{b}.resnets.{j}."] = f"input_blocks.{index}.0."
            others[f"down_blocks.{b}.attentions.{j}."] = f"input_blocks.{index}.1."
        if b < blocks - 1:
            others[f"down_blocks.{b}.downsamplers.0.conv."] = f"input_blocks.{(b + 1) * (per_block + 1)}.0.op."
        for j in range(per_block + 1):
            index = b * (per_block + 1) + j
            resnets[f"up_blocks.{b}.resnets.{j}."] = f"output_blocks.{index}.0."
            others[f"up_blocks.{b}.attentions.{j}."] = f"output_blocks.{index}.1."
        if b < blocks - 1:
            slot = 2 if "CrossAttn" in config.up_block_types[b] else 1  # after the attention, when there is one
            last = b * (per_block + 1) + per_block
            others[f"up_blocks.{b}.upsamplers.0.conv."] = f"output_blocks.{last}.{slot}.conv."
    out = {}
    for key, value in unet.state_dict().items():
        is_resnet = any(key.startswith(p) for p in resnets)
        out[_rename(key, resnets, _UNET_RESNET) if is_resnet else _rename(key, others)] = value
    return out


def _vae_original(vae: Any) -> dict[str, Any]:
    blocks = len(vae.config.down_block_types)
    prefixes: dict[str, str] = {}
    for part in ("encoder", "decoder"):
        prefixes.update({f"{part}.{n}.": f"{part}.{n}." for n in ("conv_in", "conv_out")})
        prefixes[f"{part}.conv_norm_out."] = f"{part}.norm_out."
        prefixes[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        prefixes[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
    prefixes.update({"quant_conv.": "quant_conv.", "post_quant_conv.": "post_quant_conv."})
    for i in range(blocks):
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = f"encoder.down.{i}.downsample.conv."
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = f"decoder.up.{blocks - 1 - i}.upsample.conv."
        for j in range(vae.config.layers_per_block + 1):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{blocks - 1 - i}.block.{j}."
    attention = {f"{part}.mid_block.attentions.0.": f"{part}.mid.attn_1." for part in ("encoder", "decoder")}
    out = {}
    for key, value in vae.state_dict().items():
        if any(key.startswith(p) for p in attention):
            name = _rename(key, attention, _VAE_ATTENTION)
            # The original's attention projections are 1x1 convolutions: [out, in] -> [out, in, 1, 1].
            out[name] = value.reshape(*value.shape, 1, 1) if value.ndim == 2 else value
        else:
            out[_rename(key, prefixes, {"conv_shortcut.": "nin_shortcut."})] = value
    return out


def _open_clip_original(encoder: Any) -> dict[str, Any]:
    import torch

    state = encoder.state_dict()
    top = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
           "text_model.embeddings.position_embedding.weight": "positional_embedding",
           "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias"}
    out = {new: state[old] for old, new in top.items()}
    out["text_projection"] = state["text_projection.weight"].T  # open_clip multiplies x @ text_projection
    layer_prefix = "text_model.encoder.layers."
    layers = sorted({int(k[len(layer_prefix):].split(".")[0]) for k in state if k.startswith(layer_prefix)})
    placed = set(top) | {"text_projection.weight"}
    for n in layers:
        old, new = f"{layer_prefix}{n}.", f"transformer.resblocks.{n}."
        for kind in ("weight", "bias"):  # open_clip fuses q, k and v into one in_proj, in that order
            parts = [f"{old}self_attn.{p}_proj.{kind}" for p in "qkv"]
            out[f"{new}attn.in_proj_{kind}"] = torch.cat([state[p] for p in parts])
            placed.update(parts)
        for key in state:
            if key.startswith(old) and key not in placed:
                out[_rename(key[len(old):], {"": new}, _OPEN_CLIP_LAYER)] = state[key]
                placed.add(key)
    unplaced = sorted(set(state) - placed)
    if unplaced:
        raise ValueError(f"no original-layout name for the text encoder's weights {unplaced[:3]}")
    return out


def save_single_file(pipe: Any, path: Path) -> Path:
    """Write ``pipe`` (an SDXL diffusers pipeline) as one safetensors file in the original layout
    (:func:`original_layout`), as A1111 and ComfyUI keep checkpoints. Returns ``path``."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(original_layout(pipe), str(path), metadata={"format": "pt"})
    return path

"""The tiny kit's LoRAs, in the layouts people download: the LCM-LoRA (the few-step drafts' LoRA,
latent-consistency/lcm-lora-sdxl's format) and two user LoRAs (:mod:`imgrag.drawing.loras`), one with diffusers/PEFT
keys and one with kohya's. The full-size kit builds the same files over the real SDXL's sizes.

torch, diffusers and peft are imported inside the functions that use them: they take seconds to import, and this
module is imported by the ``imgrag`` command.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from imgrag.kits.tiny_configs import SDXL_TEXT_ENCODER_1, SDXL_TEXT_ENCODER_2, SDXL_TEXT_LAYERS, SDXL_UNET

# --- LCM-LoRA: the modules latent-consistency/lcm-lora-sdxl adapts (diffusers' train_lcm_distill_lora_sdxl.py) ---
LCM_LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LCM_LORA_TARGET_MODULES = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
    "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
]  # fmt: skip
LCM_LORA_RANK = 64  # the published SDXL LCM-LoRA's (197 M parameters)
TINY_LCM_LORA_RANK = 4


def build_lcm_lora(dest: Path, unet_config: dict[str, Any], *, rank: int, seed: int | None, device: str = "cpu",
                   dtype: Any = None) -> int:
    """Write a random LoRA for the UNet of ``unet_config`` in the real LCM-LoRA on-disk format; return its size.

    The file is what diffusers' LCM-LoRA training script saves (``save_lora_weights`` of PEFT's
    ``get_peft_model_state_dict``): ``dest/pytorch_lora_weights.safetensors`` with ``unet.*.lora_A/B.weight``
    keys over :data:`LCM_LORA_TARGET_MODULES`. PEFT starts ``lora_B`` at zero (a no-op LoRA); here both halves
    are random so that switching the LoRA on visibly changes the drawing. Returns the LoRA's parameter count.
    ``seed=None`` keeps torch's random state as the caller set it.
    """
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_config)
        if dtype is not None:
            unet = unet.to(dtype)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LCM_LORA_TARGET_MODULES,
                                    init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    state = get_peft_model_state_dict(unet)
    StableDiffusionXLPipeline.save_lora_weights(dest, unet_lora_layers=state, weight_name=LCM_LORA_WEIGHT_NAME,
                                                safe_serialization=True)
    return sum(t.numel() for t in state.values())


def build_tiny_lcm_lora(dest: Path, seed: int) -> None:
    """A rank-4 LCM-LoRA for the kit's SDXL UNet (random: it makes nothing faster or better, only different)."""
    build_lcm_lora(dest, SDXL_UNET, rank=TINY_LCM_LORA_RANK, seed=seed)


# --- The user's own LoRAs (imgrag/drawing/loras.py): one in each layout people download, for the kit's SDXL ---
STYLE_LORA_NAME = "style-diffusers.safetensors"  # diffusers/PEFT keys, as save_lora_weights writes them
SUBJECT_LORA_NAME = "subject-kohya.safetensors"  # kohya keys (SGM block names, lora_down/up, .alpha)
USER_LORA_RANK = 4
USER_LORA_UNET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")  # what most SDXL LoRA trainers adapt by default
USER_LORA_TEXT_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")


def user_lora_state_dict(seed: int, *, rank: int = USER_LORA_RANK, unet_config: dict[str, Any] | None = None,
                         text_widths: tuple[int, int] | None = None, text_layers: tuple[int, int] | None = None,
                         scale: float = 0.3) -> dict[str, Any]:
    """A random LoRA for the kit's SDXL in diffusers/PEFT layout: ``unet.<module>.lora_A.weight`` ([rank, in]) and
    ``lora_B.weight`` ([out, rank]) for every attention projection of the UNet of ``unet_config`` (default the kit's),
    and ``text_encoder(_2).text_model.<module>.lora_A/B.weight`` for both CLIP text encoders (widths ``text_widths``
    and layer counts ``text_layers``, default the kit's). ``lora_B`` is random too (trainers start it at 0), with
    standard deviation ``scale``, so the LoRA visibly changes a drawing. Deterministic in ``seed``."""
    import torch
    from diffusers import UNet2DConditionModel

    generator = torch.Generator().manual_seed(seed)
    state: dict[str, Any] = {}

    def add(prefix: str, module: str, linear: Any) -> None:
        state[f"{prefix}.{module}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=generator) * 0.5
        state[f"{prefix}.{module}.lora_B.weight"] = torch.randn(linear.out_features, rank, generator=generator) * scale

    with torch.device("meta"):  # shapes only
        unet = UNet2DConditionModel(**(unet_config or SDXL_UNET))
    for name, module in unet.named_modules():
        if name.endswith(tuple(f".{m}" for m in USER_LORA_UNET_MODULES)) and hasattr(module, "in_features"):
            add("unet", name, module)
    widths = text_widths or (SDXL_TEXT_ENCODER_1["hidden_size"], SDXL_TEXT_ENCODER_2["hidden_size"])
    layers = text_layers or (SDXL_TEXT_LAYERS, SDXL_TEXT_LAYERS)
    for prefix, width, count in zip(("text_encoder", "text_encoder_2"), widths, layers, strict=True):
        for layer in range(count):
            for module in USER_LORA_TEXT_MODULES:
                add(prefix, f"text_model.encoder.layers.{layer}.self_attn.{module}",
                    torch.nn.Linear(width, width, device="meta"))
    return state


def to_kohya(state: dict[str, Any], *, layers_per_block: int = SDXL_UNET["layers_per_block"],
             alpha: float | None = None) -> dict[str, Any]:
    """The same LoRA in kohya's layout (what sd-scripts writes for SDXL): UNet modules under their SGM names
    (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``: diffusers' ``down_blocks.b.attentions.l`` is
    ``input_blocks.{1 + b*(layers_per_block+1) + l}.1``, ``up_blocks.b.attentions.l`` is
    ``output_blocks.{b*(layers_per_block+1) + l}.1``, ``mid_block.attentions.0`` is ``middle_block.1``), text
    encoders as ``lora_te1_``/``lora_te2_``, halves as ``lora_down``/``lora_up`` and each module's ``.alpha``.
    ``alpha`` (default rank/2) scales the LoRA by alpha/rank, so ``lora_up`` is multiplied by rank/alpha here: the
    kohya file draws exactly what ``state`` draws (the inverse of diffusers' own conversion)."""
    import torch

    out: dict[str, Any] = {}
    step = layers_per_block + 1  # resnets and attentions of one level, then its down/upsampler
    for key, tensor in state.items():
        prefix, rest = key.split(".", 1)
        module, half = rest.rsplit(".lora_", 1)
        rank = int(tensor.shape[0] if half.startswith("A") else tensor.shape[1])
        a = rank / 2 if alpha is None else alpha
        if prefix == "unet":
            module = re.sub(r"^down_blocks\.(\d+)\.attentions\.(\d+)\.",
                            lambda m: f"input_blocks.{1 + int(m[1]) * step + int(m[2])}.1.", module)
            module = re.sub(r"^up_blocks\.(\d+)\.attentions\.(\d+)\.",
                            lambda m: f"output_blocks.{int(m[1]) * step + int(m[2])}.1.", module)
            module = re.sub(r"^mid_block\.attentions\.0\.", "middle_block.1.", module)
            name = "lora_unet_" + module.replace(".", "_")
        else:
            name = ("lora_te1_" if prefix == "text_encoder" else "lora_te2_") + module.replace(".", "_")
        if half.startswith("A"):
            out[f"{name}.lora_down.weight"] = tensor.contiguous()
        else:
            out[f"{name}.lora_up.weight"] = (tensor * (rank / a)).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(a))
    return out


def build_user_loras(dest: Path, seed: int, **shapes: Any) -> dict[str, Path]:
    """Write the kit's two LoRAs into ``dest``: :data:`STYLE_LORA_NAME` (diffusers/PEFT layout, written by
    diffusers' ``save_lora_weights``) and :data:`SUBJECT_LORA_NAME` (kohya layout, as sd-scripts writes it), two
    different random LoRAs for the kit's SDXL (``shapes``: :func:`user_lora_state_dict`'s ``unet_config``,
    ``text_widths`` and ``text_layers``, for another SDXL's sizes). Returns their paths."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    style = user_lora_state_dict(seed + 1, **shapes)
    parts = {part: {k.removeprefix(f"{part}."): v for k, v in style.items() if k.split(".", 1)[0] == part}
             for part in ("unet", "text_encoder", "text_encoder_2")}
    StableDiffusionXLPipeline.save_lora_weights(
        dest, unet_lora_layers=parts["unet"], text_encoder_lora_layers=parts["text_encoder"],
        text_encoder_2_lora_layers=parts["text_encoder_2"], weight_name=STYLE_LORA_NAME, safe_serialization=True)
    # One of sd-scripts' ss_* metadata keys: safetensors writes the metadata map in no fixed order, and the kit's
    # files must be the same bytes at every build.
    metadata = {"ss_base_model_version": "sdxl_base_v1-0"}
    per_block = (shapes.get("unet_config") or SDXL_UNET)["layers_per_block"]
    save_file(to_kohya(user_lora_state_dict(seed + 2, **shapes), layers_per_block=per_block),
              str(dest / SUBJECT_LORA_NAME), metadata=metadata)
    return {"style": dest / STYLE_LORA_NAME, "subject": dest / SUBJECT_LORA_NAME}


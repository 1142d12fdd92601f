"""One builder per model of the full-size kit, each ``(dest, tiny, cfg, device, dtype) -> parameter counts``: it
writes the model at the sizes of ``cfg`` (:class:`imgrag.kits.full_configs.KitConfigs`) into the empty folder
``dest``, with the tokenizers, processors and scheduler of the same model in the tiny kit's folder ``tiny``.
:func:`imgrag.kits.full_scale.build_full_kit` runs them.

torch, diffusers, transformers and open_clip are imported inside the builders that use them: they take seconds to
import, and this module is imported by the ``imgrag`` command.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imgrag.drawing.loras import lora_parameters
from imgrag.kits.full_configs import KitConfigs
from imgrag.kits.tiny_configs import (
    IP_ADAPTER_IMAGE_ENCODER_FOLDER,
    IP_ADAPTER_NUM_TOKENS,
    IP_ADAPTER_SUBFOLDER,
    IP_ADAPTER_WEIGHT_NAME,
    OPEN_CLIP_CONFIG_NAME,
    OPEN_CLIP_PREPROCESS_CFG,
    OPEN_CLIP_WEIGHTS_NAME,
)
from imgrag.kits.tiny_loras import build_lcm_lora, build_user_loras


def parameter_count(model: Any) -> int:
    """How many parameters ``model`` (a torch module) holds."""
    return sum(p.numel() for p in model.parameters())


def build_full_sdxl(dest: Path, tiny: Path, cfg: KitConfigs, device: str, dtype: Any) -> dict[str, int]:
    """StableDiffusionXLPipeline at full size, with the tiny kit's tokenizers and scheduler."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def text_config(folder: str, dims: dict[str, Any]) -> Any:
        config = CLIPTextConfig.from_pretrained(tiny / folder)  # keeps the tiny tokenizer's bos/eos/pad ids
        for key, value in dims.items():
            setattr(config, key, value)
        return config

    with torch.device(device):
        unet = UNet2DConditionModel.from_config(cfg.unet).to(dtype)
        vae = AutoencoderKL.from_config(cfg.vae).to(dtype)
        te1 = CLIPTextModel(text_config("text_encoder", cfg.text_encoder)).to(dtype)
        te2 = CLIPTextModelWithProjection(text_config("text_encoder_2", cfg.text_encoder_2)).to(dtype)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, unet=unet,
        tokenizer=CLIPTokenizer.from_pretrained(tiny / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(tiny / "tokenizer_2"),
        scheduler=EulerDiscreteScheduler.from_pretrained(tiny / "scheduler"),
        image_encoder=None, feature_extractor=None,
    )
    pipe.save_pretrained(dest, safe_serialization=True)
    counts = {"sdxl.unet": parameter_count(unet), "sdxl.vae": parameter_count(vae),
              "sdxl.text_encoder": parameter_count(te1), "sdxl.text_encoder_2": parameter_count(te2)}
    del pipe, unet, vae, te1, te2
    return counts


def build_full_lcm_lora(dest: Path, tiny: Path, cfg: KitConfigs, device: str, dtype: Any) -> dict[str, int]:
    """A random LoRA of latent-consistency/lcm-lora-sdxl's rank and modules over the full UNet (197 M parameters)."""
    return {"lcm_lora": build_lcm_lora(dest, cfg.unet, rank=cfg.lcm_lora["rank"], seed=None, device=device,
                                       dtype=dtype)}


def build_full_user_loras(dest: Path, tiny: Path, cfg: KitConfigs, device: str, dtype: Any) -> dict[str, int]:
    """The tiny kit's two user LoRAs (diffusers and kohya layouts) over the full UNet and text encoders: rank 4 on
    every attention projection, as most SDXL LoRA trainers make them."""

    paths = build_user_loras(dest, 0, unet_config=cfg.unet,
                             text_widths=(cfg.text_encoder["hidden_size"], cfg.text_encoder_2["hidden_size"]),
                             text_layers=(cfg.text_encoder["num_hidden_layers"],
                                          cfg.text_encoder_2["num_hidden_layers"]))
    return {f"loras.{name}": lora_parameters(path) for name, path in paths.items()}


def build_full_ip_adapter(dest: Path, tiny: Path, cfg: KitConfigs, device: str, dtype: Any) -> dict[str, int]:
    """The SDXL ViT-H IP-Adapter for the full UNet (h94/IP-Adapter layout) and its ViT-H image encoder."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device(device):
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg.image_encoder)).to(dtype)
    encoder.save_pretrained(dest / IP_ADAPTER_IMAGE_ENCODER_FOLDER, safe_serialization=True)
    encoder_params = parameter_count(encoder)
    del encoder
    with torch.device("meta"):  # shapes only: which cross-attention layers, how wide
        unet = UNet2DConditionModel.from_config(cfg.unet)
    cross = cfg.unet["cross_attention_dim"]
    embed = cfg.image_encoder["projection_dim"]

    def rand(*shape: int) -> Any:
        return (torch.randn(*shape, device=device, dtype=torch.float32) * 0.02).to(dtype).contiguous()

    state = {
        "image_proj.proj.weight": rand(IP_ADAPTER_NUM_TOKENS * cross, embed),
        "image_proj.proj.bias": torch.zeros(IP_ADAPTER_NUM_TOKENS * cross, device=device, dtype=dtype),
        "image_proj.norm.weight": torch.ones(cross, device=device, dtype=dtype),
        "image_proj.norm.bias": torch.zeros(cross, device=device, dtype=dtype),
    }
    # diffusers numbers the cross-attention processors 1, 3, 5, ... in unet.attn_processors order.
    cross_attention = [n for n in unet.attn_processors if not n.endswith("attn1.processor")]
    for key_id, name in zip(range(1, 2 * len(cross_attention), 2), cross_attention, strict=True):
        hidden = unet.get_submodule(name.removesuffix(".processor")).to_q.in_features
        state[f"ip_adapter.{key_id}.to_k_ip.weight"] = rand(hidden, cross)
        state[f"ip_adapter.{key_id}.to_v_ip.weight"] = rand(hidden, cross)
    weights = dest / IP_ADAPTER_SUBFOLDER / IP_ADAPTER_WEIGHT_NAME
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() for k, v in state.items()}, str(weights))
    return {"ip_adapter": sum(v.numel() for v in state.values()), "ip_adapter.image_encoder": encoder_params}


def build_full_qwen_vl(dest: Path, tiny: Path, cfg: KitConfigs, device: str, dtype: Any) -> dict[str, int]:
    """Qwen2.5-VL-3B at full size, with the tiny kit's processor, token ids and generation config."""
    import torch
    from transformers import AutoConfig, AutoProcessor, GenerationConfig, Qwen2_5_VLConfig
    from transformers import Qwen2_5_VLForConditionalGeneration as Model

    small = AutoConfig.from_pretrained(tiny)
    ids = {k: getattr(small.text_config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = Qwen2_5_VLConfig(
        text_config=dict(cfg.qwen_vl_text, **ids), vision_config=dict(cfg.qwen_vl_vision),
        image_token_id=small.image_token_id, video_token_id=small.video_token_id,
        vision_start_token_id=small.vision_start_token_id, vision_end_token_id=small.vision_end_token_id,
        tie_word_embeddings=cfg.qwen_vl_text.get("tie_word_embeddings", False),
    )
    with torch.device(device):
        model = Model._from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig.from_pretrained(tiny)
    model.save_pretrained(dest, safe_serialization=True)
    AutoProcessor.from_pretrained(tiny).save_pretrained(dest)
    count = parameter_count(model)
    del model
    return {"qwen2.5-vl": count}


def build_full_qwen_llm(dest: Path, tiny: Path, cfg: KitConfigs, device: str, dtype: Any) -> dict[str, int]:
    """Qwen2.5-7B-Instruct at full size, with the tiny kit's tokenizer (the real tool-calling template)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    small = AutoConfig.from_pretrained(tiny)
    config = Qwen2Config(**cfg.qwen_llm, bos_token_id=small.bos_token_id, eos_token_id=small.eos_token_id,
                         pad_token_id=small.pad_token_id)
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig.from_pretrained(tiny)
    model.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(dest)
    count = parameter_count(model)
    del model
    return {"qwen2.5-instruct": count}


def build_full_open_clip(dest: Path, tiny: Path, cfg: KitConfigs, device: str, dtype: Any) -> dict[str, int]:
    """open_clip ViT-B-32 in the local-dir format, float32 like the laion checkpoint."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    with torch.device(device):
        model = open_clip.CLIP(**cfg.open_clip)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()},
              str(dest / OPEN_CLIP_WEIGHTS_NAME))
    config = {"model_cfg": cfg.open_clip, "preprocess_cfg": OPEN_CLIP_PREPROCESS_CFG}
    (dest / OPEN_CLIP_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    count = parameter_count(model)
    del model
    return {"open_clip": count}


def build_full_omnigen(dest: Path, tiny: Path, cfg: KitConfigs, device: str, dtype: Any) -> dict[str, int]:
    """OmniGen-v1 at full size (Shitao/OmniGen-v1-diffusers' layout), with the tiny kit's tokenizer and scheduler.
    Built in bfloat16 when the kit is float16, as the checkpoint ships (imgrag.models.omnigen runs it so)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, OmniGenPipeline, OmniGenTransformer2DModel
    from transformers import AutoTokenizer

    dtype = torch.bfloat16 if dtype == torch.float16 else dtype
    with torch.device(device):
        transformer = OmniGenTransformer2DModel.from_config(cfg.omnigen).to(dtype)
        vae = AutoencoderKL.from_config(cfg.omnigen_vae).to(dtype)
    pipe = OmniGenPipeline(transformer=transformer, vae=vae,
                           tokenizer=AutoTokenizer.from_pretrained(tiny / "tokenizer"),
                           scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(tiny / "scheduler"))
    pipe.save_pretrained(dest, safe_serialization=True)
    counts = {"omnigen.transformer": parameter_count(transformer), "omnigen.vae": parameter_count(vae)}
    del pipe, transformer, vae
    return counts

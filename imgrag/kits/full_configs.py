"""The full-size kit's configurations: every model's published ``config.json`` (named beside each), as
:class:`KitConfigs`, and :func:`smoke_configs`, the same layout with small widths for a CPU.

:mod:`imgrag.kits.full_builders` builds the models from them; :mod:`imgrag.kits.full_scale` builds the kit.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from imgrag.kits.tiny_loras import LCM_LORA_RANK

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "attention_head_dim": [5, 10, 20], "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048, "use_linear_projection": True, "norm_num_groups": 32, "norm_eps": 1e-5,
    "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": False,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + the 1280-wide pooled text embedding
    "upcast_attention": False,
}
# stabilityai/stable-diffusion-xl-base-1.0, vae/config.json
SDXL_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "norm_num_groups": 32, "act_fn": "silu", "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True,
}
# stabilityai/stable-diffusion-xl-base-1.0, text_encoder/config.json (OpenAI CLIP ViT-L/14 text tower)
SDXL_TEXT_ENCODER = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
    "layer_norm_eps": 1e-5,
}
# stabilityai/stable-diffusion-xl-base-1.0, text_encoder_2/config.json (OpenCLIP ViT-bigG/14 text tower)
SDXL_TEXT_ENCODER_2 = {
    "vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280,
    "layer_norm_eps": 1e-5,
}
# h94/IP-Adapter, models/image_encoder/config.json (OpenCLIP ViT-H/14 vision tower, projection 1024)
IP_IMAGE_ENCODER = {
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
    "image_size": 224, "patch_size": 14, "projection_dim": 1024, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
}
# Qwen/Qwen2.5-VL-3B-Instruct, config.json
QWEN_VL_TEXT = {
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
    "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
    "hidden_act": "silu", "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}
QWEN_VL_VISION = {
    "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "in_channels": 3,
    "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31], "out_hidden_size": 2048, "hidden_act": "silu", "tokens_per_second": 2,
}
# Qwen/Qwen2.5-7B-Instruct, config.json
QWEN_LLM = {
    "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    "hidden_act": "silu", "tie_word_embeddings": False, "use_sliding_window": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
}
# open_clip src/open_clip/model_configs/ViT-B-32.json (laion/CLIP-ViT-B-32-laion2B-s34B-b79K's architecture)
OPEN_CLIP_MODEL_CFG = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
}

# Shitao/OmniGen-v1-diffusers, transformer/config.json: what diffusers' scripts/convert_omnigen_to_diffusers.py
# writes (huggingface/diffusers, read at commit 54ab894): OmniGenTransformer2DModel's defaults (Phi-3-mini's sizes:
# hidden 3072, 32 layers of 32 heads, MLP 8192, vocabulary 32064, pad id 32000, 131072 positions over an original
# 4096, rope base 10000) with patch_size 2, in_channels 4, pos_embed_max_size 192 and Phi-3's "su" rope factors.
# The VAE is SDXL's (vae/config.json above); the scheduler FlowMatchEulerDiscreteScheduler(invert_sigmas=True,
# num_train_timesteps=1). 3.762 B parameters plus a 0.113 B position-embedding buffer: 7.75 GB in bfloat16.
OMNIGEN_LONG_FACTOR = [
    1.0299999713897705, 1.0499999523162842, 1.0499999523162842, 1.0799999237060547, 1.2299998998641968,
    1.2299998998641968, 1.2999999523162842, 1.4499999284744263, 1.5999999046325684, 1.6499998569488525,
    1.8999998569488525, 2.859999895095825, 3.68999981880188, 5.419999599456787, 5.489999771118164, 5.489999771118164,
    9.09000015258789, 11.579999923706055, 15.65999984741211, 15.769999504089355, 15.789999961853027,
    18.360000610351562, 21.989999771118164, 23.079999923706055, 30.009998321533203, 32.35000228881836,
    32.590003967285156, 35.56000518798828, 39.95000457763672, 53.840003967285156, 56.20000457763672,
    57.95000457763672, 59.29000473022461, 59.77000427246094, 59.920005798339844, 61.190006256103516,
    61.96000671386719, 62.50000762939453, 63.3700065612793, 63.48000717163086, 63.48000717163086, 63.66000747680664,
    63.850006103515625, 64.08000946044922, 64.760009765625, 64.80001068115234, 64.81001281738281, 64.81001281738281,
]
OMNIGEN_SHORT_FACTOR = [
    1.05, 1.05, 1.05, 1.1, 1.1, 1.1, 1.2500000000000002, 1.2500000000000002, 1.4000000000000004, 1.4500000000000004,
    1.5500000000000005, 1.8500000000000008, 1.9000000000000008, 2.000000000000001, 2.000000000000001,
    2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001,
    2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001,
    2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001,
    2.1000000000000005, 2.1000000000000005, 2.2, 2.3499999999999996, 2.3499999999999996, 2.3499999999999996,
    2.3499999999999996, 2.3999999999999995, 2.3999999999999995, 2.6499999999999986, 2.6999999999999984,
    2.8999999999999977, 2.9499999999999975, 3.049999999999997, 3.049999999999997, 3.049999999999997,
]
OMNIGEN_TRANSFORMER = {
    "in_channels": 4, "patch_size": 2, "hidden_size": 3072, "rms_norm_eps": 1e-5, "num_attention_heads": 32,
    "num_key_value_heads": 32, "intermediate_size": 8192, "num_layers": 32, "pad_token_id": 32000,
    "vocab_size": 32064, "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
    "rope_base": 10000, "pos_embed_max_size": 192, "time_step_dim": 256, "flip_sin_to_cos": True,
    "downscale_freq_shift": 0, "timestep_activation_fn": "silu",
    "rope_scaling": {"type": "su", "long_factor": OMNIGEN_LONG_FACTOR, "short_factor": OMNIGEN_SHORT_FACTOR},
}


@dataclass(frozen=True)
class KitConfigs:
    """The configurations one build uses: the real ones by default. Tests pass scaled-down copies
    through the same code, so the builder is exercised on a CPU in seconds."""

    unet: dict[str, Any] = field(default_factory=lambda: dict(SDXL_UNET))
    vae: dict[str, Any] = field(default_factory=lambda: dict(SDXL_VAE))
    text_encoder: dict[str, Any] = field(default_factory=lambda: dict(SDXL_TEXT_ENCODER))
    text_encoder_2: dict[str, Any] = field(default_factory=lambda: dict(SDXL_TEXT_ENCODER_2))
    image_encoder: dict[str, Any] = field(default_factory=lambda: dict(IP_IMAGE_ENCODER))
    qwen_vl_text: dict[str, Any] = field(default_factory=lambda: dict(QWEN_VL_TEXT))
    qwen_vl_vision: dict[str, Any] = field(default_factory=lambda: dict(QWEN_VL_VISION))
    qwen_llm: dict[str, Any] = field(default_factory=lambda: dict(QWEN_LLM))
    open_clip: dict[str, Any] = field(default_factory=lambda: json.loads(json.dumps(OPEN_CLIP_MODEL_CFG)))
    lcm_lora: dict[str, Any] = field(default_factory=lambda: {"rank": LCM_LORA_RANK})  # over the unet above
    omnigen: dict[str, Any] = field(default_factory=lambda: json.loads(json.dumps(OMNIGEN_TRANSFORMER)))
    omnigen_vae: dict[str, Any] = field(default_factory=lambda: dict(SDXL_VAE))

    def replace(self, **changes: dict[str, Any]) -> KitConfigs:
        return dataclasses.replace(self, **changes)


FULL = KitConfigs()


def smoke_configs() -> KitConfigs:
    """The full kit's layout and code path with small widths: for dry runs and tests on a CPU (seconds).

    Vocabularies stay larger than the tiny tokenizers', as the real ones are, so decoding ids past the
    tokenizer is exercised too. Nothing here is shape-true; only :data:`FULL` is.
    """
    te = {"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
          "num_attention_heads": 4, "max_position_embeddings": 77, "projection_dim": 32, "hidden_act": "gelu"}
    return KitConfigs(
        unet={**SDXL_UNET, "sample_size": 32, "layers_per_block": 1, "block_out_channels": [32, 64, 64],
              "attention_head_dim": [2, 4, 4], "transformer_layers_per_block": [1, 1, 2], "norm_num_groups": 8,
              "cross_attention_dim": 64, "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 80},
        vae={**SDXL_VAE, "block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8,
             "sample_size": 64},
        text_encoder=dict(te), text_encoder_2=dict(te),
        image_encoder={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8, "projection_dim": 16},
        qwen_vl_text={**QWEN_VL_TEXT, "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
                      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                      "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}},
        qwen_vl_vision={**QWEN_VL_VISION, "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                        "fullatt_block_indexes": [1], "out_hidden_size": 64},
        qwen_llm={**QWEN_LLM, "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2},
        omnigen={**OMNIGEN_TRANSFORMER, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 4,
                 "intermediate_size": 64, "num_layers": 2, "vocab_size": 1000, "pad_token_id": 3,
                 "pos_embed_max_size": 64, "time_step_dim": 16,
                 "rope_scaling": {"type": "su", "long_factor": [1.0] * 4, "short_factor": [1.0] * 4}},
        omnigen_vae={**SDXL_VAE, "block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8,
                     "sample_size": 64},
        open_clip={"embed_dim": 32,
                   "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
                   "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}},
    )

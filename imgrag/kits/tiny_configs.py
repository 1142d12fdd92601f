"""The tiny kit's configuration table: where each model lives in a kit, what its files are called, and the
miniature configuration of every model (the REAL architectures, a few dozen units wide).

:mod:`imgrag.kits.tiny_builders` builds the models from it; the folder and file names are also the layout of the
full-size kit (:mod:`imgrag.kits.full_scale`), whose configurations are the published ones.
"""

from __future__ import annotations

KIT_VERSION = 3
DEFAULT_SEED = 0
MARKER_NAME = "kit.json"
LOCK_NAME = ".kit.lock"

# Folder of each model under the kit directory, keyed by the settings' model names.
MODEL_DIRS: dict[str, str] = {
    "generator": "sdxl",
    "generator_single_file": "sdxl-single",  # models.generator's other form (no setting of its own)
    "ip_adapter": "ip-adapter",
    "judge": "qwen2.5-vl",
    "llm": "qwen2.5-instruct",
    "embedder": "open-clip",
    "lcm_lora": "lcm-lora",
    "loras": "loras",  # the user's own LoRAs, one per layout (not a setting: tests and the README name them)
    # imgrag eval's scorers (imgrag/kits/tiny_scorers.py)
    "dino": "dino",
    "siglip": "siglip",
    "omnigen": "omnigen",
}

# IP-Adapter files, where the real h94/IP-Adapter repository keeps the SDXL ViT-H adapter.
SDXL_SINGLE_FILE_NAME = "tiny-sdxl.safetensors"  # in sdxl-single/
IP_ADAPTER_SUBFOLDER = "sdxl_models"
IP_ADAPTER_WEIGHT_NAME = "ip-adapter_sdxl_vit-h.safetensors"
IP_ADAPTER_IMAGE_ENCODER_FOLDER = "models/image_encoder"
IP_ADAPTER_NUM_TOKENS = 4  # image_proj.proj maps one CLIP embedding to 4 cross-attention tokens

# --- SDXL: two CLIP text encoders whose hidden sizes add up to the UNet's cross-attention width ---
# (the real ones are 768 and 1280 wide; they differ here too, so nothing can assume they match)
SDXL_TEXT_ENCODER_1 = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, projection_dim=32)
SDXL_TEXT_ENCODER_2 = dict(hidden_size=48, intermediate_size=64, num_attention_heads=4, projection_dim=48)
SDXL_TEXT_LAYERS = 2
SDXL_ADDITION_TIME_EMBED_DIM = 8
# (original size, crop top-left, target size) = 6 time ids, plus text_encoder_2's pooled projection
SDXL_ADDITION_EMBED_INPUT_DIM = 6 * SDXL_ADDITION_TIME_EMBED_DIM + SDXL_TEXT_ENCODER_2["projection_dim"]
SDXL_UNET = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4),
    "transformer_layers_per_block": (1, 1),
    "use_linear_projection": True,
    "norm_num_groups": 8,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": SDXL_ADDITION_TIME_EMBED_DIM,
    "projection_class_embeddings_input_dim": SDXL_ADDITION_EMBED_INPUT_DIM,
    "cross_attention_dim": SDXL_TEXT_ENCODER_1["hidden_size"] + SDXL_TEXT_ENCODER_2["hidden_size"],
}
SDXL_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (8, 16),
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.13025,  # the real SDXL VAE's
}
SDXL_SCHEDULER = {  # the real SDXL base scheduler_config.json
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
CLIP_MAX_LENGTH = 77

# --- IP-Adapter image encoder (the real one is CLIP ViT-H/14, projection 1024) ---
IP_IMAGE_ENCODER = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 16,
}

# --- Qwen2.5-VL: text hidden 64 (head_dim 16, so mrope_section sums to 8); vision out = text hidden ---
QWEN_VL_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
}
QWEN_VL_VISION = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "in_channels": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [1],
    "out_hidden_size": QWEN_VL_TEXT["hidden_size"],
}
QWEN_VL_MIN_PIXELS = 28 * 28 * 4  # 2x2 merged patches at least
QWEN_VL_MAX_PIXELS = 28 * 28 * 16  # 4x4 merged patches at most

# --- Qwen2.5-Instruct LLM ---
QWEN_LLM = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    # The real model's context: the agent's prompt with five tool schemas is over 4k tokens.
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
}

# --- open_clip: a tiny ViT; the text tower keeps open_clip's own 49408-token BPE vocabulary ---
OPEN_CLIP_MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
OPEN_CLIP_PREPROCESS_CFG = {  # what laion/CLIP-ViT-B-32-laion2B-s34B-b79K ships (OpenAI CLIP statistics)
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
}
OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"
OPEN_CLIP_WEIGHTS_NAME = "open_clip_model.safetensors"

# --- OmniGen (ImageRAG-O's backbone): Shitao/OmniGen-v1-diffusers in miniature ---
# The processor counts one input-image token per 16x16 pixels (VAE 8x, patch 2): the VAE must downsample 8x
# (four blocks), or the image-token count does not match the latents (RuntimeError: expanded size 16 vs 256).
OMNIGEN_TRANSFORMER = {
    "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 64,
    "num_layers": 2, "in_channels": 4, "patch_size": 2, "time_step_dim": 16, "pos_embed_max_size": 64,
    "max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
    # Phi-3's "su" rope scaling with one factor per rotary frequency (head size 8 -> 4 frequencies)
    "rope_scaling": {"type": "su", "long_factor": [1.0] * 4, "short_factor": [1.0] * 4},
}  # fmt: skip
OMNIGEN_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (8, 8, 16, 16),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "norm_num_groups": 4, "sample_size": 64, "scaling_factor": 0.13025,  # the SDXL VAE's, which OmniGen uses
}  # fmt: skip
OMNIGEN_SCHEDULER = {"invert_sigmas": True, "num_train_timesteps": 1}  # as diffusers' conversion script sets it

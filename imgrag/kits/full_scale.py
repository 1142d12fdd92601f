"""Full-size, shape-true random-weight models: the kit of :mod:`imgrag.kits.tiny_kit` at the real sizes.

``imgrag models build-tiny --scale full DIR`` writes every model imgrag runs with the REAL
configuration of its checkpoint (layer counts, widths, heads, vocabularies) and random weights, in
the same layout as the tiny kit, so a profile pointing at DIR loads them through the real loading
code. They exist to measure speed and memory on a GPU without downloading ~40 GB of checkpoints:
seconds per 1024x1024 generation, per judge call, per model swap (``benchmarks/bench_gpu.py``).
Their pictures are noise and their answers gibberish, exactly like the tiny kit's, and a random
model never stops generating early, so token-generation times are for the full ``max_new_tokens``.

The configurations below are copied from the published ``config.json`` files named beside each one.
Tokenizers, processors and the scheduler come from the tiny kit (built first, in ``DIR/.tiny-source``):
the real ones are data files that cannot be downloaded here, and only the embedding tables, whose
sizes are the real vocabularies below, cost memory and time. Token ids beyond the small tokenizers'
vocabularies decode to nothing, as the real models' padding rows do.

Sizes in float16: SDXL 6.9 GB (UNet 2.6 B parameters, CLIP-L and OpenCLIP-bigG text encoders, VAE),
IP-Adapter 0.7 GB plus its ViT-H image encoder 1.3 GB, Qwen2.5-VL-3B 7.5 GB, Qwen2.5-7B 15.2 GB, OmniGen-v1
7.75 GB (bfloat16, as it ships) plus its VAE; CLIP ViT-B-32 0.6 GB in float32 (as laion ships it): ~40 GB in all.
Build it on a GPU: models are initialised on the device in float16 (about a minute on an H100, most of it
writing files). On a CPU it works but needs ~64 GB of RAM and a long time.

Why it ships in the runtime package, not beside the benchmarks: the installed CLI builds it
(``imgrag models build-tiny --scale full``, through :func:`build_kit`), so a user
can measure their own GPU without a checkout of the repository; the benchmarks only import it. Importing it
costs nothing: torch and the model libraries load inside :func:`build_full_kit`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgrag.atomic_files import write_json_atomic
from imgrag.drawing.loras import lora_parameters
from imgrag.kits.tiny_configs import (
    IP_ADAPTER_IMAGE_ENCODER_FOLDER,
    IP_ADAPTER_NUM_TOKENS,
    IP_ADAPTER_SUBFOLDER,
    IP_ADAPTER_WEIGHT_NAME,
    KIT_VERSION,
    MARKER_NAME,
    MODEL_DIRS,
    OPEN_CLIP_CONFIG_NAME,
    OPEN_CLIP_PREPROCESS_CFG,
    OPEN_CLIP_WEIGHTS_NAME,
)
from imgrag.kits.tiny_kit import build_tiny_kit, tiny_kit_paths
from imgrag.kits.tiny_loras import LCM_LORA_RANK, build_lcm_lora, build_user_loras

SCALES = ("tiny", "full")
TINY_SOURCE = ".tiny-source"

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


def build_kit(out_dir: Path, *, scale: str = "tiny", seed: int = 0, force: bool = False,
              progress: Callable[[str], None] | None = None) -> dict[str, Path]:
    """The kit at ``scale``: ``"tiny"`` (:func:`imgrag.kits.tiny_kit.build_tiny_kit`, tests and the demo) or ``"full"``
    (:func:`build_full_kit`, ~40 GB, for GPU benchmarks), both in the same layout; returns its paths. Here, above
    both builders, so that the tiny kit never imports this module. ValueError for another scale."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if scale == "tiny":
        return build_tiny_kit(Path(out_dir), seed=seed, force=force, progress=progress)
    return build_full_kit(Path(out_dir), seed=seed, force=force, progress=progress)


def build_full_kit(out_dir: Path, *, seed: int = 0, force: bool = False,
                   progress: Callable[[str], None] | None = None, device: str | None = None,
                   dtype: str | None = None, configs: KitConfigs = FULL) -> dict[str, Path]:
    """Build every model at full size into ``out_dir`` (the tiny kit's layout); return the paths.

    ``device`` defaults to cuda when present; ``dtype`` to float16 on cuda and float32 on a CPU. The
    marker ``kit.json`` (written last) records the scale, the seed and each model's parameter count.
    An existing full kit with the same seed is kept unless ``force``.
    """
    import torch

    out_dir = Path(out_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("float16" if device.startswith("cuda") else "float32")
    torch_dtype = getattr(torch, dtype)
    marker_path = out_dir / MARKER_NAME
    if not force and marker_path.is_file():
        try:
            marker = json.loads(marker_path.read_text(encoding="utf-8"))
        except ValueError:
            marker = {}
        if marker.get("scale") == "full" and marker.get("seed") == seed and all(
                p.is_dir() for p in tiny_kit_paths(out_dir).values()):
            return tiny_kit_paths(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker_path.unlink(missing_ok=True)  # an interrupted build must look unbuilt
    say = progress or (lambda message: None)
    say("tokenizers and processors (a tiny kit)")
    source = build_tiny_kit(out_dir / TINY_SOURCE, seed=seed)
    paths = tiny_kit_paths(out_dir)
    params: dict[str, int] = {}
    builders = [("generator", _build_sdxl), ("ip_adapter", _build_ip_adapter), ("judge", _build_qwen_vl),
                ("llm", _build_qwen_llm), ("embedder", _build_open_clip), ("lcm_lora", _build_lcm_lora),
                ("loras", _build_user_loras),
                ("omnigen", _build_omnigen)]
    for key, builder in builders:
        say(f"{MODEL_DIRS[key]} (full size)")
        torch.manual_seed(seed)
        dest = paths[key]
        # Not the tiny kit's build-then-swap, which keeps the old folder until the new one is in place: at full size
        # that would need up to 15 GB more disk; the marker is already gone, so a half-built kit looks unbuilt.
        if dest.exists():
            shutil.rmtree(dest)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        params.update(builder(tmp, source[key], configs, device, torch_dtype))
        os.replace(tmp, dest)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    # eval's scorers stay tiny (benchmarks skip them), and so does the single-file SDXL (configured by the tiny sdxl)
    for key in set(MODEL_DIRS) - {key for key, _ in builders}:
        shutil.rmtree(paths[key], ignore_errors=True)
        shutil.copytree(source[key], paths[key])
    marker = {"version": KIT_VERSION, "seed": seed, "scale": "full", "models": dict(MODEL_DIRS), "dtype": dtype,
              "parameters": params}
    write_json_atomic(marker_path, marker)
    return paths


def _count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _build_sdxl(dest: Path, tiny: Path, cfg: KitConfigs, device: str, dtype: Any) -> dict[str, int]:
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
    counts = {"sdxl.unet": _count(unet), "sdxl.vae": _count(vae), "sdxl.text_encoder": _count(te1),
              "sdxl.text_encoder_2": _count(te2)}
    del pipe, unet, vae, te1, te2
    return counts


def _build_lcm_lora(dest: Path, tiny: Path, cfg: KitConfigs, device: str, dtype: Any) -> dict[str, int]:
    """A random LoRA of latent-consistency/lcm-lora-sdxl's rank and modules over the full UNet (197 M parameters)."""
    return {"lcm_lora": build_lcm_lora(dest, cfg.unet, rank=cfg.lcm_lora["rank"], seed=None, device=device,
                                       dtype=dtype)}


def _build_user_loras(dest: Path, tiny: Path, cfg: KitConfigs, device: str, dtype: Any) -> dict[str, int]:
    """The tiny kit's two user LoRAs (diffusers and kohya layouts) over the full UNet and text encoders: rank 4 on
    every attention projection, as most SDXL LoRA trainers make them."""

    paths = build_user_loras(dest, 0, unet_config=cfg.unet,
                             text_widths=(cfg.text_encoder["hidden_size"], cfg.text_encoder_2["hidden_size"]),
                             text_layers=(cfg.text_encoder["num_hidden_layers"],
                                          cfg.text_encoder_2["num_hidden_layers"]))
    return {f"loras.{name}": lora_parameters(path) for name, path in paths.items()}


def _build_ip_adapter(dest: Path, tiny: Path, cfg: KitConfigs, device: str, dtype: Any) -> dict[str, int]:
    """The SDXL ViT-H IP-Adapter for the full UNet (h94/IP-Adapter layout) and its ViT-H image encoder."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device(device):
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg.image_encoder)).to(dtype)
    encoder.save_pretrained(dest / IP_ADAPTER_IMAGE_ENCODER_FOLDER, safe_serialization=True)
    encoder_params = _count(encoder)
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


def _build_qwen_vl(dest: Path, tiny: Path, cfg: KitConfigs, device: str, dtype: Any) -> dict[str, int]:
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
    count = _count(model)
    del model
    return {"qwen2.5-vl": count}


def _build_qwen_llm(dest: Path, tiny: Path, cfg: KitConfigs, device: str, dtype: Any) -> dict[str, int]:
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
    count = _count(model)
    del model
    return {"qwen2.5-instruct": count}


def _build_open_clip(dest: Path, tiny: Path, cfg: KitConfigs, device: str, dtype: Any) -> dict[str, int]:
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
    count = _count(model)
    del model
    return {"open_clip": count}


def _build_omnigen(dest: Path, tiny: Path, cfg: KitConfigs, device: str, dtype: Any) -> dict[str, int]:
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
    counts = {"omnigen.transformer": _count(transformer), "omnigen.vae": _count(vae)}
    del pipe, transformer, vae
    return counts


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

"""The model hub repositories imgrag's profiles name, written down file by file: DATA, NOT MEASUREMENTS.

No machine of this project can reach the model hub, yet ``imgrag models download --dry-run``, ``imgrag
doctor`` and the tests need to know which files each repository holds and how large they are. This module
is that knowledge, copied by hand from each repository's model card and file listing on huggingface.co
(the "Files and versions" tab) as they stood in 2025-2026. It lists every file imgrag needs and, to show
that the download patterns leave them out, the large files it does not need (ONNX/OpenVINO exports,
single-file checkpoints, ``.bin`` twins, the other adapters).

**Sizes are approximate**: they are the hub listing's rounded figures (three significant digits, in
decimal units: 5.14 GB is 5_140_000_000 bytes), not exact byte counts, and serve to show totals and to
budget disk space. Entries marked ``approx_only`` are less certain than that (a shard split or a size
recalled to about 10 %); the command line prints "size approximate" for totals that include them. A repository
revised upstream after this was written may differ; the real download prints the hub's own sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

KB = 1_000
MB = 1_000_000
GB = 1_000_000_000


@dataclass(frozen=True)
class RepoFile:
    """One file of a recorded repository: its path inside the repository and its approximate size in bytes."""

    path: str
    size: int
    approx_only: bool = False  # less certain than the hub's rounded figure (see the module docstring)


def _f(path: str, size: float, approx_only: bool = False) -> RepoFile:
    return RepoFile(path, int(size), approx_only)


_CLIP_TOKENIZER = ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")

# stabilityai/stable-diffusion-xl-base-1.0: the diffusers folders, each weight file in full precision and
# as the "fp16" variant, next to the single-file checkpoints and ONNX exports imgrag never reads.
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
_SDXL: list[RepoFile] = [
    _f("model_index.json", 609),
    _f("scheduler/scheduler_config.json", 479),
    _f("text_encoder/config.json", 565),
    _f("text_encoder/model.safetensors", 492 * MB),
    _f("text_encoder/model.fp16.safetensors", 246 * MB),
    _f("text_encoder/model.onnx", 493 * MB),
    _f("text_encoder_2/config.json", 575),
    _f("text_encoder_2/model.safetensors", 2.78 * GB),
    _f("text_encoder_2/model.fp16.safetensors", 1.39 * GB),
    _f("text_encoder_2/model.onnx", 1.39 * GB, approx_only=True),
    *[_f(f"tokenizer/{name}", size) for name, size in zip(_CLIP_TOKENIZER, (525 * KB, 460, 737, 1.06 * MB),
                                                          strict=True)],
    *[_f(f"tokenizer_2/{name}", size) for name, size in zip(_CLIP_TOKENIZER, (525 * KB, 460, 725, 1.06 * MB),
                                                            strict=True)],
    _f("unet/config.json", 1.68 * KB),
    _f("unet/diffusion_pytorch_model.safetensors", 10.3 * GB),
    _f("unet/diffusion_pytorch_model.fp16.safetensors", 5.14 * GB),
    _f("unet/model.onnx", 7.29 * MB, approx_only=True),
    _f("unet/model.onnx_data", 10.3 * GB, approx_only=True),
    _f("vae/config.json", 642),
    _f("vae/diffusion_pytorch_model.safetensors", 335 * MB),
    _f("vae/diffusion_pytorch_model.fp16.safetensors", 167 * MB),
    _f("vae_1_0/diffusion_pytorch_model.fp16.safetensors", 167 * MB),
    _f("vae_decoder/model.onnx", 198 * MB, approx_only=True),
    _f("vae_encoder/model.onnx", 137 * MB, approx_only=True),
    _f("sd_xl_base_1.0.safetensors", 6.94 * GB),
    _f("sd_xl_base_1.0_0.9vae.safetensors", 6.94 * GB),
    _f("sd_xl_offset_example-lora_1.0.safetensors", 49.6 * MB),
    _f("README.md", 7.5 * KB, approx_only=True),
]

# h94/IP-Adapter: SD 1.5 adapters under models/, SDXL ones under sdxl_models/. The "vit-h" SDXL adapters
# take the ViT-H image encoder in models/image_encoder; sdxl_models/image_encoder is ViT-bigG (for
# ip-adapter_sdxl.safetensors). Every weight exists as .bin and as .safetensors; imgrag reads safetensors.
IP_ADAPTER = "h94/IP-Adapter"
_IP_ADAPTER: list[RepoFile] = [
    _f("models/image_encoder/config.json", 574, approx_only=True),
    _f("models/image_encoder/model.safetensors", 2.53 * GB),
    _f("models/image_encoder/pytorch_model.bin", 2.53 * GB),
    _f("models/ip-adapter_sd15.safetensors", 44.6 * MB),
    _f("models/ip-adapter_sd15.bin", 44.6 * MB),
    _f("models/ip-adapter-plus_sd15.safetensors", 98.2 * MB),
    _f("models/ip-adapter-plus_sd15.bin", 158 * MB, approx_only=True),
    _f("sdxl_models/image_encoder/config.json", 560, approx_only=True),
    _f("sdxl_models/image_encoder/model.safetensors", 3.69 * GB),
    _f("sdxl_models/image_encoder/pytorch_model.bin", 3.69 * GB),
    _f("sdxl_models/ip-adapter_sdxl.safetensors", 703 * MB),
    _f("sdxl_models/ip-adapter_sdxl.bin", 703 * MB),
    _f("sdxl_models/ip-adapter_sdxl_vit-h.safetensors", 698 * MB),
    _f("sdxl_models/ip-adapter_sdxl_vit-h.bin", 698 * MB),
    _f("sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors", 848 * MB),
    _f("sdxl_models/ip-adapter-plus_sdxl_vit-h.bin", 1.01 * GB, approx_only=True),
    _f("sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors", 848 * MB),
    _f("sdxl_models/ip-adapter-plus-face_sdxl_vit-h.bin", 1.01 * GB, approx_only=True),
]

# Qwen's repositories: a transformers folder each, weights in safetensors shards with their index.
QWEN_VL_3B = "Qwen/Qwen2.5-VL-3B-Instruct"
_QWEN_VL_3B: list[RepoFile] = [
    _f("chat_template.json", 1.05 * KB),
    _f("config.json", 1.37 * KB),
    _f("generation_config.json", 216),
    _f("merges.txt", 1.67 * MB),
    _f("model-00001-of-00002.safetensors", 3.98 * GB),
    _f("model-00002-of-00002.safetensors", 3.53 * GB),
    _f("model.safetensors.index.json", 65.4 * KB),
    _f("preprocessor_config.json", 350),
    _f("tokenizer.json", 7.03 * MB),
    _f("tokenizer_config.json", 5.7 * KB),
    _f("vocab.json", 2.78 * MB),
    _f("README.md", 18 * KB, approx_only=True),
]

QWEN_7B = "Qwen/Qwen2.5-7B-Instruct"
_QWEN_7B: list[RepoFile] = [
    _f("LICENSE", 11.3 * KB),
    _f("README.md", 6.6 * KB, approx_only=True),
    _f("config.json", 663),
    _f("generation_config.json", 243),
    _f("merges.txt", 1.67 * MB),
    _f("model-00001-of-00004.safetensors", 3.95 * GB),
    _f("model-00002-of-00004.safetensors", 3.86 * GB),
    _f("model-00003-of-00004.safetensors", 3.86 * GB),
    _f("model-00004-of-00004.safetensors", 3.56 * GB),
    _f("model.safetensors.index.json", 27.8 * KB),
    _f("tokenizer.json", 7.03 * MB),
    _f("tokenizer_config.json", 7.3 * KB),
    _f("vocab.json", 2.78 * MB),
]

# The Int4 checkpoint is about 5.6 GB in all; how it is split into shards is recalled, not copied.
QWEN_7B_GPTQ = "Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4"
_QWEN_7B_GPTQ: list[RepoFile] = [
    _f("LICENSE", 11.3 * KB),
    _f("README.md", 7 * KB, approx_only=True),
    _f("config.json", 1 * KB, approx_only=True),
    _f("generation_config.json", 243),
    _f("merges.txt", 1.67 * MB),
    _f("model-00001-of-00002.safetensors", 3.99 * GB, approx_only=True),
    _f("model-00002-of-00002.safetensors", 1.59 * GB, approx_only=True),
    _f("model.safetensors.index.json", 80 * KB, approx_only=True),
    _f("tokenizer.json", 7.03 * MB),
    _f("tokenizer_config.json", 7.3 * KB),
    _f("vocab.json", 2.78 * MB),
]

# laion's open_clip repository also carries a transformers copy (config.json, model.safetensors, the
# tokenizer) and .bin twins; open_clip reads open_clip_config.json and open_clip_model.safetensors.
CLIP_B32_LAION = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
_CLIP_B32_LAION: list[RepoFile] = [
    _f("README.md", 12 * KB, approx_only=True),
    _f("config.json", 4.36 * KB, approx_only=True),
    _f("merges.txt", 525 * KB),
    _f("model.safetensors", 605 * MB),
    _f("open_clip_config.json", 707, approx_only=True),
    _f("open_clip_model.safetensors", 605 * MB),
    _f("open_clip_pytorch_model.bin", 605 * MB),
    _f("preprocessor_config.json", 316),
    _f("pytorch_model.bin", 605 * MB),
    _f("special_tokens_map.json", 389),
    _f("tokenizer.json", 2.22 * MB),
    _f("tokenizer_config.json", 905),
    _f("vocab.json", 862 * KB),
]

# latent-consistency/lcm-lora-sdxl: one LoRA file in diffusers' format (used with generation.fast = "lcm-lora").
LCM_LORA_SDXL = "latent-consistency/lcm-lora-sdxl"
_LCM_LORA_SDXL: list[RepoFile] = [
    _f("README.md", 4 * KB, approx_only=True),
    _f("pytorch_lora_weights.safetensors", 394 * MB, approx_only=True),
]

# Shitao/OmniGen-v1-diffusers: diffusers' convert_omnigen_to_diffusers.py output (OmniGenPipeline.save_pretrained):
# the transformer in bfloat16 (the script casts it), SDXL's VAE in float32 (335 MB, as in SDXL's own vae/), Phi-3's
# Llama tokenizer. NOT copied from the hub listing (no machine here reached it): the file names are what that script
# and diffusers' save_pretrained write, the sizes are computed: the transformer's 3.762 B parameters plus its
# 192x192x3072 position-embedding buffer (0.113 B), 2 bytes each, in one file (under diffusers' 10 GB shard size).
OMNIGEN_V1 = "Shitao/OmniGen-v1-diffusers"
_OMNIGEN_V1: list[RepoFile] = [
    _f("README.md", 5 * KB, approx_only=True),
    _f("model_index.json", 400, approx_only=True),
    _f("scheduler/scheduler_config.json", 500, approx_only=True),
    _f("tokenizer/special_tokens_map.json", 600, approx_only=True),
    _f("tokenizer/tokenizer.json", 1.84 * MB, approx_only=True),
    _f("tokenizer/tokenizer.model", 500 * KB, approx_only=True),
    _f("tokenizer/tokenizer_config.json", 3.4 * KB, approx_only=True),
    _f("transformer/config.json", 2.6 * KB, approx_only=True),
    _f("transformer/diffusion_pytorch_model.safetensors", 7.75 * GB, approx_only=True),
    _f("vae/config.json", 700, approx_only=True),
    _f("vae/diffusion_pytorch_model.safetensors", 335 * MB, approx_only=True),
]

LAYOUTS: dict[str, list[RepoFile]] = {
    SDXL_BASE: _SDXL,
    IP_ADAPTER: _IP_ADAPTER,
    QWEN_VL_3B: _QWEN_VL_3B,
    QWEN_7B: _QWEN_7B,
    QWEN_7B_GPTQ: _QWEN_7B_GPTQ,
    CLIP_B32_LAION: _CLIP_B32_LAION,
    LCM_LORA_SDXL: _LCM_LORA_SDXL,
    OMNIGEN_V1: _OMNIGEN_V1,
}

"""The tiny-model kit: miniature, randomly initialised copies of every model imgrag runs.

No machine of this project can download real checkpoints, so the ``tiny`` settings profile points at
this kit instead. Each model here has the REAL architecture and is saved in the REAL on-disk format
(``save_pretrained`` folders, the h94/IP-Adapter repository layout, open_clip's ``local-dir:``
schema), so imgrag's real loading code runs on it unchanged. The weights are random: every image
drawn is noise, every judgement and every chat answer is gibberish. The kit only proves that the
plumbing (loading, shapes, prompts, chat templates, generation calls) works.

Layout under ``out_dir``::

    sdxl/                  StableDiffusionXLPipeline.save_pretrained (AutoPipelineForText2Image loads it)
    sdxl-single/           the same SDXL as one file, tiny-sdxl.safetensors, in the original A1111/ComfyUI key
                           layout (from_single_file loads it, configured by sdxl/; imgrag.weights.single_file)
    ip-adapter/            like h94/IP-Adapter: sdxl_models/ip-adapter_sdxl_vit-h.safetensors
                           + models/image_encoder/ (CLIPVisionModelWithProjection)
    qwen2.5-vl/            Qwen2_5_VLForConditionalGeneration + Qwen2_5_VLProcessor
    qwen2.5-instruct/      Qwen2ForCausalLM + Qwen2.5-Instruct tokenizer (tool-calling chat template)
    open-clip/             open_clip_config.json + open_clip_model.safetensors ("local-dir:<dir>")
    lcm-lora/              like latent-consistency/lcm-lora-sdxl: pytorch_lora_weights.safetensors (PEFT LoRA keys)
    loras/                 two LoRAs for the SDXL, as people download them: style-diffusers.safetensors (diffusers/
                           PEFT keys, UNet and both text encoders) and subject-kohya.safetensors (kohya keys, .alpha)
    dino/                  ViTModel + ViTImageProcessor, the layout of facebook/dino-vits16 (eval's DINO score)
    siglip/                open_clip local-dir SigLIP (timm "map"-pooled ViT, HF tokenizer) for eval's SigLIP score
    omnigen/               OmniGenPipeline.save_pretrained, like Shitao/OmniGen-v1-diffusers (transformer, its own
                           8x-downsampling VAE, a Llama BPE tokenizer with Phi-3's chat markers, scheduler)
    kit.json               marker, written last: {"version", "seed", "models"}

Builds are seeded and deterministic (same seed, same bytes), write only safetensors, and take a
few seconds on a 2-core CPU. Each model is built in a temporary sibling folder and renamed into
place; the marker is removed first and written last (atomically), so an interrupted build is
detected and redone by :func:`ensure_tiny_kit`.

Why one module of ~900 lines: it is one recipe, the kit, whose builders share the configuration table
(also the template of :mod:`imgrag.kits.full_scale`), the tokenizers and the atomic build-and-mark steps; split by
model, each part would be a short function importing the same shared half.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from imgrag.atomic_files import write_json_atomic

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
CLIP_TOY_MERGES = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]

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

# --- Qwen tokenizer: a small byte-level BPE with the real Qwen2.5 special tokens ---
QWEN_BPE_VOCAB_SIZE = 400
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
# Qwen2.5 ships these as added but NOT special tokens (skip_special_tokens=True keeps them).
QWEN_NON_SPECIAL_TOKENS = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip
QWEN_BPE_CORPUS = [
    "a photo of a cat sitting on a red chair",
    "the image shows a dog in a park",
    "score: 7 / 10. the prompt adherence is good",
    '{"name": "search_images", "arguments": {"query": "cat"}}',
    "You are a helpful assistant. Describe the image and judge its quality.",
    "retrieve reference images then regenerate with ip adapter",
    "yes no true false 0 1 2 3 4 5 6 7 8 9",
]

# Qwen2.5-VL-Instruct's chat template (chat_template.json of the real repository).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2.5-Instruct's tool-calling chat template (tokenizer_config.json of the real repository).
QWEN_LLM_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n\
You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments \
within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": \
<args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. \
You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or \
(message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

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


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def tiny_kit_paths(out_dir: Path) -> dict[str, Path]:
    """Where each model of the kit lives under ``out_dir`` (nothing is built or checked)."""
    out_dir = Path(out_dir)
    return {key: out_dir / name for key, name in MODEL_DIRS.items()}


def build_tiny_kit(
    out_dir: Path,
    *,
    seed: int = DEFAULT_SEED,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Build the whole kit into ``out_dir`` and return :func:`tiny_kit_paths`. The same layout at the real models'
    sizes is :func:`imgrag.kits.full_scale.build_kit` with ``scale="full"``.

    Without ``force``, a kit already there with a current marker and the same seed is kept as is.
    ``progress`` is called once per model with its folder name ("sdxl", "ip-adapter", ...).
    Only the kit's own folders under ``out_dir`` are replaced; other files there are left alone.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _kit_lock(out_dir):
        marker = _read_marker(out_dir)
        if not force and marker is not None and marker.get("seed") == seed:
            return tiny_kit_paths(out_dir)
        return _build_locked(out_dir, seed, progress)


def ensure_tiny_kit(out_dir: Path, progress: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Return the kit's paths, building it (DEFAULT_SEED) only when the marker is missing or stale.

    A current kit of any seed is kept. Concurrent callers wait on a file lock; one of them builds.
    """
    out_dir = Path(out_dir)
    if _read_marker(out_dir) is not None:
        return tiny_kit_paths(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _kit_lock(out_dir):
        if _read_marker(out_dir) is not None:  # another process built it while we waited
            return tiny_kit_paths(out_dir)
        return _build_locked(out_dir, DEFAULT_SEED, progress)


# ----------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------


def _kit_lock(out_dir: Path) -> Any:
    from filelock import FileLock

    return FileLock(str(out_dir / LOCK_NAME))


def _read_marker(out_dir: Path) -> dict[str, Any] | None:
    """The marker if it is current (this KIT_VERSION, every model folder present), else None."""
    try:
        marker = json.loads((out_dir / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("version") != KIT_VERSION:
        return None
    if not all(path.is_dir() for path in tiny_kit_paths(out_dir).values()):
        return None
    return marker


def _build_locked(out_dir: Path, seed: int, progress: Callable[[str], None] | None) -> dict[str, Path]:
    (out_dir / MARKER_NAME).unlink(missing_ok=True)  # an interrupted build must look unbuilt
    builders: dict[str, Callable[[Path, int], None]] = {
        "generator": _build_sdxl,
        "generator_single_file": _build_sdxl_single_file,
        "ip_adapter": _build_ip_adapter,
        "judge": _build_qwen_vl,
        "llm": _build_qwen_llm,
        "embedder": _build_open_clip,
        "lcm_lora": _build_lcm_lora,
        "loras": _build_user_loras,
        "dino": _build_dino,
        "siglip": _build_siglip,
        "omnigen": _build_omnigen,
    }
    paths = tiny_kit_paths(out_dir)
    with _quiet_progress_bars():
        for key, builder in builders.items():
            if progress is not None:
                progress(MODEL_DIRS[key])
            _build_into(paths[key], lambda tmp, builder=builder: builder(tmp, seed))
    _write_marker(out_dir, seed)
    return paths


@contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Silence transformers' "Writing model shards" bars (the caller has ``progress``), then restore them."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _build_into(final: Path, build: Callable[[Path], None]) -> None:
    """Run ``build`` on a temporary sibling folder of ``final``, then swap it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the kit is ordinary readable files
        build(tmp)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_marker(out_dir: Path, seed: int) -> None:
    marker = {"version": KIT_VERSION, "seed": seed, "models": dict(MODEL_DIRS)}
    write_json_atomic(out_dir / MARKER_NAME, marker)


# ----------------------------------------------------------------------------------------------
# One builder per model. Each seeds torch itself, so it gives the same bytes on its own or in a kit.
# ----------------------------------------------------------------------------------------------


def _build_sdxl(dest: Path, seed: int) -> None:
    """StableDiffusionXLPipeline: two CLIP text encoders, VAE, UNet, Euler scheduler."""
    _tiny_sdxl_pipeline(seed).save_pretrained(dest, safe_serialization=True)


def _build_sdxl_single_file(dest: Path, seed: int) -> None:
    """The kit's SDXL (the same seed, so the same weights as sdxl/) as one safetensors file in the original key
    layout that A1111 and ComfyUI keep checkpoints in (:func:`imgrag.weights.single_file.save_single_file`)."""
    from imgrag.weights.single_file import save_single_file

    save_single_file(_tiny_sdxl_pipeline(seed), dest / SDXL_SINGLE_FILE_NAME)


def _tiny_sdxl_pipeline(seed: int) -> Any:
    """The kit's random-weight StableDiffusionXLPipeline, in memory (seeded: the same weights every time)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = _clip_tokenizer()

    def text_config(dims: dict[str, int]) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer), num_hidden_layers=SDXL_TEXT_LAYERS, hidden_act="gelu",
            bos_token_id=0, eos_token_id=1, pad_token_id=1, max_position_embeddings=CLIP_MAX_LENGTH, **dims,
        )  # fmt: skip

    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**SDXL_VAE),
        text_encoder=CLIPTextModel(text_config(SDXL_TEXT_ENCODER_1)),
        text_encoder_2=CLIPTextModelWithProjection(text_config(SDXL_TEXT_ENCODER_2)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=UNet2DConditionModel(**SDXL_UNET),
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        image_encoder=None,
        feature_extractor=None,
    )
    return pipe


def _clip_tokenizer() -> Any:
    """A CLIP BPE tokenizer built in memory: the 256 byte symbols, their word-final forms, a few merges."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(symbol, len(vocab))
    for left, right in CLIP_TOY_MERGES:
        vocab.setdefault(left + right, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=list(CLIP_TOY_MERGES), model_max_length=CLIP_MAX_LENGTH)


def ip_adapter_attention_weights(scale: float) -> dict[str, Any]:
    """The adapter's key/value projections for the kit's SDXL UNet, random with standard deviation ``scale``:
    ``ip_adapter.{1,3,5,...}.to_{k,v}_ip.weight`` ([hidden, cross]), one pair per cross-attention processor in
    ``unet.attn_processors`` order, as diffusers' loader reads them (the self-attention ones would take the even
    numbers). Shared by the plain adapter here and the "plus" one built in the tests."""
    import torch
    from diffusers import UNet2DConditionModel

    cross = SDXL_UNET["cross_attention_dim"]
    unet = UNet2DConditionModel(**SDXL_UNET)
    cross_attention = [n for n in unet.attn_processors if not n.endswith("attn1.processor")]
    weights = {}
    for key_id, name in zip(range(1, 2 * len(cross_attention), 2), cross_attention, strict=True):
        hidden = unet.get_submodule(name.removesuffix(".processor")).to_q.in_features
        weights[f"ip_adapter.{key_id}.to_k_ip.weight"] = torch.randn(hidden, cross) * scale
        weights[f"ip_adapter.{key_id}.to_v_ip.weight"] = torch.randn(hidden, cross) * scale
    return weights


def _build_ip_adapter(dest: Path, seed: int) -> None:
    """IP-Adapter (SDXL, ViT-H flavour) for the kit's UNet, in the h94/IP-Adapter layout."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**IP_IMAGE_ENCODER))
    encoder.save_pretrained(dest / IP_ADAPTER_IMAGE_ENCODER_FOLDER, safe_serialization=True)

    cross = SDXL_UNET["cross_attention_dim"]
    embed = IP_IMAGE_ENCODER["projection_dim"]
    state = {
        "image_proj.proj.weight": torch.randn(IP_ADAPTER_NUM_TOKENS * cross, embed) * 0.02,
        "image_proj.proj.bias": torch.zeros(IP_ADAPTER_NUM_TOKENS * cross),
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    state.update(ip_adapter_attention_weights(scale=0.02))
    weights = dest / IP_ADAPTER_SUBFOLDER / IP_ADAPTER_WEIGHT_NAME
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))


def _qwen_tokenizer(chat_template: str) -> Any:
    """Qwen2Tokenizer over a small byte-level BPE trained here, with Qwen2.5's added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=QWEN_BPE_VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"], show_progress=False,
    )  # fmt: skip
    bpe.train_from_iterator(QWEN_BPE_CORPUS * 20, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]

    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"], merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", errors="replace", model_max_length=32768,
    )  # fmt: skip
    # transformers 5 spells additional special tokens "extra_special_tokens".
    extra_special = [t for t in QWEN_SPECIAL_TOKENS if t != "<|endoftext|>"]  # pad is set already
    tokenizer.add_special_tokens({"extra_special_tokens": extra_special})
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_NON_SPECIAL_TOKENS])
    tokenizer.chat_template = chat_template
    return tokenizer


def _qwen_generation_config(tokenizer: Any) -> Any:
    """Like the real Qwen2.5 generation_config.json (stop on <|im_end|> or <|endoftext|>), but greedy."""
    from transformers import GenerationConfig

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return GenerationConfig(bos_token_id=endoftext, pad_token_id=endoftext, eos_token_id=[im_end, endoftext])


def _build_qwen_vl(dest: Path, seed: int) -> None:
    """Qwen2_5_VLForConditionalGeneration + Qwen2_5_VLProcessor (small min/max pixels)."""
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    torch.manual_seed(seed)
    tokenizer = _qwen_tokenizer(QWEN_VL_CHAT_TEMPLATE)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            QWEN_VL_TEXT, vocab_size=len(tokenizer), bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(QWEN_VL_VISION),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = _qwen_generation_config(tokenizer)
    model.save_pretrained(dest, safe_serialization=True)

    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=QWEN_VL_MIN_PIXELS, max_pixels=QWEN_VL_MAX_PIXELS),
        video_processor=Qwen2VLVideoProcessor(),  # required by the processor even for images only
        tokenizer=tokenizer,
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(dest)


def _build_qwen_llm(dest: Path, seed: int) -> None:
    """Qwen2ForCausalLM + the Qwen2.5-Instruct tokenizer with its tool-calling chat template."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    tokenizer = _qwen_tokenizer(QWEN_LLM_CHAT_TEMPLATE)
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(
        vocab_size=len(tokenizer), bos_token_id=endoftext, pad_token_id=endoftext,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), **QWEN_LLM,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config)
    model.generation_config = _qwen_generation_config(tokenizer)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


def _build_open_clip(dest: Path, seed: int) -> None:
    """open_clip's local-dir schema: open_clip_config.json + open_clip_model.safetensors."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.CLIP(**OPEN_CLIP_MODEL_CFG)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(dest / OPEN_CLIP_WEIGHTS_NAME))
    config = {"model_cfg": OPEN_CLIP_MODEL_CFG, "preprocess_cfg": OPEN_CLIP_PREPROCESS_CFG}
    (dest / OPEN_CLIP_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


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


def _build_lcm_lora(dest: Path, seed: int) -> None:
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
    import re

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


def _build_user_loras(dest: Path, seed: int) -> None:
    build_user_loras(dest, seed)


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
OMNIGEN_BPE_VOCAB_SIZE = 600
# Llama's <unk> <s> </s> first (the processor drops a chunk's leading id 1, the bos), then Phi-3's chat markers,
# which OmniGen's processor writes around every instruction.
OMNIGEN_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]
OMNIGEN_BPE_CORPUS = [
    "Generate an image according to the following instructions",
    "According to these images of a red fox: <img><|image_1|></img>, generate a red fox on a wooden cradle",
    "a photo of a golden retriever puppy sleeping in a cradle beside a red toy rocket",
    "<|diffusion|> low quality, jpeg artifacts, ugly, duplicate, blurry, bad anatomy",
]


def _omnigen_tokenizer() -> Any:
    """A LlamaTokenizer over a byte-level BPE trained here, with Phi-3's special tokens (OmniGen's tokenizer is
    Phi-3's, a Llama sentencepiece tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=OMNIGEN_BPE_VOCAB_SIZE, special_tokens=OMNIGEN_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(OMNIGEN_BPE_CORPUS * 10, trainer=trainer)
    return LlamaTokenizer(tokenizer_object=bpe, bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>",
                          pad_token="<|endoftext|>")


def _build_omnigen(dest: Path, seed: int) -> None:
    """OmniGenPipeline: a Phi-3-style OmniGen transformer, an 8x VAE, the BPE tokenizer, flow-matching scheduler."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, OmniGenPipeline, OmniGenTransformer2DModel

    torch.manual_seed(seed)
    tokenizer = _omnigen_tokenizer()
    transformer = OmniGenTransformer2DModel(**OMNIGEN_TRANSFORMER, vocab_size=len(tokenizer),
                                            pad_token_id=tokenizer.pad_token_id)
    pipe = OmniGenPipeline(transformer=transformer, vae=AutoencoderKL(**OMNIGEN_VAE), tokenizer=tokenizer,
                           scheduler=FlowMatchEulerDiscreteScheduler(**OMNIGEN_SCHEDULER))
    pipe.save_pretrained(dest, safe_serialization=True)


def quantise_gptq(source: Path, dest: Path, *, bits: int = 4, group_size: int = 32) -> Path:
    """A GPTQ-Int4 copy of a Qwen2.5 folder (the tiny kit's, for tests), in the format of
    ``Qwen2.5-7B-Instruct-GPTQ-Int4``: ``quantization_config.quant_method = "gptq"`` in its config.json, which
    transformers loads through gptqmodel + optimum (the ``gptq`` extra). Runs on a CPU in seconds for the tiny
    model. Raises ``ModuleNotFoundError`` without the extra. gptqmodel writes a ``logs/`` folder into the working
    directory."""
    import os

    # gptqmodel sizes its CPU worker pools at import; on a 2-core machine it refuses to start unless told to
    # use 2 workers ("Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1").
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import GPTQModel, QuantizeConfig

    model = GPTQModel.load(str(source), QuantizeConfig(bits=bits, group_size=group_size, desc_act=False, sym=True),
                           device="cpu")
    # Calibration text: a few prompts of the kind the agent LLM reads (the tiny model's weights are random anyway).
    model.quantize(["Draw a golden retriever puppy sleeping in a wooden cradle beside a red toy rocket."] * 4,
                   batch_size=1)
    model.save(str(dest))
    return dest


def _build_dino(dest: Path, seed: int) -> None:
    from imgrag.kits.tiny_scorers import build_dino

    build_dino(dest, seed)


def _build_siglip(dest: Path, seed: int) -> None:
    from imgrag.kits.tiny_scorers import build_siglip

    build_siglip(dest, seed)

"""One builder per model of the tiny kit, each ``(dest, seed) -> None``: it writes the model into the empty
folder ``dest`` in the real on-disk format. Each seeds torch itself, so it gives the same bytes on its own or in a
kit. :mod:`imgrag.kits.tiny_kit` runs them; the LoRAs' builders are in :mod:`imgrag.kits.tiny_loras`.

torch, diffusers, transformers, open_clip and gptqmodel are imported inside the builders that use them: they take
seconds to import, and this module is imported by the ``imgrag`` command.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from imgrag.kits.tiny_configs import (
    CLIP_MAX_LENGTH,
    IP_ADAPTER_IMAGE_ENCODER_FOLDER,
    IP_ADAPTER_NUM_TOKENS,
    IP_ADAPTER_SUBFOLDER,
    IP_ADAPTER_WEIGHT_NAME,
    IP_IMAGE_ENCODER,
    OMNIGEN_SCHEDULER,
    OMNIGEN_TRANSFORMER,
    OMNIGEN_VAE,
    OPEN_CLIP_CONFIG_NAME,
    OPEN_CLIP_MODEL_CFG,
    OPEN_CLIP_PREPROCESS_CFG,
    OPEN_CLIP_WEIGHTS_NAME,
    QWEN_LLM,
    QWEN_VL_MAX_PIXELS,
    QWEN_VL_MIN_PIXELS,
    QWEN_VL_TEXT,
    QWEN_VL_VISION,
    SDXL_SCHEDULER,
    SDXL_SINGLE_FILE_NAME,
    SDXL_TEXT_ENCODER_1,
    SDXL_TEXT_ENCODER_2,
    SDXL_TEXT_LAYERS,
    SDXL_UNET,
    SDXL_VAE,
)
from imgrag.kits.tiny_tokenizers import (
    QWEN_LLM_CHAT_TEMPLATE,
    QWEN_SPECIAL_TOKENS,
    QWEN_VL_CHAT_TEMPLATE,
    clip_tokenizer,
    omnigen_tokenizer,
    qwen_generation_config,
    qwen_tokenizer,
)
from imgrag.weights.single_file import save_single_file


def build_sdxl(dest: Path, seed: int) -> None:
    """StableDiffusionXLPipeline: two CLIP text encoders, VAE, UNet, Euler scheduler."""
    tiny_sdxl_pipeline(seed).save_pretrained(dest, safe_serialization=True)


def build_sdxl_single_file(dest: Path, seed: int) -> None:
    """The kit's SDXL (the same seed, so the same weights as sdxl/) as one safetensors file in the original key
    layout that A1111 and ComfyUI keep checkpoints in (:func:`imgrag.weights.single_file.save_single_file`)."""
    save_single_file(tiny_sdxl_pipeline(seed), dest / SDXL_SINGLE_FILE_NAME)


def tiny_sdxl_pipeline(seed: int) -> Any:
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
    tokenizer = clip_tokenizer()

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


def build_ip_adapter(dest: Path, seed: int) -> None:
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


def build_qwen_vl(dest: Path, seed: int) -> None:
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
    tokenizer = qwen_tokenizer(QWEN_VL_CHAT_TEMPLATE)
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
    model.generation_config = qwen_generation_config(tokenizer)
    model.save_pretrained(dest, safe_serialization=True)

    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=QWEN_VL_MIN_PIXELS, max_pixels=QWEN_VL_MAX_PIXELS),
        video_processor=Qwen2VLVideoProcessor(),  # required by the processor even for images only
        tokenizer=tokenizer,
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(dest)


def build_qwen_llm(dest: Path, seed: int) -> None:
    """Qwen2ForCausalLM + the Qwen2.5-Instruct tokenizer with its tool-calling chat template."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer(QWEN_LLM_CHAT_TEMPLATE)
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(
        vocab_size=len(tokenizer), bos_token_id=endoftext, pad_token_id=endoftext,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), **QWEN_LLM,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config)
    model.generation_config = qwen_generation_config(tokenizer)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


def build_open_clip(dest: Path, seed: int) -> None:
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


def build_omnigen(dest: Path, seed: int) -> None:
    """OmniGenPipeline: a Phi-3-style OmniGen transformer, an 8x VAE, the BPE tokenizer, flow-matching scheduler."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, OmniGenPipeline, OmniGenTransformer2DModel

    torch.manual_seed(seed)
    tokenizer = omnigen_tokenizer()
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


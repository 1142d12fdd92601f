"""The full-size kit (``imgrag models build-tiny --scale full``): its configurations are the real
checkpoints' (parameter counts checked on the meta device, no memory used), and the builder's layout
loads through the real engine (checked with the same builder at small widths on the CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imgrag.kits import full_configs as C
from imgrag.kits import full_scale as F

# Parameter counts of the published checkpoints (the figures their model cards and loaders report).
PUBLISHED = {
    "unet": 2_567_463_684,  # stabilityai/stable-diffusion-xl-base-1.0 unet
    "vae": 83_653_863,
    "text_encoder": 123_060_480,  # CLIP ViT-L/14 text tower
    "text_encoder_2": 694_659_840,  # OpenCLIP bigG text tower with projection
    "image_encoder": 632_076_800,  # h94/IP-Adapter models/image_encoder (ViT-H/14)
    "qwen_llm": 7_615_616_512,  # Qwen/Qwen2.5-7B-Instruct
    "qwen_vl": 3_754_622_976,  # Qwen/Qwen2.5-VL-3B-Instruct
    "open_clip": 151_277_313,  # open_clip ViT-B-32
    "omnigen": 3_762_072_592,  # Shitao/OmniGen-v1-diffusers transformer ("3.8 B" with its position-embedding buffer)
}


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_full_configurations_have_the_published_sizes() -> None:
    import open_clip
    import torch
    from diffusers import AutoencoderKL, OmniGenTransformer2DModel, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    with torch.device("meta"):  # shapes only: 15 B parameters cost no memory here
        counts = {
            "unet": _count(UNet2DConditionModel.from_config(C.SDXL_UNET)),
            "vae": _count(AutoencoderKL.from_config(C.SDXL_VAE)),
            "text_encoder": _count(CLIPTextModel(CLIPTextConfig(**C.SDXL_TEXT_ENCODER))),
            "text_encoder_2": _count(CLIPTextModelWithProjection(CLIPTextConfig(**C.SDXL_TEXT_ENCODER_2))),
            "image_encoder": _count(CLIPVisionModelWithProjection(CLIPVisionConfig(**C.IP_IMAGE_ENCODER))),
            "qwen_llm": _count(Qwen2ForCausalLM(Qwen2Config(**C.QWEN_LLM))),
            "qwen_vl": _count(Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
                text_config=dict(C.QWEN_VL_TEXT), vision_config=dict(C.QWEN_VL_VISION), tie_word_embeddings=True))),
            "open_clip": _count(open_clip.CLIP(**C.OPEN_CLIP_MODEL_CFG)),
            "omnigen": _count(OmniGenTransformer2DModel.from_config(C.OMNIGEN_TRANSFORMER)),
        }
    assert counts == PUBLISHED
    # SDXL's UNet attends over both text encoders' hidden states side by side.
    widths = C.SDXL_TEXT_ENCODER["hidden_size"] + C.SDXL_TEXT_ENCODER_2["hidden_size"]
    assert C.SDXL_UNET["cross_attention_dim"] == widths


def test_the_builder_layout_loads_through_the_engine(tmp_path: Path) -> None:
    from imgrag.management.engine import build_manager
    from imgrag.settings import load_settings

    kit = tmp_path / "kit"
    paths = F.build_full_kit(kit, configs=C.smoke_configs(), device="cpu")
    marker = json.loads((kit / "kit.json").read_text())
    assert marker["scale"] == "full" and marker["parameters"]["sdxl.unet"] > 0
    assert set(paths) == {"generator", "generator_single_file", "ip_adapter", "judge", "llm", "embedder", "lcm_lora",
                          "loras", "dino", "siglip", "omnigen"}
    assert F.build_full_kit(kit, configs=C.smoke_configs(), device="cpu") == paths  # kept, not rebuilt

    settings = load_settings("default", environ={"IMGRAG_HOME": str(tmp_path / "home")}, overrides={
        "device": "cpu",
        "judge": {"min_pixels": 4 * 28 * 28, "max_pixels": 16 * 28 * 28, "max_new_tokens": 4},
        "llm": {"max_new_tokens": 4},
        "models": {"generator": str(paths["generator"]), "ip_adapter": str(paths["ip_adapter"]),
                   "judge": str(paths["judge"]), "llm": str(paths["llm"]),
                   "embedder": f"local-dir:{paths['embedder']}", "omnigen": str(paths["omnigen"])},
        "generation": {"width": 64, "height": 64, "steps": 2, "repair_with": "omnigen"},
        "omnigen": {"steps": 2, "max_input_image_size": 64}})
    manager = build_manager(settings)
    with manager.use("generator") as generator:
        image = generator.generate("a cat", seed=1)
        guided = generator.generate("a cat", seed=1, references=[image], ip_scale=0.5)
        generator.settings.models.lcm_lora = str(paths["lcm_lora"])
        fast = generator.generate("a cat", seed=1, references=[image], fast="lcm-lora")
    assert image.size == guided.size == fast.size == (64, 64)
    with manager.use("omnigen") as omnigen:
        assert omnigen.generate("a cat like <img><|image_1|></img>", seed=1, input_images=[image]).size == (64, 64)
    with manager.use("judge") as judge:
        verdict = judge.judge(image, "a cat")
        assert 1 <= judge.last_tokens["output"] <= 4 and isinstance(verdict.match, bool)
    with manager.use("llm") as llm:
        from langchain_core.messages import HumanMessage

        reply = llm.invoke([HumanMessage("hello")])
        assert reply.usage_metadata["output_tokens"] <= 4
    with manager.use("embedder") as embedder:
        assert embedder.embed_images([image]).shape == (1, C.smoke_configs().open_clip["embed_dim"])


def test_build_tiny_scale_flag(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from agent.frontends.cli.app import app
    from imgrag.errors import UserError

    with pytest.raises(UserError, match="needs a DIRECTORY"):
        CliRunner().invoke(app, ["models", "build-tiny", "--scale", "full"], catch_exceptions=False)
    with pytest.raises(UserError, match="tiny or full"):
        CliRunner().invoke(app, ["models", "build-tiny", str(tmp_path), "--scale", "huge"], catch_exceptions=False)
    with pytest.raises(ValueError, match="scale must be"):
        F.build_kit(tmp_path, scale="medium")

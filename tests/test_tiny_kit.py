"""The tiny-model kit: builds, is deterministic, and every model reloads through its real loader and runs."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import hashlib  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from imgrag.kits import tiny_kit as kit  # noqa: E402
from imgrag.kits.tiny_builders import build_open_clip  # noqa: E402
from imgrag.kits.tiny_configs import OPEN_CLIP_MODEL_CFG, QWEN_VL_MAX_PIXELS, SDXL_SINGLE_FILE_NAME  # noqa: E402

MODEL_NAMES = ["sdxl", "sdxl-single", "ip-adapter", "qwen2.5-vl", "qwen2.5-instruct", "open-clip", "lcm-lora",
               "loras", "dino",
               "siglip", "omnigen"]


def _weights_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.safetensors"))
    }


def _kit_dir(paths: dict[str, Path]) -> Path:
    return paths["generator"].parent


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def test_kit_builds_every_model_and_writes_the_marker(tiny_kit: dict[str, Path]) -> None:
    root = _kit_dir(tiny_kit)
    assert tiny_kit == kit.tiny_kit_paths(root)
    assert set(tiny_kit) == {"generator", "generator_single_file", "ip_adapter", "judge", "llm", "embedder",
                             "lcm_lora", "loras", "dino", "siglip", "omnigen"}
    assert all(path.is_dir() for path in tiny_kit.values())

    marker = json.loads((root / "kit.json").read_text())
    assert marker["version"] == kit.KIT_VERSION
    assert marker["seed"] == 0
    assert marker["models"] == {key: path.name for key, path in tiny_kit.items()}

    ip = tiny_kit["ip_adapter"]
    assert (ip / "sdxl_models" / "ip-adapter_sdxl_vit-h.safetensors").is_file()
    assert (ip / "models" / "image_encoder" / "config.json").is_file()
    assert (tiny_kit["embedder"] / "open_clip_config.json").is_file()
    assert (tiny_kit["embedder"] / "open_clip_model.safetensors").is_file()
    assert [p.name for p in tiny_kit["generator_single_file"].iterdir()] == [SDXL_SINGLE_FILE_NAME]

    files = [p for p in root.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}], "safetensors only"
    assert not [p for p in root.iterdir() if ".tmp-" in p.name or ".old-" in p.name], "no leftovers"


def test_ensure_keeps_a_current_kit(tiny_kit: dict[str, Path]) -> None:
    root = _kit_dir(tiny_kit)
    stamps = {p: p.stat().st_mtime_ns for p in [root / "kit.json", *root.rglob("*.safetensors")]}
    calls: list[str] = []

    assert kit.ensure_tiny_kit(root, progress=calls.append) == tiny_kit
    assert kit.build_tiny_kit(root, seed=0, progress=calls.append) == tiny_kit  # same seed, no force

    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_rebuild_is_deterministic_reports_progress_and_recovers_from_a_crash(
    tiny_kit: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    second = kit.build_tiny_kit(tmp_path / "kit", seed=0, progress=calls.append)
    root = _kit_dir(second)
    assert calls == MODEL_NAMES

    expected = _weights_digests(_kit_dir(tiny_kit))
    # 4 SDXL parts, the same SDXL as one file, adapter + its image encoder, 2 Qwens, open_clip, LCM-LoRA, the two
    # user LoRAs, DINO, SigLIP, OmniGen's transformer and VAE
    assert len(expected) == 17
    assert _weights_digests(root) == expected

    # A stale marker (older kit version) makes ensure_tiny_kit rebuild.
    marker = json.loads((root / "kit.json").read_text())
    (root / "kit.json").write_text(json.dumps({**marker, "version": kit.KIT_VERSION - 1}))
    calls.clear()
    kit.ensure_tiny_kit(root, progress=calls.append)
    assert calls == MODEL_NAMES
    assert json.loads((root / "kit.json").read_text())["version"] == kit.KIT_VERSION

    # A crash mid-build leaves no marker and no temporary folders; the next ensure rebuilds.
    def crash(dest: Path, seed: int) -> None:
        (dest / "partial.safetensors").write_bytes(b"")
        raise RuntimeError("simulated crash")

    with monkeypatch.context() as patch:
        patch.setitem(kit.BUILDERS, "judge", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            kit.build_tiny_kit(root, force=True)
    assert not (root / "kit.json").exists()
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]
    calls.clear()
    kit.ensure_tiny_kit(root, progress=calls.append)
    assert calls == MODEL_NAMES
    assert _weights_digests(root) == expected


def test_another_seed_gives_other_weights(tmp_path: Path) -> None:
    for i, seed in enumerate((0, 0, 1)):
        dest = tmp_path / f"{i}-seed-{seed}"
        dest.mkdir()
        build_open_clip(dest, seed)
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tmp_path.glob("*/*.safetensors"))]
    assert digests[0] == digests[1] != digests[2]


# --------------------------------------------------------------------------------------------
# Each model through its real loader
# --------------------------------------------------------------------------------------------


def _sdxl(tiny_kit: dict[str, Path]):
    from diffusers import AutoPipelineForText2Image, StableDiffusionXLPipeline

    pipe = AutoPipelineForText2Image.from_pretrained(
        str(tiny_kit["generator"]), dtype=torch.float32, use_safetensors=True, trust_remote_code=False
    )
    assert isinstance(pipe, StableDiffusionXLPipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sdxl_generates(tiny_kit: dict[str, Path]) -> None:
    pipe = _sdxl(tiny_kit)
    generator = torch.Generator().manual_seed(0)
    image = pipe("a cat", num_inference_steps=2, height=64, width=64, generator=generator).images[0]
    assert image.size == (64, 64) and image.mode == "RGB"


def test_ip_adapter_loads_like_h94_and_takes_two_references(tiny_kit: dict[str, Path]) -> None:
    from safetensors import safe_open

    weights = tiny_kit["ip_adapter"] / "sdxl_models" / "ip-adapter_sdxl_vit-h.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        keys = set(f.keys())
    assert {"image_proj.proj.weight", "image_proj.proj.bias", "image_proj.norm.weight"} <= keys
    assert {"ip_adapter.1.to_k_ip.weight", "ip_adapter.1.to_v_ip.weight"} <= keys

    pipe = _sdxl(tiny_kit)
    pipe.load_ip_adapter(
        str(tiny_kit["ip_adapter"]),
        subfolder="sdxl_models",
        weight_name="ip-adapter_sdxl_vit-h.safetensors",
        image_encoder_folder="models/image_encoder",
    )
    pipe.set_ip_adapter_scale(0.6)
    assert pipe.image_encoder is not None
    refs = [Image.new("RGB", (100, 80), (200, 30, 30)), Image.new("RGB", (50, 90), (30, 30, 200))]
    image = pipe(
        "a cat", ip_adapter_image=[refs], num_inference_steps=2, height=64, width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]  # fmt: skip
    assert image.size == (64, 64)


def test_qwen_vl_judge_generates_on_an_image(tiny_kit: dict[str, Path]) -> None:
    from qwen_vl_utils import process_vision_info
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    path = str(tiny_kit["judge"])
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, trust_remote_code=False
    )
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=False)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"

    messages = [{"role": "user", "content": [
        {"type": "image", "image": Image.new("RGB", (120, 90), (10, 200, 30))},
        {"type": "text", "text": "Score this image 0-10 for the prompt 'a cat'."},
    ]}]  # fmt: skip
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in text and text.endswith("<|im_start|>assistant\n")
    images, videos = process_vision_info(messages)
    inputs = processor(text=[text], images=images, videos=videos, padding=True, return_tensors="pt")
    grid = inputs["image_grid_thw"][0].tolist()
    assert grid[1] * grid[2] * 14 * 14 <= QWEN_VL_MAX_PIXELS  # the processor's small max_pixels

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    assert new.shape == (1, 4)
    assert isinstance(processor.batch_decode(new, skip_special_tokens=True)[0], str)


def test_llm_renders_tools_and_generates(tiny_kit: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(tiny_kit["llm"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    assert type(model).__name__ == "Qwen2ForCausalLM"

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>"
    assert im_end in model.generation_config.eos_token_id

    tool = {"type": "function", "function": {
        "name": "search_references", "description": "Search the reference images.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    }}  # fmt: skip
    messages = [
        {"role": "user", "content": "draw a cat"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "search_references", "arguments": {"query": "cat"}}},
        ]},
        {"role": "tool", "content": '["ref_0.png"]'},
    ]  # fmt: skip
    text = tokenizer.apply_chat_template(messages, tools=[tool], tokenize=False, add_generation_prompt=True)
    assert "<tools>" in text and '"name": "search_references"' in text
    assert '<tool_call>\n{"name": "search_references", "arguments": {"query": "cat"}}\n</tool_call>' in text
    assert '<tool_response>\n["ref_0.png"]\n</tool_response>' in text
    assert text.endswith("<|im_start|>assistant\n")
    # <tool_call> is one added token, and not a special one (skip_special_tokens keeps it, as in Qwen2.5)
    assert len(tokenizer("<tool_call>", add_special_tokens=False).input_ids) == 1
    decoded = tokenizer.decode(tokenizer("<tool_call>x").input_ids, skip_special_tokens=True)
    assert decoded.startswith("<tool_call>")

    inputs = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


def test_open_clip_local_dir_encodes(tiny_kit: dict[str, Path]) -> None:
    import open_clip

    name = f"local-dir:{tiny_kit['embedder']}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    model.eval()
    images = torch.stack([preprocess(Image.new("RGB", (300, 200), c)) for c in [(120, 20, 220), (0, 0, 0)]])
    with torch.no_grad():
        image_features = model.encode_image(images)
        text_features = model.encode_text(tokenizer(["a photo of a cat", "a dog"]))
    dim = OPEN_CLIP_MODEL_CFG["embed_dim"]
    assert image_features.shape == (2, dim) and text_features.shape == (2, dim)
    assert torch.isfinite(image_features).all() and torch.isfinite(text_features).all()

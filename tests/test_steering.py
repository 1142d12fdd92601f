"""Steering the references on the tiny SDXL kit: a weight per reference, style/content per-block scales
(InstantStyle), and cached image-encoder embeddings that give the same picture byte for byte."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from imgrag.drawing.steering import (
    instantstyle_blocks,
    instantstyle_scale,
    mode_for_verdict,
    parse_ref_arg,
    policy_weights,
)
from imgrag.errors import UserError
from imgrag.models.embed_cache import EmbeddingCache
from imgrag.models.generator import Generator
from imgrag.settings import Settings, load_settings

RED = Image.new("RGB", (100, 80), (200, 30, 30))
BLUE = Image.new("RGB", (50, 90), (30, 30, 200))
# The published SDXL base UNet's block layout (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json).
SDXL_UNET = SimpleNamespace(layers_per_block=2,
                            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _key(image: Image.Image) -> str:
    return hashlib.sha256(_png(image)).hexdigest()


@pytest.fixture(scope="module")
def settings(tiny_kit: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Settings:
    home = tmp_path_factory.mktemp("steer-home")
    return load_settings("tiny", environ={"IMGRAG_TINY_KIT_DIR": str(tiny_kit["generator"].parent),
                                          "IMGRAG_HOME": str(home)})


@pytest.fixture(scope="module")
def generator(settings: Settings) -> Generator:
    return Generator.from_pretrained(settings)


def test_instantstyle_blocks_of_sdxl_are_the_published_ones() -> None:
    """diffusers' IP-Adapter guide (InstantStyle, PR #7668): style = up_blocks.0.attentions.1, layout =
    down_blocks.2.attentions.1, written as set_ip_adapter_scale dicts."""
    assert instantstyle_scale(SDXL_UNET, "style") == {"up": {"block_0": [0.0, 1.0, 0.0]}}
    assert instantstyle_scale(SDXL_UNET, "content") == {"down": {"block_2": [0.0, 1.0]}}
    assert instantstyle_scale(SDXL_UNET, "both") == 1.0
    assert instantstyle_blocks(SDXL_UNET, "style") == ["up_blocks.0.attentions.1"]
    assert instantstyle_blocks(SDXL_UNET, "content") == ["down_blocks.2.attentions.1"]


def test_ref_argument_and_policy_rules() -> None:
    assert parse_ref_arg("cat.png") == (Path("cat.png"), parse_ref_arg("cat.png:1")[1])
    path, steer = parse_ref_arg("a/b c.png:0.7:style")
    assert path == Path("a/b c.png") and steer.weight == 0.7 and steer.mode == "style"
    assert parse_ref_arg("x.jpg:content")[1].mode == "content"
    with pytest.raises(UserError, match="within 0..2"):
        parse_ref_arg("x.jpg:3")
    assert policy_weights([0.3, 0.15, 0.27]) == [1.0, 0.5, 0.9]
    assert policy_weights([-0.1, -0.2]) == [1.0, 1.0]
    assert mode_for_verdict({"parsed": True, "missing": [], "reason": "the style is wrong"}) == "style"
    assert mode_for_verdict({"parsed": True, "missing": ["a cradle"], "reason": "style"}) == "both"


def test_per_reference_weights_change_the_picture(generator: Generator) -> None:
    even = generator.generate("a cat", seed=1, references=[RED, BLUE], ip_scale=1.0)
    again = generator.generate("a cat", seed=1, references=[RED, BLUE], ip_scale=1.0, weights=[1.0, 1.0])
    red_more = generator.generate("a cat", seed=1, references=[RED, BLUE], ip_scale=1.0, weights=[2.0, 0.2])
    blue_more = generator.generate("a cat", seed=1, references=[RED, BLUE], ip_scale=1.0, weights=[0.2, 2.0])
    assert np.array_equal(np.asarray(even), np.asarray(again))
    assert not np.array_equal(np.asarray(even), np.asarray(red_more))
    assert not np.array_equal(np.asarray(red_more), np.asarray(blue_more))
    # a weight of zero leaves that reference out of the sum (up to float rounding of a batch of two)
    only_red = generator.generate("a cat", seed=1, references=[RED, BLUE], ip_scale=1.0, weights=[1.0, 0.0])
    alone = generator.generate("a cat", seed=1, references=[RED], ip_scale=1.0)
    gap = np.abs(np.asarray(only_red, dtype=np.int16) - np.asarray(alone, dtype=np.int16)).max()
    assert gap <= 2 < np.abs(np.asarray(red_more, dtype=np.int16) - np.asarray(alone, dtype=np.int16)).max()
    with pytest.raises(UserError, match="one per reference"):
        generator.generate("a cat", seed=1, references=[RED, BLUE], weights=[1.0])


def test_style_and_content_scales_reach_the_attention_processors(generator: Generator) -> None:
    pictures = {}
    for mode in ("both", "style", "content"):
        pictures[mode] = np.asarray(generator.generate("a cat", seed=2, references=[RED, BLUE], ip_scale=0.8,
                                                       weights=[1.0, 0.5], modes=[mode, "both"]))
        scales = {name: proc.scale[0] for name, proc in generator.pipe.unet.attn_processors.items()
                  if isinstance(getattr(proc, "scale", None), list)}
        kept = instantstyle_blocks(generator.pipe.unet.config, mode)
        for name, (first, second) in scales.items():
            assert second == pytest.approx(0.4)  # the second reference stays "both" at 0.8 x 0.5 everywhere
            inside = any(name.startswith(block) for block in kept)
            assert first == pytest.approx(0.8 if inside else 0.0), name
    assert not np.array_equal(pictures["both"], pictures["style"])
    assert not np.array_equal(pictures["style"], pictures["content"])


def test_cached_embeddings_give_the_same_picture_and_skip_the_encoder(generator: Generator, tmp_path: Path) -> None:
    keys = [_key(RED), _key(BLUE)]
    generator.embed_cache = None
    fresh = generator.generate("a cat", seed=4, references=[RED, BLUE], ip_scale=1.0, reference_keys=keys)
    try:
        generator.embed_cache = EmbeddingCache(tmp_path / "ip_embeds")
        first = generator.generate("a cat", seed=4, references=[RED, BLUE], ip_scale=1.0, reference_keys=keys)
        assert generator.last_guidance["encoded"] == 2 and generator.last_guidance["cached"] == 0
        assert len(list((tmp_path / "ip_embeds").glob("*/*.safetensors"))) == 2
        # a new process: a fresh cache object reads the files
        generator.embed_cache = EmbeddingCache(tmp_path / "ip_embeds")
        calls = generator.encoder_calls
        cached = generator.generate("a cat", seed=4, references=[RED, BLUE], ip_scale=1.0, reference_keys=keys)
        assert generator.encoder_calls == calls  # no forward pass of the image encoder at all
        assert generator.last_guidance == {**generator.last_guidance, "encoded": 0, "cached": 2}
        assert _png(cached) == _png(fresh) == _png(first)
        # another encoder identity never reads these entries
        generator._encoder_ids["cpu"] = "0" * 24
        generator.generate("a cat", seed=4, references=[RED], ip_scale=1.0, reference_keys=keys[:1])
        assert generator.last_guidance["encoded"] == 1
    finally:
        generator._encoder_ids.clear()
        generator.embed_cache = None


def test_generate_takes_a_weight_and_mode_per_reference(tiny_settings, tmp_path: Path, capsys) -> None:
    from imgrag.records.provenance import read_provenance
    from tests.cli import run_cli

    refs = []
    for i, colour in enumerate(((200, 0, 0), (0, 0, 200))):
        refs.append(tmp_path / f"ref{i}.png")
        Image.new("RGB", (40, 30), colour).save(refs[-1])
    target = tmp_path / "out.png"
    code, out, err = run_cli(capsys, "generate", "a cat", "--profile", "tiny", "--ref", f"{refs[0]}:1.5",
                             "--ref", f"{refs[1]}:0.5:style", "--steps", "1", "-o", str(target), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["reference_steering"] == [{"weight": 1.5, "mode": "both"}, {"weight": 0.5, "mode": "style"}]
    assert doc["image_encoder"]["calls"] == 2  # encoded once each, then cached beside the store
    steering = [(r["weight"], r["mode"]) for r in read_provenance(target)["references"]]
    assert steering == [(1.5, "both"), (0.5, "style")]
    code, out, err = run_cli(capsys, "generate", "a cat", "--profile", "tiny", "--ref", f"{refs[0]}:1.5",
                             "--ref", f"{refs[1]}:0.5:style", "--steps", "1", "-o", str(target), "--json")
    assert code == 0 and json.loads(out)["image_encoder"] == {"calls": 0, "cached": 2}
    code, _, err = run_cli(capsys, "generate", "a cat", "--profile", "tiny", "--ref", f"{refs[0]}:7",
                           "-o", str(target))
    assert code == 1 and "weight must be within 0..2" in err and "Traceback" not in err

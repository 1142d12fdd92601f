"""The open_clip embedder: loading (and refusing to load silently random weights), vectors, identity."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgrag.errors import ModelLoadError
from imgrag.models.embedder import Embedder
from imgrag.settings import load_settings


def settings_with(embedder: str, pretrained: str = ""):
    return load_settings("default", overrides={"models": {"embedder": embedder, "embedder_pretrained": pretrained},
                                               "device": "cpu"})


@pytest.fixture(scope="module")
def kit_clip(tiny_kit) -> Path:
    return tiny_kit["embedder"]


def test_tiny_embedder_vectors(kit_clip: Path, caplog: pytest.LogCaptureFixture) -> None:
    emb = Embedder.from_pretrained(settings_with(f"local-dir:{kit_clip}"))
    assert emb.dim == 32 and emb.device == "cpu" and emb.memory_bytes > 0
    images = [Image.new("RGB", (64, 40), (200, 10, 10)), Image.new("L", (9, 9), 128), Image.new("RGBA", (30, 30))]
    vectors = emb.embed_images(images, batch_size=2)
    assert vectors.shape == (3, 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb.embed_images(images[:1])[0], vectors[0], atol=1e-5)  # batching changes nothing
    with caplog.at_level(logging.DEBUG, logger="imgrag.models.embedder"):
        texts = emb.embed_texts(["a rocket", "word " * 200])
    assert texts.shape == (2, 32) and np.allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    assert any("cut to the embedder's 77" in r.getMessage() for r in caplog.records)
    assert emb.embed_texts([]).shape == (0, 32) and emb.embed_images([]).shape == (0, 32)
    assert emb.to("cpu") is emb


def test_model_id_is_stable_and_follows_the_weights(kit_clip: Path, tmp_path: Path) -> None:
    first = Embedder.from_pretrained(settings_with(f"local-dir:{kit_clip}")).model_id
    moved = tmp_path / "open-clip"
    shutil.copytree(kit_clip, moved)
    assert first.startswith("local-dir:open-clip@")
    assert Embedder.from_pretrained(settings_with(f"local-dir:{moved}")).model_id == first  # moving keeps it
    weights = moved / "open_clip_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # other weights under the same name
    weights.write_bytes(bytes(data))
    assert Embedder.from_pretrained(settings_with(f"local-dir:{moved}")).model_id != first


@pytest.mark.parametrize("name, pretrained, message", [
    ("local-dir:/no/such/dir", "", "checkpoint folder not found: /no/such/dir"),
    ("hf-hub:nobody/no-such-clip", "", "nobody/no-such-clip is not in the local Hugging Face cache"),
    ("ViT-B-32", "", "names an architecture without weights"),
    ("ViT-B-32", "/no/such/weights.safetensors", "weights file not found: /no/such/weights.safetensors"),
    ("No-Such-Arch", "x.pt", "unknown open_clip architecture 'No-Such-Arch'"),
])
def test_missing_checkpoints_are_model_load_errors(name: str, pretrained: str, message: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        Embedder.from_pretrained(settings_with(name, pretrained))
    assert message in str(info.value)


def test_a_folder_without_weights_is_refused_not_randomly_initialised(kit_clip: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no-weights"
    folder.mkdir()
    shutil.copy(kit_clip / "open_clip_config.json", folder)
    with pytest.raises(ModelLoadError, match="has no weights file"):
        Embedder.from_pretrained(settings_with(f"local-dir:{folder}"))
    (folder / "open_clip_config.json").unlink()
    with pytest.raises(ModelLoadError, match="has no open_clip_config.json"):
        Embedder.from_pretrained(settings_with(f"local-dir:{folder}"))

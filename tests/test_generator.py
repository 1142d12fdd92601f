"""The generator on the tiny SDXL kit: reproducible, guided by one or several references, one pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgrag.errors import ModelLoadError, UserError
from imgrag.management.manager import measure_gb
from imgrag.models.generator import Generator
from imgrag.settings import Settings, load_settings

RED = Image.new("RGB", (100, 80), (200, 30, 30))
BLUE = Image.new("RGB", (50, 90), (30, 30, 200))


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def settings(tiny_kit: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Settings:
    home = tmp_path_factory.mktemp("gen-home")
    return load_settings("tiny", environ={"IMGRAG_TINY_KIT_DIR": str(tiny_kit["generator"].parent),
                                          "IMGRAG_HOME": str(home)})


@pytest.fixture(scope="module")
def generator(settings: Settings) -> Generator:
    return Generator.from_pretrained(settings)


def test_same_seed_same_image_other_seed_other_image(generator: Generator) -> None:
    a = generator.generate("a cat on a chair", seed=3)
    b = generator.generate("a cat on a chair", seed=3)
    c = generator.generate("a cat on a chair", seed=4)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert np.array_equal(_pixels(a), _pixels(b))
    assert not np.array_equal(_pixels(a), _pixels(c))


def test_guided_differs_from_plain_and_takes_two_references(generator: Generator) -> None:
    plain = generator.generate("a cat", seed=1)
    one = generator.generate("a cat", seed=1, references=[RED], ip_scale=1.0)
    two = generator.generate("a cat", seed=1, references=[RED, BLUE], ip_scale=1.0)
    again = generator.generate("a cat", seed=1, references=[RED, BLUE], ip_scale=1.0)
    assert not np.array_equal(_pixels(plain), _pixels(one))
    assert not np.array_equal(_pixels(one), _pixels(two))  # the second reference is really used
    assert np.array_equal(_pixels(two), _pixels(again))


def test_plain_after_guided_is_the_plain_picture(settings: Settings) -> None:
    """Scale 0 with a zero embedding must draw exactly what the pipeline draws without the adapter."""
    fresh = Generator.from_pretrained(settings)
    before = fresh.generate("a dog", seed=5)
    size_plain = measure_gb(fresh)
    fresh.generate("a dog", seed=5, references=[RED])
    assert fresh.adapter_loaded
    after = fresh.generate("a dog", seed=5)
    assert np.array_equal(_pixels(before), _pixels(after))
    # without classifier-free guidance the zero embedding has one row, not two
    unguided = fresh.generate("a dog", seed=5, guidance=1.0)
    assert unguided.size == before.size and not np.array_equal(_pixels(before), _pixels(unguided))
    assert measure_gb(fresh) > size_plain  # the manager re-measures, so the adapter counts in the budget


def test_sdxl_is_loaded_once_and_the_adapter_once(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    import diffusers

    from imgrag.management.engine import build_manager

    real = diffusers.AutoPipelineForText2Image.from_pretrained.__func__
    calls: list[str] = []

    def counting(cls, *args, **kwargs):
        calls.append(str(args[0]))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(diffusers.AutoPipelineForText2Image, "from_pretrained", classmethod(counting))
    manager = build_manager(settings)
    adapter_loads = 0
    with manager.use("generator") as generator:
        original = generator.pipe.load_ip_adapter

        def spy(*args, **kwargs):
            nonlocal adapter_loads
            adapter_loads += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(generator.pipe, "load_ip_adapter", spy)
    for refs in (None, [RED], None, [RED, BLUE], None):
        with manager.use("generator") as generator:
            generator.generate("a cat", seed=0, references=refs)
    assert calls == [settings.models.generator]
    assert adapter_loads == 1
    assert manager.load_counts()["generator"] == 1


def test_on_step_reports_every_denoising_step(generator: Generator) -> None:
    seen: list[tuple[int, int]] = []
    generator.generate("a cat", seed=0, steps=3, on_step=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_size_steps_and_guidance_are_honoured(generator: Generator) -> None:
    image = generator.generate("a cat", seed=0, width=80, height=48, steps=1, guidance=1.0)
    assert image.size == (80, 48)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"prompt": "   "}, "prompt is empty"),
    ({"width": 65}, "multiple of 8"),
    ({"height": 0}, "multiple of 8"),
    ({"steps": -1}, "steps must be at least 1"),
    ({"ip_scale": 3.0, "references": [RED]}, "ip_scale"),
    ({"references": ["red.png"]}, "PIL image"),
])
def test_bad_requests_are_user_errors(generator: Generator, kwargs: dict, message: str) -> None:
    args = {"prompt": "a cat", "seed": 0, **kwargs}
    with pytest.raises(UserError, match=message):
        generator.generate(**args)


def test_wrong_or_missing_checkpoint_is_a_model_load_error(settings: Settings, tiny_kit: dict[str, Path],
                                                           tmp_path: Path) -> None:
    from dataclasses import replace

    for ref, message in ((tiny_kit["judge"], "model_index.json"), (tmp_path / "nothing-here", "not found")):
        wrong = replace(settings, models=replace(settings.models, generator=str(ref)))
        with pytest.raises(ModelLoadError, match=message) as info:
            Generator.from_pretrained(wrong)
        assert str(ref) in str(info.value) and "\n" not in str(info.value)


# ----- a broken (NaN) drawing is never a candidate -----

def _nan_decode(vae, when):
    """Wrap the VAE's decode so that it returns NaN pixels whenever ``when(vae)`` holds."""
    real = vae.decode

    def decode(latents, *args, **kwargs):
        if when(vae):
            batch, _, height, width = latents.shape
            return (torch.full((batch, 3, 8 * height, 8 * width), float("nan"), dtype=latents.dtype),)
        return real(latents, *args, **kwargs)

    return decode


def test_nan_pixels_from_a_half_precision_vae_are_redrawn_in_float32(settings: Settings, generator: Generator,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    expected = _pixels(generator.generate("a red ball", seed=3))
    fresh = Generator.from_pretrained(settings)
    vae = fresh.pipe.vae
    vae.register_to_config(force_upcast=False)  # an fp16-fixed VAE: diffusers would not upcast it itself
    vae.to(dtype=torch.float16)
    calls: list = []
    monkeypatch.setattr(vae, "decode", _nan_decode(vae, lambda v: calls.append(v.dtype) or v.dtype == torch.float16))
    picture = fresh.generate("a red ball", seed=3)
    assert calls == [torch.float16, torch.float32]  # one retry, with the VAE in float32
    assert vae.dtype == torch.float16  # and the VAE is left as it was
    assert np.isfinite(_pixels(picture)).all()
    assert np.abs(_pixels(picture).astype(int) - expected.astype(int)).max() <= 1


def test_nan_pixels_even_in_float32_fail_with_one_line_naming_the_setting(generator: Generator,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from imgrag.models.decoding import NonFiniteDrawingError

    monkeypatch.setattr(generator.pipe.vae, "decode", _nan_decode(generator.pipe.vae, lambda v: True))
    with pytest.raises(NonFiniteDrawingError, match="NaN or inf.*dtype") as info:
        generator.generate("a red ball", seed=3)
    assert "\n" not in str(info.value)


def test_nan_latents_fail_before_any_decode(generator: Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    from imgrag.models.decoding import NonFiniteDrawingError

    unet = generator.pipe.unet
    real = unet.forward

    def overflowing(*args, **kwargs):
        out = real(*args, **kwargs)
        out[0].fill_(float("inf"))
        return out

    monkeypatch.setattr(unet, "forward", overflowing)
    monkeypatch.setattr(generator.pipe.vae, "decode", lambda *a, **k: pytest.fail("decoded NaN latents"))
    with pytest.raises(NonFiniteDrawingError, match="latents hold NaN or inf.*set dtype"):
        generator.generate("a red ball", seed=3)

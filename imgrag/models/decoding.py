"""The last step of an SDXL drawing: its final latents through the VAE to a picture, never letting a broken
(non-finite) drawing through.

torch is imported inside the functions that use it: it takes seconds to import, and ``imgrag --help`` imports the
model wrappers.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from imgrag.errors import UserError


class NonFiniteDrawingError(UserError):
    """A drawing whose latents or pixels are NaN or inf: never a candidate. The message names the setting to change."""


def decode_latents(pipe: Any, latents: Any) -> Image.Image:
    """Decode the final latents to a picture, never letting a broken (non-finite) drawing through.

    An fp16 SDXL can overflow: NaN latents (the UNet) or NaN pixels (the VAE) come out as the well-known black
    picture. NaN latents fail at once (no decoder can mend them); NaN pixels from a VAE that is not float32 are
    decoded once more with the VAE in float32, as diffusers itself does for VAEs marked ``force_upcast``.
    Either failure is a :class:`NonFiniteDrawingError` naming the setting to change. The decode follows
    ``StableDiffusionXLPipeline.__call__``'s own (latents_mean/std, scaling_factor, watermark, postprocess).
    """
    import torch

    if not bool(torch.isfinite(latents).all()):
        raise NonFiniteDrawingError(
            f"the drawing's latents hold NaN or inf (numeric overflow in {pipe.unet.dtype}); set dtype = "
            "\"float32\" or \"bfloat16\" in the profile (IMGRAG_DTYPE), or lower generation.guidance")
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    pixels = _vae_decode(pipe, latents, torch.float32 if upcast else vae.dtype)
    if not bool(torch.isfinite(pixels).all()) and vae.dtype != torch.float32 and not upcast:
        pixels = _vae_decode(pipe, latents, torch.float32)  # the one retry: the same latents, a float32 VAE
    if not bool(torch.isfinite(pixels).all()):
        raise NonFiniteDrawingError(
            "the decoded picture holds NaN or inf (the VAE overflowed, even in float32); set dtype = "
            "\"float32\" in the profile (IMGRAG_DTYPE) or use a VAE fixed for fp16 (madebyollin/sdxl-vae-fp16-fix)")
    if pipe.watermark is not None:
        pixels = pipe.watermark.apply_watermark(pixels)
    return pipe.image_processor.postprocess(pixels, output_type="pil")[0]


def _vae_decode(pipe: Any, latents: Any, dtype: Any) -> Any:
    """The VAE's decode of ``latents`` in ``dtype`` (the VAE is moved there for the call and back after)."""
    import torch

    vae = pipe.vae
    original = vae.dtype
    if original != dtype:
        vae.to(dtype=dtype)
    try:
        with torch.no_grad():
            return _decode_scaled(vae, latents, dtype)
    finally:
        if original != dtype:
            vae.to(dtype=original)


def _decode_scaled(vae: Any, latents: Any, dtype: Any) -> Any:
    """Undo the latents' scaling (and normalisation, where the VAE has one) and decode."""
    latents = latents.to(device=vae.device, dtype=dtype)
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        mean = latents.new_tensor(mean).view(1, 4, 1, 1)
        std = latents.new_tensor(std).view(1, 4, 1, 1)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor
    return vae.decode(latents, return_dict=False)[0]

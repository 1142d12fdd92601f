"""Live previews: a small RGB picture straight from SDXL's latents while it draws, with no VAE decode.

Each of SDXL's four latent channels is mixed into red, green and blue by a fixed 4x3 matrix plus a bias, fitted
to SDXL's VAE by the ComfyUI project (``comfy/latent_formats.py``, class ``SDXL``: ``latent_rgb_factors`` and
``latent_rgb_factors_bias``, its "latent2rgb" previewer). The result is one pixel per latent (1/8 of the picture's
side: 128x128 for a 1024² drawing), in the value range ComfyUI maps from [-1, 1] to [0, 255]. It costs one
4x3 matrix product per latent pixel, so a preview every few steps stays far below one UNet step (BENCHMARKS.md,
"Several drawings per round and live previews", measures it). A tiny decoder (TAESD-XL) would look better; it is
a model to download and none is bundled, so imgrag does not use one.

The latents seen mid-way are the noisy ones the sampler holds (diffusers' ``callback_on_step_end`` gives them), so
the first previews are mostly noise; they sharpen as the drawing proceeds. A tiny-profile drawing has random
weights: its previews are noise throughout.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

# Rows: latent channels 0..3; columns: R, G, B (ComfyUI's SDXL latent format).
SDXL_LATENT_RGB_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)
# Latents smaller than this a side (the tiny kit's 8x8) are enlarged to it, so a preview is visible at all.
MIN_PREVIEW_SIDE = 64


def latents_to_rgb(latents: Any) -> list[Image.Image]:
    """One preview picture per drawing of a batch: ``latents`` is SDXL's ``[batch, 4, h/8, w/8]`` tensor as the
    sampler holds it (scaled by the VAE's scaling factor, as ComfyUI's factors expect). Pictures are ``w/8 x h/8``
    RGB, enlarged (nearest neighbour) to at least :data:`MIN_PREVIEW_SIDE` a side. Raises ValueError for a tensor
    that is not four-channel."""
    import torch

    if latents.ndim != 4 or latents.shape[1] != len(SDXL_LATENT_RGB_FACTORS):
        raise ValueError(f"expected SDXL latents [batch, 4, h, w], got {tuple(latents.shape)}")
    with torch.no_grad():
        x = latents.detach().float().cpu()
        factors = torch.tensor(SDXL_LATENT_RGB_FACTORS)
        bias = torch.tensor(SDXL_LATENT_RGB_BIAS)
        rgb = torch.einsum("bchw,cr->bhwr", x, factors) + bias  # [batch, h, w, 3], about -1..1
        pixels = ((rgb.nan_to_num(0.0) + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    out = []
    for array in pixels:
        image = Image.fromarray(array, "RGB")
        side = min(image.size)
        if side < MIN_PREVIEW_SIDE:
            factor = -(-MIN_PREVIEW_SIDE // side)  # ceil
            image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
        out.append(image)
    return out


def strip(images: list[Image.Image], gap: int = 2) -> Image.Image:
    """The previews of one batch side by side in one picture (one preview shown for a round of several drawings)."""
    if len(images) == 1:
        return images[0]
    width = sum(i.width for i in images) + gap * (len(images) - 1)
    height = max(i.height for i in images)
    sheet = Image.new("RGB", (width, height), (24, 24, 24))
    x = 0
    for image in images:
        sheet.paste(image, (x, 0))
        x += image.width + gap
    return sheet


def due(step: int, total: int, every: int) -> bool:
    """Whether a preview is due after denoising step ``step`` (1-based) of ``total``: every ``every`` steps, never
    after the last one (the finished picture follows at once), never when ``every`` is 0."""
    return every > 0 and step < total and step % every == 0

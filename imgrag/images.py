"""Opening images from users safely: every way a file can be wrong becomes one clear ``UserError``.

Pillow's own decompression-bomb guard only warns below twice its limit; we check the size the
header claims before decoding anything, so a 40000x40000 PNG costs nothing.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

from imgrag.errors import UserError

# File types imgrag indexes and accepts as references.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# 64 megapixels: larger than any photograph a user would want as a reference; larger claims are bombs.
MAX_IMAGE_PIXELS = 64_000_000


def probe_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """Read only the header and return (width, height); raise UserError if the file is not a usable image."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not an image")
    try:
        if path.stat().st_size == 0:
            raise UserError(f"{path}: empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
    except UserError:
        raise
    except PermissionError:
        raise UserError(f"{path}: permission denied") from None
    except Image.DecompressionBombError:
        raise UserError(f"{path}: its header claims more pixels than Pillow's safety limit "
                        "(a decompression bomb, or a picture too large to use)") from None
    except UnidentifiedImageError:
        raise UserError(f"{path}: not an image file (or a format Pillow cannot read)") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None
    check_pixels(path, width, height, max_pixels)
    if width == 0 or height == 0:
        raise UserError(f"{path}: image has no pixels")
    return width, height


def check_pixels(name: str | Path, width: int, height: int, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Refuse a picture whose header claims more than ``max_pixels`` before any pixel is decoded."""
    if width * height > max_pixels:
        raise UserError(f"{name}: {width}x{height} exceeds the {max_pixels // 1_000_000} megapixel limit "
                        "(a decompression bomb, or a picture too large to use)")


def decode_rgb(source: str | Path | BinaryIO, name: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS,
               draft_box: int | None = None) -> Image.Image:
    """Fully decode ``source`` (a path or a file object), upright per its EXIF orientation, as RGB.

    ``name`` is what errors call it. The header's size is checked again (the bytes may not be those that
    were probed), and truncated data, seen only when the pixels are decoded, is a UserError. ``draft_box``
    lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale when only that many pixels are needed.
    (A phone photo stored sideways must be seen upright by CLIP and IP-Adapter.)
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                check_pixels(name, *im.size, max_pixels)
                if draft_box and im.format == "JPEG":
                    im.draft("RGB", (draft_box, draft_box))
                im.load()
                return to_rgb(ImageOps.exif_transpose(im))
    except UserError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{name}: corrupt or truncated image ({exc})") from None


# What transparent areas become: mid-grey carries no colour and no extreme of brightness into CLIP or IP-Adapter,
# where black (the usual RGB under alpha 0) or white would read as content.
NEUTRAL_BACKGROUND = (128, 128, 128)
# Modes whose samples do not fit in 8 bits: Pillow's own convert("RGB") clips them (16-bit grey turns white,
# float in 0..1 turns black), so they are rescaled here first.
_WIDE_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")


def _rescale_to_8bit(im: Image.Image) -> Image.Image:
    """A wide single-channel image (16- or 32-bit integers, 32-bit floats) as 8-bit greyscale, content kept.

    Integers are scaled by the range their bit depth implies (a 16-bit PNG by 65535, whatever its values);
    32-bit data larger than that, and floats outside 0..1, are stretched from their own minimum to maximum.
    Non-finite floats (NaN, inf) become 0."""
    import numpy as np

    data = np.asarray(im, dtype=np.float64)
    data = np.where(np.isfinite(data), data, 0.0)
    low, high = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if im.mode.startswith("I;16"):
        scaled = data / 65535.0
    elif im.mode == "F" and low >= 0.0 and high <= 1.0:
        scaled = data  # the common convention for float images
    elif im.mode == "I" and low >= 0 and high <= 255:
        scaled = data / 255.0  # 8-bit values stored in 32 bits
    elif im.mode == "I" and low >= 0 and high <= 65535:
        scaled = data / 65535.0  # Pillow opens some 16-bit files as "I"
    else:
        scaled = (data - low) / (high - low) if high > low else np.zeros_like(data)
    return Image.fromarray(np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8), mode="L")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode a photo folder can hold, as 8-bit RGB with its content kept.

    Wide modes (16/32-bit integer, 32-bit float) are rescaled rather than clipped; transparency (an alpha band,
    a palette or greyscale transparency key) is composited onto :data:`NEUTRAL_BACKGROUND` rather than left as
    whatever colour lies under alpha 0. Everything else (1, L, P, CMYK, YCbCr, LAB, HSV) is Pillow's conversion.
    """
    if im.mode in _WIDE_MODES:
        return _rescale_to_8bit(im).convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        if im.mode == "La":  # Pillow converts premultiplied grey only to LA
            im = im.convert("LA")
        rgba = im.convert("RGBA")  # also premultiplied (RGBa, La) and palette/key transparency
        background = Image.new("RGBA", rgba.size, (*NEUTRAL_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def open_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open a user's picture as upright RGB; raise UserError naming the file on any problem."""
    probe_image(path, max_pixels)  # the clear reasons: no such file, empty, not an image, unreadable, a bomb
    return decode_rgb(path, path, max_pixels=max_pixels)

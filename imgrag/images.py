"""Opening images from users safely: every way a file can be wrong becomes one clear ``UserError``.

Pillow's own decompression-bomb guard only warns below twice its limit; we check the size the
header claims before decoding anything, so a 40000x40000 PNG costs nothing.
"""

from __future__ import annotations

import warnings
from pathlib import Path

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
    if width * height > max_pixels:
        raise UserError(f"{path}: {width}x{height} exceeds the {max_pixels // 1_000_000} megapixel limit "
                        "(a decompression bomb, or a picture too large to use)")
    if width == 0 or height == 0:
        raise UserError(f"{path}: image has no pixels")
    return width, height


def open_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open, fully decode, turn upright per its EXIF orientation and convert to RGB; raise UserError naming
    the file on any problem. (A phone photo stored sideways must be seen upright by CLIP and IP-Adapter.)"""
    probe_image(path, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        # Truncated or corrupt data shows up only when the pixels are decoded.
        raise UserError(f"{path}: corrupt or truncated image ({exc})") from None

"""Opening images from users safely: every way a file can be wrong becomes one clear ``UserError``.

This module is the one place that decides what an unreadable picture is (:data:`UNREADABLE_IMAGE_ERRORS`,
:func:`reading_image`): indexing, search, critique, generate and its recipes, the chat, the web page's thumbnails,
the report and the evaluation all open pictures through it, so a file that one of them cannot read is the same
one-line :class:`UnreadableImage` (naming the file and why) in all of them, and a caller that walks many files
skips that one and goes on.

Pillow's own decompression-bomb guard only warns below twice its limit; we check the size the
header claims before decoding anything, so a 40000x40000 PNG costs nothing.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

from imgrag.errors import UserError
from imgrag.file_names import display_name

# File types imgrag indexes and accepts as references.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# 64 megapixels: larger than any photograph a user would want as a reference; larger claims are bombs.
MAX_IMAGE_PIXELS = 64_000_000

# Every exception Pillow or one of its plugins raises for a malformed file while opening, decoding, transposing or
# converting it. Pillow documents OSError (UnidentifiedImageError is one), but its plugins also raise ValueError (a
# PNG text chunk or ICC profile that inflates past PngImagePlugin.MAX_TEXT_CHUNK, bad TIFF tags), SyntaxError (a
# broken PNG chunk, "not a TIFF file"), struct.error and EOFError (headers cut short), zlib.error (a corrupt
# compressed stream), IndexError, KeyError and TypeError (palettes and tags out of range: Image.open itself treats
# SyntaxError, IndexError, TypeError and struct.error as "not this format"), ZeroDivisionError (a zero resolution
# or stride), MemoryError (an allocation a header asked for) and DecompressionBombError, which subclasses none of
# them. Inside :func:`reading_image` only Pillow runs, so catching these there cannot hide a bug of imgrag's.
UNREADABLE_IMAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, IndexError, KeyError, TypeError,
    ZeroDivisionError, MemoryError, Image.DecompressionBombError)


class UnreadableImage(UserError):
    """A file that cannot be used as a picture: ``path`` (as given) and ``reason`` (without the path), so a walk
    over many files can list it beside its name and go on. ``str()`` is the one line ``"PATH: reason"``."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{display_name(self.path)}: {reason}")


def unreadable_reason(exc: BaseException) -> str:
    """Why Pillow could not read a file, in words, for one of :data:`UNREADABLE_IMAGE_ERRORS`."""
    if isinstance(exc, Image.DecompressionBombError):
        return ("its header claims more pixels than Pillow's safety limit (a decompression bomb, or a picture too "
                "large to use)")
    if isinstance(exc, UnidentifiedImageError):
        return "not an image file (or a format Pillow cannot read)"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, MemoryError):
        return "decoding it needs more memory than there is (a corrupt or hostile header)"
    if isinstance(exc, ValueError) and "MAX_TEXT_CHUNK" in str(exc):
        return ("a text chunk or ICC profile in it inflates past Pillow's safety limit (PngImagePlugin.MAX_TEXT_CHUNK"
                ", 1 MB): corrupt or hostile metadata")
    if isinstance(exc, OSError) and exc.strerror and not str(exc).startswith(("image file", "broken", "cannot")):
        return f"cannot read: {exc.strerror}"
    detail = str(exc).strip() or type(exc).__name__
    return f"corrupt or truncated image ({type(exc).__name__}: {detail})"


@contextmanager
def reading_image(name: str | Path) -> Iterator[None]:
    """Run Pillow calls on a user's file; any of :data:`UNREADABLE_IMAGE_ERRORS` becomes :class:`UnreadableImage`
    naming ``name``. Pillow's DecompressionBombWarning is silenced: the pixel count is checked by us."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except UserError:
        raise
    except UNREADABLE_IMAGE_ERRORS as exc:
        raise UnreadableImage(name, unreadable_reason(exc)) from None


def probe_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """Read only the header and return (width, height); raise :class:`UnreadableImage` if the file is not a
    usable image (missing, a folder, empty, not an image, corrupt metadata, a bomb, unreadable)."""
    path = Path(path)
    if not path.exists():
        raise UnreadableImage(path, "no such file")
    if path.is_dir():
        raise UnreadableImage(path, "is a directory, not an image")
    with reading_image(path):
        if path.stat().st_size == 0:
            raise UnreadableImage(path, "empty file")
        with Image.open(path) as im:
            width, height = im.size
    check_pixels(path, width, height, max_pixels)
    if width == 0 or height == 0:
        raise UnreadableImage(path, "image has no pixels")
    return width, height


def check_pixels(name: str | Path, width: int, height: int, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Refuse a picture whose header claims more than ``max_pixels`` before any pixel is decoded."""
    if width * height > max_pixels:
        raise UnreadableImage(name, f"{width}x{height} exceeds the {max_pixels // 1_000_000} megapixel limit "
                              "(a decompression bomb, or a picture too large to use)")


def decode_rgb(source: str | Path | BinaryIO, name: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS,
               draft_box: int | None = None) -> Image.Image:
    """Fully decode ``source`` (a path or a file object), upright per its EXIF orientation, as RGB.

    ``name`` is what errors call it. The header's size is checked again (the bytes may not be those that
    were probed), and truncated data, seen only when the pixels are decoded, is a UserError. ``draft_box``
    lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale when only that many pixels are needed.
    (A phone photo stored sideways must be seen upright by CLIP and IP-Adapter.)
    """
    with reading_image(name), Image.open(source) as im:
        check_pixels(name, *im.size, max_pixels)
        if draft_box and im.format == "JPEG":
            im.draft("RGB", (draft_box, draft_box))
        im.load()
        return to_rgb(ImageOps.exif_transpose(im))


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

"""Opening user images: bombs are named as bombs, and sideways phone photos come out upright."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from imgrag.errors import UserError
from imgrag.images import open_image, probe_image


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height over one tiny data chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [10_000, 40_000])
def test_a_bomb_is_called_a_bomb_not_a_non_image(tmp_path: Path, side: int) -> None:
    # 10000^2 passes Pillow's own check and hits ours; 40000^2 trips Pillow's DecompressionBombError.
    bomb = png_claiming(tmp_path / "bomb.png", side, side)
    with pytest.raises(UserError, match="decompression bomb") as info:
        probe_image(bomb)
    assert "not an image" not in str(info.value)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    wide = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    wide.save(tmp_path / "phone.jpg", exif=exif)
    assert open_image(tmp_path / "phone.jpg").size == (20, 40)


def test_text_named_png_is_not_an_image(tmp_path: Path) -> None:
    fake = tmp_path / "notes.png"
    fake.write_text("hello")
    with pytest.raises(UserError, match="not an image"):
        open_image(fake)


# ----- every Pillow mode a photo folder can hold keeps its content (16-bit grey was once read as white) -----

def _gradient() -> Image.Image:
    """8-bit grey, dark on the left and bright on the right: 32 columns from 0 to 248."""
    import numpy as np

    return Image.fromarray(np.tile(np.arange(0, 256, 8, dtype=np.uint8), (8, 1)))


def _wide(mode: str, scale: float, dtype: str) -> Image.Image:
    import numpy as np

    data = np.asarray(_gradient(), dtype=np.float64) * scale
    image = Image.fromarray(data.astype(dtype))  # float32 -> F, int32 -> I, uint16 -> I;16
    assert image.mode == mode
    return image


def _lab() -> Image.Image:
    from PIL import ImageCms

    rgb = _gradient().convert("RGB")
    transform = ImageCms.buildTransformFromOpenProfiles(
        ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    return ImageCms.applyTransform(rgb, transform)


MODE_CASES = {
    # mode: (builder, file suffix to round-trip through, or None to decode in memory)
    "1": (lambda: _gradient().point(lambda v: 255 if v >= 128 else 0).convert("1"), ".png"),
    "L": (_gradient, ".png"),
    "P": (lambda: _gradient().convert("RGB").convert("P"), ".png"),
    "RGB": (lambda: _gradient().convert("RGB"), ".jpg"),
    "RGBA": (lambda: _gradient().convert("RGBA"), ".png"),
    "LA": (lambda: _gradient().convert("LA"), ".png"),
    "PA": (lambda: _gradient().convert("RGB").convert("P").convert("PA"), None),
    "La": (lambda: Image.frombytes("La", (32, 8), _gradient().convert("LA").tobytes()), None),
    "RGBa": (lambda: _gradient().convert("RGBA").convert("RGBa"), None),
    "CMYK": (lambda: _gradient().convert("CMYK"), ".tif"),
    "YCbCr": (lambda: _gradient().convert("YCbCr"), None),
    "HSV": (lambda: _gradient().convert("RGB").convert("HSV"), None),
    "LAB": (_lab, ".tif"),
    "I;16 (16-bit PNG)": (lambda: _wide("I;16", 257.0, "uint16"), ".png"),
    "I;16B": (lambda: _wide("I;16", 257.0, "uint16").convert("I").convert("I;16B"), None),
    "I (16-bit values)": (lambda: _wide("I", 257.0, "int32"), ".tif"),
    "I (32-bit values)": (lambda: _wide("I", 8_000_000.0, "int32"), ".tif"),
    "F (0..1 float TIFF)": (lambda: _wide("F", 1 / 255, "float32"), ".tif"),
    "F (HDR float)": (lambda: _wide("F", 40.0, "float32"), ".tif"),
}


@pytest.mark.parametrize("case", sorted(MODE_CASES))
def test_every_mode_decodes_with_its_content(case: str, tmp_path: Path) -> None:
    import numpy as np

    from imgrag.images import decode_rgb, to_rgb

    builder, suffix = MODE_CASES[case]
    image = builder()
    if suffix:
        path = tmp_path / f"x{suffix}"
        image.save(path)
        rgb = decode_rgb(path, path)
    else:
        rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (32, 8)
    grey = np.asarray(rgb.convert("L"), dtype=np.float64)
    left, right = grey[:, :4].mean(), grey[:, -4:].mean()
    # Content kept: dark stays dark, bright stays bright (a clipped decode is all 255 or all 0).
    assert left < 60, (case, left)
    assert right > 190, (case, right)
    assert 80 < grey.mean() < 175, (case, grey.mean())


def test_transparent_areas_become_neutral_grey_not_what_lies_under_alpha(tmp_path: Path) -> None:
    import numpy as np

    from imgrag.images import NEUTRAL_BACKGROUND, open_image

    rgba = np.zeros((8, 8, 4), dtype=np.uint8)  # black, fully transparent ...
    rgba[:, 4:] = (255, 0, 0, 255)  # ... beside opaque red
    path = tmp_path / "cutout.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    rgb = np.asarray(open_image(path))
    assert tuple(rgb[0, 0]) == NEUTRAL_BACKGROUND
    assert tuple(rgb[0, 7]) == (255, 0, 0)
    # Palette transparency (a GIF's or PNG's transparent index) too.
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((3, 3), 1)
    pal.info["transparency"] = 0
    gif = tmp_path / "t.gif"
    pal.save(gif, transparency=0)
    rgb = np.asarray(open_image(gif))
    assert tuple(rgb[0, 0]) == NEUTRAL_BACKGROUND and tuple(rgb[3, 3]) == (0, 255, 0)

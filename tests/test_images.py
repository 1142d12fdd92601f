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

"""Live previews in a terminal that can show pictures: kitty's graphics protocol, iTerm2's inline images, or sixel.

Which one a terminal speaks is read from its environment, as terminals announce themselves: kitty sets
``TERM=xterm-kitty`` and ``KITTY_WINDOW_ID`` (Ghostty speaks kitty's protocol too, ``TERM_PROGRAM=ghostty``);
iTerm2 sets ``TERM_PROGRAM=iTerm.app`` or ``LC_TERMINAL=iTerm2`` (WezTerm speaks its protocol,
``TERM_PROGRAM=WezTerm``); foot, mlterm, contour and Windows Terminal (``WT_SESSION``) draw sixel, as does any
``TERM`` naming it. Anything else, a terminal multiplexer (tmux and screen swallow the sequences unless told to
pass them through), or output that is not a terminal: no preview, silently. Nothing is asked of the terminal
(a query would race the user's typing).

The preview keeps one place on the screen while a picture is drawn: the first preview makes room
(:data:`PREVIEW_ROWS` lines), each later one is drawn over it (cursor saved and restored around the picture), so a
30-step drawing shows one changing picture rather than a column of them. Anything else printed in between moves
the place on (:meth:`TerminalPreview.detach`).
"""

from __future__ import annotations

import base64
import io
import os
import sys
from collections.abc import Mapping
from typing import IO, Any

from PIL import Image

PROTOCOLS = ("kitty", "iterm2", "sixel")
PREVIEW_ROWS = 8  # terminal lines a preview takes
PREVIEW_COLS = 16  # and columns (cells are about twice as tall as wide: a square picture)
SIXEL_PX = 80  # a sixel preview's height in pixels: within PREVIEW_ROWS lines of cells 10 px tall or more
SIXEL_COLOURS = 64
_KITTY_CHUNK = 4096  # the kitty protocol's limit on base64 bytes per escape sequence
_ESC = "\x1b"
_ST = "\x1b\\"


def detect_protocol(environ: Mapping[str, str] | None = None, stream: IO[str] | None = None) -> str | None:
    """The picture protocol of the terminal behind ``stream`` (default stderr): "kitty", "iterm2", "sixel", or None
    when ``stream`` is not a terminal, runs inside tmux or screen, or announces none of them (see the module)."""
    env = os.environ if environ is None else environ
    stream = stream if stream is not None else __import__("sys").stderr
    try:
        if not stream.isatty():
            return None
    except (AttributeError, ValueError):  # a closed or stand-in stream
        return None
    term = env.get("TERM", "").lower()
    program = env.get("TERM_PROGRAM", "").lower()
    if env.get("TMUX") or term.startswith(("screen", "tmux")):
        return None
    if term == "xterm-kitty" or env.get("KITTY_WINDOW_ID") or program == "ghostty":
        return "kitty"
    if program in ("iterm.app", "wezterm") or env.get("LC_TERMINAL", "").lower() == "iterm2":
        return "iterm2"
    if "sixel" in term or term.startswith(("foot", "mlterm", "contour")) or env.get("WT_SESSION"):
        return "sixel"
    return None


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def kitty_sequence(image: Image.Image, cols: int = PREVIEW_COLS, rows: int = PREVIEW_ROWS, image_id: int = 1) -> str:
    """kitty's graphics protocol: the picture as PNG (``f=100``), transmitted and shown (``a=T``) in ``cols x rows``
    cells without moving the cursor (``C=1``), quietly (``q=2``); image ``image_id``, placement 1, so showing the
    same id again replaces the picture in place. Chunked at 4096 base64 bytes as the protocol requires."""
    data = base64.b64encode(_png(image)).decode("ascii")
    chunks = [data[i:i + _KITTY_CHUNK] for i in range(0, len(data), _KITTY_CHUNK)] or [""]
    out = []
    for n, chunk in enumerate(chunks):
        more = 1 if n < len(chunks) - 1 else 0
        head = f"a=T,f=100,t=d,i={image_id},p=1,c={cols},r={rows},C=1,q=2,m={more}" if n == 0 else f"m={more}"
        out.append(f"{_ESC}_G{head};{chunk}{_ST}")
    return "".join(out)


def iterm2_sequence(image: Image.Image, cols: int = PREVIEW_COLS, rows: int = PREVIEW_ROWS) -> str:
    """iTerm2's inline image (OSC 1337 ``File=``): the PNG shown in ``cols x rows`` cells, aspect kept."""
    data = _png(image)
    return (f"{_ESC}]1337;File=inline=1;size={len(data)};width={cols};height={rows};preserveAspectRatio=1:"
            f"{base64.b64encode(data).decode('ascii')}\a")


def sixel_sequence(image: Image.Image, height: int = SIXEL_PX, colours: int = SIXEL_COLOURS) -> str:
    """The picture as DEC sixel graphics: scaled to ``height`` pixels, quantised to ``colours`` colours (Pillow's
    median cut), six pixel rows per band, each colour's run-length-encoded row of sixels (DEC VT330/340 manual)."""
    import numpy as np

    rgb = image.convert("RGB")
    width = max(1, round(rgb.width * height / max(1, rgb.height)))
    paletted = rgb.resize((width, height), Image.Resampling.BILINEAR).quantize(colors=colours)
    palette = (paletted.getpalette() or [])[:3 * colours]
    pixels = np.asarray(paletted, dtype=np.int32)
    used = sorted(int(c) for c in np.unique(pixels))
    out = [f"{_ESC}Pq", f'"1;1;{width};{height}']
    for c in used:  # colour registers in percent of full intensity
        r, g, b = (round(v * 100 / 255) for v in palette[3 * c:3 * c + 3])
        out.append(f"#{c};2;{r};{g};{b}")
    for top in range(0, height, 6):
        band = pixels[top:top + 6]
        weights = (1 << np.arange(band.shape[0]))[:, None]  # bit k: the band's k-th pixel row
        rows = []
        for c in used:
            bits = ((band == c) * weights).sum(axis=0)
            if not bits.any():
                continue
            rows.append(f"#{c}" + _run_length("".join(chr(63 + int(v)) for v in bits)))
        out.append("$".join(rows) + "-")
    out.append(_ST)
    return "".join(out)


def _run_length(text: str) -> str:
    """Sixel's repeat introducer: a run of four or more equal sixels as ``!<count><sixel>``."""
    out, i = [], 0
    while i < len(text):
        j = i
        while j < len(text) and text[j] == text[i]:
            j += 1
        run = j - i
        out.append(f"!{run}{text[i]}" if run > 3 else text[i] * run)
        i = j
    return "".join(out)


def encode(image: Image.Image, protocol: str, image_id: int = 1) -> str:
    """The escape sequence that shows ``image`` as a preview in ``protocol``."""
    if protocol == "kitty":
        return kitty_sequence(image, image_id=image_id)
    if protocol == "iterm2":
        return iterm2_sequence(image)
    if protocol == "sixel":
        return sixel_sequence(image)
    raise ValueError(f"unknown terminal picture protocol {protocol!r} (known: {', '.join(PROTOCOLS)})")


class TerminalPreview:
    """One preview place on a terminal (see the module docstring); does nothing without a picture protocol."""

    def __init__(self, stream: IO[str] | None = None, environ: Mapping[str, str] | None = None,
                 protocol: str | None = None, enabled: bool = True) -> None:
        """``protocol`` None: detected (:func:`detect_protocol`); ``enabled=False``: never shows anything."""
        self.stream = stream if stream is not None else sys.stderr
        self.protocol = (protocol or detect_protocol(environ, self.stream)) if enabled else None
        self.placed = False  # whether the lines just above the cursor are this preview's place
        self.shown = 0
        self._image_id = 1

    @property
    def available(self) -> bool:
        """Whether this terminal shows pictures (else :meth:`show` does nothing)."""
        return self.protocol is not None

    def show(self, image: Image.Image) -> None:
        """Draw ``image`` in the preview's place (making room for it first when the place moved on). Output errors
        (a closed terminal) end the previews quietly: they are a nicety, never a reason to stop a drawing."""
        if self.protocol is None:
            return
        try:
            parts = []
            if not self.placed:
                parts.append("\n" * PREVIEW_ROWS)  # room for the picture, scrolled now, not while it is drawn
                self.placed = True
            parts += [f"{_ESC}[{PREVIEW_ROWS}A\r{_ESC}7", encode(image, self.protocol, self._image_id),
                      f"{_ESC}8{_ESC}[{PREVIEW_ROWS}B\r"]
            self.stream.write("".join(parts))
            self.stream.flush()
            self.shown += 1
        except (OSError, ValueError):
            self.protocol = None

    def detach(self) -> None:
        """Something else was printed below the preview: the next one gets a new place (a new kitty image, so the
        one above stays as it was)."""
        if self.placed:
            self.placed = False
            self._image_id += 1


def preview_event_image(event: dict[str, Any]) -> Image.Image | None:
    """The picture of a runner ``preview`` event (None for any other event)."""
    image = event.get("image") if event.get("event") == "preview" else None
    return image if isinstance(image, Image.Image) else None

"""Live previews: the step callback makes small pictures from the tiny kit's real latents, the run's events carry
them, and a terminal shows them only where it can draw pictures (kitty, iTerm2, sixel), in one place per drawing."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from agent.frontends.cli.terminal_images import (
    PREVIEW_ROWS,
    TerminalPreview,
    detect_protocol,
    iterm2_sequence,
    kitty_sequence,
    sixel_sequence,
)
from imgrag.models.generator import Generator
from imgrag.models.previews import SDXL_LATENT_RGB_BIAS, due, latents_to_rgb, strip
from imgrag.settings import Settings, load_settings


@pytest.fixture(scope="module")
def settings(tiny_kit: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Settings:
    home = tmp_path_factory.mktemp("preview-home")
    return load_settings("tiny", environ={"IMGRAG_TINY_KIT_DIR": str(tiny_kit["generator"].parent),
                                          "IMGRAG_HOME": str(home)})


def test_latents_become_one_small_picture_per_drawing() -> None:
    zeros = torch.zeros(2, 4, 16, 24)
    first, second = latents_to_rgb(zeros)
    assert first.size == (96, 64) and first.mode == "RGB"  # 24x16 latents, enlarged to 64 on the short side
    expected = tuple(round((b + 1) * 127.5 - 0.5) for b in SDXL_LATENT_RGB_BIAS)  # the bias alone
    assert all(abs(a - b) <= 1 for a, b in zip(first.getpixel((0, 0)), expected, strict=True))
    big = latents_to_rgb(torch.randn(1, 4, 128, 128))[0]
    assert big.size == (128, 128)  # a 1024² drawing's latents: no enlargement
    assert strip([first, second]).size == (96 * 2 + 2, 64)
    with pytest.raises(ValueError, match="expected SDXL latents"):
        latents_to_rgb(torch.zeros(1, 16, 8, 8))
    assert [s for s in range(1, 31) if due(s, 30, 5)] == [5, 10, 15, 20, 25]  # never after the last step
    assert not any(due(s, 30, 0) for s in range(1, 31))


def test_the_callback_produces_previews_on_the_tiny_pipeline(settings: Settings) -> None:
    generator = Generator.from_pretrained(settings)
    seen: list[tuple[int, int, list[Image.Image]]] = []
    plain = generator.generate("a red fox", seed=3, steps=4)
    with_previews = generator.generate_batch("a red fox", seeds=[3, 4], steps=4, preview_every=1,
                                             on_preview=lambda step, total, pictures: seen.append(
                                                 (step, total, pictures)))
    assert [(step, total) for step, total, _ in seen] == [(1, 4), (2, 4), (3, 4)]
    assert all(len(pictures) == 2 and all(p.size == (64, 64) for p in pictures) for _, _, pictures in seen)
    assert seen[0][2][0].tobytes() != seen[-1][2][0].tobytes()  # the latents change as it draws
    assert len(with_previews) == 2
    watched = generator.generate("a red fox", seed=3, steps=4, preview_every=1, on_preview=lambda *a: None)
    assert watched.tobytes() == plain.tobytes()  # looking does not change the drawing


def test_a_run_sends_preview_events_only_when_asked(settings: Settings, tmp_path: Path) -> None:
    import dataclasses

    from agent.runner import Runner

    own = dataclasses.replace(settings, output_dir=str(tmp_path / "runs"), threads_db=str(tmp_path / "t.sqlite"),
                              store=str(tmp_path / "store"))
    events: list[dict[str, Any]] = []
    runner = Runner(own, on_event=events.append, previews=True)
    runner.run("a red fox", planner="fixed", max_rounds=1)
    previews = [e for e in events if e["event"] == "preview"]
    assert previews and all(isinstance(e["image"], Image.Image) and e["candidates"] == ["c0"] for e in previews)
    quiet: list[dict[str, Any]] = []
    Runner(own, manager=runner.manager, on_event=quiet.append).run("a red fox", planner="fixed", max_rounds=1)
    assert not [e for e in quiet if e["event"] == "preview"]


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("environ", "expected"), [
    ({"TERM": "xterm-kitty"}, "kitty"), ({"TERM": "xterm-256color", "KITTY_WINDOW_ID": "1"}, "kitty"),
    ({"TERM_PROGRAM": "ghostty"}, "kitty"), ({"TERM_PROGRAM": "iTerm.app"}, "iterm2"),
    ({"LC_TERMINAL": "iTerm2"}, "iterm2"), ({"TERM_PROGRAM": "WezTerm"}, "iterm2"), ({"TERM": "foot"}, "sixel"),
    ({"TERM": "xterm-sixel"}, "sixel"), ({"TERM": "xterm-256color", "WT_SESSION": "x"}, "sixel"),
    ({"TERM": "xterm-256color"}, None), ({"TERM": "xterm-kitty", "TMUX": "/tmp/t"}, None),
    ({"TERM": "screen-256color", "TERM_PROGRAM": "iTerm.app"}, None)])
def test_the_protocol_is_read_from_the_terminals_environment(environ: dict[str, str], expected: str | None) -> None:
    assert detect_protocol(environ, FakeTTY()) == expected
    assert detect_protocol(environ, io.StringIO()) is None  # not a terminal: never


def test_the_escape_sequences_carry_the_picture() -> None:
    picture = Image.new("RGB", (64, 64), (200, 40, 10))
    kitty = kitty_sequence(picture, image_id=3)
    chunks = re.findall(r"\x1b_G([^;]*);([^\x1b]*)\x1b\\", kitty)
    assert chunks[0][0].startswith("a=T,f=100,t=d,i=3,p=1,") and "C=1" in chunks[0][0] and "q=2" in chunks[0][0]
    assert chunks[-1][0].endswith("m=0")
    decoded = Image.open(io.BytesIO(base64.b64decode("".join(data for _, data in chunks))))
    assert decoded.size == (64, 64) and decoded.convert("RGB").getpixel((5, 5)) == (200, 40, 10)
    iterm = iterm2_sequence(picture)
    assert iterm.startswith("\x1b]1337;File=inline=1;") and iterm.endswith("\a")
    assert Image.open(io.BytesIO(base64.b64decode(iterm.split(":", 1)[1][:-1]))).size == (64, 64)
    sixel = sixel_sequence(picture, height=12)
    assert sixel.startswith('\x1bPq"1;1;12;12') and sixel.endswith("\x1b\\")
    assert re.search(r"#\d+;2;78;16;4", sixel)  # the colour register, in percent
    assert sixel.count("-") == 2 and "!12~" in sixel  # two bands of six rows, each a run of 12 full sixels


def test_the_terminal_keeps_one_place_per_drawing_and_quiet_terminals_get_nothing() -> None:
    from agent.frontends.cli.chat_screen import ChatStatus

    tty = FakeTTY()
    status = ChatStatus(preview=TerminalPreview(tty, protocol="kitty"))
    frame = {"event": "preview", "step": 1, "total": 2, "image": Image.new("RGB", (64, 64))}
    status(frame)
    status(frame)
    text = tty.getvalue()
    assert text.count("\n") == PREVIEW_ROWS  # room made once, the second preview drawn over the first
    assert text.count("\x1b_Ga=T") == 2 and text.count(f"\x1b[{PREVIEW_ROWS}A") == 2
    status({"event": "tool_end", "tool": "generate", "ok": True, "seconds": 0.1, "message": "done"})
    status(frame)  # printed below: a new place, a new kitty image
    assert tty.getvalue().count("\n") == 2 * PREVIEW_ROWS
    assert "i=2" in tty.getvalue()[len(text):]
    plain = io.StringIO()
    silent = ChatStatus(preview=TerminalPreview(plain, environ={"TERM": "xterm-256color"}))
    silent(frame)
    assert plain.getvalue() == "" and not silent.preview.available


def test_json_runs_never_ask_for_previews(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.frontends.cli import run as cli_run

    monkeypatch.setattr("agent.frontends.cli.terminal_images.detect_protocol",
                        lambda environ=None, stream=None: "kitty")
    assert cli_run.ProgressPrinter(previews=True).preview.available
    assert not cli_run.ProgressPrinter(previews=False).preview.available

"""``imgrag generate`` and ``imgrag critique`` in-process on the tiny profile: outputs, JSON, bad input."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from agent.frontends.cli.app import main
from agent.frontends.cli.common import TINY_WARNING


@pytest.fixture(autouse=True)
def _tiny(tiny_kit: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command here runs on the tiny profile and reuses the session's kit."""
    monkeypatch.setenv("IMGRAG_TINY_KIT_DIR", str(tiny_kit["generator"].parent))
    monkeypatch.setenv("IMGRAG_PROFILE", "tiny")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    captured = capsys.readouterr()
    return info.value.code or 0, captured.out, captured.err


def error_line(err: str) -> str:
    """The one line the command printed for a user mistake (no traceback anywhere)."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def bomb_png(path: Path, width: int = 10000, height: int = 10000) -> Path:
    """A tiny PNG whose header claims 100 megapixels (over the 64 MP limit, under Pillow's own error)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))
                     + chunk(b"IEND", b""))
    return path


def test_generate_writes_a_png(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "sub" / "cat.png"
    code, out, err = run(capsys, "generate", "a cat on a red chair", "-o", str(target), "--seed", "3")
    assert code == 0, err
    with Image.open(target) as image:
        assert image.format == "PNG" and image.size == (64, 64)
    assert f"wrote {target}" in out
    # The noise warning, once: on stderr, before the work (stdout keeps the result).
    assert err.replace("\n", " ").count(TINY_WARNING) == 1 and TINY_WARNING not in out.replace("\n", " ")
    assert not list(target.parent.glob(".cat.*"))  # no temporary file left behind


def test_generate_json_with_two_references(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    refs = []
    for i, colour in enumerate(((200, 0, 0), (0, 0, 200))):
        refs.append(tmp_path / f"ref{i}.jpg")
        Image.new("RGB", (40, 30), colour).save(refs[-1])
    target = tmp_path / "guided.png"
    code, out, err = run(capsys, "generate", "a cat", "--ref", str(refs[0]), "--ref", str(refs[1]),
                         "--ip-scale", "0.8", "--steps", "1", "--size", "72x48", "-o", str(target), "--json")
    assert code == 0, err
    doc = json.loads(out)  # exactly one JSON document on stdout
    assert doc["references"] == [str(r) for r in refs] and doc["ip_scale"] == 0.8
    assert (doc["width"], doc["height"], doc["steps"]) == (72, 48, 1)
    assert doc["model_loads"]["generator"] == 1 and doc["warning"] == TINY_WARNING
    assert Image.open(target).size == (72, 48)


def test_critique_json_is_one_parseable_document(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    picture = tmp_path / "pic.png"
    Image.new("RGB", (90, 60), (20, 180, 20)).save(picture)
    code, out, err = run(capsys, "critique", str(picture), "a green field", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert {"match", "missing", "reason", "parsed"} <= set(doc)
    assert isinstance(doc["match"], bool) and isinstance(doc["missing"], list) and isinstance(doc["parsed"], bool)
    assert doc["warning"] == TINY_WARNING


def test_critique_readable(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    picture = tmp_path / "pic.png"
    Image.new("RGB", (32, 32)).save(picture)
    code, out, err = run(capsys, "critique", str(picture), "a [bold]cat[/bold]")
    assert code == 0, err
    assert out.startswith("verdict: ")
    assert err.replace("\n", " ").count(TINY_WARNING) == 1 and TINY_WARNING not in out.replace("\n", " ")


@pytest.mark.parametrize(("args", "expected"), [
    (["generate", "", "-o", "{tmp}/x.png"], "prompt is empty"),
    (["generate", "a cat", "--size", "64by64", "-o", "{tmp}/x.png"], "--size must look like"),
    (["generate", "a cat", "--size", "65x64", "-o", "{tmp}/x.png"], "multiple of 8"),
    (["generate", "a cat", "--ref", "{tmp}/missing.png", "-o", "{tmp}/x.png"], "missing.png: no such file"),
    (["generate", "a cat", "--ref", "{tmp}/notes.txt", "-o", "{tmp}/x.png"], "notes.txt: not an image"),
    (["generate", "a cat", "--ref", "{tmp}/bomb.png", "-o", "{tmp}/x.png"], "megapixel limit"),
    (["generate", "a cat", "-o", "{tmp}/x.txt"], "the output must end in"),
    (["generate", "a cat", "--ip-scale", "5", "--ref", "{tmp}/ok.png", "-o", "{tmp}/x.png"], "ip_scale"),
    (["critique", "{tmp}/notes.txt", "a cat"], "notes.txt: not an image"),
    (["critique", "{tmp}/ok.png", "  "], "prompt is empty"),
])
def test_bad_input_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str],
                                          expected: str) -> None:
    (tmp_path / "notes.txt").write_text("not a picture")
    bomb_png(tmp_path / "bomb.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    code, out, err = run(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert code == 1
    assert expected in error_line(err)
    assert out == ""
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(("variable", "role", "expected"), [
    ("IMGRAG_MODELS_GENERATOR", None, "generator checkpoint not found"),
    ("IMGRAG_MODELS_GENERATOR", "judge", "expected an SDXL diffusers pipeline"),
    ("IMGRAG_MODELS_JUDGE", "llm", "holds a 'qwen2' model, not the judge"),
    ("IMGRAG_MODELS_JUDGE", "generator", "cannot load the judge"),
])
def test_bad_checkpoint_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                               tiny_kit: dict[str, Path], tmp_path: Path, variable: str,
                                               role: str | None, expected: str) -> None:
    path = str(tiny_kit[role]) if role else str(tmp_path / "no-such-checkpoint")
    monkeypatch.setenv(variable, path)
    picture = tmp_path / "pic.png"
    Image.new("RGB", (32, 32)).save(picture)
    args = ["generate", "a cat", "-o", str(tmp_path / "x.png")] if "GENERATOR" in variable else \
        ["critique", str(picture), "a cat"]
    code, out, err = run(capsys, *args)
    assert code == 1
    line = error_line(err)
    assert expected in line and path in line


def test_a_hub_id_not_in_the_cache_fails_at_once_with_the_download_command(capsys, tmp_path: Path,
                                                                            monkeypatch) -> None:
    # Even with the network allowed, imgrag never fetches a checkpoint behind the user's back.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setenv("IMGRAG_MODELS_GENERATOR", "nobody/no-such-sdxl")
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "a cat", "-o", str(tmp_path / "x.png"), "--profile", "default"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert "nobody/no-such-sdxl is not in the local Hugging Face cache" in err and "Traceback" not in err
    assert "imgrag models download" in err

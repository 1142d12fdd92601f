"""Broken and odd inputs are one file's problem: every decoder error, names that are not UTF-8, shapes the judge
cannot take. Real files on disk (PNGs with oversized text chunks, truncated headers, names of raw bytes) through
the real store, the real command line and the real qwen-vl-utils / Qwen2.5-VL processor."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from imgrag.file_names import display_name, from_stored, is_text_name, stored_name
from imgrag.images import UnreadableImage, open_image, probe_image
from tests.cli import run_cli
from tests.test_store import ColourEmbedder, open_store, solid

# A name of raw bytes: "café" in Latin-1, which is not UTF-8.
LATIN1_NAME = os.fsdecode(b"caf\xe9.png")


def png_with_huge_text(path: Path, *, itxt: bool = False) -> Path:
    """A valid 8x8 PNG with a compressed text chunk that inflates past PngImagePlugin.MAX_TEXT_CHUNK: Pillow
    raises ValueError (not OSError) while opening it."""
    info = PngImagePlugin.PngInfo()
    text = "a" * (PngImagePlugin.MAX_TEXT_CHUNK + 10)
    if itxt:
        info.add_itxt("comment", text, zip=True)
    else:
        info.add_text("comment", text, zip=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (9, 9, 9)).save(path, pnginfo=info)
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_with_short_header(path: Path) -> Path:
    """A PNG whose IHDR is 5 bytes long (Pillow reads it with struct and fails)."""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", b"\0\0\0\x08\0") + _chunk(b"IEND", b""))
    return path


# ----------------------------------------------------------------------------------------------
# one place decides what an unreadable picture is
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("maker", [
    lambda p: png_with_huge_text(p),
    lambda p: png_with_huge_text(p, itxt=True),
    png_with_short_header,
    lambda p: (p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 7), p)[1],  # signature then a cut chunk header
    lambda p: (p.write_bytes(b"GIF89a" + b"\x01"), p)[1],  # a GIF cut inside its screen descriptor
], ids=["ztxt", "itxt", "short-ihdr", "cut-chunk", "cut-gif"])
def test_every_decoder_error_is_an_unreadable_image(tmp_path: Path, maker) -> None:
    path = maker(tmp_path / "bad.png")
    with pytest.raises(UnreadableImage) as info:
        open_image(path)
    assert info.value.path == str(path) and str(info.value).startswith(f"{path}: ")
    assert "\n" not in str(info.value) and info.value.reason


def test_oversized_text_chunk_says_why(tmp_path: Path) -> None:
    with pytest.raises(UnreadableImage, match="MAX_TEXT_CHUNK"):
        probe_image(png_with_huge_text(tmp_path / "meta.png"))


def test_report_thumbnail_of_an_unreadable_file_is_none(tmp_path: Path) -> None:
    from imgrag.records.report_html import image_data_uri

    assert image_data_uri(png_with_huge_text(tmp_path / "meta.png")) is None
    assert image_data_uri(solid(tmp_path / "ok.png", (1, 2, 3))).startswith("data:image/png")


def test_reading_provenance_of_an_unreadable_file_is_one_line(tmp_path: Path) -> None:
    from imgrag.records.provenance import read_provenance

    with pytest.raises(UnreadableImage, match="MAX_TEXT_CHUNK"):
        read_provenance(png_with_huge_text(tmp_path / "meta.png"))


# ----------------------------------------------------------------------------------------------
# names that are not UTF-8
# ----------------------------------------------------------------------------------------------

def test_stored_name_round_trips() -> None:
    assert not is_text_name(LATIN1_NAME) and is_text_name("café.png")
    shown, raw = stored_name("/p/" + LATIN1_NAME)
    assert shown == "/p/caf\\xe9.png" and shown.encode("utf-8")
    assert from_stored(shown, raw) == "/p/" + LATIN1_NAME
    assert stored_name("/p/café.png") == ("/p/café.png", "")
    assert from_stored("/p/café.png", "") == "/p/café.png"
    assert from_stored("/p/x.png", "zz") == "/p/x.png"  # a malformed hex falls back to the name
    assert display_name("/p/" + LATIN1_NAME) == "/p/caf\\xe9.png"


def test_index_stores_everything_but_the_broken_file(tmp_path: Path) -> None:
    emb = ColourEmbedder()
    folder = tmp_path / "mixed"
    solid(folder / "red.png", (255, 0, 0))
    solid(folder / "green.png", (0, 255, 0))
    odd = solid(folder / LATIN1_NAME, (0, 0, 255))
    png_with_huge_text(folder / "meta.png")
    store = open_store(tmp_path, emb)
    summary = store.index([folder], emb)
    assert (summary["added"], summary["total"]) == (3, 3)
    assert [(Path(s["path"]).name, "MAX_TEXT_CHUNK" in s["reason"]) for s in summary["skipped"]] == [
        ("meta.png", True)]
    assert [n["path"] for n in summary["notes"]] == [str(odd)] and "UTF-8" in summary["notes"][0]["note"]
    # Found again, under the name that opens the file; a second index sees nothing new.
    best = store.search_text(emb, "blue", k=1)[0]
    assert best.path == str(odd) and os.path.isfile(best.path)
    again = store.index([folder], emb)
    assert (again["added"], again["unchanged"], again["notes"]) == (0, 3, [])
    assert [r.path for r in store.retrieve(emb, ["blue"], k=1)] == [str(odd)]


def test_index_and_search_on_the_command_line(capsys: pytest.CaptureFixture, tiny_settings, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    for i, colour in enumerate(((200, 10, 10), (10, 200, 10))):
        solid(folder / f"p{i}.png", colour, size=40)
    odd = solid(folder / LATIN1_NAME, (10, 10, 200), size=40)
    png_with_huge_text(folder / "meta.png")
    store = str(tmp_path / "store")
    code, out, err = run_cli(capsys, "index", str(folder), "--profile", "tiny", "--store", store)
    assert code == 0, err
    assert "Traceback" not in err
    assert f"skipped {folder / 'meta.png'}: a text chunk" in err.replace("\n", " ")
    assert f"note: {folder}/caf\\xe9.png: its name is not valid UTF-8" in err.replace("\n", " ")
    code, out, err = run_cli(capsys, "index", str(folder), "--profile", "tiny", "--store", store, "--json")
    assert code == 0 and json.loads(out)["unchanged"] == 3
    code, out, err = run_cli(capsys, "search", "--image", str(odd), "-k", "1", "--profile", "tiny", "--store", store,
                             "--json")
    assert code == 0, err
    first = json.loads(out)["results"][0]
    assert first["path"] == str(odd)  # JSON's \u escapes carry the bytes through, for a Python reader
    assert bytes.fromhex(first["path_bytes"]) == os.fsencode(odd)  # and the hex, for jq or JavaScript
    code, out, err = run_cli(capsys, "search", "--image", str(folder / "p0.png"), "-k", "1", "--profile", "tiny",
                             "--store", store, "--json")
    assert "path_bytes" not in json.loads(out)["results"][0]  # a name that is text has no second form
    code, out, err = run_cli(capsys, "search", "--image", str(odd), "-k", "3", "--profile", "tiny", "--store", store)
    assert code == 0 and "caf\\xe9.png" in out.replace("\n", "")


def test_provenance_keeps_a_reference_whose_name_is_not_utf8(tmp_path: Path) -> None:
    from imgrag.records.provenance import read_provenance, save_image

    odd = str(tmp_path / LATIN1_NAME)
    doc = {"schema": "imgrag.records.provenance/1", "prompt": "a cat", "references": [{"path": odd}], "steps": 2,
           "guidance": 1.0, "seed": 1, "width": 8, "height": 8, "models": {"generator": "tiny"}}
    target = save_image(Image.new("RGB", (8, 8)), tmp_path / "out.png", doc)
    assert read_provenance(target)["references"][0]["path"] == odd


# ----------------------------------------------------------------------------------------------
# the judge's view: shapes qwen-vl-utils refuses
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(400, 2), (2, 900), (20, 20), (1, 1), (5000, 30), (64, 64)])
@pytest.mark.parametrize("max_pixels", [16 * 28 * 28, 1024 * 28 * 28])
def test_judge_view_is_a_shape_qwen_vl_utils_and_the_processor_accept(size, max_pixels) -> None:
    from qwen_vl_utils import process_vision_info
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

    from imgrag.models.judge import judge_view

    view = judge_view(Image.new("L", size, 255), max_pixels)
    assert view.mode == "RGB" and min(view.size) >= 28
    if size == (64, 64):
        assert view.size == (64, 64)  # a usual picture is untouched
    messages = [{"role": "user", "content": [{"type": "image", "image": view, "min_pixels": 4 * 28 * 28,
                                              "max_pixels": max_pixels}]}]
    images, _ = process_vision_info(messages)
    width, height = images[0].size
    assert width >= 28 and height >= 28
    hf_smart_resize(height, width, factor=28, min_pixels=4 * 28 * 28, max_pixels=max_pixels)
    # The content is padded, never cut: the original's white pixels are all there.
    assert int((np.asarray(view.convert("L")) > 200).sum()) >= size[0] * size[1]


def test_judge_view_refuses_a_bound_under_one_patch() -> None:
    from imgrag.errors import UserError
    from imgrag.models.judge import judge_view

    with pytest.raises(UserError, match="at least 784"):
        judge_view(Image.new("RGB", (10, 10)), 700)


@pytest.mark.parametrize("size", [(400, 2), (2, 900), (500, 2), (20, 20)])
def test_critique_takes_extreme_shapes(capsys: pytest.CaptureFixture, tiny_settings, tmp_path: Path, size) -> None:
    picture = tmp_path / "odd.png"
    Image.new("RGB", size, (200, 30, 30)).save(picture)
    code, out, err = run_cli(capsys, "critique", str(picture), "a red bar", "--profile", "tiny", "--json")
    assert code == 0, err
    assert "Traceback" not in err and isinstance(json.loads(out)["match"], bool)


# ----------------------------------------------------------------------------------------------
# the evaluation: a broken picture of a class costs only itself
# ----------------------------------------------------------------------------------------------

def truncated_png(path: Path) -> Path:
    """A PNG whose header reads fine but whose pixel data is cut short: only decoding finds out."""
    import numpy as np

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_a_class_split_leaves_unreadable_pictures_out_with_their_reason(tmp_path: Path) -> None:
    from imgrag.scoring.class_folders import read_class_folder, split_classes
    from tests.test_eval_protocol import make_classes

    root = make_classes(tmp_path / "classes", {"fox": 4})
    png_with_huge_text(root / "fox" / "meta.png")
    split = split_classes(read_class_folder(root), gold_per_class=1, seed=0)[0]
    assert [(Path(s["path"]).name, "MAX_TEXT_CHUNK" in s["reason"]) for s in split.skipped] == [("meta.png", True)]
    assert not any(p.endswith("meta.png") for p in split.gold + split.retrieval)
    assert len(split.gold) + len(split.retrieval) == 4


def test_a_gold_picture_that_does_not_decode_is_left_out_of_the_scores(tiny_settings, tmp_path: Path) -> None:
    from imgrag.management.engine import build_manager
    from imgrag.scoring.scorers import Scorers

    good = solid(tmp_path / "gold.png", (200, 30, 30), size=32)
    broken = truncated_png(tmp_path / "cut.png")
    probe_image(broken)  # the header alone looks fine
    drawn = solid(tmp_path / "drawn.png", (190, 40, 40), size=32)
    scorers = Scorers(tiny_settings, build_manager(tiny_settings))
    scores = scorers.score("a red square", {"plain": str(drawn)}, [str(good), str(broken)],
                           verdicts={"plain": {"match": False}})
    assert "clip_gold" in scores["plain"] and list(scorers.skipped) == [str(broken)]
    assert scorers.score("a red square", {"plain": str(drawn)}, [str(broken)],
                         verdicts={"plain": {"match": False}})["plain"].get("clip_gold") is None


def test_a_report_naming_a_reference_that_is_not_utf8_is_written(tmp_path: Path) -> None:
    from imgrag.records.report import write_report
    from imgrag.records.runs import RunRecord

    record = RunRecord(tmp_path / "run-1")
    odd = str(tmp_path / LATIN1_NAME)
    record.append_step({"tool": "retrieve", "ok": True, "args": {"path": odd}, "message": f"found {odd}"})
    record.write_result({"prompt": "a cat", "status": "matched", "references": {"r1": {"path": odd}},
                         "candidates": [], "final_image": None})
    page = write_report(record.dir).read_text(encoding="utf-8")
    assert "caf\\xe9.png" in page


def test_a_run_guided_by_a_reference_whose_name_is_not_utf8_checkpoints_and_resumes(
        capsys: pytest.CaptureFixture, tiny_settings, tmp_path: Path) -> None:
    """The only picture of the store has a Latin-1 name: the run retrieves it, draws with it, checkpoints the state
    holding its path (strict msgpack), writes its record, and a resume of the finished run reads it back."""
    folder = tmp_path / "odd"
    odd = solid(folder / LATIN1_NAME, (10, 10, 200), size=40)
    code, _, err = run_cli(capsys, "index", str(folder), "--profile", "tiny", "--json")
    assert code == 0, err
    out_dir = tmp_path / "runs"
    code, out, err = run_cli(capsys, "run", "a blue square", "--profile", "tiny", "--max-rounds", "2",
                             "--out", str(out_dir), "--json")
    assert code == 0, err
    assert "Traceback" not in err
    result = json.loads(out)
    guided = [c for c in result["candidates"] if c["reference_ids"]]
    assert guided, "the second round is drawn with the retrieved picture"
    used = {result["references"][ref_id]["path"] for c in guided for ref_id in c["reference_ids"]}
    assert used == {str(odd)}  # JSON's \u escapes carry the bytes through, the name still opens the file
    hexes = {result["references"][ref_id]["path_bytes"] for c in guided for ref_id in c["reference_ids"]}
    assert hexes == {os.fsencode(odd).hex()}  # and the hex beside it, for readers that cannot keep them
    run_dir = Path(result["final_image"]).parents[1]
    assert json.loads((run_dir / "result.json").read_text(encoding="utf-8")) == result
    run_id = Path(result["final_image"]).parents[1].name
    code, out, err = run_cli(capsys, "run", "--resume", run_id, "--profile", "tiny", "--out", str(out_dir), "--json")
    assert code == 0, err
    assert json.loads(out)["rounds"] == result["rounds"]

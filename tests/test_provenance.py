"""Provenance: every picture imgrag writes carries how it was made, and can be redrawn from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agent.frontends.cli.app import main
from imgrag.records.provenance import (
    PARAMETERS_KEY,
    copy_with_provenance,
    file_sha256,
    read_provenance,
    save_image,
)
from imgrag.records.runs import RunRecord
from tests.cli import run_cli


@pytest.fixture
def tiny_env(tiny_kit: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGRAG_TINY_KIT_DIR", str(tiny_kit["generator"].parent))
    monkeypatch.setenv("IMGRAG_PROFILE", "tiny")


def _doc(**extra) -> dict:
    return {"schema": "imgrag.records.provenance/1", "prompt": "ein Wiegenlied — 子守唄", "seed": 7, "steps": 2,
            "guidance": 5.0, "width": 8, "height": 8, "ip_scale": None, "fast": "off",
            "models": {"generator": "g"}, "imgrag_version": "x", "run_id": "r1", "references": [], **extra}


def _noise(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8))


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_metadata_survives_the_atomic_write_in_every_format(tmp_path: Path, suffix: str) -> None:
    path = save_image(_noise(), tmp_path / f"a{suffix}", _doc())
    assert read_provenance(path) == _doc()
    assert not list(tmp_path.glob(".a*"))  # the temporary file was renamed, not left behind
    if suffix == ".png":
        with Image.open(path) as im:  # the A1111-style line other tools show
            assert im.info[PARAMETERS_KEY].startswith("ein Wiegenlied") and "Seed: 7" in im.info[PARAMETERS_KEY]


def test_a_picture_without_provenance_reads_as_none(tmp_path: Path) -> None:
    _noise().save(tmp_path / "plain.png")
    assert read_provenance(tmp_path / "plain.png") is None


def test_save_candidate_embeds_and_a_copy_keeps_it(tmp_path: Path) -> None:
    record = RunRecord(tmp_path / "run-1")
    path = record.save_candidate("c0", _noise(), _doc(candidate_id="c0"))
    assert read_provenance(path)["candidate_id"] == "c0"
    copy = copy_with_provenance(path, tmp_path / "saved.jpg", saved_from=str(path))
    assert read_provenance(copy)["candidate_id"] == "c0" and read_provenance(copy)["saved_from"] == str(path)


def test_a_run_candidate_names_its_run_models_and_references(tiny_settings, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "refs"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(folder / f"r{i}.png")
    code, _, err = run_cli(capsys, "index", str(folder), "--profile", "tiny", "--json")
    assert code == 0, err
    code, out, err = run_cli(capsys, "run", "a wooden cradle", "--profile", "tiny", "--planner", "fixed",
                             "--max-rounds", "2", "--seed", "5", "--json")
    assert code == 0, err
    result = json.loads(out)
    by_id = {c["id"]: c for c in result["candidates"]}
    for cid, candidate in by_id.items():
        doc = read_provenance(candidate["path"])
        assert doc["run_id"] == result["run_id"] and doc["candidate_id"] == cid
        assert doc["prompt"] == candidate["prompt"] and doc["seed"] == candidate["seed"]
        assert doc["steps"] == 2 and doc["models"]["generator"].endswith("sdxl")
        assert doc["imgrag_version"]
        assert [r["id"] for r in doc["references"]] == candidate["reference_ids"]
        for ref in doc["references"]:
            assert Path(ref["path"]).parent == folder and ref["sha256"] == file_sha256(ref["path"])
            assert ref["sha256"].startswith(ref["id"])  # the store id is the head of the content hash
        if candidate["reference_ids"]:
            assert doc["ip_scale"] == candidate["ip_scale"] and "ip_adapter" in doc["models"]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    captured = capsys.readouterr()
    return info.value.code or 0, captured.out, captured.err


def test_generate_writes_provenance_and_from_image_redraws_the_same_picture(tiny_env, tmp_path: Path,
                                                                            capsys) -> None:
    ref = tmp_path / "ref.png"
    _noise(4).resize((48, 48)).save(ref)
    first = tmp_path / "first.png"
    code, _, err = _run(capsys, "generate", "a red kettle", "-o", str(first), "--seed", "11", "--ref", str(ref),
                        "--ip-scale", "0.7")
    assert code == 0, err
    doc = read_provenance(first)
    assert (doc["prompt"], doc["seed"], doc["steps"], doc["ip_scale"]) == ("a red kettle", 11, 2, 0.7)
    assert doc["references"] == [{"path": str(ref), "id": None, "sha256": file_sha256(ref), "weight": 1.0,
                                  "mode": "both"}]

    again = tmp_path / "again.png"
    code, out, err = _run(capsys, "generate", "--from-image", str(first), "-o", str(again), "--json")
    assert code == 0, err
    assert json.loads(out)["from_image"] == str(first)
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert {k: v for k, v in read_provenance(again).items()} == doc

    # A flag beside --from-image wins over the picture's value.
    other = tmp_path / "other.png"
    code, _, err = _run(capsys, "generate", "--from-image", str(first), "-o", str(other), "--seed", "12")
    assert code == 0, err
    assert read_provenance(other)["seed"] == 12 and read_provenance(other)["prompt"] == "a red kettle"


def test_from_image_refuses_a_picture_without_provenance_or_a_changed_reference(tiny_env, tmp_path: Path,
                                                                               capsys) -> None:
    plain = tmp_path / "plain.png"
    _noise().save(plain)
    code, _, err = _run(capsys, "generate", "--from-image", str(plain), "-o", str(tmp_path / "x.png"))
    assert code != 0 and "carries no imgrag provenance" in err and "Traceback" not in err

    ref = tmp_path / "ref.png"
    _noise(1).resize((48, 48)).save(ref)
    drawn = tmp_path / "drawn.png"
    save_image(_noise(), drawn, _doc(references=[{"path": str(ref), "id": None, "sha256": "0" * 64}]))
    code, _, err = _run(capsys, "generate", "--from-image", str(drawn), "-o", str(tmp_path / "y.png"))
    assert code != 0 and "has changed since" in err and "Traceback" not in err

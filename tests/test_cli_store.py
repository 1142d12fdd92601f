"""``imgrag index`` and ``imgrag search`` through the real entry point, in process, on the tiny profile."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agent.frontends.cli.common import TINY_WARNING
from tests.cli import run_cli

INDEX_KEYS = {"added", "duplicates", "updated", "unchanged", "removed", "skipped", "notes", "total", "seconds"}


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    rng = np.random.default_rng(7)
    for i in range(6):
        (folder / f"set{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"set{i % 2}" / f"p{i}.png")
    (folder / "set0" / "p0.txt").write_text("a rocket on its launch pad", encoding="utf-8")
    return folder


def test_index_then_search_json(capsys: pytest.CaptureFixture, tiny_settings, photos: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    code, out, err = run_cli(capsys, "index", str(photos), "--profile", "tiny", "--store", store, "--json")
    assert code == 0
    summary = json.loads(out)  # stdout holds the one JSON document and nothing else
    assert set(summary) == INDEX_KEYS
    assert (summary["added"], summary["total"], summary["skipped"]) == (6, 6, [])
    assert TINY_WARNING.split(":")[0] in err

    code, out, _ = run_cli(capsys, "index", str(photos), "--profile", "tiny", "--store", store, "--json")
    assert code == 0 and json.loads(out)["unchanged"] == 6  # idempotent, still exit 0

    code, out, _ = run_cli(capsys, "search", "a rocket", "-k", "3", "--profile", "tiny", "--store", store, "--json")
    assert code == 0
    results = json.loads(out)["results"]
    assert len(results) == 3
    assert all(set(r) == {"id", "path", "score", "caption"} and Path(r["path"]).exists() for r in results)
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)

    query = photos / "set1" / "p3.png"
    code, out, _ = run_cli(capsys, "search", "--image", str(query), "-k", "2", "--profile", "tiny", "--store", store,
                           "--json")
    best = json.loads(out)["results"][0]
    assert code == 0 and best["path"] == str(query) and best["score"] == pytest.approx(1.0, abs=1e-4)


def test_index_and_search_tables(capsys: pytest.CaptureFixture, tiny_settings, photos: Path) -> None:
    long_caption = "a heron standing on one leg on a wooden post in the shallow water of a lake at dawn, " * 3
    (photos / "set1" / "p1.txt").write_text(long_caption, encoding="utf-8")
    # The default store of the tiny profile, under the test's IMGRAG_HOME.
    code, out, _ = run_cli(capsys, "index", str(photos), "--profile", "tiny")
    assert code == 0 and "added" in out and "6" in out
    code, out, _ = run_cli(capsys, "search", "rocket", "--profile", "tiny", "-k", "6")
    assert code == 0 and "a rocket on its launch pad" in out and "p0.png" in out
    # A caption longer than its column is cut where the terminal ends, and says so.
    assert "…" in out and "lake at dawn, a heron standing on one leg on a wooden post in the shallow" not in \
        " ".join(cell.strip() for line in out.splitlines() for cell in line.split("│")[-2:-1])


def test_index_prune_and_skips(capsys: pytest.CaptureFixture, tiny_settings, photos: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    (photos / "set1" / "broken.png").write_text("not a picture")
    code, out, _ = run_cli(capsys, "index", str(photos), "--profile", "tiny", "--store", store, "--json")
    summary = json.loads(out)
    assert code == 0 and summary["added"] == 6
    assert [Path(s["path"]).name for s in summary["skipped"]] == ["broken.png"]
    (photos / "set0" / "p0.png").unlink()
    code, out, _ = run_cli(capsys, "index", str(photos), "--prune", "--profile", "tiny", "--store", store, "--json")
    assert code == 0 and json.loads(out)["removed"] == 1 and json.loads(out)["total"] == 5


def test_index_with_nothing_usable_exits_1_with_the_summary(capsys: pytest.CaptureFixture, tiny_settings,
                                                            tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_bytes(b"")
    (junk / "b.jpg").write_text("text")
    code, out, err = run_cli(capsys, "index", str(junk), "--profile", "tiny", "--store", str(tmp_path / "s"), "--json")
    assert code == 1
    summary = json.loads(out)
    assert summary["added"] == 0 and len(summary["skipped"]) == 2
    assert "no usable image" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "index", str(empty), "--profile", "tiny", "--store", str(tmp_path / "s"))
    assert code == 1 and "no usable image" in err


@pytest.mark.parametrize("argv, message", [
    (["index", "/no/such/folder"], "/no/such/folder: no such file or folder"),
    (["index", ".", "--batch-size", "0"], "--batch-size must be between"),
    (["search"], "give a TEXT to search for, or --image PATH"),
    (["search", "cat", "--image", "x.png"], "not both"),
    (["search", "cat", "-k", "0"], "-k must be between 1 and"),
    (["search", "--image", "/no/such/picture.png"], "no such file"),
])
def test_user_mistakes_are_one_line_and_exit_1(capsys: pytest.CaptureFixture, argv: list[str], message: str) -> None:
    code, out, err = run_cli(capsys, *argv, "--profile", "tiny")
    assert code == 1 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1


def test_search_on_an_empty_store_says_how_to_fill_it(capsys: pytest.CaptureFixture, tiny_settings,
                                                      tmp_path: Path) -> None:
    code, out, err = run_cli(capsys, "search", "a rocket", "--profile", "tiny", "--store", str(tmp_path / "none"))
    assert code == 1 and out == "" and "does not exist" in err and "imgrag index PATH --profile tiny" in err
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(capsys, "search", "a rocket", "--profile", "tiny", "--store", str(tmp_path / "empty"))
    assert code == 1 and out == "" and "holds no pictures yet" in err and "imgrag index PATH --profile tiny" in err


def test_search_with_a_non_image_is_a_user_error(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_text("hello")
    code, _, err = run_cli(capsys, "search", "--image", str(bad), "--profile", "tiny")
    assert code == 1 and "not an image" in err

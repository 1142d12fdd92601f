"""``safety.exclude`` takes paths for what they are: literal names (brackets, stars, question marks, spaces, any
script) unless an entry says ``glob:``, compared with symbolic links resolved on both sides. Real folders and
links on disk; the real store and command line for search and for references named by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgrag.models.safety import excluded_by
from imgrag.settings import load_settings
from tests.cli import run_cli

ODD_NAMES = ["scans [old]", "a*b", "why?", "two words", "фото 写真", "[x]"]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_a_folder_name_is_literal(tmp_path: Path, name: str) -> None:
    folder = tmp_path / name
    folder.mkdir()
    (tmp_path / "scans o").mkdir()  # what "scans [old]" matched as a glob
    assert excluded_by(folder / "p.png", [str(folder)]) == str(folder)
    assert excluded_by(folder / "deeper" / "p.png", [str(folder)]) == str(folder)
    # Neighbours a glob reading would have caught (or missed) are left alone.
    for other in ("scans o", "aXb", "whyz", "two words2", "x"):
        assert excluded_by(tmp_path / other / "p.png", [str(folder)]) is None, other


def test_a_file_entry_covers_that_file_only(tmp_path: Path) -> None:
    picture = tmp_path / "id [front].png"
    assert excluded_by(picture, [str(picture)]) == str(picture)
    assert excluded_by(tmp_path / "id f.png", [str(picture)]) is None


def test_glob_entries_say_so(tmp_path: Path) -> None:
    assert excluded_by(tmp_path / "x" / "id-scan.png", ["glob:*/id-*"]) == "glob:*/id-*"
    assert excluded_by(tmp_path / "scans o" / "p.png", [f"glob:{tmp_path}/scans [o]ld/*"]) is None
    assert excluded_by(tmp_path / "scans o" / "p.png", [f"glob:{tmp_path}/scans [o]/*"]) is not None
    assert excluded_by(tmp_path / "x" / "ID-scan.png", ["glob:*/id-*"]) is None  # case-sensitive, as paths are


def test_links_into_and_out_of_an_excluded_folder(tmp_path: Path) -> None:
    private = tmp_path / "private [2020]"
    public = tmp_path / "public"
    private.mkdir()
    public.mkdir()
    secret = private / "secret.png"
    secret.write_bytes(b"x")
    open_file = public / "open.png"
    open_file.write_bytes(b"x")
    # A link from a public folder to an excluded file, and to the excluded folder itself: excluded.
    (public / "alias.png").symlink_to(secret)
    (public / "door").symlink_to(private, target_is_directory=True)
    assert excluded_by(public / "alias.png", [str(private)]) == str(private)
    assert excluded_by(public / "door" / "secret.png", [str(private)]) == str(private)
    # A link kept inside the excluded folder that points out: excluded (it was found there).
    (private / "out.png").symlink_to(open_file)
    assert excluded_by(private / "out.png", [str(private)]) == str(private)
    assert excluded_by(open_file, [str(private)]) is None
    # The entry itself may be a link: what it leads to is excluded.
    (tmp_path / "shortcut").symlink_to(private, target_is_directory=True)
    assert excluded_by(secret, [str(tmp_path / "shortcut")]) == str(tmp_path / "shortcut")
    # A relative path and ~ are made absolute first.
    assert excluded_by(secret, ["~/nothing-here"]) is None


def test_a_bare_glob_that_names_nothing_is_refused(tmp_path: Path) -> None:
    from imgrag.errors import UserError

    with pytest.raises((UserError, ValueError), match="glob:"):
        load_settings("tiny", overrides={"safety": {"exclude": ["*/scans/id-*"]}})
    existing = tmp_path / "a*b"
    existing.mkdir()
    assert load_settings("tiny", overrides={"safety": {"exclude": [str(existing)]}}).safety.exclude == [str(existing)]
    assert load_settings("tiny", overrides={"safety": {"exclude": ["glob:*/id-*"]}}).safety.exclude == ["glob:*/id-*"]


def _noise(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)


def test_search_leaves_out_an_odd_named_folder_and_a_link_into_it(tiny_settings, tmp_path: Path, capsys) -> None:
    private = tmp_path / "scans [old] ф"
    public = tmp_path / "open"
    for i in range(2):
        _noise(private / f"p{i}.png", i)
        _noise(public / f"o{i}.png", 10 + i)
    (public / "door").symlink_to(private, target_is_directory=True)  # the walk follows it: p0, p1 seen twice
    (tmp_path / "scans o").mkdir()
    _noise(tmp_path / "scans o" / "neighbour.png", 20)  # what a glob reading of the entry would have caught
    code, _, err = run_cli(capsys, "index", str(public), str(private), str(tmp_path / "scans o"), "--profile",
                           "tiny", "--json")
    assert code == 0, err
    config = tmp_path / "safe.toml"
    config.write_text("[safety]\nexclude = [" + json.dumps(str(private), ensure_ascii=False) + "]\n",
                      encoding="utf-8")
    code, out, err = run_cli(capsys, "search", "anything", "-k", "10", "--profile", "tiny", "--config", str(config),
                             "--json")
    assert code == 0, err
    paths = [r["path"] for r in json.loads(out)["results"]]
    assert sorted(Path(p).name for p in paths) == ["neighbour.png", "o0.png", "o1.png"]


@pytest.mark.parametrize("inside", [True, False], ids=["link-into", "link-out-of"])
def test_a_reference_through_a_link_and_an_excluded_folder_is_refused(tmp_path: Path, inside: bool) -> None:
    from agent.memory_guide import check_user_references
    from imgrag.errors import UserError

    private = tmp_path / "why? [private]"
    public = tmp_path / "public"
    _noise(private / "secret.png", 1)
    _noise(public / "open.png", 2)
    if inside:  # a public link to an excluded picture
        (public / "alias.png").symlink_to(private / "secret.png")
        named = public / "alias.png"
    else:  # a link kept in the excluded folder, to a public picture
        (private / "alias.png").symlink_to(public / "open.png")
        named = private / "alias.png"
    settings = load_settings("tiny", overrides={"safety": {"exclude": [str(private)]}})
    with pytest.raises(UserError, match=r"is excluded by safety.exclude"):
        check_user_references([{"path": str(named)}], settings, where="line 1")
    assert check_user_references([{"path": str(public / "open.png")}], settings)[0]["path"] == str(
        (public / "open.png").resolve())

"""``imgrag generate --from-image``: a picture's recipe is untrusted input. It is read with a schema, held to the
command line's bounds, its references checked like a batch line's (safety.exclude included), and every error is one
line naming the picture's recipe. Real PNGs with real metadata, through the real command line on the tiny kit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgrag.records.provenance import file_sha256, for_drawing, for_omnigen_drawing, read_provenance, save_image
from imgrag.records.recipes import Recipe
from tests.cli import run_cli


@pytest.fixture
def tiny_env(tiny_kit: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGRAG_TINY_KIT_DIR", str(tiny_kit["generator"].parent))
    monkeypatch.setenv("IMGRAG_PROFILE", "tiny")


def _noise(path: Path, seed: int = 0, size: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def _recipe(**changes) -> dict:
    doc = {"schema": "imgrag.records.provenance/1", "prompt": "a red kettle", "seed": 7, "steps": 2, "guidance": 5.0,
           "width": 64, "height": 64, "ip_scale": None, "fast": "off", "models": {"generator": "g"},
           "profile": "tiny", "imgrag_version": "x", "run_id": None, "candidate_id": None, "references": []}
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not ...}


def _picture(tmp_path: Path, doc: dict, name: str = "drawn.png") -> Path:
    """A PNG carrying ``doc`` as its imgrag chunk, written by hand: a hostile recipe need not be one imgrag could
    write (save_image's parameters line would refuse most of these)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt("imgrag", json.dumps(doc))
    path = tmp_path / name
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_the_schema_takes_what_imgrag_writes(tiny_settings, tmp_path: Path) -> None:
    ref = _noise(tmp_path / "ref.png")
    sdxl = for_drawing(tiny_settings, prompt="a cat", seed=3, references=[{"path": str(ref), "id": "abc",
                                                                           "weight": 0.5, "mode": "style"}],
                       ip_scale=0.6, run_id="r", candidate_id="c1", backbone="sdxl+ip-adapter")
    omnigen = for_omnigen_drawing(tiny_settings, prompt="a cat", sent_prompt="a cat <img><|image_1|></img>", seed=3,
                                  references=[{"path": str(ref), "id": "ref1"}],
                                  concepts=[{"concept": "cat", "reference_ids": ["ref1"], "images": [1]}])
    for doc in (sdxl, omnigen):
        # through the file, as --from-image reads it
        recipe = Recipe.model_validate(read_provenance(save_image(Image.new("RGB", (8, 8)), tmp_path / "a.png", doc)))
        recipe.check_bounds(tiny_settings.generation, "x")
        assert recipe.prompt == "a cat" and recipe.references[0].path == str(ref)
    assert Recipe.model_validate(omnigen).backbone == "omnigen"
    assert Recipe.model_validate(omnigen).concepts[0].reference_ids == ["ref1"]
    assert Recipe.model_validate(sdxl).references[0].id == "abc"


@pytest.mark.parametrize(("changes", "expected"), [
    ({"steps": 500000}, "500000 steps is above generation.max_steps"),
    ({"width": 99999}, "width 99999 is above generation.max_side"),
    ({"width": 60}, "width must be a positive multiple of 8, got 60"),
    ({"steps": 0}, "steps must be at least 1"),
    ({"seed": -1}, "seed out of range"),
    ({"seed": 2**70}, "seed out of range"),
    ({"seed": "7"}, "seed: input should be a valid integer (got '7')"),
    ({"ip_scale": 7.0}, "ip_scale must be within"),
    ({"guidance": -3.0}, "guidance must be a number from 0 to"),
    ({"fast": "turbo"}, "fast must be off, lcm-lora or distilled"),
    ({"prompt": ...}, "it has no prompt"),
    ({"prompt": "   "}, "prompt:"),
    ({"prompt": 5}, "prompt:"),
    ({"references": ["/some/picture.png"]}, "reference 1 must be an object {\"path\""),
    ({"references": {"path": "x"}}, "references: input should be a valid list"),
    ({"references": [{"path": "/x.png", "sha256": "not-a-hash"}]}, "reference 1's sha256: string should match pattern"),
    ({"references": [{"weight": 1.0}]}, "reference 1 has no path"),
], ids=lambda v: str(v)[:40])
def test_a_bad_recipe_is_one_line_naming_the_picture(tiny_env, tmp_path: Path, capsys, changes, expected) -> None:
    drawn = _picture(tmp_path, _recipe(**changes))
    target = tmp_path / "again.png"
    code, out, err = run_cli(capsys, "generate", "--from-image", str(drawn), "-o", str(target))
    line = error_line(err)
    assert code == 1 and f"{drawn}'s recipe: " in line and expected in line, line
    assert not target.exists()


def test_a_reference_weight_or_mode_out_of_bounds(tiny_env, tmp_path: Path, capsys) -> None:
    ref = _noise(tmp_path / "ref.png")
    for entry, expected in (({"weight": 9.0}, "reference 1's weight must be within"),
                            ({"mode": "sideways"}, "reference 1's mode must be one of")):
        drawn = _picture(tmp_path, _recipe(references=[{"path": str(ref), "sha256": file_sha256(ref), **entry}]))
        code, _, err = run_cli(capsys, "generate", "--from-image", str(drawn), "-o", str(tmp_path / "o.png"))
        line = error_line(err)
        assert code == 1 and f"{drawn}'s recipe: " in line and expected in line, line


def test_a_flag_replaces_the_value_it_is_held_to(tiny_env, tmp_path: Path, capsys) -> None:
    drawn = _picture(tmp_path, _recipe(steps=500000))
    target = tmp_path / "again.png"
    code, out, err = run_cli(capsys, "generate", "--from-image", str(drawn), "-o", str(target), "--steps", "1",
                             "--json")
    assert code == 0, err
    assert json.loads(out)["steps"] == 1 and target.exists()


def test_a_reference_in_an_excluded_folder_is_refused(tiny_env, tmp_path: Path, capsys) -> None:
    private = tmp_path / "private [2020]"
    ref = _noise(private / "me.png")
    (tmp_path / "alias.png").symlink_to(ref)
    config = tmp_path / "safe.toml"
    config.write_text("[safety]\nexclude = [" + json.dumps(str(private)) + "]\n", encoding="utf-8")
    for named in (ref, tmp_path / "alias.png"):  # named directly, and through a link into the folder
        drawn = _picture(tmp_path, _recipe(references=[{"path": str(named), "sha256": file_sha256(ref)}]))
        code, _, err = run_cli(capsys, "generate", "--from-image", str(drawn), "-o", str(tmp_path / "o.png"),
                               "--config", str(config))
        line = error_line(err)
        assert code == 1 and f"{drawn}'s recipe: " in line and "excluded by safety.exclude" in line, line
    assert not (tmp_path / "o.png").exists()
    # Without the exclusion the same recipe draws.
    code, _, err = run_cli(capsys, "generate", "--from-image", str(drawn), "-o", str(tmp_path / "o.png"))
    assert code == 0, err


def test_a_good_recipe_with_a_reference_still_redraws(tiny_env, tmp_path: Path, capsys) -> None:
    ref = _noise(tmp_path / "ref.png")
    first = tmp_path / "first.png"
    code, _, err = run_cli(capsys, "generate", "a kettle", "-o", str(first), "--ref", f"{ref}:0.5:style")
    assert code == 0, err
    again = tmp_path / "again.png"
    code, _, err = run_cli(capsys, "generate", "--from-image", str(first), "-o", str(again))
    assert code == 0, err
    assert read_provenance(again)["references"][0]["mode"] == "style"


def test_the_safety_gate_checks_a_recipes_references(tiny_env, tmp_path: Path, capsys) -> None:
    """The real tiny CLIP and the real gate: at threshold -1 every picture is flagged, so a recipe's reference is
    refused before anything is drawn; a --ref given by hand replaces the recipe's and is the user's choice."""
    ref = _noise(tmp_path / "ref.png")
    drawn = _picture(tmp_path, _recipe(references=[{"path": str(ref), "sha256": file_sha256(ref)}]))
    config = tmp_path / "strict.toml"
    config.write_text("[safety]\nenabled = true\nthreshold = -1.0\n", encoding="utf-8")
    target = tmp_path / "again.png"
    code, _, err = run_cli(capsys, "generate", "--from-image", str(drawn), "-o", str(target), "--config", str(config))
    line = error_line(err)
    assert code == 1 and f"{drawn}'s recipe: its reference {ref} is flagged by the safety gate" in line, line
    assert not target.exists()

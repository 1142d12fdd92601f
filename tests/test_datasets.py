"""The bundled data set: sample photos with captions and attribution, and the prompt files. No models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from agent.eval_inputs import read_eval_file
from agent.runner import read_prompt_file
from imgrag.errors import UserError
from imgrag.images import IMAGE_SUFFIXES, open_image

DATASETS = Path(__file__).resolve().parent.parent / "datasets"
SAMPLE = DATASETS / "sample"
PROMPTS = DATASETS / "prompts"
IMAGES = sorted(p for p in SAMPLE.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if SAMPLE.is_dir() else []


def _jsonl_objects(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip() and not line.strip().startswith("#")]


def test_sample_folder_has_about_a_dozen_photos() -> None:
    assert 10 <= len(IMAGES) <= 16, [p.name for p in IMAGES]


@pytest.mark.parametrize("image", IMAGES, ids=lambda p: p.name)
def test_sample_image_opens_is_small_and_has_caption_and_attribution(image: Path) -> None:
    with Image.open(image) as im:
        im.verify()  # a truncated or corrupt file fails here
    rgb = open_image(image)  # the loader the store and the tools use
    assert rgb.mode == "RGB" and min(rgb.size) >= 64
    assert image.stat().st_size < 1_100_000, f"{image.name} is over ~1 MB"

    caption = image.with_suffix(".txt")
    assert caption.is_file(), f"{image.name} has no sidecar caption"
    lines = caption.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"{caption.name} must hold one non-empty line"

    attribution = (SAMPLE / "ATTRIBUTION.md").read_text(encoding="utf-8")
    assert f"## `{image.name}`" in attribution, f"ATTRIBUTION.md has no section for {image.name}"


def test_every_caption_belongs_to_a_picture() -> None:
    stems = {p.stem for p in IMAGES}
    orphans = [p.name for p in SAMPLE.glob("*.txt") if p.stem not in stems]
    assert not orphans


def test_datasets_folder_stays_small() -> None:
    total = sum(p.stat().st_size for p in DATASETS.rglob("*") if p.is_file())
    assert total < 8 * 1024 * 1024, f"datasets/ is {total / 1e6:.1f} MB"


def test_sample_prompts() -> None:
    path = PROMPTS / "sample.txt"
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(lines) == 3
    assert lines[0] == "a beautiful retriever and a cradle"
    items = read_prompt_file(path)
    assert [item["prompt"] for item in items] == lines
    assert all(item["seed"] is None and item["max_rounds"] is None for item in items)


def test_eval_jsonl_lines_parse_and_gold_exists() -> None:
    path = PROMPTS / "eval.jsonl"
    objects = _jsonl_objects(path)
    assert 12 <= len(objects) <= 16
    with_gold = 0
    for obj in objects:
        assert isinstance(obj["prompt"], str) and obj["prompt"].strip()
        assert isinstance(obj["seed"], int) and not isinstance(obj["seed"], bool)
        assert set(obj) <= {"prompt", "seed", "gold", "max_rounds"}, obj
        if "max_rounds" in obj:
            assert isinstance(obj["max_rounds"], int) and obj["max_rounds"] >= 1
        if "gold" in obj:
            with_gold += 1
            gold = path.parent / obj["gold"]
            assert gold.is_file(), f"gold {obj['gold']} of {obj['prompt']!r} is missing"
            assert gold.resolve().parent == SAMPLE.resolve()
    assert 0 < with_gold < len(objects)  # some prompts have a sample photo, some have none


def test_eval_txt_matches_eval_jsonl() -> None:
    txt = [item["prompt"] for item in read_prompt_file(PROMPTS / "eval.txt")]
    jsonl = [obj["prompt"] for obj in _jsonl_objects(PROMPTS / "eval.jsonl")]
    assert txt == jsonl


def test_runner_reads_eval_jsonl() -> None:
    path = PROMPTS / "eval.jsonl"
    with pytest.raises(UserError, match=r'eval\.jsonl:1: unknown key "gold"'):  # a batch has no gold pictures
        read_prompt_file(path)
    items = read_prompt_file(path, extra_keys=("gold",))  # imgrag eval's lines
    objects = _jsonl_objects(path)
    assert [item["prompt"] for item in items] == [obj["prompt"] for obj in objects]
    assert [item["seed"] for item in items] == [obj["seed"] for obj in objects]
    assert [item["max_rounds"] for item in items] == [obj.get("max_rounds") for obj in objects]


def test_evaluation_loader_resolves_gold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # gold must resolve relative to the file's folder, not the working folder
    path = PROMPTS / "eval.jsonl"
    items = read_eval_file(path)
    objects = _jsonl_objects(path)
    assert len(items) == len(objects)
    for item, obj in zip(items, objects, strict=True):
        if "gold" in obj:
            assert item["gold"] == str((path.parent / obj["gold"]).resolve())
            assert Path(item["gold"]).is_file()
        else:
            assert item["gold"] is None
    assert all(item["gold"] is None for item in read_eval_file(PROMPTS / "eval.txt"))

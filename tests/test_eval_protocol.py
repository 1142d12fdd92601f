"""ImageRAG's protocol in ``imgrag eval --classes``: the split, the gold pictures kept out of retrieval, the
paired statistics against hand-computed values, and one small end-to-end run of every arm on the tiny kit
(its numbers are plumbing)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgrag.errors import UserError
from imgrag.scoring.class_folders import class_words, read_class_folder, split_classes
from imgrag.scoring.paired_stats import bootstrap_interval, paired, summarise
from tests.cli import run_cli


def make_classes(root: Path, classes: dict[str, int], size: int = 24) -> Path:
    """A class folder of generated pictures: per class a hue, each picture its own noise."""
    rng = np.random.default_rng(7)
    for c, (name, count) in enumerate(classes.items()):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(count):
            base = np.array([(80 * c) % 256, (40 + 60 * c) % 256, 200 - 50 * c], dtype=np.int16)
            pixels = np.clip(base + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    return root


# --------------------------------------------------------------------------------------------
# The split
# --------------------------------------------------------------------------------------------

def test_split_is_deterministic_disjoint_and_sized_by_settings(tmp_path: Path) -> None:
    root = make_classes(tmp_path / "classes", {"001.Black_footed_Albatross": 7, "Laysan_albatross": 5})
    (root / "Laysan_albatross" / "notes.txt").write_text("not a picture")
    classes = read_class_folder(root)
    assert list(classes) == ["001.Black_footed_Albatross", "Laysan_albatross"]
    assert len(classes["Laysan_albatross"]) == 5  # the .txt is no picture
    first = split_classes(classes, gold_per_class=2, retrieval_per_class=3, seed=11)
    again = split_classes(read_class_folder(root), gold_per_class=2, retrieval_per_class=3, seed=11)
    assert first == again  # the same seed, the same split
    for split in first:
        assert len(split.gold) == 2 and len(split.retrieval) == 3
        assert not set(split.gold) & set(split.retrieval)
        assert set(split.gold) | set(split.retrieval) <= set(classes[split.folder])
    assert first[0].name == "Black footed Albatross" and class_words("00042_Danaus plexippus") == "Danaus plexippus"
    other = split_classes(classes, gold_per_class=2, seed=12)
    assert [s.gold for s in other] != [s.gold for s in first]  # another seed, another split
    assert len(other[0].retrieval) == 5  # 0: every picture that is not gold
    # A class's split does not depend on the other classes.
    alone = split_classes({"Laysan_albatross": classes["Laysan_albatross"]}, gold_per_class=2, retrieval_per_class=3,
                          seed=11)
    assert alone[0] == first[1]


def test_duplicates_stay_on_one_side_and_small_classes_are_one_line(tmp_path: Path) -> None:
    root = make_classes(tmp_path / "classes", {"fox": 4})
    (root / "fox" / "copy.png").write_bytes((root / "fox" / "00.png").read_bytes())
    for seed in range(6):
        split = split_classes(read_class_folder(root), gold_per_class=1, seed=seed)[0]
        together = {"00.png", "copy.png"} & {Path(p).name for p in split.gold}
        assert together in (set(), {"00.png", "copy.png"})  # identical bytes never straddle the split
    with pytest.raises(UserError, match=r"class 'fox' has 4 distinct readable picture\(s\); the protocol needs "
                                         r"at least 5 \(eval.gold_per_class = 4"):
        split_classes(read_class_folder(root), gold_per_class=4)
    with pytest.raises(UserError, match="no class folders with pictures"):
        read_class_folder(tmp_path / "classes" / "fox")
    # A Hugging Face `datasets` image folder with split folders: the splits are merged.
    hf = make_classes(tmp_path / "hf" / "train", {"a": 2, "b": 2}).parent
    make_classes(hf / "test", {"a": 1})
    assert {k: len(v) for k, v in read_class_folder(hf).items()} == {"a": 3, "b": 2}


# --------------------------------------------------------------------------------------------
# The statistics, against values worked out by hand
# --------------------------------------------------------------------------------------------

def test_paired_statistics_match_hand_computed_values() -> None:
    # Prompts 1-4: arm 0.30 0.50 0.40 None; plain 0.20 0.50 0.45 0.10 -> pairs (1, 2, 3): diffs 0.10, 0, -0.05.
    s = summarise("dino_gold", "loop-agent", [0.30, 0.50, 0.40, None], [0.20, 0.50, 0.45, 0.10])
    assert s.n == 3
    assert s.mean_arm == pytest.approx(0.4) and s.mean_baseline == pytest.approx(0.3833, abs=1e-4)
    assert s.mean_diff == pytest.approx(0.0167, abs=1e-4)  # (0.10 + 0 - 0.05) / 3
    assert s.improved == pytest.approx(1 / 3, abs=1e-4) and s.worsened == pytest.approx(1 / 3, abs=1e-4)
    # Two differences 0 and 2: a resampled mean is 0, 1 or 2 with chances 1/4, 1/2, 1/4, so the 2.5th
    # percentile is 0 and the 97.5th is 2.
    assert bootstrap_interval([0.0, 2.0], seed=0) == (0.0, 2.0)
    # One difference: no spread. All equal: the interval is that value.
    assert bootstrap_interval([0.25]) == (0.25, 0.25)
    assert bootstrap_interval([1.0, 1.0, 1.0], seed=5) == (1.0, 1.0)
    # Fixed seed, fixed interval; another seed may differ; the interval holds the mean.
    d = [0.1, -0.2, 0.05, 0.3, 0.0, 0.12]
    low, high = bootstrap_interval(d, seed=3)
    assert (low, high) == bootstrap_interval(d, seed=3) and low < np.mean(d) < high
    # The judge's match counts as 0/1; unscored prompts drop out of the pairs.
    a, b = paired([True, False, None], [False, False, True])
    assert a.tolist() == [1.0, 0.0] and b.tolist() == [0.0, 0.0]
    empty = summarise("siglip_text", "imagerag", [None], [0.2])
    assert empty.n == 0 and empty.mean_diff is None
    with pytest.raises(ValueError, match="same prompts"):
        paired([1.0], [1.0, 2.0])


# --------------------------------------------------------------------------------------------
# End to end on the tiny kit: every arm, gold never retrieved, the files
# --------------------------------------------------------------------------------------------

def test_eval_classes_runs_every_arm_and_never_retrieves_gold(tiny_settings, tmp_path: Path, capsys,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # The tiny LLM's replies are junk either way: fewer tokens, and the fixed policy takes over after one.
    monkeypatch.setenv("IMGRAG_LLM_MAX_NEW_TOKENS", "8")
    monkeypatch.setenv("IMGRAG_BUDGET_MAX_LLM_FAILURES", "1")
    root = make_classes(tmp_path / "classes", {"red_kite": 4, "snowy_owl": 4})
    # Two classes indexed, one prompt drawn (--limit 1): every arm runs, and the test stays small.
    code, out, err = run_cli(capsys, "eval", "--classes", str(root), "--profile", "tiny", "--max-rounds", "2",
                             "--limit", "1", "--json")
    assert code == 0, err
    doc = json.loads(out)
    eval_dir = Path(doc["eval_dir"])
    assert doc["arms"] == ["plain", "imagerag", "loop-fixed", "loop-agent"]
    assert [it["prompt"] for it in doc["items"]] == ["a photo of a red kite"]
    assert "plumbing" in doc["note"] and "tiny profile" in doc["note"]

    # The split: 2 gold per class (the tiny profile's eval.gold_per_class), the rest indexed, nothing shared.
    split = {c["folder"]: c for c in doc["split"]["classes"]}
    gold = {p for c in split.values() for p in c["gold"]}
    assert all(len(c["gold"]) == 2 and c["retrieval"] == 2 for c in split.values())
    assert doc["store"]["pictures"] == 4 and doc["store"]["location"] == str(eval_dir / "store")

    # Every arm drew every prompt on the prompt's seed; gold never among what any arm was given (the records).
    seen_any = False
    for item in doc["items"]:
        assert set(item["arms"]) == set(doc["arms"])
        for arm, result in item["arms"].items():
            assert result["error"] is None, (arm, result["error"])
            assert Path(result["image"]).is_file()
            records = json.loads((Path(result["run_dir"]) / "result.json").read_text())
            retrieved = {ref["path"] for ref in records.get("references", {}).values()}
            assert not retrieved & gold, arm
            seen_any |= bool(retrieved)
            assert {"dino_gold", "siglip_text", "clip_text", "clip_gold", "judge_match"} <= set(result["scores"])
    assert seen_any, "some arm must have retrieved from the evaluation's store"
    assert doc["gold_retrieved"] == []

    # The selection metrics are marked; DINO and SigLIP come from the kit's scorers.
    assert doc["agent_selects_with"] == ["clip_text", "judge_match"]
    assert doc["scorers"]["dino_gold"].endswith("/dino") and "siglip" in doc["scorers"]["siglip_text"]
    stats = doc["summary"]["loop-agent"]["dino_gold"]["vs_plain"]
    assert stats["n"] == 1 and stats["ci_low"] == stats["mean_diff"] == stats["ci_high"]  # one prompt: no spread
    assert set(doc["per_arm"]) == set(doc["arms"]) and doc["per_arm"]["plain"]["seconds_per_prompt"] > 0

    # eval.csv: a plain CSV (the header first), one row per prompt and arm, the marked columns, each row's profile.
    lines = (eval_dir / "eval.csv").read_text().splitlines()
    assert lines[0].startswith("profile,index,prompt,")
    rows = list(csv.DictReader(lines))
    assert {r["profile"] for r in rows} == {"tiny"}
    assert len(rows) == 1 * 4 and "clip_text (agent selects with)" in rows[0] and "dino_gold_minus_plain" in rows[0]
    plain = next(r for r in rows if r["arm"] == "plain" and r["index"] == "0")
    agent = next(r for r in rows if r["arm"] == "loop-agent" and r["index"] == "0")
    assert float(agent["dino_gold_minus_plain"]) == pytest.approx(float(agent["dino_gold"]) - float(plain["dino_gold"]),
                                                                  abs=2e-4)
    # The report: the banner, the table, one plot per metric, the best/worst pictures.
    page = (eval_dir / "report.html").read_text()
    assert "plumbing" in page and "agent selects with" in page and "95 % interval" in page
    assert page.count("<svg") == 5 and "Best and worst prompts" in page
    assert "tiny profile" in err


def test_repair_with_omnigen_adds_imagerag_o_and_its_baseline(tiny_settings, tmp_path: Path, capsys,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import imgrag.management.engine
    from tests.fakes import FakeVerdict, ScriptedJudge

    root = make_classes(tmp_path / "classes", {"red_kite": 4, "snowy_owl": 4})
    # The tiny judge's verdicts are junk: a scripted one names a missing concept, so the single passes redraw.
    verdict = FakeVerdict(False, ["a red kite"], "scripted", parsed=True)
    monkeypatch.setattr(imgrag.management.engine, "_load_judge", lambda *_: ScriptedJudge([verdict]))
    code, out, err = run_cli(capsys, "eval", "--classes", str(root), "--profile", "tiny", "--planner", "fixed",
                             "--repair-with", "omnigen", "--max-rounds", "2", "--limit", "1", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["arms"] == ["plain", "imagerag", "plain-omnigen", "imagerag-o", "loop-fixed"]
    arms = doc["items"][0]["arms"]
    assert all(r["error"] is None for r in arms.values()), {a: r["error"] for a, r in arms.items()}
    record = json.loads((Path(arms["imagerag-o"]["run_dir"]) / "result.json").read_text())
    first, redraw = record["candidates"]
    assert first["backbone"] == "omnigen" and redraw["backbone"] == "omnigen"
    assert [c["concept"] for c in redraw["concepts"]] == ["a red kite"] and "<|image_1|>" in redraw["sent_prompt"]
    with Image.open(redraw["path"]) as picture:
        assert json.loads(picture.info["imgrag"])["backbone"] == "omnigen"
    sdxl = json.loads((Path(arms["imagerag"]["run_dir"]) / "result.json").read_text())
    assert "backbone" not in sdxl["candidates"][-1] and sdxl["candidates"][-1]["ip_scale"] is not None
    assert arms["plain-omnigen"]["model_loads"].get("generator", 0) == 0
    assert "imagerag-o" in doc["summary"] and doc["gold_retrieved"] == []


def test_prompt_file_mode_excludes_its_gold_pictures_from_retrieval(tmp_path: Path) -> None:
    """The store holds the gold picture (and a copy of it elsewhere): neither is ever a reference."""
    from agent.evaluation import Evaluation
    from agent.runner import Runner, open_checkpointer
    from imgrag.settings import load_settings
    from tests.fakes import FakeEmbedder, FakeGenerator, FakeManager, FakeReference, FakeVerdict, ScriptedJudge

    refs = tmp_path / "refs"
    refs.mkdir()
    for name, colour in (("gold", (200, 0, 0)), ("copy", (200, 0, 0)), ("other", (0, 90, 0))):
        Image.new("RGB", (16, 16), colour).save(refs / f"{name}.png")
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red cradle", "seed": 2, "gold": "refs/gold.png"}) + "\n")

    class CopyingStore:
        """Every retrieval finds all three pictures; the store knows gold.png and copy.png are one picture."""

        location = str(refs)

        def count(self) -> int:
            return 3

        def retrieve(self, embedder, queries, k=2, **_):
            return [FakeReference(rid, str(refs / name), 0.9, name, queries[0])
                    for rid, name in (("g", "gold.png"), ("g2", "copy.png"), ("o", "other.png"))]

        def paths_of(self, ids):
            return {"g": [str(refs / "gold.png"), str(refs / "copy.png")]} if ids else {}  # one picture, two files

    settings = load_settings("default", environ={"IMGRAG_HOME": str(tmp_path / "home")})
    miss = FakeVerdict(False, ["a cradle"], "no cradle")
    manager = FakeManager({"generator": FakeGenerator(), "judge": ScriptedJudge([miss]), "embedder": FakeEmbedder()})
    runner = Runner(settings, manager=manager, reference_store=CopyingStore(),
                    checkpointer=open_checkpointer(tmp_path / "threads.sqlite"))
    doc = Evaluation(settings, runner=runner, planner="fixed", max_rounds=2).run(prompts)
    gold = str((refs / "gold.png").resolve())
    assert set(doc["store"]["gold_excluded"]) == {gold, str(refs / "copy.png")}
    for arm in ("imagerag", "loop-fixed"):
        result = doc["items"][0]["arms"][arm]
        assert result["error"] is None
        assert [Path(r["path"]).name for r in result["retrieved"]] == ["other.png"], arm
        trace = (Path(result["run_dir"]) / "trace.jsonl").read_text()
        assert "excluded by safety.exclude" in trace  # dropped with a line in the trace
    assert doc["gold_retrieved"] == [] and settings.safety.exclude == []  # the user's settings are untouched


def test_eval_refuses_bad_invocations_in_one_line(tmp_path: Path, capsys) -> None:
    root = make_classes(tmp_path / "classes", {"kite": 2})
    code, _, err = run_cli(capsys, "eval", "--classes", str(root), "--profile", "tiny")
    assert code == 1 and "Traceback" not in err
    assert "class 'kite' has 2 distinct readable picture(s); the protocol needs at least 3" in err
    code, _, err = run_cli(capsys, "eval", "--profile", "tiny")
    assert code == 1 and "give a prompt FILE or --classes DIR" in err
    code, _, err = run_cli(capsys, "eval", "--classes", str(root), "--arms", "plain,omnigen-x", "--profile", "tiny")
    assert code == 1 and "unknown arm(s) omnigen-x" in err

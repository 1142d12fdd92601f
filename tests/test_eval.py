"""``imgrag eval``'s harness over scripted models: plain generation and the agent on the same seeds,
scores, and the CSV, JSON and HTML it writes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from agent.eval_inputs import read_eval_file
from agent.evaluation import Evaluation, cosine
from agent.runner import Runner, open_checkpointer
from imgrag.errors import UserError
from imgrag.settings import load_settings
from tests.fakes import FakeEmbedder, FakeGenerator, FakeManager, FakeVerdict, MemoryStore, ScriptedJudge

NO_CRADLE = FakeVerdict(False, ["a wooden cradle"], "no cradle")
MATCH = FakeVerdict(True, [], "all there")


class RedJudge:
    """A match when the picture is red enough (FakeGenerator: red = 40 x seed): the same verdict for a picture
    whichever arm, or the scoring, asks."""

    def judge(self, image: Image.Image, prompt: str, **_: object) -> FakeVerdict:
        return MATCH if image.getpixel((0, 0))[0] >= 150 else NO_CRADLE


def make_evaluation(tmp_path: Path, verdicts: list[FakeVerdict] | None = None,
                    generator: FakeGenerator | None = None, **settings_env: str) -> tuple[Evaluation, dict]:
    settings = load_settings("default", environ={"IMGRAG_HOME": str(tmp_path / "home"), **settings_env})
    judge = RedJudge() if verdicts is None else ScriptedJudge(verdicts)
    models = {"generator": generator or FakeGenerator(), "judge": judge, "embedder": FakeEmbedder()}
    refs = tmp_path / "refs"
    refs.mkdir(exist_ok=True)
    runner = Runner(settings, manager=FakeManager(models), reference_store=MemoryStore(refs),
                    checkpointer=open_checkpointer(tmp_path / "threads.sqlite"))
    return Evaluation(settings, runner=runner, planner="fixed", max_rounds=2), models


@pytest.fixture
def prompt_file(tmp_path: Path) -> Path:
    gold = tmp_path / "gold"
    gold.mkdir()
    Image.new("RGB", (16, 16), (200, 0, 99)).save(gold / "cradle.png")
    path = tmp_path / "eval.jsonl"
    path.write_text('{"prompt": "a retriever and a cradle", "seed": 3, "gold": "gold/cradle.png"}\n'
                    "# a comment line\n"
                    '{"prompt": "a rocket on a pad", "seed": 5}\n'
                    '{"prompt": "a third prompt, cut by --limit"}\n')
    return path


def test_eval_compares_every_arm_with_plain_on_the_same_seeds(tmp_path: Path, prompt_file: Path) -> None:
    # Prompt 1 (seed 3) is judged "no cradle" until the loop redraws on seed 4; prompt 2 (seed 5) matches at once.
    evaluation, models = make_evaluation(tmp_path)
    doc = evaluation.run(prompt_file, limit=2)
    eval_dir = Path(doc["eval_dir"])
    assert len(doc["items"]) == 2 and doc["arms"] == ["plain", "imagerag", "loop-fixed"]  # --planner fixed

    # Every arm's first drawing uses the prompt's seed.
    seeds = [c["seed"] for c in models["generator"].calls]
    assert seeds[0] == 3 and seeds.count(3) >= 3 and 5 in seeds
    first, second = doc["items"]
    loop = first["arms"]["loop-fixed"]
    assert loop["status"] == "matched" and loop["rounds"] == 2
    assert first["arms"]["imagerag"]["status"] == "redrawn" and first["arms"]["imagerag"]["retrieved"]
    assert second["arms"]["loop-fixed"]["rounds"] == 1

    # CLIP text-image of the saved pictures against the prompt, by the run's own embedder.
    embedder = models["embedder"]
    text = embedder.embed_texts([first["prompt"]])[0]
    for arm, result in first["arms"].items():
        saved = embedder.embed_images([Image.open(result["image"]).convert("RGB")])[0]
        assert result["scores"]["clip_text"] == pytest.approx(cosine(saved, text), abs=1e-4), arm
    # The loop's answer (c1, seed 4: red 160) is redder than the plain one (seed 3: red 120): it scores higher.
    assert loop["scores"]["clip_text"] > first["arms"]["plain"]["scores"]["clip_text"]
    # Image-image against the gold picture only where there is one.
    assert "clip_gold" in first["arms"]["plain"]["scores"] and "clip_gold" not in second["arms"]["plain"]["scores"]
    assert loop["scores"]["clip_gold"] > first["arms"]["plain"]["scores"]["clip_gold"]  # redder, like the gold

    summary = doc["summary"]
    assert summary["plain"]["judge_match"]["mean"] == 0.5 and summary["loop-fixed"]["judge_match"]["mean"] == 1.0
    vs = summary["loop-fixed"]["judge_match"]["vs_plain"]
    assert vs["mean_diff"] == 0.5 and vs["improved"] == 0.5 and vs["worsened"] == 0.0
    assert summary["plain"]["clip_gold"]["n"] == 1
    assert doc["scorers"]["dino_gold"] is None and summary["plain"]["dino_gold"]["n"] == 0  # no DINO configured
    assert doc["agent_selects_with"] == ["clip_text", "judge_match"]
    assert doc["per_arm"]["loop-fixed"]["rounds"] == 1.5

    # Files: CSV (a row per prompt and arm), JSON, HTML; the loop runs' folders beside the eval folder.
    rows = list(csv.DictReader((eval_dir / "eval.csv").open()))
    assert [(r["index"], r["arm"]) for r in rows[:3]] == [("0", "plain"), ("0", "imagerag"), ("0", "loop-fixed")]
    assert rows[0]["judge_match (agent selects with)"] == "False" and rows[2]["judge_match (agent selects with)"] == \
        "True"
    assert float(rows[2]["clip_text (agent selects with)"]) == loop["scores"]["clip_text"]
    assert rows[3]["clip_gold"] == "" and rows[0]["clip_text_minus_plain"] == ""
    assert json.loads((eval_dir / "eval.json").read_text())["summary"] == summary
    page = (eval_dir / "report.html").read_text()
    assert "a retriever and a cradle" in page and "paired differences" in page and "CLIP text-image" in page
    assert page.count("data:image/png;base64,") >= 7  # 2 prompts x 3 arms, and the gold picture
    for item in doc["items"]:
        run = item["arms"]["loop-fixed"]
        assert (Path(run["run_dir"]) / "result.json").exists() and Path(run["run_dir"]).parent == eval_dir.parent
        assert Path(run["report"]).is_file()  # each loop run gets its own report, linked from the summary
        assert f'href="../{run["run_id"]}/report.html"' in page
    # Models load before timing; the loads are reported apart.
    assert set(doc["model_load_seconds"]) == {"generator", "judge", "embedder"}  # fixed arms: no LLM


def test_eval_keeps_going_after_a_broken_prompt(tmp_path: Path, prompt_file: Path) -> None:
    class BrokenOnce(FakeGenerator):
        def generate(self, prompt, **kw):
            if "rocket" in prompt:
                raise RuntimeError("CUDA out of memory (simulated)")
            return super().generate(prompt, **kw)

    evaluation, _ = make_evaluation(tmp_path, [MATCH], generator=BrokenOnce())
    doc = evaluation.run(prompt_file)
    assert len(doc["items"]) == 3
    broken = doc["items"][1]
    # The manager turns the out-of-memory error into its one-line UserError; the eval records it and goes on.
    assert "out of GPU memory running 'generator'" in broken["error"] and broken["arms"]["plain"]["image"] is None
    assert doc["per_arm"]["plain"]["errors"] == 1 and doc["items"][2]["arms"]["loop-fixed"]["status"] == "matched"


def test_dino_scores_when_a_checkpoint_is_configured(tmp_path: Path, prompt_file: Path) -> None:
    """A DINOv2 folder loads through the same scorer as the kit's DINO ViT (AutoModel)."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    dino = tmp_path / "dino"
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=28, patch_size=14)
    Dinov2Model(config).save_pretrained(dino)
    BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(dino)
    evaluation, _ = make_evaluation(tmp_path, [MATCH], IMGRAG_MODELS_DINO=str(dino))
    doc = evaluation.run(prompt_file, limit=2)
    first, second = doc["items"]
    # Each arm's saved picture against the gold one, by the same checkpoint loaded here.
    from imgrag.models.dino import DinoScorer

    arms = list(first["arms"])
    pictures = [Image.open(first["arms"][a]["image"]).convert("RGB") for a in arms]
    vectors = DinoScorer(str(dino)).embed([*pictures, Image.open(prompt_file.parent / "gold" / "cradle.png")])
    for n, arm in enumerate(arms):
        assert first["arms"][arm]["scores"]["dino_gold"] == pytest.approx(cosine(vectors[n], vectors[-1]), abs=1e-3)
    assert "dino_gold" not in second["arms"]["plain"]["scores"]  # no gold picture, no score
    assert doc["summary"]["plain"]["dino_gold"]["n"] == 1 and doc["scorers"]["dino_gold"] == str(dino)


def test_eval_file_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": "x", "gold": "nowhere.png"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: gold image 'nowhere.png' not found"):
        read_eval_file(bad)
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\ntwo\n")
    assert [i["prompt"] for i in read_eval_file(txt)] == ["one", "two"]
    assert cosine([1, 0], [0, 2]) == 0.0 and cosine([1, 1], [2, 2]) == pytest.approx(1.0)


def test_eval_command_rejects_a_bad_file_before_loading_models(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from agent.frontends.cli.app import app

    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(UserError, match="bad.jsonl:1: not valid JSON"):
        CliRunner().invoke(app, ["eval", str(bad)], catch_exceptions=False)


def test_every_second_of_an_agent_run_belongs_to_a_named_stage(tmp_path: Path, prompt_file: Path) -> None:
    """An LLM that takes its time choosing each step: its seconds are a stage (plan_llm), and the stages add up
    to the loop's seconds (the rest is the graph's overhead, named too)."""
    import itertools
    import time

    from langchain_core.messages import AIMessage

    from tests.fakes import ScriptedChatModel, call

    class SlowLLM(ScriptedChatModel):
        def _generate(self, messages, stop=None, run_manager=None, **kwargs):
            time.sleep(0.15)
            return super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)

    evaluation, models = make_evaluation(tmp_path, [NO_CRADLE, NO_CRADLE, MATCH])
    script = [call("generate", prompt="a retriever and a cradle", seed=3), call("critique", candidate_id="c0")]
    models["llm"] = SlowLLM(messages=itertools.chain(script, itertools.repeat(AIMessage(content="Done?"))))
    evaluation.arms = ["plain", "loop-agent"]
    doc = evaluation.run(prompt_file, limit=1)
    agent = doc["items"][0]["arms"]["loop-agent"]
    stages = agent["seconds_by_stage"]
    assert stages["plan_llm"] >= 0.3  # at least two LLM turns of 0.15 s
    assert {"generate", "critique", "overhead"} <= set(stages)
    assert sum(stages.values()) == pytest.approx(agent["seconds"], abs=0.01)
    assert doc["per_arm"]["loop-agent"]["seconds_per_prompt"] == pytest.approx(agent["seconds"], abs=1e-3)

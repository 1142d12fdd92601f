"""``imgrag eval``'s harness over scripted models: plain generation and the agent on the same seeds,
scores, and the CSV, JSON and HTML it writes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from agent.evaluation import Evaluation, cosine, read_eval_file
from agent.runner import Runner, open_checkpointer
from imgrag.errors import UserError
from imgrag.settings import load_settings
from tests.fakes import FakeEmbedder, FakeGenerator, FakeManager, FakeVerdict, MemoryStore, ScriptedJudge

NO_CRADLE = FakeVerdict(False, ["a wooden cradle"], "no cradle")
MATCH = FakeVerdict(True, [], "all there")


def make_evaluation(tmp_path: Path, verdicts: list[FakeVerdict], generator: FakeGenerator | None = None,
                    **settings_env: str) -> tuple[Evaluation, dict]:
    settings = load_settings("default", environ={"IMGRAG_HOME": str(tmp_path / "home"), **settings_env})
    models = {"generator": generator or FakeGenerator(), "judge": ScriptedJudge(verdicts), "embedder": FakeEmbedder()}
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


def test_eval_compares_plain_and_agent_on_the_same_seeds(tmp_path: Path, prompt_file: Path) -> None:
    # Prompt 1: plain judged (no match), agent c0 (no match), agent c1 matches. Prompt 2: everything matches.
    evaluation, models = make_evaluation(tmp_path, [NO_CRADLE, NO_CRADLE, MATCH, MATCH])
    doc = evaluation.run(prompt_file, limit=2)
    eval_dir = Path(doc["eval_dir"])
    assert len(doc["items"]) == 2

    # The same seed for the plain picture and the agent's first drawing.
    seeds = [c["seed"] for c in models["generator"].calls]
    assert seeds[:2] == [3, 3] and 5 in seeds[2:]
    first, second = doc["items"]
    assert first["plain"]["judge_match"] is False and first["agent"]["judge_match"] is True
    assert first["agent"]["status"] == "matched" and first["agent"]["rounds"] == 2
    assert second["plain"]["judge_match"] is True and second["agent"]["rounds"] == 1

    # CLIP text-image of the saved pictures against the prompt, by the run's own embedder; the agent's final
    # picture (c1, seed 4: red 160) is redder than the plain one (seed 3: red 120), so it scores higher.
    embedder = models["embedder"]
    text = embedder.embed_texts([first["prompt"]])[0]
    for side in ("plain", "agent"):
        saved = embedder.embed_images([Image.open(first[side]["image"]).convert("RGB")])[0]
        assert first[side]["clip_text"] == pytest.approx(cosine(saved, text), abs=1e-4)
    assert first["agent"]["clip_text"] > first["plain"]["clip_text"]
    # Image-image against the gold picture only where there is one.
    assert first["plain"]["clip_gold"] is not None and "clip_gold" not in second["plain"]
    assert first["agent"]["clip_gold"] > first["plain"]["clip_gold"]  # redder, like the gold picture

    agg = doc["aggregate"]
    assert agg["plain_judge_match"] == 0.5 and agg["agent_judge_match"] == 1.0
    assert agg["n_clip_gold"] == 1 and agg["agent_rounds"] == 1.5 and agg["plain_rounds"] == 1.0
    assert {"seconds_plain_generate", "seconds_plain_judge", "seconds_agent_total", "seconds_agent_generate",
            "seconds_agent_critique", "seconds_scoring"} <= set(agg)
    assert "dino_gold" not in json.dumps(agg)  # no DINO checkpoint configured

    # Files: CSV, JSON, HTML, the plain pictures, and the agent's run folders beside the eval folder.
    rows = list(csv.DictReader((eval_dir / "eval.csv").open()))
    assert [r["prompt"] for r in rows] == ["a retriever and a cradle", "a rocket on a pad"]
    assert rows[0]["plain_judge_match"] == "False" and rows[0]["agent_judge_match"] == "True"
    assert float(rows[0]["agent_clip_text"]) == first["agent"]["clip_text"] and rows[1]["plain_clip_gold"] == ""
    assert json.loads((eval_dir / "eval.json").read_text())["aggregate"] == agg
    page = (eval_dir / "report.html").read_text()
    assert "a retriever and a cradle" in page and "Means over prompts" in page and "CLIP text-image" in page
    assert page.count("data:image/png;base64,") >= 5  # 2 plain, 2 agent, 1 gold
    assert (eval_dir / "plain" / "000.png").exists()
    for item in doc["items"]:
        assert (Path(item["agent"]["run_dir"]) / "result.json").exists()
        assert Path(item["agent"]["run_dir"]).parent == eval_dir.parent
        # Each agent run gets its own report, linked from the summary by a relative path.
        assert Path(item["agent"]["report"]).is_file()
        assert f'href="../{item["agent"]["run_id"]}/report.html"' in page
    # Models load before timing: the stages are model calls only; the loads are reported apart.
    assert set(doc["model_load_seconds"]) == {"generator", "judge", "embedder"}  # fixed planner: no LLM
    assert first["plain"]["seconds"] == pytest.approx(first["plain"]["seconds_generate"]
                                                      + first["plain"]["seconds_judge"], abs=2e-3)


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
    assert "out of GPU memory running 'generator'" in broken["error"] and broken["plain"].get("image") is None
    assert doc["aggregate"]["errors"] == 1 and doc["items"][2]["agent"]["status"] == "matched"


def test_dino_scores_when_a_checkpoint_is_configured(tmp_path: Path, prompt_file: Path) -> None:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    dino = tmp_path / "dino"
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=28, patch_size=14)
    Dinov2Model(config).save_pretrained(dino)
    BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(dino)
    evaluation, _ = make_evaluation(tmp_path, [MATCH], IMGRAG_MODELS_DINO=str(dino))
    doc = evaluation.run(prompt_file, limit=2)
    first, second = doc["items"]
    # Each side's saved picture against the gold one, by the same checkpoint loaded here.
    from imgrag.dino import DinoScorer

    pictures = [Image.open(path).convert("RGB") for path in
                (first["plain"]["image"], first["agent"]["image"], prompt_file.parent / "gold" / "cradle.png")]
    vectors = DinoScorer(str(dino)).embed(pictures)
    assert first["plain"]["dino_gold"] == pytest.approx(cosine(vectors[0], vectors[2]), abs=1e-3)
    assert first["agent"]["dino_gold"] == pytest.approx(cosine(vectors[1], vectors[2]), abs=1e-3)
    assert "dino_gold" not in second["plain"]  # no gold picture, no score
    assert doc["aggregate"]["n_dino_gold"] == 1 and doc["dino"] == str(dino)


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

    from agent.cli import app

    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(UserError, match="bad.jsonl:1: not valid JSON"):
        CliRunner().invoke(app, ["eval", str(bad)], catch_exceptions=False)


def test_every_second_of_an_agent_run_belongs_to_a_named_stage(tmp_path: Path, prompt_file: Path) -> None:
    """An LLM that takes its time choosing each step: its seconds are a stage (plan_llm), and the stages add up
    to the agent's seconds (the rest is the graph's overhead, named too)."""
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
    evaluation.planner = "agent"
    doc = evaluation.run(prompt_file, limit=1)
    agent = doc["items"][0]["agent"]
    stages = agent["seconds_by_tool"]
    assert stages["plan_llm"] >= 0.3  # at least two LLM turns of 0.15 s
    assert {"generate", "critique", "overhead"} <= set(stages)
    assert sum(stages.values()) == pytest.approx(agent["seconds"], abs=0.01)
    agg = doc["aggregate"]
    assert agg["seconds_agent_plan_llm"] == pytest.approx(stages["plan_llm"], abs=1e-3)
    page = (Path(doc["eval_dir"]) / "report.html").read_text()
    assert "agent_plan_llm" in page and "agent_overhead" in page

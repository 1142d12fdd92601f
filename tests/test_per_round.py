"""Several drawings per round: one batched pipeline call on consecutive seeds (each picture the one a single call
with its seed draws), their working memory counted by the model manager, every candidate judged and kept in the
record (trace, result.json, report), and the loop going on from the round's best."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from agent.policy import latest_candidate, next_step
from agent.runner import Runner, open_checkpointer
from imgrag.drawing.draw_options import DrawOptions
from imgrag.errors import UserError
from imgrag.management.engine import batch_extra_gb, build_manager, generator_picture_gb
from imgrag.management.manager import ModelManager
from imgrag.models.generator import Generator
from imgrag.records.provenance import PARAMETERS_KEY, read_provenance
from imgrag.settings import Settings, load_settings
from tests.cli import run_cli
from tests.fakes import FakeEmbedder, FakeGenerator, FakeManager, FakeVerdict, MemoryStore, ScriptedJudge
from tools.records import Candidate, Retrieval


@pytest.fixture(scope="module")
def settings(tiny_kit: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Settings:
    home = tmp_path_factory.mktemp("rounds-home")
    return load_settings("tiny", environ={"IMGRAG_TINY_KIT_DIR": str(tiny_kit["generator"].parent),
                                          "IMGRAG_HOME": str(home)})


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# ----- the batched call -----

def test_a_batch_is_one_pipeline_call_whose_pictures_are_the_single_calls(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = Generator.from_pretrained(settings)
    calls: list[dict[str, Any]] = []
    real = type(generator.pipe).__call__

    def call(this: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(this, *args, **kwargs)

    monkeypatch.setattr(type(generator.pipe), "__call__", call)
    batch = generator.generate_batch("a red fox", seeds=[7, 8, 9], negative_prompt="blurry")
    assert len(calls) == 1 and calls[0]["num_images_per_prompt"] == 3
    assert [g.initial_seed() for g in calls[0]["generator"]] == [7, 8, 9]
    singles = [generator.generate("a red fox", seed=s, negative_prompt="blurry") for s in (7, 8, 9)]
    for one, many in zip(singles, batch, strict=True):
        assert np.abs(_pixels(one) - _pixels(many)).max() <= 1  # the same picture (CPU fp32: exactly)
    assert not np.array_equal(_pixels(batch[0]), _pixels(batch[1]))
    # guided too: the references' embeddings serve every picture of the batch
    red = Image.new("RGB", (40, 40), (200, 30, 30))
    guided = generator.generate_batch("a red fox", seeds=[7, 8], references=[red], ip_scale=1.0)
    assert np.abs(_pixels(guided[1]) - _pixels(generator.generate("a red fox", seed=8, references=[red],
                                                                  ip_scale=1.0))).max() <= 1
    with pytest.raises(UserError, match="a batch draws 1 to 8 pictures"):
        generator.generate_batch("a red fox", seeds=list(range(9)))


def test_the_budget_counts_a_batch_and_refuses_one_that_does_not_fit(settings: Settings) -> None:
    one = generator_picture_gb(settings)
    assert batch_extra_gb(settings, 3) == pytest.approx(2 * one) and batch_extra_gb(settings, 1) == 0
    import dataclasses

    manager = build_manager(dataclasses.replace(settings, gpu_memory_gb=0.0))
    asked: list[tuple[float, bool]] = []
    real = manager.make_room
    manager.make_room = lambda name, gib, working=False: (asked.append((gib, working)), real(name, gib,
                                                                                            working=working))[1]
    manager.run("generator", lambda g: g.generate_batch("a fox", seeds=[1, 2, 3]))
    assert asked == [(pytest.approx(2 * one), True)]
    weights = manager.stats()["generator"]["size_gb"]
    # A budget that holds one drawing but not three: the batch is refused in one line naming the budget.
    tight = build_manager(dataclasses.replace(settings, gpu_memory_gb=weights + 2.5 * one))
    tight.run("generator", lambda g: g.generate("a fox", seed=1))
    with pytest.raises(UserError, match="gpu_memory_gb"):
        tight.run("generator", lambda g: g.generate_batch("a fox", seeds=[1, 2, 3]))


class FakeProbe:
    def __init__(self, peaks: list[float]) -> None:
        self.peaks = list(peaks)

    def start(self) -> None:
        pass

    def working_gb(self) -> float | None:
        return self.peaks.pop(0) if self.peaks else None


class Toy:
    def to(self, device: str) -> Toy:
        return self


def test_a_batchs_extra_pictures_stay_out_of_the_measured_reserve() -> None:
    """The measured peak of a batched call, less what the batch asked for on top, is the one-call reserve: the next
    batch asks for its extra pictures again instead of counting them twice."""
    settings = load_settings("default", environ={}, overrides={"device": "cpu", "gpu_memory_gb": 10.0})
    manager = ModelManager(settings, device="gpu-fake", lock=threading.RLock(), memory_probe=FakeProbe([3.0, 1.2]))
    manager.register("generator", Toy, size_gb=1.0, reserve_gb=1.0)

    def batch(model: Any) -> None:
        manager.make_room("generator", 2.0, working=True)

    manager.run("generator", batch)
    assert manager.stats()["generator"]["reserve_gb"] == pytest.approx(1.0)  # 3.0 measured - 2.0 asked
    manager.run("generator", lambda model: None)
    assert manager.stats()["generator"]["reserve_gb"] == pytest.approx(1.2)


# ----- the loop: every candidate judged, the next round from the best -----

def test_the_policy_judges_each_drawing_of_a_round_then_repairs_the_best() -> None:
    def candidate(cid: str, rnd: int, clip: float, verdict: Any = None) -> Candidate:
        return Candidate.of({"id": cid, "path": f"/x/{cid}.png", "round": rnd, "seed": int(cid[1:]),
                             "clip_score": clip, "verdict": verdict, "reference_ids": []})

    def judged(state: dict[str, Any], cid: str, verdict: dict[str, Any]) -> None:
        state["candidates"][cid] = state["candidates"][cid].replace(verdict=verdict)

    miss = {"match": False, "missing": ["a cradle"], "reason": "", "parsed": True}
    state = {"prompt": "a dog and a cradle", "seed": 10, "rounds": 1, "budget": {"max_rounds": 3},
             "candidates": {"c0": candidate("c0", 1, 0.1, miss), "c1": candidate("c1", 1, 0.3),
                            "c2": candidate("c2", 1, 0.2)}, "references": {}, "retrievals": []}
    assert next_step(state, 0.5, per_round=3) == ("critique", {"candidate_id": "c1"})
    judged(state, "c1", miss)
    assert next_step(state, 0.5, per_round=3) == ("critique", {"candidate_id": "c2"})
    judged(state, "c2", miss)
    assert latest_candidate(state).id == "c1"  # the best CLIP score of the round
    name, args = next_step(state, 0.5, per_round=3)
    assert name == "retrieve" and args["avoid_candidate_id"] == "c1"
    state["retrievals"] = [Retrieval.of({"for": "c1", "queries": ["a cradle"], "reference_ids": []})]
    assert next_step(state, 0.5, per_round=3) == ("generate", {"prompt": "a dog and a cradle", "seed": 13})
    judged(state, "c2", {**miss, "match": True})  # a match wins the round whatever its score
    assert latest_candidate(state).id == "c2" and next_step(state, 0.5, per_round=3)[0] == "finish"


def test_per_round_3_judges_three_candidates_per_round_on_the_tiny_kit(
        settings: Settings, capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGRAG_TINY_KIT_DIR", settings.tiny_kit_dir)
    monkeypatch.setenv("IMGRAG_HOME", str(tmp_path / "home"))
    code, stdout, err = run_cli(capsys, "run", "a dog and a cradle", "--profile", "tiny", "--planner", "fixed",
                                "--per-round", "3", "--max-rounds", "2", "--seed", "4", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["rounds"] == 2 and result["drawing"]["per_round"] == 3
    by_round: dict[int, list[dict[str, Any]]] = {}
    for c in result["candidates"]:
        by_round.setdefault(c["round"], []).append(c)
    assert sorted(by_round) == [1, 2] and all(len(cs) == 3 for cs in by_round.values())
    assert [c["seed"] for c in result["candidates"]] == [4, 5, 6, 7, 8, 9]
    assert all(c["verdict"] is not None for c in result["candidates"])  # every drawing judged
    critiqued = [s["args"]["candidate_id"] for s in result["steps"] if s["tool"] == "critique"]
    assert critiqued == ["c0", "c1", "c2", "c3", "c4", "c5"]
    drawn = [s for s in result["steps"] if s["tool"] in ("generate", "regenerate")]
    assert len(drawn) == 2  # one batched drawing per round
    best_first = max(by_round[1], key=lambda c: c["clip_score"])
    retrieve = next(s for s in result["steps"] if s["tool"] == "retrieve")
    assert retrieve["args"]["avoid_candidate_id"] == best_first["id"]  # the repair starts from the round's best
    trace = [json.loads(line) for line in (Path(result["run_dir"]) / "trace.jsonl").read_text().splitlines()]
    assert [s["candidates"] for s in trace if s.get("tool") == "generate"] == [["c0", "c1", "c2"], ["c3", "c4", "c5"]]
    for c in result["candidates"]:  # every candidate kept, with its place in its round
        assert Path(c["path"]).is_file() and c["batch"]["size"] == 3 and c["batch"]["candidates"]
        doc = read_provenance(c["path"])
        assert doc["batch"] == {"size": 3, "index": c["batch"]["index"]}
        with Image.open(c["path"]) as im:
            assert f"Batch size: 3, Batch pos: {c['batch']['index']}" in im.info[PARAMETERS_KEY]
    code, _, err = run_cli(capsys, "report", result["run_dir"])
    assert code == 0, err
    page = (Path(result["run_dir"]) / "report.html").read_text(encoding="utf-8")
    assert all(f"candidates/{c['id']}.png" in page for c in result["candidates"])
    assert page.count("of 3 this round") == 6 and "<b>sampler</b> Euler" in page


def test_the_agents_tools_take_n(tmp_path: Path) -> None:
    """An LLM's generate with n=2 draws two candidates in one round; n out of range is an error it can act on."""
    from tests.fakes import ScriptedChatModel, call

    settings = load_settings("default", environ={"IMGRAG_HOME": str(tmp_path / "home")})
    generator = FakeGenerator()
    llm = ScriptedChatModel(messages=iter([
        call("generate", prompt="a fox", n=9), call("generate", prompt="a fox", n=2),
        call("critique", candidate_id="c0"), call("critique", candidate_id="c1"),
        call("finish", candidate_id="c1")]))
    (tmp_path / "refs").mkdir()
    manager = FakeManager({"generator": generator, "embedder": FakeEmbedder(), "llm": llm,
                           "judge": ScriptedJudge([FakeVerdict(False, ["x"], ""), FakeVerdict(True, [], "")])})
    runner = Runner(settings, manager=manager, reference_store=MemoryStore(tmp_path / "refs"),
                    checkpointer=open_checkpointer(settings.threads_db))
    result = runner.run("a fox", planner="agent", max_rounds=2, options=DrawOptions())
    steps = result["steps"]
    assert not steps[0]["ok"] and steps[0]["args"]["n"] == 9
    assert steps[1]["ok"] and [c["round"] for c in result["candidates"]] == [1, 1]
    assert [c.get("batch") for c in generator.calls] == [2, 2]
    assert result["status"] == "matched" and result["final_candidate"] == "c1"


def test_a_chat_follow_up_goes_on_from_the_best_of_a_round(tmp_path: Path) -> None:
    """After a round of several, a refinement re-judges the thread's best only (its round-mates stay in the
    record), then repairs it."""
    from agent.chat import ChatSession

    settings = load_settings("default", environ={"IMGRAG_HOME": str(tmp_path / "home")})
    (tmp_path / "refs").mkdir()
    judge = ScriptedJudge([FakeVerdict(False, ["a wooden cradle"], "no cradle")])
    manager = FakeManager({"generator": FakeGenerator(), "judge": judge, "embedder": FakeEmbedder()})
    runner = Runner(settings, manager=manager, reference_store=MemoryStore(tmp_path / "refs"),
                    checkpointer=open_checkpointer(settings.threads_db))
    session = ChatSession(runner, planner="fixed", rounds=1)
    session.set_per_round("3")
    first = session.send("a dog and a cradle")
    assert [c["round"] for c in first["candidates"]] == [1, 1, 1] and judge.calls == 3
    best = first["final_candidate"]
    second = session.send("make the cradle wooden")
    steps = [s for s in second["steps"] if s["tool"] == "critique"][3:]
    assert steps[0]["args"] == {"candidate_id": best}  # the best is judged again against the new prompt
    assert [c["round"] for c in second["candidates"]].count(2) == 3  # the repair round drew three again
    assert all(s["args"]["candidate_id"] not in {"c0", "c1", "c2"} - {best} for s in steps)


def test_omnigen_draws_a_round_of_several_one_after_another(
        settings: Settings, capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGRAG_TINY_KIT_DIR", settings.tiny_kit_dir)
    monkeypatch.setenv("IMGRAG_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("IMGRAG_GENERATION_DRAW_WITH", "omnigen")
    code, stdout, err = run_cli(capsys, "run", "a red fox", "--profile", "tiny", "--planner", "fixed",
                                "--per-round", "2", "--max-rounds", "1", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert [(c["backbone"], c["round"], c["seed"]) for c in result["candidates"]] == [("omnigen", 1, 0),
                                                                                       ("omnigen", 1, 1)]
    assert all(read_provenance(c["path"])["batch"]["size"] == 2 for c in result["candidates"])
    assert [s["tool"] for s in result["steps"]] == ["generate", "critique", "critique"]

"""Retrieve or generate (after TIGeR): a photo of the collection as the run's answer, when allowed.

Scripted verdicts decide; the store is an in-memory one whose text search returns fixed photos."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from agent.chat import ChatSession
from agent.runner import Runner, open_checkpointer
from imgrag.records.run_report import render_run
from imgrag.settings import load_settings
from tests.fakes import (
    FakeEmbedder,
    FakeGenerator,
    FakeManager,
    FakeReference,
    FakeVerdict,
    MemoryStore,
    ScriptedChatModel,
    ScriptedJudge,
    call,
)

MATCH = FakeVerdict(True, [], "all there")
NO_CRADLE = FakeVerdict(False, ["a wooden cradle"], "no cradle")


class PhotoStore(MemoryStore):
    """MemoryStore plus a text search for the whole prompt: every photo, best first, with a high score."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.searches: list[str] = []

    def search_text(self, embedder: Any, text: str, k: int = 5) -> list[FakeReference]:
        self.searches.append(text)
        return [FakeReference(rid, path, 0.99 - 0.01 * n, f"a photo of a {name}", text)
                for n, (rid, path, name) in enumerate(self.refs[:k])]


def settings_for(tmp_path: Path, allow: bool):
    settings = load_settings("default", environ={"IMGRAG_HOME": str(tmp_path / "home")})
    return dataclasses.replace(settings, retrieval=dataclasses.replace(settings.retrieval, allow_retrieved=allow))


def make_runner(tmp_path: Path, verdicts: list, *, allow: bool = True, llm_script: list | None = None):
    models: dict[str, Any] = {"generator": FakeGenerator(), "judge": ScriptedJudge(verdicts),
                              "embedder": FakeEmbedder()}
    if llm_script is not None:
        models["llm"] = ScriptedChatModel(messages=iter(llm_script))
    refs = tmp_path / "refs"
    refs.mkdir(exist_ok=True)
    runner = Runner(settings_for(tmp_path, allow), manager=FakeManager(models), reference_store=PhotoStore(refs),
                    checkpointer=open_checkpointer(tmp_path / "threads.sqlite"))
    return runner, models


def tools_of(result: dict) -> list[str]:
    return [s["tool"] for s in result["steps"]]


def test_a_matching_photo_ends_the_run_without_drawing(tmp_path: Path) -> None:
    runner, models = make_runner(tmp_path, [MATCH])
    result = runner.run("a wooden cradle", planner="fixed", max_rounds=3)
    assert tools_of(result) == ["consider_photos", "critique", "finish"]
    assert models["generator"].calls == []
    assert result["status"] == "matched" and result["rounds"] == 0
    assert result["final_source"] == "retrieved"
    final = next(c for c in result["candidates"] if c["id"] == result["final_candidate"])
    assert final["source"] == "retrieved" and final["path"] == result["final_image"]
    assert Path(result["final_image"]).parent == tmp_path / "refs"  # the photo itself, not a copy
    on_disk = json.loads((Path(result["run_dir"]) / "result.json").read_text())
    assert on_disk["final_source"] == "retrieved"
    trace = [json.loads(line) for line in (Path(result["run_dir"]) / "trace.jsonl").read_text().splitlines()]
    end = next(s for s in trace if s.get("event") == "end")
    assert end["final_source"] == "retrieved" and end["final_image"] == result["final_image"]
    assert any(s.get("tool") == "consider_photos" and s.get("photos") for s in trace)
    page = render_run(result["run_dir"])
    assert "Retrieved from your collection" in page and "a retrieved photo (not drawn)" in page


def test_photos_that_do_not_match_never_end_the_run_and_never_win(tmp_path: Path) -> None:
    # Two photos judged no-match, then every drawing no-match too: the photos' CLIP scores (0.99) beat the
    # drawings', yet the answer is a drawing.
    runner, models = make_runner(tmp_path, [NO_CRADLE])
    result = runner.run("a wooden cradle", planner="fixed", max_rounds=2, seed=1)
    assert tools_of(result)[:3] == ["consider_photos", "critique", "critique"]
    assert tools_of(result)[3] == "generate"
    assert len(models["generator"].calls) == 2 and result["rounds"] == 2
    assert result["status"] == "budget_exhausted" and result["final_source"] == "drawn"
    final = next(c for c in result["candidates"] if c["id"] == result["final_candidate"])
    assert final.get("source") is None and "candidates" in final["path"]
    # The repair retrieves for the drawing's missing concept, never repairs a photo.
    assert runner.reference_store.queries[0] == ["a wooden cradle"]


def test_a_later_drawing_can_still_match_after_the_photos_did_not(tmp_path: Path) -> None:
    runner, models = make_runner(tmp_path, [NO_CRADLE, NO_CRADLE, MATCH])
    result = runner.run("a wooden cradle", planner="fixed", max_rounds=2)
    assert result["status"] == "matched" and result["final_source"] == "drawn"
    assert len(models["generator"].calls) == 1


def test_without_permission_no_photo_is_considered(tmp_path: Path) -> None:
    runner, models = make_runner(tmp_path, [MATCH], allow=False)
    result = runner.run("a wooden cradle", planner="fixed", max_rounds=2)
    assert tools_of(result) == ["generate", "critique"]
    assert runner.reference_store.searches == [] and result["final_source"] == "drawn"


def test_the_agent_llm_may_choose_a_photo(tmp_path: Path) -> None:
    script = [call("consider_photos"), call("critique", candidate_id="c0"),
              call("finish", candidate_id="c0", reason="the photo shows it")]
    runner, models = make_runner(tmp_path, [MATCH], llm_script=script)
    result = runner.run("a wooden cradle", planner="agent", max_rounds=2)
    assert tools_of(result) == ["consider_photos", "critique", "finish"]
    assert result["final_source"] == "retrieved" and result["fallback_steps"] == 0
    assert models["generator"].calls == []


def test_the_agent_llm_is_not_offered_the_tool_without_permission(tmp_path: Path) -> None:
    script = [call("consider_photos")] * 3
    runner, _ = make_runner(tmp_path, [MATCH], allow=False, llm_script=script)
    result = runner.run("a wooden cradle", planner="agent", max_rounds=1)
    assert "consider_photos" not in tools_of(result)  # refused as an unknown tool; the policy drew instead
    assert result["final_source"] == "drawn" and result["fallback_steps"] >= 1


def test_chat_use_photo_n_as_the_answer(tmp_path: Path) -> None:
    runner, models = make_runner(tmp_path, [NO_CRADLE], allow=False)
    session = ChatSession(runner, planner="fixed", rounds=2)
    first = session.send("a retriever and a cradle")
    assert first["status"] == "budget_exhausted" and first["references"]
    result = session.send("use photo 1 as the answer")
    ref_id, ref = next(iter(first["references"].items()))
    assert result["status"] == "chosen" and result["final_source"] == "retrieved"
    assert result["final_image"] == ref["path"]
    final = next(c for c in result["candidates"] if c["id"] == result["final_candidate"])
    assert final["reference_id"] == ref_id and final["chosen_by"] == "user"
    assert json.loads((Path(result["run_dir"]) / "result.json").read_text())["final_source"] == "retrieved"
    # The thread goes on from there: a follow-up is a new request.
    assert session.values()["final_candidate"] == final["id"]
    with pytest.raises(Exception, match="no reference 9"):
        session.send("use photo 9 as the answer")


def test_use_photo_phrases() -> None:
    from agent.chat.photos import parse_use_photo

    assert parse_use_photo("use photo 2 as the answer") == "2"
    assert parse_use_photo("Please use reference #3 as my answer.") == "3"
    assert parse_use_photo("use the photo c4 as answer") == "c4"
    assert parse_use_photo("make the photo warmer") is None


def test_photo_candidate_image_is_the_file(tmp_path: Path) -> None:
    runner, _ = make_runner(tmp_path, [MATCH])
    result = runner.run("a wooden cradle", planner="fixed", max_rounds=1)
    with Image.open(result["final_image"]) as im:
        assert im.size == (8, 8)


def test_allow_retrieved_flag_reaches_a_real_run(tiny_settings, tmp_path: Path, capsys) -> None:
    import numpy as np

    from tests.cli import run_cli

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    code, _, err = run_cli(capsys, "index", str(folder), "--profile", "tiny", "--json")
    assert code == 0, err
    code, out, err = run_cli(capsys, "run", "a red kettle", "--profile", "tiny", "--planner", "fixed",
                             "--max-rounds", "1", "--allow-retrieved", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["steps"][0]["tool"] == "consider_photos"
    photos = [c for c in result["candidates"] if c.get("source") == "retrieved"]
    assert len(photos) == 2 and all(Path(c["path"]).parent == folder for c in photos)
    if result["final_source"] == "retrieved":  # only a photo the (junk) judge matched may be the answer
        assert next(c for c in photos if c["id"] == result["final_candidate"])["verdict"]["match"]

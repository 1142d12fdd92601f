"""Concept memory and references given per prompt, through the real runner with a scripted judge: a matched
guided run is remembered, the next prompt naming the concept starts guided, a demoted memory is not used."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from agent.chat.followups import parse_followup, steer_records
from agent.llm_view import status_summary
from agent.runner import Runner, open_checkpointer
from imgrag.errors import UserError
from imgrag.settings import load_settings
from imgrag.store.memory import ConceptMemory, names_concept
from tests.cli import run_cli
from tests.fakes import FakeEmbedder, FakeGenerator, FakeManager, FakeVerdict, MemoryStore, ScriptedJudge
from tools.records import from_state

NO_CRADLE = FakeVerdict(False, ["a wooden cradle"], "no cradle")
MATCH = FakeVerdict(True, [], "all there")


def _settings(**overrides):
    return load_settings("default", environ={"IMGRAG_HOME": os.environ["IMGRAG_HOME"]}, overrides=overrides)


def _runner(settings, tmp_path: Path, verdicts, generator=None) -> Runner:
    models = {"generator": generator or FakeGenerator(), "judge": ScriptedJudge(verdicts), "embedder": FakeEmbedder()}
    refs = tmp_path / "refs"
    refs.mkdir(exist_ok=True)
    return Runner(settings, manager=FakeManager(models), reference_store=MemoryStore(refs),
                  checkpointer=open_checkpointer(tmp_path / "threads.sqlite"))


def _tools(result: dict) -> list[str]:
    return [s["tool"] for s in result["steps"]]


def _trace(result: dict) -> list[dict]:
    return [json.loads(line) for line in (Path(result["run_dir"]) / "trace.jsonl").read_text().splitlines()]


def test_memory_makes_the_next_run_start_guided_and_a_demoted_one_is_not_used(tmp_path: Path, capsys) -> None:
    settings = _settings()
    first = _runner(settings, tmp_path, [NO_CRADLE, MATCH]).run("a retriever and a cradle", planner="fixed",
                                                                  max_rounds=3)
    assert first["status"] == "matched" and _tools(first)[:3] == ["generate", "critique", "retrieve"]
    assert any(s.get("event") == "memory_update" and s["remembered"] for s in _trace(first))
    memory = ConceptMemory.for_settings(settings)
    [entry] = memory.entries()
    assert entry.concept == "a wooden cradle" and entry.references[0].path.endswith("cradle.png")

    # A prompt naming the concept: round 1 is drawn with the remembered reference, and matches in one round.
    generator = FakeGenerator()
    second = _runner(settings, tmp_path, [MATCH], generator).run("a wooden cradle by the window", planner="fixed")
    assert _tools(second) == ["regenerate", "critique"] and second["rounds"] == 1
    assert generator.calls[0]["references"] == 1
    assert second["candidates"][0]["guided_by"] == ["memory"]
    trace = _trace(second)
    assert any(s.get("event") == "memory" and s["concepts"] == ["a wooden cradle"] for s in trace)
    assert [s.get("guided_by") for s in trace if s.get("tool") == "regenerate"] == [["memory"]]
    from imgrag.records.run_report import render_run

    assert "concept memory" in render_run(second["run_dir"]) and "(remembered)" in render_run(second["run_dir"])
    assert memory.entries()[0].references[0].matches == 2

    # --no-memory (retrieval.memory = false): neither used nor updated.
    off = _runner(_settings(retrieval={"memory": False}), tmp_path, [MATCH]).run("a wooden cradle", planner="fixed")
    assert _tools(off) == ["generate", "critique"]

    # The judge naming a remembered concept: the repair's retrieval brings the remembered reference too.
    third = _runner(settings, tmp_path, [NO_CRADLE, MATCH]).run("a retriever and a cradle", planner="fixed",
                                                                  max_rounds=3)
    [retrieved] = [s for s in _trace(third) if s.get("tool") == "retrieve"]
    assert retrieved["remembered"] and retrieved["remembered"][0] in third["candidates"][1]["reference_ids"]

    # As many mismatches as matches demote it; a demoted memory guides nothing.
    matches = memory.entries()[0].references[0].matches
    assert matches == 3
    for _ in range(matches):
        miss = _runner(settings, tmp_path, [NO_CRADLE]).run("a wooden cradle", planner="fixed", max_rounds=1)
        assert _tools(miss)[0] == "regenerate"
    assert memory.entries()[0].references[0].demoted
    after = _runner(settings, tmp_path, [MATCH]).run("a wooden cradle", planner="fixed")
    assert _tools(after) == ["generate", "critique"]

    code, out, err = run_cli(capsys, "memory", "list", "--json")
    assert code == 0, err
    listed = json.loads(out)["concepts"]
    assert listed[0]["concept"] == "a wooden cradle" and listed[0]["references"][0]["demoted"] is True
    code, out, err = run_cli(capsys, "memory", "forget", "A wooden cradle")
    assert code == 0, err
    assert memory.entries() == []
    code, _, err = run_cli(capsys, "memory", "forget", "a kettle")
    assert code == 1 and "no remembered concept" in err and "Traceback" not in err


def test_a_remembered_reference_below_the_threshold_is_not_used(tmp_path: Path) -> None:
    settings = _settings(retrieval={"memory_min_score": 0.99})  # the fake CLIP scores about 0.8-0.96
    _runner(settings, tmp_path, [NO_CRADLE, MATCH]).run("a retriever and a cradle", planner="fixed", max_rounds=3)
    again = _runner(settings, tmp_path, [MATCH]).run("a wooden cradle", planner="fixed")
    assert _tools(again)[0] == "generate"
    [event] = [s for s in _trace(again) if s.get("event") == "memory"]
    assert event["reference_ids"] == [] and event["considered"][0]["skipped"].startswith("below")


def test_batch_lines_carry_references_with_weights(tmp_path: Path) -> None:
    settings = _settings()
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (12, 12), (200, 20, 20)).save(photos / "kettle.png")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red kettle", "references": [
        {"path": "photos/kettle.png", "weight": 0.6, "mode": "style"}]}) + "\n" +
        json.dumps({"prompt": "a plain heron"}) + "\n", encoding="utf-8")
    generator = FakeGenerator()
    runner = _runner(settings, tmp_path, [MATCH], generator)
    summary = runner.batch(prompts, planner="fixed")
    assert [i["status"] for i in summary["items"]] == ["matched", "matched"], summary["items"]
    first, second = (json.loads((Path(summary["batch_dir"]).parent / i["run_id"] / "result.json").read_text())
                     for i in summary["items"])
    assert _tools(first) == ["regenerate", "critique"] and _tools(second) == ["generate", "critique"]
    [candidate] = first["candidates"]
    rid = candidate["reference_ids"][0]
    assert candidate["reference_weights"] == {rid: 0.6} and candidate["reference_modes"] == {rid: "style"}
    assert first["steps"][0]["args"]["weights"] == [0.6] and first["start_guidance"]["source"] == "user"
    assert first["references"][rid]["path"] == str((photos / "kettle.png").resolve())
    from imgrag.records.run_report import render_run

    page = render_run(first["run_dir"])  # the report says how each reference steered
    assert "weight 0.60, style" in page and "(yours)" in page


def test_bad_batch_references_are_named_line_by_line_before_any_run(tmp_path: Path) -> None:
    photos = tmp_path / "private"
    photos.mkdir()
    Image.new("RGB", (8, 8)).save(photos / "me.png")
    settings = _settings(safety={"exclude": [str(photos)]})
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text("\n".join(json.dumps(line) for line in (
        {"prompt": "fine"},
        {"prompt": "a", "references": [{"path": "missing.png"}]},
        {"prompt": "b", "references": [{"path": str(photos / "me.png")}]},
        {"prompt": "c", "references": [{"path": str(photos / "me.png"), "weight": 5}]},
    )) + "\n", encoding="utf-8")
    generator = FakeGenerator()
    with pytest.raises(UserError) as caught:
        _runner(settings, tmp_path, [MATCH], generator).batch(prompts, planner="fixed")
    message = str(caught.value)
    assert f"{prompts}:2:" in message and "missing.png" in message
    assert f"{prompts}:3:" in message and "safety.exclude" in message
    assert f"{prompts}:4:" in message
    assert [line.split(": ", 1)[0] for line in message.split("\n")[1:]] == [f"{prompts}:{n}" for n in (2, 3, 4)]
    assert generator.calls == []


def test_the_agent_sees_the_start_guidance_and_the_chat_reads_steering() -> None:
    state = {"budget": {"max_rounds": 3, "max_tool_calls": 20}, "candidates": {},
             "references": {"mem-1": {"path": "/x/mem-1.png", "query": "a wooden cradle"}},
             "start_guidance": {"reference_ids": ["mem-1"], "concepts": ["a wooden cradle"], "source": "memory"}}
    assert "Start guided: regenerate with references ['mem-1'] for a wooden cradle (concept memory" \
        in status_summary(from_state(state))
    followup = parse_followup("use the second reference more strongly and make it blue")
    assert followup.steer == {2: {"factor": 1.5}} and followup.refinement == "make it blue"
    assert parse_followup("use the first reference for its style only").steer == {1: {"mode": "style"}}
    assert parse_followup("use reference 3 at weight 0.4").steer == {3: {"weight": 0.4}}
    refs = {"a": {"weight": 1.0}, "b": {"weight": 1.6}}
    changed = steer_records({2: {"factor": 1.5}}, refs, lambda n: list(refs)[int(n) - 1])
    assert changed == {"b": {"weight": 2.0}}  # capped at 2
    assert names_concept("A wooden Cradle by the window", "a wooden cradle")
    assert not names_concept("a wooden chair", "a wooden cradle")


def test_the_chat_steers_a_reference_for_the_next_drawings(tmp_path: Path) -> None:
    from agent.chat.session import ChatSession

    settings = _settings(retrieval={"memory": False})
    runner = _runner(settings, tmp_path, [FakeVerdict(False, ["a wooden cradle", "a retriever"], "neither")])
    session = ChatSession(runner, rounds=2, planner="fixed")
    first = session.send("a retriever and a cradle")
    assert first["candidates"][-1]["reference_ids"] == ["ref-cradle", "ref-retriever"]
    result = session.send("use the second reference more strongly")
    assert result["prompt"] == "a retriever and a cradle"  # a directive, not a change of the picture
    later = result["candidates"][2:]
    assert later and all(c["reference_ids"] == ["ref-retriever"] for c in later)
    assert all(c["reference_weights"] == {"ref-retriever": 1.5} for c in later)
    assert session.values()["references"]["ref-retriever"].weight == 1.5


def test_a_run_restarted_from_its_trace_keeps_its_references(tmp_path: Path) -> None:
    from imgrag.records.runs import RunRecord

    settings = _settings()
    picture = tmp_path / "kettle.png"
    Image.new("RGB", (12, 12), (200, 20, 20)).save(picture)
    record = RunRecord(Path(settings.output_dir) / "killed-early")  # killed before its first checkpoint
    record.append_step({"event": "start", "prompt": "a red kettle", "planner": "fixed", "seed": 0,
                        "budget": {"max_rounds": 2, "max_tool_calls": 20, "max_seconds": 600.0},
                        "references": [{"path": str(picture), "weight": 0.7, "mode": "content"}]})
    result = _runner(settings, tmp_path, [MATCH]).resume("killed-early")
    assert _tools(result) == ["regenerate", "critique"]
    assert list(result["candidates"][0]["reference_weights"].values()) == [0.7]

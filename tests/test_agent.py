"""The agent's decisions, driven by a scripted LLM and a scripted judge (no model is loaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage

from agent.runner import Runner, open_checkpointer
from imgrag.settings import load_settings
from tests.fakes import (
    FakeEmbedder,
    FakeGenerator,
    FakeManager,
    FakeVerdict,
    MemoryStore,
    ScriptedChatModel,
    ScriptedJudge,
    call,
)

NO_CRADLE = FakeVerdict(False, ["a wooden cradle"], "no cradle")
MATCH = FakeVerdict(True, [], "all there")


@pytest.fixture
def settings(tmp_path: Path):
    return load_settings("default", environ={"IMGRAG_HOME": str(tmp_path / "home")})


def make_runner(settings, tmp_path: Path, verdicts, llm_script=None, generator=None):
    models = {"generator": generator or FakeGenerator(), "judge": ScriptedJudge(verdicts), "embedder": FakeEmbedder()}
    if llm_script is not None:
        models["llm"] = ScriptedChatModel(messages=iter(llm_script))
    refs = tmp_path / "refs"
    refs.mkdir(exist_ok=True)
    runner = Runner(settings, manager=FakeManager(models), reference_store=MemoryStore(refs),
                    checkpointer=open_checkpointer(tmp_path / "threads.sqlite"))
    return runner, models


def tools_of(result: dict) -> list[str]:
    return [s["tool"] for s in result["steps"]]


def test_match_in_round_one_ends_the_run(settings, tmp_path: Path) -> None:
    runner, _ = make_runner(settings, tmp_path, [MATCH])
    result = runner.run("a beautiful retriever and a cradle", planner="fixed", max_rounds=3)
    assert result["status"] == "matched"
    assert result["rounds"] == 1
    assert tools_of(result) == ["generate", "critique"]
    assert Path(result["final_image"]).exists()
    on_disk = json.loads((Path(result["run_dir"]) / "result.json").read_text())
    assert on_disk["status"] == "matched" and on_disk["run_id"] == result["run_id"]


def test_match_in_round_three_goes_through_repair(settings, tmp_path: Path) -> None:
    runner, models = make_runner(settings, tmp_path, [NO_CRADLE, NO_CRADLE, MATCH])
    result = runner.run("a retriever and a cradle", planner="fixed", max_rounds=3, seed=5)
    assert result["status"] == "matched"
    assert result["rounds"] == 3
    assert tools_of(result) == ["generate", "critique", "retrieve", "regenerate", "critique",
                                "retrieve", "regenerate", "critique"]
    calls = models["generator"].calls
    assert [c["references"] for c in calls] == [0, 1, 1]
    assert calls[2]["ip_scale"] > calls[1]["ip_scale"]  # a concept still missing pushes the references harder
    assert len({c["seed"] for c in calls}) == 3  # a new seed each round
    assert runner.reference_store.queries[0] == ["a wooden cradle"]
    assert result["final_candidate"] == "c2"


def test_never_a_match_returns_the_best_candidate(settings, tmp_path: Path) -> None:
    runner, _ = make_runner(settings, tmp_path, [NO_CRADLE])
    result = runner.run("a retriever and a cradle", planner="fixed", max_rounds=3, seed=1)
    assert result["status"] == "budget_exhausted"
    assert result["rounds"] == 3
    scores = {c["id"]: c["clip_score"] for c in result["candidates"]}
    assert result["final_candidate"] == max(scores, key=scores.get)
    assert result["stop_reason"] == "round budget spent"


def test_unparseable_verdict_retrieves_with_the_prompt(settings, tmp_path: Path) -> None:
    junk = FakeVerdict(False, [], "", raw="qwxz", parsed=False)
    runner, _ = make_runner(settings, tmp_path, [junk, MATCH])
    result = runner.run("a rocket on a pad", planner="fixed", max_rounds=2)
    assert runner.reference_store.queries[0] == ["a rocket on a pad"]
    assert result["status"] == "matched"


def test_llm_drives_the_loop(settings, tmp_path: Path) -> None:
    script = [
        call("generate", prompt="a retriever and a cradle", seed=3),
        call("critique", candidate_id="c0"),
        call("retrieve", queries=["a wooden baby cradle"], avoid_candidate_id="c0"),
        call("regenerate", prompt="a retriever and a cradle", reference_ids=["ref-cradle"], ip_scale=0.6),
        call("critique", candidate_id="c1"),
    ]
    runner, models = make_runner(settings, tmp_path, [NO_CRADLE, MATCH], llm_script=script)
    result = runner.run("a retriever and a cradle", planner="agent", max_rounds=3)
    assert result["status"] == "matched"
    assert result["fallback_steps"] == 0
    assert models["generator"].calls[1] == {"prompt": "a retriever and a cradle", "seed": 0, "references": 1,
                                             "ip_scale": 0.6}


def test_llm_mistakes_are_recovered(settings, tmp_path: Path) -> None:
    settings.budget.max_llm_failures = 3  # enough patience to see every kind of mistake answered
    malformed = AIMessage(content="<tool_call>{oops", invalid_tool_calls=[
        {"name": None, "args": "{oops", "id": "x", "error": "not JSON", "type": "invalid_tool_call"}])
    script = [
        malformed,  # malformed tool call: goes back to the LLM as an error
        call("generate", prompt="a retriever and a cradle"),
        call("paint", canvas="big"),  # unknown tool
        call("critique", candidate_id="c7"),  # hallucinated candidate id: the tool answers with an error
        call("critique", candidate_id="c0"),
        call("regenerate", prompt="x", reference_ids=["ref-made-up"]),  # hallucinated reference id
        call("retrieve", queries=["a cradle"]),
        call("regenerate", prompt="a retriever and a cradle", reference_ids=["ref-cradle"]),
        call("critique", candidate_id="c1"),
    ]
    runner, _ = make_runner(settings, tmp_path, [NO_CRADLE, MATCH], llm_script=script)
    result = runner.run("a retriever and a cradle", planner="agent", max_rounds=3)
    assert result["status"] == "matched"
    failed = [s for s in result["steps"] if not s["ok"]]
    assert [s["tool"] for s in failed] == ["critique", "regenerate"]
    trace = [json.loads(line) for line in (Path(result["run_dir"]) / "trace.jsonl").read_text().splitlines()]
    errors = [t["error"] for t in trace if t.get("planner") == "llm" and not t["ok"]]
    assert any("malformed" in e for e in errors) and any("unknown tool 'paint'" in e for e in errors)


def test_fallback_policy_takes_over_a_useless_llm(settings, tmp_path: Path) -> None:
    chatter = [AIMessage(content="I think the picture is lovely.") for _ in range(40)]
    runner, _ = make_runner(settings, tmp_path, [NO_CRADLE, MATCH], llm_script=chatter)
    result = runner.run("a retriever and a cradle", planner="agent", max_rounds=3)
    assert result["status"] == "matched"
    assert result["fallback_steps"] >= 5
    assert tools_of(result) == ["generate", "critique", "retrieve", "regenerate", "critique"]


def test_budget_of_tool_calls_stops_a_looping_llm(settings, tmp_path: Path) -> None:
    settings.budget.max_tool_calls = 4
    loop = [call("critique", candidate_id="c9") for _ in range(20)]
    runner, _ = make_runner(settings, tmp_path, [NO_CRADLE], llm_script=loop)
    result = runner.run("a cradle", planner="agent", max_rounds=3)
    assert len(result["steps"]) <= 4
    assert result["stop_reason"] == "tool-call budget spent"


class CrashingGenerator(FakeGenerator):
    """Works once, then dies like a killed process would in the middle of the second drawing."""

    def generate(self, *args, **kwargs):
        if len(self.calls) == 1:
            raise KeyboardInterrupt
        return super().generate(*args, **kwargs)


def test_resume_after_a_crash_skips_finished_steps(settings, tmp_path: Path) -> None:
    runner, _ = make_runner(settings, tmp_path, [NO_CRADLE, MATCH], generator=CrashingGenerator())
    with pytest.raises(KeyboardInterrupt):
        runner.run("a retriever and a cradle", planner="fixed", max_rounds=3, run_id="crashy")
    # A new process: fresh models, the same checkpoint database.
    runner2, models2 = make_runner(settings, tmp_path, [MATCH])
    result = runner2.resume("crashy")
    assert result["status"] == "matched"
    assert len(models2["generator"].calls) == 1  # only the drawing in flight is redone
    assert models2["judge"].calls == 1  # c0's verdict came from the checkpoint
    assert tools_of(result) == ["generate", "critique", "retrieve", "regenerate", "critique"]


def test_bad_run_arguments_are_user_errors(settings, tmp_path: Path) -> None:
    from imgrag.errors import UserError

    runner, _ = make_runner(settings, tmp_path, [MATCH])
    with pytest.raises(UserError, match="empty"):
        runner.run("   ")
    with pytest.raises(UserError, match="planner"):
        runner.run("x", planner="magic")
    with pytest.raises(UserError, match="no run"):
        runner.resume("never-was")


def test_an_llm_server_gone_away_is_a_failed_turn_and_the_policy_finishes(settings, tmp_path: Path) -> None:
    """The openai backend's connection errors (a vLLM or Ollama server that went away) never end the run."""
    import httpx

    class GoneAway(ScriptedChatModel):
        def invoke(self, *args, **kwargs):
            raise httpx.ConnectError("Connection refused")

    runner, models = make_runner(settings, tmp_path, [NO_CRADLE, MATCH], llm_script=[])
    models["llm"] = GoneAway(messages=iter([]))
    result = runner.run("a beautiful retriever and a cradle", planner="agent", max_rounds=2)
    assert result["status"] == "matched"
    assert result["fallback_steps"] >= 1
    trace = [json.loads(line) for line in (Path(result["run_dir"]) / "trace.jsonl").read_text().splitlines()]
    failed = [s for s in trace if s.get("planner") == "llm" and not s["ok"]]
    assert failed and "ConnectError" in failed[0]["error"]


def test_one_compiled_graph_serves_every_run_of_a_runner_with_its_own_context(settings, tmp_path: Path,
                                                                              monkeypatch) -> None:
    """The graph is compiled once per runner; each run brings its own context (record, clock), so two runs
    with the same graph keep their own files and budgets, and threads are read without another graph."""
    import agent.runner as runner_module
    from agent.chat import thread_ids

    built = []
    real = runner_module.build_graph
    monkeypatch.setattr(runner_module, "build_graph", lambda *a, **k: built.append(1) or real(*a, **k))
    runner, _ = make_runner(settings, tmp_path, [NO_CRADLE, MATCH, MATCH])
    graph = runner.graph()
    first = runner.run("a cradle", planner="fixed", max_rounds=2, run_id="first")
    second = runner.run("a retriever", planner="fixed", max_rounds=1, run_id="second")
    assert len(built) == 1 and runner.graph() is graph
    assert first["rounds"] == 2 and second["rounds"] == 1 and first["run_dir"] != second["run_dir"]
    assert tools_of(second) == ["generate", "critique"]  # its own record: none of the first run's steps
    assert thread_ids(runner.checkpointer) == ["second", "first"]  # newest first, through the checkpointer's API

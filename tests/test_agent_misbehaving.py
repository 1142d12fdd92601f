"""The agent under real model behaviour: an LLM that calls several tools per turn, picks out-of-range seeds,
drafts calls in a reasoning block, a judge that says "yes, but...", tools that fail, a store that is down.

The graph, the tools and the runner are the real ones; models are scripted (tests/fakes.py), and where the LLM's
reply is text it goes through the real QwenChatModel (the tiny kit's tokenizer and chat template)."""

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
    scripted_qwen,
)

NO_CRADLE = FakeVerdict(False, ["a wooden cradle"], "no cradle")
MATCH = FakeVerdict(True, [], "all there")


@pytest.fixture
def settings(tmp_path: Path):
    return load_settings("default", environ={"IMGRAG_HOME": str(tmp_path / "home")})


def turn(*calls: tuple[str, dict]) -> AIMessage:
    """One LLM turn holding several tool calls."""
    return AIMessage(content="", tool_calls=[{"name": name, "args": args, "id": f"call-{i}-{name}"}
                                             for i, (name, args) in enumerate(calls)])


def make_runner(settings, tmp_path: Path, verdicts, llm=None, generator=None, store=None, embedder=None):
    models = {"generator": generator or FakeGenerator(), "judge": ScriptedJudge(verdicts),
              "embedder": embedder or FakeEmbedder()}
    if llm is not None:
        models["llm"] = llm if not isinstance(llm, list) else ScriptedChatModel(messages=iter(llm))
    if store is None:
        refs = tmp_path / "refs"
        refs.mkdir(exist_ok=True)
        store = MemoryStore(refs)
    manager = FakeManager(models)
    runner = Runner(settings, manager=manager, reference_store=store or None,
                    checkpointer=open_checkpointer(tmp_path / "threads.sqlite"))
    return runner, models


def trace_of(result: dict) -> list[dict]:
    return [json.loads(line) for line in (Path(result["run_dir"]) / "trace.jsonl").read_text().splitlines()]


def on_disk(result: dict) -> dict:
    return json.loads((Path(result["run_dir"]) / "result.json").read_text())


# ----- 1. budgets are claims -----

def test_three_generates_in_one_turn_draw_no_more_than_the_rounds(settings, tmp_path: Path) -> None:
    three = turn(*[("generate", {"prompt": "a kite", "seed": s}) for s in (1, 2, 3)])
    runner, models = make_runner(settings, tmp_path, [NO_CRADLE], llm=[three] + [AIMessage("done")] * 10)
    result = runner.run("a kite", planner="agent", max_rounds=1)
    assert len(models["generator"].calls) == 1
    assert result["rounds"] == 1 and len(result["candidates"]) == 1
    refused = [t for t in trace_of(result) if t.get("refused")]
    assert len(refused) == 2 and all("drawing budget is spent" in t["message"] for t in refused)
    assert on_disk(result)["status"] == "budget_exhausted"


def test_thirty_critiques_in_one_turn_stay_within_the_tool_call_budget(settings, tmp_path: Path) -> None:
    settings.budget.max_tool_calls = 4
    first = turn(("generate", {"prompt": "a cradle", "seed": 0}))
    thirty = turn(*[("critique", {"candidate_id": "c0"})] * 30)
    runner, models = make_runner(settings, tmp_path, [NO_CRADLE], llm=[first, thirty] + [AIMessage("x")] * 10)
    result = runner.run("a cradle", planner="agent", max_rounds=3)
    assert models["judge"].calls == 3  # 4 calls in all, one of them the drawing
    assert sum(1 for s in result["steps"] if s["ok"]) == 4
    assert result["stop_reason"] == "tool-call budget spent"


def test_two_drawings_in_one_turn_get_distinct_rounds(settings, tmp_path: Path) -> None:
    two = turn(("generate", {"prompt": "a kite", "seed": 1}), ("generate", {"prompt": "a kite", "seed": 2}))
    runner, _ = make_runner(settings, tmp_path, [MATCH], llm=[two] + [AIMessage("x")] * 10)
    result = runner.run("a kite", planner="agent", max_rounds=3)
    assert sorted(c["round"] for c in result["candidates"][:2]) == [1, 2]


# ----- 2. no tool error ends a run -----

class FailingGenerator(FakeGenerator):
    """Raises ``error`` on the drawings numbered in ``when`` (0-based), draws otherwise."""

    def __init__(self, error: BaseException, when: set[int]) -> None:
        super().__init__()
        self.error, self.when, self.tries = error, when, 0

    def generate(self, *args, **kwargs):
        self.tries += 1
        if self.tries - 1 in self.when:
            raise self.error
        return super().generate(*args, **kwargs)


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: an illegal memory access"),
                                   MemoryError("out of memory"), OSError(5, "Input/output error"),
                                   ValueError("a bad argument the schema allowed")],
                         ids=["model-error", "oom", "io-error", "value-error"])
def test_a_failing_drawing_becomes_an_error_message(settings, tmp_path: Path, error: BaseException) -> None:
    runner, models = make_runner(settings, tmp_path, [NO_CRADLE], generator=FailingGenerator(error, {1}))
    result = runner.run("a retriever and a cradle", planner="fixed", max_rounds=3)
    assert on_disk(result)["status"] == "budget_exhausted"
    assert result["final_candidate"] is not None and Path(result["final_image"]).exists()
    failed = [t for t in trace_of(result) if t.get("tool") == "regenerate" and not t.get("ok", True)]
    assert len(failed) == 1 and type(error).__name__ in failed[0]["message"] and "exception" in failed[0]
    # The failed guided drawing of c0 is not repeated: the policy draws without references instead.
    tools = [s["tool"] for s in result["steps"]]
    assert tools[:5] == ["generate", "critique", "retrieve", "regenerate", "generate"]


def test_nothing_drawn_ends_failed_with_a_result(settings, tmp_path: Path) -> None:
    runner, _ = make_runner(settings, tmp_path, [MATCH], generator=FailingGenerator(RuntimeError("boom"), {0, 1, 2}))
    result = runner.run("a kite", planner="fixed", max_rounds=3)
    assert on_disk(result)["status"] == "failed" and result["final_image"] is None
    assert [s["tool"] for s in result["steps"]] == ["generate"]  # tried once, not until the budget is gone
    assert "generate failed" in result["stop_reason"] and "boom" in result["stop_reason"]


def test_out_of_range_seed_from_the_llm_is_an_error_message(settings, tmp_path: Path) -> None:
    script = [turn(("generate", {"prompt": "a kite", "seed": 2**70})),
              turn(("generate", {"prompt": "a kite", "seed": -1})),
              turn(("generate", {"prompt": "a kite", "seed": 7})),
              turn(("critique", {"candidate_id": "c0"}))]
    runner, models = make_runner(settings, tmp_path, [MATCH], llm=script)
    settings.budget.max_llm_failures = 3
    result = runner.run("a kite", planner="agent", max_rounds=2)
    assert on_disk(result)["status"] == "matched"
    messages = [t["message"] for t in trace_of(result) if t.get("tool") == "generate" and not t["ok"]]
    assert len(messages) == 2 and all("torch's seed range" in m for m in messages)
    assert [c["seed"] for c in models["generator"].calls] == [7]


def test_a_vanished_candidate_file_is_an_error_message(settings, tmp_path: Path) -> None:
    script = [turn(("generate", {"prompt": "a kite", "seed": 1})), turn(("critique", {"candidate_id": "c0"}))]
    runner, _ = make_runner(settings, tmp_path, [MATCH], llm=script)
    # Delete c0 as soon as it is drawn: critique then fails to open it.
    from imgrag.records.runs import RunRecord

    real_save = RunRecord.save_candidate

    def save_then_delete(self, candidate_id, image, *more):
        path = real_save(self, candidate_id, image, *more)
        if candidate_id == "c0":
            path.unlink()
        return path

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RunRecord, "save_candidate", save_then_delete)
        result = runner.run("a kite", planner="agent", max_rounds=1)
    critique = [t for t in trace_of(result) if t.get("tool") == "critique" and "args" in t]
    assert critique and not critique[0]["ok"] and "c0.png" in critique[0]["message"]
    assert (Path(result["run_dir"]) / "result.json").exists()


def test_an_llm_that_raises_hands_over_to_the_policy_once(settings, tmp_path: Path) -> None:
    class DownLLM(ScriptedChatModel):
        def invoke(self, *args, **kwargs):
            raise ConnectionError("Connection refused")

    runner, _ = make_runner(settings, tmp_path, [NO_CRADLE, MATCH], llm=DownLLM(messages=iter([])))
    events: list[dict] = []
    runner.on_event = events.append
    result = runner.run("a retriever and a cradle", planner="agent", max_rounds=3)
    assert result["status"] == "matched"
    llm_steps = [t for t in trace_of(result) if t.get("planner") == "llm"]
    assert len(llm_steps) == 1 and "Connection refused" in llm_steps[0]["error"]
    assert sum(1 for e in events if e["event"] == "note") == 1


def test_a_crash_inside_the_graph_still_writes_the_result(settings, tmp_path: Path) -> None:
    import agent.nodes as graph

    runner, _ = make_runner(settings, tmp_path, [NO_CRADLE])
    with pytest.MonkeyPatch.context() as mp:
        real = graph.next_step
        calls = {"n": 0}

        def flaky(state, *args):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("a bug in the planner")
            return real(state, *args)

        mp.setattr(graph, "next_step", flaky)
        result = runner.run("a cradle", planner="fixed", max_rounds=3)
    assert on_disk(result)["status"] == "budget_exhausted"
    assert result["final_candidate"] == "c0" and "a bug in the planner" in result["stop_reason"]


# ----- 3. no blind repeats -----

def test_unreachable_store_is_said_once_and_the_run_draws_without(settings, tmp_path: Path) -> None:
    settings.store = "http://127.0.0.1:9"
    runner, models = make_runner(settings, tmp_path, [NO_CRADLE], store=False)
    events: list[dict] = []
    runner.on_event = events.append
    result = runner.run("a retriever and a cradle", planner="fixed", max_rounds=3)
    assert result["status"] == "budget_exhausted" and result["rounds"] == 3
    tools = [s["tool"] for s in result["steps"]]
    assert "retrieve" not in tools
    assert tools == ["generate", "critique"] * 3
    notes = [e for e in events if e["event"] == "note"]
    assert len(notes) == 1 and "127.0.0.1:9" in notes[0]["text"]
    assert [t for t in trace_of(result) if t.get("event") == "retrieval_off"]


def test_a_store_built_by_another_embedder_is_said_once(settings, tmp_path: Path) -> None:
    class OtherStore(MemoryStore):
        def count(self) -> int:
            from imgrag.errors import UserError

            raise UserError("the store at X was built with another embedder")

    refs = tmp_path / "refs"
    refs.mkdir()
    runner, _ = make_runner(settings, tmp_path, [NO_CRADLE], store=OtherStore(refs))
    result = runner.run("a cradle", planner="fixed", max_rounds=2)
    assert "retrieve" not in [s["tool"] for s in result["steps"]] and result["rounds"] == 2


def test_a_retrieval_that_fails_mid_run_is_not_repeated(settings, tmp_path: Path) -> None:
    class BrokenStore(MemoryStore):
        def retrieve(self, *args, **kwargs):
            raise ConnectionError("the store went away")

    refs = tmp_path / "refs"
    refs.mkdir()
    runner, _ = make_runner(settings, tmp_path, [NO_CRADLE], store=BrokenStore(refs))
    result = runner.run("a cradle", planner="fixed", max_rounds=3)
    tools = [s["tool"] for s in result["steps"]]
    # One failed retrieval per candidate at most, never twice for the same one.
    assert tools == ["generate", "critique", "retrieve", "generate", "critique", "retrieve", "generate", "critique"]
    assert result["status"] == "budget_exhausted" and result["rounds"] == 3


# ----- 4. reasoning blocks (the real QwenChatModel over scripted tokens) -----

def test_a_draft_inside_think_is_not_run(settings, tmp_path: Path, tiny_kit) -> None:
    replies = [
        '<think>Maybe <tool_call>\n{"name": "generate", "arguments": {"prompt": "a kite", "seed": 9}}\n</tool_call>'
        ' twice? No: one.</think>\n<tool_call>\n{"name": "generate", "arguments": {"prompt": "a kite", "seed": 1}}'
        '\n</tool_call>',
        '<think>I could draw again: <tool_call>{"name": "generate", "arguments": {"prompt": "x"}}</tool_call>'
        '</think><tool_call>\n{"name": "critique", "arguments": {"candidate_id": "c0"}}\n</tool_call>',
    ]
    llm = scripted_qwen(tiny_kit["llm"], replies)
    runner, models = make_runner(settings, tmp_path, [MATCH], llm=llm)
    result = runner.run("a kite", planner="agent", max_rounds=3)
    assert [s["tool"] for s in result["steps"]] == ["generate", "critique"]
    assert [c["seed"] for c in models["generator"].calls] == [1]
    assert result["status"] == "matched" and result["fallback_steps"] == 0


# ----- 6. several or contradictory calls in one turn -----

def test_two_finish_calls_in_one_turn(settings, tmp_path: Path) -> None:
    script = [turn(("generate", {"prompt": "a kite", "seed": 1}), ("generate", {"prompt": "a kite", "seed": 2})),
              turn(("critique", {"candidate_id": "c0"}), ("critique", {"candidate_id": "c1"})),
              turn(("finish", {"candidate_id": "c1", "reason": "b"}),
                   ("finish", {"candidate_id": "c0", "reason": "a"}))]
    runner, _ = make_runner(settings, tmp_path, [MATCH], llm=script)
    result = runner.run("a kite", planner="agent", max_rounds=3)
    # Both drawings match, so the run ends matched with the better CLIP score. The two parallel drawings take
    # their ids in whichever thread gets there first, so which id that is is not fixed; nothing crashes.
    best = max(result["candidates"], key=lambda c: c["clip_score"])["id"]
    assert result["status"] == "matched" and result["final_candidate"] == best
    assert on_disk(result)["final_candidate"] == best


def test_finish_beside_a_generate(settings, tmp_path: Path) -> None:
    """A match ends the run before the LLM is asked again, so a finish beside a drawing names an unmatched
    candidate: the finish is refused, the drawing goes on, nothing crashes."""
    script = [turn(("generate", {"prompt": "a kite", "seed": 1})),
              turn(("critique", {"candidate_id": "c0"})),
              turn(("finish", {"candidate_id": "c0"}), ("generate", {"prompt": "a kite", "seed": 2})),
              turn(("critique", {"candidate_id": "c1"}))]
    runner, models = make_runner(settings, tmp_path, [NO_CRADLE, MATCH], llm=script)
    result = runner.run("a kite", planner="agent", max_rounds=2)
    assert result["status"] == "matched" and result["final_candidate"] == "c1"
    assert [(s["tool"], s["ok"]) for s in result["steps"]][2:4] in (
        [("finish", False), ("generate", True)], [("generate", True), ("finish", False)])


def test_a_valid_finish_stops_the_calls_beside_it(settings, tmp_path: Path) -> None:
    """In a chat follow-up the LLM may finish with an earlier matched candidate: a drawing beside it is not run."""
    from langgraph.prebuilt import ToolRuntime

    from imgrag.records.runs import RunRecord
    from tools.context import ToolContext
    from tools.image_tools import make_tools

    runner, models = make_runner(settings, tmp_path, [MATCH])
    ctx = ToolContext(settings, runner.manager, RunRecord(tmp_path / "run"))
    generate = {t.name: t for t in make_tools()}["generate"]
    calls = [{"name": "finish", "args": {"candidate_id": "c0"}, "id": "f", "type": "tool_call"},
             {"name": "generate", "args": {"prompt": "a kite", "seed": 2}, "id": "g", "type": "tool_call"}]
    state = {"messages": [AIMessage("", tool_calls=calls)], "rounds": 1, "tool_calls": 3, "seed": 0, "prompt": "a kite",
             "budget": {"max_rounds": 3, "max_tool_calls": 20, "max_seconds": 100},
             "candidates": {"c0": {"id": "c0", "path": "c0.png", "verdict": {"match": True}}}}
    runtime = ToolRuntime(state=state, context=ctx, config={}, stream_writer=lambda _: None, tool_call_id="g",
                          store=None)
    out = generate.invoke({"type": "tool_call", "name": "generate", "id": "g",
                           "args": {"prompt": "a kite", "seed": 2, "runtime": runtime}})
    assert "also finished the run with c0" in out.update["messages"][0].content
    assert models["generator"].calls == []


# ----- 7. one yardstick -----

def test_clip_scores_are_measured_against_the_users_prompt(settings, tmp_path: Path) -> None:
    class RecordingEmbedder(FakeEmbedder):
        def __init__(self) -> None:
            self.texts: list[str] = []

        def embed_texts(self, texts):
            self.texts += list(texts)
            return super().embed_texts(texts)

    embedder = RecordingEmbedder()
    script = [turn(("generate", {"prompt": "a kite, vivid colours, 8k, trending", "seed": 1})),
              turn(("generate", {"prompt": "kite", "seed": 2}))]
    runner, _ = make_runner(settings, tmp_path, [MATCH], llm=script, embedder=embedder)
    result = runner.run("a red kite over a field", planner="agent", max_rounds=2)
    assert len(result["candidates"]) == 2
    assert embedder.texts == ["a red kite over a field"] * 2
    assert [c["prompt"] for c in result["candidates"]] == ["a kite, vivid colours, 8k, trending", "kite"]


# ----- 9. the caption step -----

def test_the_fixed_planner_retrieves_with_captions_when_asked(settings, tmp_path: Path) -> None:
    settings.retrieval.rewrite_queries = True
    captions = AIMessage('["a photo of a wooden baby cradle with curved rockers"]')
    runner, models = make_runner(settings, tmp_path, [NO_CRADLE, MATCH], llm=[captions])
    result = runner.run("a retriever and a cradle", planner="fixed", max_rounds=2)
    assert runner.reference_store.queries == [["a photo of a wooden baby cradle with curved rockers"]]
    assert result["status"] == "matched"
    assert [t["captions"] for t in trace_of(result) if t.get("event") == "captions"] == [
        ["a photo of a wooden baby cradle with curved rockers"]]


def test_the_caption_step_is_off_by_default_and_falls_back_on_junk(settings, tmp_path: Path) -> None:
    runner, _ = make_runner(settings, tmp_path, [NO_CRADLE, MATCH])  # no LLM at all: the fixed planner needs none
    runner.run("a retriever and a cradle", planner="fixed", max_rounds=2)
    assert runner.reference_store.queries == [["a wooden cradle"]]
    settings.retrieval.rewrite_queries = True
    (tmp_path / "junk").mkdir()
    runner, _ = make_runner(settings, tmp_path / "junk", [NO_CRADLE, MATCH], llm=[AIMessage("qwxz park")])
    runner.run("a retriever and a cradle", planner="fixed", max_rounds=2)
    assert runner.reference_store.queries == [["a wooden cradle"]]

"""The graph's nodes and the agent's tools are module-level functions: each can be imported and called alone, with
a state and a runtime context built by hand (no graph, no checkpointer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langgraph.prebuilt import ToolRuntime
from langgraph.runtime import Runtime

from agent.context import RunContext
from agent.graph import build_graph, initial_state
from agent.nodes import EVERY_TOOL, finalize, plan, route
from imgrag.records.runs import RunRecord
from imgrag.settings import load_settings
from tests.fakes import FakeEmbedder, FakeGenerator, FakeManager
from tools.image_tools import TOOL_NAMES, finish, generate


@pytest.fixture
def ctx(tmp_path: Path) -> RunContext:
    settings = load_settings("default", environ={"IMGRAG_HOME": str(tmp_path / "home")})
    manager = FakeManager({"generator": FakeGenerator(), "embedder": FakeEmbedder()})
    return RunContext(settings, manager, RunRecord(tmp_path / "run"))


def state_with(candidates: dict, messages: list | None = None, **more) -> dict:
    state = initial_state("a kite", seed=3, run_id="r", run_dir="r", planner="fixed",
                          budget={"max_rounds": 3, "max_tool_calls": 20, "max_seconds": 100})
    return {**state, "candidates": candidates, **({"messages": messages} if messages is not None else {}), **more}


def test_route_sends_tool_calls_to_the_tools_and_a_stop_to_finalize() -> None:
    call = {"name": "regenerate", "args": {"prompt": "a kite", "reference_ids": ["r1"]}, "id": "x", "type": "tool_call"}
    assert route(state_with({}, [HumanMessage("a kite")])) == "finalize"  # no tool call
    assert route(state_with({}, [AIMessage("", tool_calls=[call])])) == "tools"
    assert route(state_with({}, [AIMessage("", tool_calls=[call])], approve=True)) == "review"
    assert route(state_with({}, [AIMessage("", tool_calls=[call])], stop_reason="matched")) == "finalize"


def test_finalize_picks_the_match_over_a_better_clip_score(ctx: RunContext) -> None:
    candidates = {"c0": {"id": "c0", "path": "c0.png", "round": 1, "clip_score": 0.9, "verdict": {"match": False}},
                  "c1": {"id": "c1", "path": "c1.png", "round": 2, "clip_score": 0.2, "verdict": {"match": True}}}
    out = finalize(state_with(candidates), Runtime(context=ctx))
    assert (out["status"], out["final_candidate"]) == ("matched", "c1")
    out = finalize(state_with({}), Runtime(context=ctx))
    assert (out["status"], out["final_candidate"]) == ("failed", None)


def test_plan_with_the_fixed_policy_draws_first_then_stops_on_a_match(ctx: RunContext) -> None:
    first = plan(state_with({}), Runtime(context=ctx))
    (message,) = first["messages"]
    assert message.tool_calls[0]["name"] == "generate" and first["fallback_steps"] == 0
    matched = {"c0": {"id": "c0", "path": "c0.png", "round": 1, "clip_score": 0.3, "verdict": {"match": True}}}
    assert plan(state_with(matched, rounds=1), Runtime(context=ctx))["stop_reason"] == "matched"


def runtime_for(ctx: RunContext, state: dict, call_id: str) -> ToolRuntime:
    return ToolRuntime(state=state, context=ctx, config={}, stream_writer=lambda _: None, tool_call_id=call_id,
                       store=None)


def invoke(tool, ctx: RunContext, state: dict, **args):
    runtime = runtime_for(ctx, state, "t1")
    return tool.invoke({"type": "tool_call", "name": tool.name, "id": "t1", "args": {**args, "runtime": runtime}})


def test_the_finish_tool_alone_refuses_an_unmatched_candidate_and_ends_with_a_match(ctx: RunContext) -> None:
    candidates = {"c0": {"id": "c0", "path": "c0.png", "round": 1, "verdict": {"match": False, "missing": ["tail"]}},
                  "c1": {"id": "c1", "path": "c1.png", "round": 2, "verdict": {"match": True}}}
    refused = invoke(finish, ctx, state_with(candidates), candidate_id="c0")
    assert refused.update["messages"][0].status == "error" and "finished" not in refused.update
    done = invoke(finish, ctx, state_with(candidates), candidate_id="c1", reason="all there")
    assert done.update["finished"].candidate_id == "c1"
    unknown = invoke(finish, ctx, state_with(candidates), candidate_id="c9")
    assert "unknown candidate_id 'c9'" in unknown.update["messages"][0].content


def test_the_generate_tool_alone_draws_scores_and_saves_a_candidate(ctx: RunContext) -> None:
    out = invoke(generate, ctx, state_with({}), prompt="a kite", seed=5)
    (candidate,) = out.update["candidates"].values()
    assert candidate.seed == 5 and candidate.round == 1 and Path(candidate.path).is_file()
    assert json.loads(out.update["messages"][0].content)["candidate_id"] == candidate.id
    assert ctx.manager.models["generator"].calls[0]["seed"] == 5


def test_the_graph_runs_the_module_level_nodes_and_tools() -> None:
    graph = build_graph()
    assert set(graph.nodes) == {"plan", "review", "tools", "finalize"}
    assert graph.nodes["plan"].runnable.func is plan  # the function itself, not a copy made by a factory
    assert {t.name for t in EVERY_TOOL} == {*TOOL_NAMES, "consider_photos"}

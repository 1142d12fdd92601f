"""The tools answer bad arguments with messages the LLM can act on, and never raise."""

from __future__ import annotations

from pathlib import Path

import pytest
from langchain_core.messages import AIMessage
from langgraph.graph import END, START, StateGraph
from langgraph.prebuilt import ToolNode

from agent.graph import initial_state
from agent.state import AgentState
from imgrag.records.runs import RunRecord
from imgrag.settings import load_settings
from tests.fakes import FakeEmbedder, FakeGenerator, FakeManager, FakeVerdict, MemoryStore, ScriptedJudge
from tools.context import ToolContext
from tools.image_tools import make_tools


@pytest.fixture
def node_and_state(tmp_path: Path):
    settings = load_settings("default", environ={"IMGRAG_HOME": str(tmp_path)})
    manager = FakeManager({"generator": FakeGenerator(), "judge": ScriptedJudge([FakeVerdict(False, ["x"])]),
                           "embedder": FakeEmbedder()})
    (tmp_path / "refs").mkdir()
    ctx = ToolContext(settings, manager, RunRecord(tmp_path / "run"), reference_store=MemoryStore(tmp_path / "refs"))
    state = initial_state("a cradle", seed=0, run_id="r", run_dir=str(tmp_path / "run"), planner="agent",
                          budget={"max_rounds": 1, "max_tool_calls": 9, "max_seconds": 60})
    graph = StateGraph(AgentState, context_schema=ToolContext)
    graph.add_node("tools", ToolNode(make_tools()))
    graph.add_edge(START, "tools")
    graph.add_edge("tools", END)
    return (graph.compile(), ctx), state


def call_tool(app, state: dict, name: str, **args) -> tuple[str, str, dict]:
    """Run one tool call through a one-node graph; return its status, text and the new state."""
    graph, ctx = app
    message = AIMessage(content="", tool_calls=[{"name": name, "args": args, "id": "t1"}])
    new_state = graph.invoke({**state, "messages": [*state["messages"], message]}, context=ctx)
    tool_message = new_state["messages"][-1]
    return tool_message.status, tool_message.content, new_state


@pytest.mark.parametrize(
    ("name", "args", "expected"),
    [
        ("critique", {"candidate_id": "c3"}, "unknown candidate_id 'c3'"),
        ("retrieve", {"queries": ["", "  "]}, "queries is empty"),
        ("retrieve", {"queries": ["a cradle"], "k": 99}, "k must be between 1 and 8"),
        ("regenerate", {"prompt": "a cradle", "reference_ids": ["ref-x"]}, "unknown reference ids ['ref-x']"),
        ("regenerate", {"prompt": "a cradle", "reference_ids": []}, "reference_ids is empty"),
        ("generate", {"prompt": "   "}, "prompt is empty"),
        ("finish", {"candidate_id": "c0"}, "unknown candidate_id"),
    ],
)
def test_bad_arguments_come_back_as_error_messages(node_and_state, name, args, expected) -> None:
    node, state = node_and_state
    status, content, update = call_tool(node, state, name, **args)
    assert status == "error"
    assert expected in content
    assert update["candidates"] == {} and update["rounds"] == 0  # nothing changed


def test_scale_out_of_range_and_spent_budget(node_and_state) -> None:
    node, state = node_and_state
    _, _, update = call_tool(node, state, "retrieve", queries=["a cradle"])
    state = update
    status, content, _ = call_tool(node, state, "regenerate", prompt="a cradle", reference_ids=["ref-cradle"],
                                   ip_scale=3.0)
    assert status == "error" and "ip_scale must be between 0 and 1" in content
    status, content, update = call_tool(node, state, "generate", prompt="a cradle")
    assert status == "success" and update["rounds"] == 1
    status, content, _ = call_tool(node, update, "generate", prompt="a cradle")
    assert status == "error" and "budget is spent" in content


def test_finish_needs_a_matched_candidate(node_and_state) -> None:
    node, state = node_and_state
    _, _, state = call_tool(node, state, "generate", prompt="a cradle")
    status, content, _ = call_tool(node, state, "finish", candidate_id="c0")
    assert status == "error" and "critique first" in content
    _, _, state = call_tool(node, state, "critique", candidate_id="c0")
    status, content, _ = call_tool(node, state, "finish", candidate_id="c0")
    assert status == "error" and "did not match" in content


def test_a_new_candidate_never_overwrites_a_picture_left_on_disk(tmp_path: Path) -> None:
    """After a chat /undo (or a crash before the checkpoint) the state forgets c1, but its file stays."""
    settings = load_settings("default", environ={"IMGRAG_HOME": str(tmp_path)})
    record = RunRecord(tmp_path / "run")
    ctx = ToolContext(settings, FakeManager({}), record)
    record.candidate_path("c1").write_bytes(b"an undone picture")
    assert ctx.allocate_candidate_id({"c0": {}}) == "c2"
    assert ctx.allocate_candidate_id({"c0": {}}) == "c3"  # and two calls in one turn never share an id
    assert record.candidate_path("c1").read_bytes() == b"an undone picture"

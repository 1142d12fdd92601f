"""What the agent LLM is sent stays bounded over a long chat thread (the real tokenizer and chat template)."""

from __future__ import annotations

from pathlib import Path

from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.utils.function_calling import convert_to_openai_tool

from agent.graph import initial_state
from agent.llm_view import context_window, llm_messages
from tests.fakes import scripted_qwen
from tools.image_tools import make_tools
from tools.records import from_state

LONG_CAPTION = "a grey heron standing in shallow water at dawn, " * 45  # ~2,000 characters, as indexed captions run


def add_request(state: dict, n: int) -> None:
    """One chat request as the graph leaves it: the ask, then generate, critique, retrieve, regenerate, critique."""
    c0, c1 = f"c{2 * n}", f"c{2 * n + 1}"
    steps = [("generate", {"prompt": f"request {n}", "seed": n}, f'{{"candidate_id": "{c0}"}}'),
             ("critique", {"candidate_id": c0},
              '{"match": false, "missing": ["a heron"], "reason": "' + "x" * 300 + '"}'),
             ("retrieve", {"queries": ["a grey heron"], "avoid_candidate_id": c0},
              str([{"reference_id": f"r{n}-{k}", "caption": LONG_CAPTION} for k in range(3)])),
             ("regenerate", {"prompt": f"request {n}", "reference_ids": [f"r{n}-0"], "seed": n},
              f'{{"candidate_id": "{c1}"}}'),
             ("critique", {"candidate_id": c1}, '{"match": true, "missing": []}')]
    state["messages"].append(HumanMessage(f"request {n}: make the heron bigger and add a pond " * 3))
    for i, (name, args, result) in enumerate(steps):
        call_id = f"call-{n}-{i}"
        state["messages"].append(AIMessage("", tool_calls=[{"name": name, "args": args, "id": call_id}]))
        state["messages"].append(ToolMessage(result, tool_call_id=call_id, name=name))
    for cid, rnd in ((c0, 2 * n + 1), (c1, 2 * n + 2)):
        state["candidates"][cid] = {"id": cid, "path": f"/tmp/{cid}.png", "prompt": "p", "seed": n, "round": rnd,
                                    "reference_ids": [], "ip_scale": None, "clip_score": 0.3,
                                    "verdict": {"match": cid == c1, "missing": [] if cid == c1 else ["a heron"]}}
    for k in range(3):
        state["references"][f"r{n}-{k}"] = {"path": f"/tmp/r{n}-{k}.png", "caption": LONG_CAPTION,
                                            "query": "a grey heron"}
    state["rounds"] = 2 * n + 2
    state["tool_calls"] = 5 * (n + 1)
    state["prompt"] = f"request {n}"


def test_a_twenty_request_thread_stays_under_a_fixed_token_bound(tiny_kit, tmp_path: Path) -> None:
    tools = [convert_to_openai_tool(t) for t in make_tools()]
    chat = scripted_qwen(tiny_kit["llm"], ["-"])
    state = initial_state("request 0", seed=0, run_id="t", run_dir=str(tmp_path), planner="agent",
                          budget={"max_rounds": 100, "max_tool_calls": 500, "max_seconds": 1e9})
    state["messages"] = []
    # What every prompt carries whatever the thread: the system text and the tools' schemas.
    fixed = len(chat.tokenizer(chat.render([HumanMessage("-")], tools))["input_ids"])
    sizes, whole = [], []
    for n in range(20):
        add_request(state, n)
        sizes.append(len(chat.tokenizer(chat.render(llm_messages(from_state(state)), tools))["input_ids"]))
        whole.append(len(chat.tokenizer(chat.render(state["messages"], tools))["input_ids"]))
    print("fixed part:", fixed, "prompt tokens per request:", sizes, "whole thread:", whole[-1])
    assert max(sizes) - fixed < 4000, (fixed, sizes)  # the window's share stays under a fixed bound
    assert max(sizes[10:]) - min(sizes[10:]) < 100, sizes  # per-step prompt size stops growing
    assert whole[-1] > 5 * sizes[-1]  # the whole thread would not have fitted
    window = llm_messages(from_state(state))
    assert any(isinstance(m, HumanMessage) and "request 19" in m.content for m in window)  # the current request
    assert not isinstance(window[1], ToolMessage)


def test_the_window_never_starts_with_a_tool_result() -> None:
    messages = [HumanMessage("a"), AIMessage("", tool_calls=[{"name": "generate", "args": {}, "id": "1"}]),
                ToolMessage("x" * 5000, tool_call_id="1", name="generate"), ToolMessage("y", tool_call_id="1")]
    window = context_window(messages, max_messages=2, max_chars=100)
    assert [type(m).__name__ for m in window] == ["HumanMessage", "AIMessage", "ToolMessage", "ToolMessage"]
    assert all(len(str(m.content)) <= 110 for m in window)

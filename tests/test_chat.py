"""``imgrag chat``: the command parser and follow-up reading, the chat session on scripted models, and the
terminal itself through a pseudo-terminal (pexpect) on the tiny profile with a scripted LLM
(``tests/chat_launcher.py``)."""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from PIL import Image

from agent.chat import (
    ChatSession,
    FollowUp,
    SlashCommand,
    parse_followup,
    parse_line,
    parse_review,
    refine_prompt,
)
from agent.runner import Runner, open_checkpointer
from imgrag.errors import UserError
from imgrag.settings import load_settings
from tests.fakes import FakeEmbedder, FakeGenerator, FakeManager, FakeVerdict, MemoryStore, ScriptedChatModel, call

REPO = Path(__file__).resolve().parent.parent
NO_CRADLE = FakeVerdict(False, ["a wooden cradle", "a retriever"], "no cradle")


# ----- the command line of the chat -----

def test_slash_commands_prefixes_aliases_and_mistakes() -> None:
    assert parse_line("   ") is None
    assert parse_line("a dog on a sofa") == "a dog on a sofa"
    assert parse_line("/help") == SlashCommand("help")
    assert parse_line("/he") == SlashCommand("help")
    assert parse_line("/exit") == SlashCommand("quit")
    assert parse_line("/res chat-2026") == SlashCommand("resume", "chat-2026")
    assert parse_line("/budget  4 ") == SlashCommand("budget", "4")
    with pytest.raises(UserError, match=r"/re is ambiguous: .*/resume.*/refs|/re is ambiguous: .*/refs.*/resume"):
        parse_line("/re")
    with pytest.raises(UserError, match="did you mean /help"):
        parse_line("/hlep")
    with pytest.raises(UserError, match="unknown command /frobnicate; /help"):
        parse_line("/frobnicate")
    with pytest.raises(UserError, match="takes no argument"):
        parse_line("/undo twice")


@pytest.mark.parametrize("text, expected", [
    ("make the cradle wooden", FollowUp("make the cradle wooden")),
    ("two more rounds", FollowUp(None, 2)),
    ("another round please", FollowUp(None, 1)),
    ("3 more tries and make it brighter", FollowUp("make it brighter", 3)),
    ("use the second reference", FollowUp(None, None, [2])),
    ("use the first and third references", FollowUp(None, None, [1, 3])),
    ("use reference 2, then make the dog smaller", FollowUp("make the dog smaller", None, [2])),
    ("try again", FollowUp(None)),
    ("use the last ref", FollowUp(None, None, [-1])),
    # A directive's noun used as a modifier is part of the refinement, which stays whole.
    ("add another picture frame on the wall", FollowUp("add another picture frame on the wall")),
    ("the dog should use the second reference photo pose",
     FollowUp("the dog should use the second reference photo pose")),
    ("use the second reference photo, and one more round", FollowUp(None, 1, [2])),
    ("draw another picture with a red roof", FollowUp("draw another picture with a red roof")),
])
def test_follow_ups_are_read_as_directives_and_refinements(text: str, expected: FollowUp) -> None:
    assert parse_followup(text) == expected


def test_a_refinement_is_added_to_the_prompt() -> None:
    assert refine_prompt("a retriever and a cradle.", "make the cradle wooden") == \
        "a retriever and a cradle; make the cradle wooden"


def test_review_answers(tmp_path: Path) -> None:
    refs = {"ref-a": {"path": "a.png"}, "ref-b": {"path": "b.png"}, "ref-c": {"path": "c.png"}}
    proposed = ["ref-a", "ref-b"]
    assert parse_review("", proposed, refs)["reference_ids"] == proposed
    assert parse_review("drop 2", proposed, refs)["reference_ids"] == ["ref-a"]
    assert parse_review("drop ref-a", proposed, refs)["reference_ids"] == ["ref-b"]
    assert parse_review("use 3", proposed, refs)["reference_ids"] == ["ref-c"]
    assert parse_review("none", proposed, refs)["reference_ids"] == []
    picture = tmp_path / "my cradle.png"
    Image.new("RGB", (20, 20), (90, 60, 30)).save(picture)
    answer = parse_review(f"replace 2 with '{picture}'", proposed, refs)
    (new_id,) = answer["references"]
    assert answer["reference_ids"] == ["ref-a", new_id] and new_id.startswith("file-")
    assert answer["references"][new_id]["path"] == str(picture.resolve())
    with pytest.raises(UserError, match="not among this drawing's references"):
        parse_review("drop 3", proposed, refs)
    with pytest.raises(UserError, match="there is no reference 9"):
        parse_review("use 9", proposed, refs)
    with pytest.raises(UserError, match="no such file"):
        parse_review(f"use {tmp_path}/missing.png", proposed, refs)
    with pytest.raises(UserError, match="cannot read 'maybe later'"):
        parse_review("maybe later", proposed, refs)


# ----- the session on scripted models (no terminal) -----

@pytest.fixture
def settings(tmp_path: Path):
    settings = load_settings("default", environ={"IMGRAG_HOME": str(tmp_path / "home")})
    # FakeGenerator's red is seed*40 % 256 and FakeEmbedder scores red 191 best: seeds 4, 5, 6 make c1 the best
    # picture of a first request while c2 is the last one drawn.
    settings.generation.seed = 4
    return settings


def make_session(settings, tmp_path: Path, verdicts=None, generator=None, llm_script=None, **kwargs) -> ChatSession:
    from tests.fakes import ScriptedJudge

    models = {"generator": generator or FakeGenerator(), "judge": ScriptedJudge(verdicts or [NO_CRADLE]),
              "embedder": FakeEmbedder()}
    if llm_script is not None:  # after the script the LLM only chats, so the fixed policy takes the steps
        chatter = AIMessage(content="What a lovely picture.")
        models["llm"] = RecordingChatModel(messages=itertools.chain(llm_script, itertools.repeat(chatter)))
    refs = tmp_path / "refs"
    refs.mkdir(exist_ok=True)
    runner = Runner(settings, manager=FakeManager(models), reference_store=MemoryStore(refs),
                    checkpointer=open_checkpointer(tmp_path / "threads.sqlite"))
    kwargs.setdefault("planner", "fixed")
    return ChatSession(runner, rounds=3, **kwargs)


SEEN_BY_LLM: list[list] = []


class RecordingChatModel(ScriptedChatModel):
    """A scripted LLM that keeps every conversation it is shown (in SEEN_BY_LLM)."""

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        SEEN_BY_LLM.append(list(messages))
        return super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)


def steps_since(result: dict, n: int) -> list[str]:
    return [s["tool"] for s in result["steps"]][n:]


def test_a_follow_up_refines_the_same_thread_from_the_best_picture(settings, tmp_path: Path) -> None:
    notes: list[str] = []
    session = make_session(settings, tmp_path, on_event=lambda e: notes.append(e["text"]) if e["event"] == "note"
                           else None)
    first = session.send("a retriever and a cradle")
    thread = session.thread_id
    assert thread.startswith("chat-") and first["rounds"] == 3 and first["final_candidate"] == "c1"
    second = session.send("make the cradle wooden")
    assert session.thread_id == thread and second["run_id"] == thread and second["run_dir"] == first["run_dir"]
    assert second["prompt"] == "a retriever and a cradle; make the cradle wooden"
    assert notes == ["prompt: a retriever and a cradle; make the cradle wooden"]
    # The follow-up starts from c1 (the best), not c2 (the last): the judge looks at c1 again, against the new
    # prompt, and the repair avoids c1.
    assert steps_since(second, len(first["steps"]))[:3] == ["critique", "retrieve", "regenerate"]
    trace = [json.loads(line) for line in (Path(second["run_dir"]) / "trace.jsonl").read_text().splitlines()]
    follow = next(i for i, t in enumerate(trace) if t.get("event") == "follow_up")
    assert trace[follow]["continue_from"] == {"candidate_id": "c1", "rounds": 3, "retrievals_from": 2}
    repair = [t for t in trace[follow:] if t.get("tool") in ("critique", "retrieve")][:2]
    assert repair[0]["args"] == {"candidate_id": "c1"} and repair[1]["args"]["avoid_candidate_id"] == "c1"
    # One request's worth of budget more, the candidates continue, and the old verdicts are kept aside.
    assert second["rounds"] == 6 and [c["id"] for c in second["candidates"]] == [f"c{i}" for i in range(6)]
    by_id = {c["id"]: c for c in second["candidates"]}
    assert by_id["c0"]["verdict"] is None and by_id["c0"]["stale_verdict"]["missing"] == NO_CRADLE.missing
    assert by_id["c1"]["verdict"] is not None  # judged again
    # The report says against which prompt the set-aside verdicts were given, instead of "not judged".
    assert by_id["c0"]["stale_prompt"] == "a retriever and a cradle"
    from imgrag.records.run_report import render_run

    page = render_run(second["run_dir"])
    card = page[page.index('id="cand-c0"'):page.index('id="cand-c1"')]
    assert "judged against an earlier prompt" in card and "not judged" not in card
    assert "<b>Prompt then:</b> a retriever and a cradle</p>" in card and "<li>a wooden cradle</li>" in card
    state = session.values()
    assert [m.content for m in state["messages"] if isinstance(m, HumanMessage)] == \
        ["a retriever and a cradle", "make the cradle wooden"]
    assert second["final_candidate"] != "c0"  # a picture judged only against the old prompt is not the answer


def test_budget_only_follow_up_keeps_the_prompt(settings, tmp_path: Path) -> None:
    session = make_session(settings, tmp_path)
    session.send("a retriever and a cradle")
    result = session.send("two more rounds")
    assert result["prompt"] == "a retriever and a cradle" and result["rounds"] == 5
    with pytest.raises(UserError, match="between 1 and 50"):
        session.set_budget("0")


def test_the_llm_sees_the_follow_up_and_the_numbered_references(settings, tmp_path: Path) -> None:
    SEEN_BY_LLM.clear()
    script = [call("generate", prompt="a retriever and a cradle"), call("critique", candidate_id="c0"),
              call("retrieve", queries=["a wooden cradle", "a retriever"], avoid_candidate_id="c0"),
              call("regenerate", prompt="a retriever and a cradle", reference_ids=["ref-cradle"]),
              call("critique", candidate_id="c1"),
              # The follow-up, read by the LLM: no change to the picture, reference 2.
              AIMessage('{"prompt": "a retriever and a cradle", "rounds": null, "references": [2]}'),
              call("regenerate", prompt="a retriever and a cradle", reference_ids=["ref-retriever"]),
              call("critique", candidate_id="c2")]
    session = make_session(settings, tmp_path, llm_script=script, planner="agent")
    session.rounds = 2
    session.send("a retriever and a cradle")
    result = session.send("use the second reference")
    assert result["prompt"] == "a retriever and a cradle"  # a directive, not a change of the picture
    last = SEEN_BY_LLM[-1]
    assert isinstance(last[0], SystemMessage)
    assert "[1] ref-cradle" in last[0].content and "[2] ref-retriever" in last[0].content
    assert "Best so far:" in last[0].content
    assert any(isinstance(m, HumanMessage) and m.content == "use the second reference" for m in last)
    assert {c["id"]: c["reference_ids"] for c in result["candidates"]}["c2"] == ["ref-retriever"]


def test_a_thread_resumed_under_another_planner_runs_its_next_request_with_it(settings, tmp_path: Path) -> None:
    SEEN_BY_LLM.clear()
    notes: list[str] = []
    fixed = make_session(settings, tmp_path, llm_script=[], planner="fixed")
    fixed.rounds = 1
    first = fixed.send("a retriever and a cradle")
    assert first["planner"] == "fixed" and SEEN_BY_LLM == []
    # `imgrag chat --planner agent --thread ID`: a new session over the same threads.
    agent = make_session(settings, tmp_path, llm_script=[call("critique", candidate_id="c0")], planner="agent",
                         on_event=lambda e: notes.append(e["text"]) if e["event"] == "note" else None)
    agent.open(first["run_id"])
    second = agent.send("one more round")
    assert SEEN_BY_LLM, "the LLM plans the request"
    assert second["planner"] == "agent"
    assert json.loads((Path(second["run_dir"]) / "result.json").read_text())["planner"] == "agent"
    assert "planner agent from this request on (the thread ran with fixed)" in notes


def test_a_picked_reference_is_used_even_by_the_fixed_policy(settings, tmp_path: Path) -> None:
    session = make_session(settings, tmp_path)
    session.rounds = 2
    first = session.send("a retriever and a cradle")
    assert [c["reference_ids"] for c in first["candidates"]][-1] == ["ref-cradle", "ref-retriever"]
    result = session.send("use the first reference")  # two more guided drawings, both with reference 1 only
    assert [c["reference_ids"] for c in result["candidates"][2:]] == [["ref-cradle"], ["ref-cradle"]]
    with pytest.raises(UserError, match="there is no reference 7"):
        session.send("use reference 7")


def test_approve_pauses_before_a_redraw_and_drops_a_reference(settings, tmp_path: Path) -> None:
    asked = []

    def reviewer(proposal):
        asked.append((list(proposal.proposed), proposal.number("ref-retriever")))
        return parse_review("drop 2", proposal.proposed, proposal.references)

    session = make_session(settings, tmp_path, reviewer=reviewer)
    session.rounds = 2
    assert session.set_approve("on") is True
    result = session.send("a retriever and a cradle")
    assert asked == [(["ref-cradle", "ref-retriever"], 2)]
    assert result["candidates"][1]["reference_ids"] == ["ref-cradle"] and result["status"] == "budget_exhausted"
    trace = [json.loads(line) for line in (Path(result["run_dir"]) / "trace.jsonl").read_text().splitlines()]
    assert {"proposed": ["ref-cradle", "ref-retriever"], "approved": ["ref-cradle"]} in \
        next(t for t in trace if t.get("event") == "review")["calls"]
    with pytest.raises(UserError, match="approve on or /approve off"):
        session.set_approve("maybe")


def test_a_paused_thread_is_asked_again_in_a_new_process(settings, tmp_path: Path) -> None:
    session = make_session(settings, tmp_path)
    paused = session.runner.run("a retriever and a cradle", planner="fixed", max_rounds=2, run_id="chat-paused",
                                approve=True)  # paused before the redraw, and the process ended unanswered
    assert paused["pending"][0]["reference_ids"] == ["ref-cradle", "ref-retriever"]
    assert not (Path(paused["run_dir"]) / "result.json").exists()
    later = make_session(settings, tmp_path, reviewer=lambda p: {"reference_ids": [], "references": {}})
    summary = later.resume("paused")
    assert summary["paused"] and summary["thread_id"] == "chat-paused"
    result = later.answer_pending()
    assert result["status"] == "budget_exhausted" and result["candidates"][1]["reference_ids"] == []


def test_threads_resume_and_undo_across_sessions(settings, tmp_path: Path) -> None:
    session = make_session(settings, tmp_path)
    session.rounds = 1
    session.send("a retriever and a cradle")
    session.send("make the cradle wooden")
    thread = session.thread_id
    session.new()
    session.send("a rocket on a pad")
    other = session.thread_id

    later = make_session(settings, tmp_path)  # a new process: fresh models, the same checkpoint database
    listed = later.threads()
    assert [t["id"] for t in listed] == [other, thread]
    assert listed[1]["first"] == "a retriever and a cradle" and listed[1]["requests"] == 2
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", listed[1]["date"])
    with pytest.raises(UserError, match="matches 2 threads"):
        later.resume("chat-")
    with pytest.raises(UserError, match="no thread 'nope'"):
        later.resume("nope")
    summary = later.resume(thread[len("chat-"):])  # a prefix without 'chat-' is enough
    assert summary["requests"] == ["a retriever and a cradle", "make the cradle wooden"]
    assert summary["prompt"] == "a retriever and a cradle; make the cradle wooden"

    undone = later.undo()
    assert undone["undone"] == "make the cradle wooden" and undone["prompt"] == "a retriever and a cradle"
    assert undone["requests"] == ["a retriever and a cradle"] and undone["candidates"] == 1
    with pytest.raises(UserError, match="nothing to undo"):
        later.undo()
    # The undo holds in yet another process, and the thread goes on from there.
    again = make_session(settings, tmp_path)
    again.rounds = 1
    again.resume(thread)
    result = again.send("make the retriever golden")
    assert result["prompt"] == "a retriever and a cradle; make the retriever golden"
    # The undone request's c1.png stays on disk; the new picture takes the next free name.
    assert [c["id"] for c in result["candidates"]] == ["c0", "c2"]
    assert Path(result["candidates"][1]["path"]).name == "c2.png"

    # imgrag chat --thread: a saved thread by a unique start of its id; with --new, the name of a new one.
    named = make_session(settings, tmp_path)
    assert named.open(other[:-2])["requests"] == ["a rocket on a pad"]
    with pytest.raises(UserError, match=r"no thread 'my-fox' \(.*--thread my-fox --new starts a new thread"):
        named.open("my-fox")  # a typo never starts a thread by accident
    typo = other[:-3] + ("x" if other[-3] != "x" else "y") + other[-2:]  # one character off a saved id
    with pytest.raises(UserError, match=f"closest: {other}"):
        named.open(typo)
    with pytest.raises(UserError, match=f"closest: {other}"):
        named.resume(typo)  # the chat's /resume says the same
    assert named.open("my-fox", new=True) is None and named.thread_id == "chat-my-fox"  # so /threads lists it
    named.rounds = 1
    assert named.send("a fox")["run_id"] == "chat-my-fox"
    assert "chat-my-fox" in [t["id"] for t in named.threads()]
    with pytest.raises(UserError, match="already exists; drop --new"):
        named.open("my-fox", new=True)
    assert make_session(settings, tmp_path).open("my-fox")["requests"] == ["a fox"]
    # a new name that starts several saved ids is a new name, not an ambiguous typo
    start = thread[len("chat-"):len("chat-") + 4]  # the year: both saved threads start with it
    assert named.open(start, new=True) is None and named.thread_id == f"chat-{start}"
    with pytest.raises(UserError, match="may hold only letters"):
        named.open("bad id!", new=True)


def test_show_refs_and_save(settings, tmp_path: Path) -> None:
    session = make_session(settings, tmp_path)
    with pytest.raises(UserError, match="describe a picture first"):
        session.candidate()
    session.rounds = 2
    result = session.send("a retriever and a cradle")
    assert session.candidate()["id"] == result["final_candidate"]
    assert session.candidate("0")["id"] == "c0" and session.candidate("c1")["id"] == "c1"
    with pytest.raises(UserError, match=r"no candidate 'c9' on this thread \(candidates: c0, c1\)"):
        session.candidate("c9")
    refs = session.references()
    assert [(r["number"], r["id"]) for r in refs] == [(1, "ref-cradle"), (2, "ref-retriever")]
    with pytest.raises(UserError, match=r"the folder .*out does not exist; create it first"):
        session.save(str(tmp_path / "out" / "best.jpg"))  # a typo'd folder is never made silently
    (tmp_path / "out").mkdir()
    best, path = session.save(str(tmp_path / "out" / "best.jpg"))
    assert path.exists() and Image.open(path).format == "JPEG" and best["id"] == result["final_candidate"]
    _, folder_copy = session.save(str(tmp_path) + "/")
    assert folder_copy.parent == tmp_path and folder_copy.suffix == ".png"
    for name in ("best.txt", "best.gif", "best.bmp"):  # a format that would lose the picture's recipe
        with pytest.raises(UserError, match=r"/save's file must end in one of \.png, \.jpg, \.jpeg, \.webp"):
            session.save(str(tmp_path / name))


class StoppedMidDrawing(FakeGenerator):
    """The user presses Ctrl-C while the second picture is being drawn."""

    def generate(self, *args, **kwargs):
        if len(self.calls) == 1:
            self.calls.append({})
            raise KeyboardInterrupt
        return super().generate(*args, **kwargs)


def test_ctrl_c_stops_the_request_and_keeps_the_thread(settings, tmp_path: Path) -> None:
    session = make_session(settings, tmp_path, generator=StoppedMidDrawing())
    result = session.send("a retriever and a cradle")
    assert result["stopped"] and result["final_candidate"] == "c0" and result["stop_reason"].startswith("stopped")
    # Cut off, not out of budget: result.json says so, and so does the report's badge.
    assert result["status"] == "interrupted"
    assert json.loads((Path(result["run_dir"]) / "result.json").read_text())["status"] == "interrupted"
    from imgrag.records.run_report import render_run

    assert '<span class="badge warn">interrupted</span>' in render_run(result["run_dir"])
    assert "budget_exhausted" not in render_run(result["run_dir"])
    state = session.values()
    last_call = next(m for m in reversed(state["messages"]) if isinstance(m, AIMessage) and m.tool_calls)
    closing = next(m for m in state["messages"] if isinstance(m, ToolMessage)
                   and m.tool_call_id == last_call.tool_calls[0]["id"])
    assert closing.status == "error"  # the interrupted call is answered, so the history stays well formed
    assert not session.snapshot().next
    again = session.send("make the cradle wooden")
    assert again["run_id"] == result["run_id"] and not again.get("stopped")
    assert again["rounds"] >= 2 and again["status"] == "budget_exhausted"


# ----- the terminal, through a pseudo-terminal -----

pexpect = pytest.importorskip("pexpect")
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Z0-9]|\x1b[=>]|\r")


@pytest.fixture
def chat_env(tiny_kit: dict[str, Path], tmp_path: Path) -> dict[str, str]:
    refs = tmp_path / "refs"
    refs.mkdir()
    for i, name in enumerate(("cradle", "retriever")):  # two pictures: every retrieval proposes both
        Image.new("RGB", (32, 32), (80 * i, 120, 40)).save(refs / f"{name}.png")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_TEST_")}
    env.update({"IMGRAG_TINY_KIT_DIR": str(tiny_kit["generator"].parent), "IMGRAG_STORE": str(tmp_path / "store"),
                "CHAT_TEST_LLM_LOG": str(tmp_path / "llm.jsonl"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm", "NO_COLOR": "1"})
    # A real store of those pictures, indexed by the tiny CLIP through the command line (a few seconds).
    subprocess.run([sys.executable, "-m", "agent.frontends.cli", "index", str(refs), "--profile", "tiny"],
            cwd=str(REPO),
                   env=env, check=True, capture_output=True)
    return env


class Chat:
    """One ``imgrag chat`` process on a pseudo-terminal."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.log = io.StringIO()
        self.child = pexpect.spawn(sys.executable, ["-m", "tests.chat_launcher", "--profile", "tiny",
                                                    "--max-rounds", "2", *args],
                                   cwd=str(REPO), env=env, encoding="utf-8", timeout=40, dimensions=(50, 220))
        self.child.logfile_read = self.log
        self.prompt()

    def prompt(self) -> None:
        self.child.expect_exact("imgrag>")

    def say(self, line: str, *expected: str) -> list[str]:
        """Type a line and wait for each expected regex in turn, then for the next prompt; return the matches."""
        self.child.sendline(line)
        found = []
        for pattern in expected:
            self.child.expect(pattern)
            found.append(self.child.match.group(1) if self.child.match.groups() else self.child.match.group(0))
        self.prompt()
        return found

    def quit(self, ctrl_d: bool = False) -> str:
        """Leave with /quit (or Ctrl-D), check the process ended cleanly, return the transcript without escapes."""
        if ctrl_d:
            self.child.sendeof()
        else:
            self.child.sendline("/quit")
        self.child.expect("bye: threads are kept")
        self.child.expect(pexpect.EOF)
        self.child.close()
        text = ANSI.sub("", self.log.getvalue())
        assert "Traceback" not in text, text
        assert self.child.exitstatus == 0, text
        return text


PICTURE = r"picture: (\S+\.png)"


@pytest.mark.slow
def test_terminal_two_turns_then_resume_and_undo_in_a_new_process(chat_env: dict[str, str]) -> None:
    chat = Chat(chat_env)
    chat.say("/help", "/approve on\\|off", "Ctrl-D quits")
    chat.say("/hlep", "unknown command /hlep; did you mean /help\\?")
    chat.say("/re", "/re is ambiguous: /resume, /refs")
    (first,) = chat.say("a dog and a cradle", PICTURE)
    _, second = chat.say("make the cradle wooden", "prompt: a dog and a cradle; make the cradle wooden", PICTURE)
    run_dir = Path(first).parent.parent
    assert Path(second).parent.parent == run_dir and Path(first).exists() and Path(second).exists()
    result = json.loads((run_dir / "result.json").read_text())
    assert result["rounds"] == 4 and result["model_loads"]["generator"] == 1  # loaded once for both requests
    assert result["model_loads"]["judge"] == 1
    thread = run_dir.name
    text = chat.quit()
    assert "tiny profile: random-weight models" in text  # the tiny warning, as every command prints it
    shown = [json.loads(line) for line in Path(chat_env["CHAT_TEST_LLM_LOG"]).read_text().splitlines()]
    assert any(m["type"] == "human" and m["content"] == "make the cradle wooden" for m in shown[-1])
    assert "make the cradle wooden" in shown[-1][0]["content"]  # the system prompt carries the refined prompt

    later = Chat(chat_env)
    later.say("/threads", re.escape(thread))
    later.say(f"/resume {thread[len('chat-'):][:15]}", "2 request\\(s\\)", "1\\. a dog and a cradle",
              "2\\. make the cradle wooden")
    later.say("/undo", "undid 'make the cradle wooden'", "1 request\\(s\\)", "prompt: a dog and a cradle\r?\n")
    later.quit(ctrl_d=True)


@pytest.mark.slow
def test_terminal_approve_on_drops_a_reference(chat_env: dict[str, str]) -> None:
    chat = Chat(chat_env)
    chat.say("/approve on", "approve on")
    chat.child.sendline("a dog and a cradle")
    chat.child.expect("1\\. ([0-9a-f]{32}) ")  # the store's ids: hashes of the pictures' bytes
    first = chat.child.match.group(1)
    chat.child.expect("2\\. [0-9a-f]{32} ")
    chat.child.expect_exact("references>")
    chat.child.sendline("drop 7")
    chat.child.expect("error: there is no reference 7: this thread has 2")
    chat.child.expect_exact("references>")
    chat.child.sendline("drop 2")
    chat.child.expect(f"drawing with {first}\r?\n")
    chat.child.expect(PICTURE)
    run_dir = Path(chat.child.match.group(1)).parent.parent
    chat.prompt()
    chat.quit()
    result = json.loads((run_dir / "result.json").read_text())
    assert [c["reference_ids"] for c in result["candidates"]] == [[], [first]]


@pytest.mark.slow
def test_terminal_ctrl_c_stops_a_request_and_the_chat_goes_on(chat_env: dict[str, str]) -> None:
    chat = Chat(chat_env)
    chat.child.sendline("a slowly drawn fox")
    chat.child.expect("drawing, step \\d+/600")  # the live status line
    chat.child.sendintr()
    chat.child.expect("stopped: the thread keeps everything up to its last step")
    chat.prompt()
    _, picture = chat.say("make it red", "prompt: a slowly drawn fox; make it red", PICTURE)
    state = json.loads((Path(picture).parent.parent / "result.json").read_text())
    assert state["status"] == "budget_exhausted" and state["rounds"] == 2
    chat.say("/show", "c\\d \\(round \\d, seed", PICTURE)
    text = chat.quit()
    assert text.count("imgrag chat · profile tiny") == 1


# ----- follow-ups read by the LLM -----

def test_the_llm_rewrites_the_prompt_of_a_follow_up(settings, tmp_path: Path) -> None:
    """The rewritten prompt replaces the old one (not appended) and is shown before drawing."""
    rewritten = AIMessage('<think>{"prompt": "draft"}</think>{"prompt": "a retriever asleep in a wooden cradle, '
                          'with a picture frame on the wall", "rounds": 2, "references": []}')
    session = make_session(settings, tmp_path, llm_script=[], planner="agent")
    session.rounds = 1
    session.send("a retriever and a cradle")
    models = session.runner.manager.models
    models["llm"] = RecordingChatModel(messages=itertools.chain([rewritten], itertools.repeat(AIMessage("hm"))))
    events: list[dict] = []
    session.on_event = events.append
    result = session.send("make it sleep in a wooden cradle and add a picture frame on the wall")
    assert result["prompt"] == "a retriever asleep in a wooden cradle, with a picture frame on the wall"
    kinds = [e.get("text") if e["event"] == "note" else e["event"] for e in events]
    shown = kinds.index("prompt: a retriever asleep in a wooden cradle, with a picture frame on the wall")
    assert shown < kinds.index("tool_start")  # shown to the user before drawing
    assert result["rounds"] == 3  # 1 + the 2 rounds the LLM read


def test_an_unusable_llm_reading_falls_back_to_the_regular_expressions(settings, tmp_path: Path) -> None:
    session = make_session(settings, tmp_path, llm_script=[], planner="agent")
    session.rounds = 1
    session.send("a retriever and a cradle")
    result = session.send("add another picture frame on the wall")
    assert result["prompt"] == "a retriever and a cradle; add another picture frame on the wall"
    assert result["rounds"] == 2


def test_a_thread_opens_only_under_the_profile_that_drew_it(settings, tmp_path: Path, tiny_kit) -> None:
    session = make_session(settings, tmp_path)
    session.rounds = 1
    session.send("a retriever and a cradle")
    thread = session.thread_id
    tiny = load_settings("tiny", environ={"IMGRAG_HOME": str(tmp_path / "home"),
                                          "IMGRAG_TINY_KIT_DIR": str(tiny_kit["generator"].parent)})
    with pytest.raises(UserError, match=f"thread {thread} was started with the default profile.*"
                                        f"open it with imgrag chat --thread {thread} --profile default"):
        make_session(tiny, tmp_path).resume(thread)
    assert make_session(settings, tmp_path).resume(thread)["requests"] == ["a retriever and a cradle"]


def test_the_chat_opens_chat_threads_only(settings, tmp_path: Path) -> None:
    from agent.runner import Runner, open_checkpointer
    from tests.fakes import ScriptedJudge

    models = {"generator": FakeGenerator(), "judge": ScriptedJudge([NO_CRADLE]), "embedder": FakeEmbedder()}
    (tmp_path / "refs").mkdir(exist_ok=True)
    runner = Runner(settings, manager=FakeManager(models), reference_store=MemoryStore(tmp_path / "refs"),
                    checkpointer=open_checkpointer(tmp_path / "threads.sqlite"))
    runner.run("a rocket on a pad", planner="fixed", max_rounds=1, run_id="20261207-013608-129944")
    session = make_session(settings, tmp_path)
    with pytest.raises(UserError, match="is a run, not a chat thread: continue it with imgrag run --resume"):
        session.open("20261207-013608-129944")
    with pytest.raises(UserError, match="no thread is saved yet"):  # the run is not offered as a close thread
        session.open("20261207-013608-129945")
    with pytest.raises(UserError, match="give a thread id"):
        session.open("  ")

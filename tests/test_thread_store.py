"""The thread database as untrusted input and as a shared resource (agent/thread_store.py): a tampered
``threads.sqlite`` is refused, never run (real tampered files: extension records that would call ``os.system`` or
build an arbitrary class, a pickle row, garbage); another process holding its lock is waited for, and past the busy
timeout the run still ends with its ``result.json`` (a real lock held by a second process)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import ormsgpack
import pytest
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.checkpoint.sqlite import SqliteSaver

from agent.chat import ChatSession
from agent.chat.threads import list_threads
from agent.runner import CheckpointFailed, Runner
from agent.thread_store import (
    CHECKPOINT_TYPES,
    DEFAULT_BUSY_TIMEOUT_S,
    CheckpointWriteError,
    StrictSerializer,
    UntrustedThread,
    open_checkpointer,
)
from imgrag.settings import load_settings
from tests.fakes import FakeEmbedder, FakeGenerator, FakeManager, FakeVerdict, MemoryStore, ScriptedJudge

NO_CRADLE = FakeVerdict(False, ["a wooden cradle"], "no cradle")
MATCH = FakeVerdict(True, [], "all there")
EXT_CONSTRUCTOR_SINGLE_ARG, EXT_CONSTRUCTOR_KW_ARGS, EXT_PYDANTIC_V2 = 0, 2, 5


@pytest.fixture
def settings(tmp_path: Path):
    return load_settings("default", environ={"IMGRAG_HOME": str(tmp_path / "home")})


def make_runner(settings, tmp_path: Path, verdicts, generator=None, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S):
    models = {"generator": generator or FakeGenerator(), "judge": ScriptedJudge(verdicts), "embedder": FakeEmbedder()}
    refs = tmp_path / "refs"
    refs.mkdir(exist_ok=True)
    return Runner(settings, manager=FakeManager(models), reference_store=MemoryStore(refs),
                  checkpointer=open_checkpointer(settings.threads_db, busy_timeout_s))


# ----- strict reads -----

def _evil(marker: Path) -> dict[str, ormsgpack.Ext]:
    """Extension records of LangGraph's msgpack format that, read permissively, run a shell command and build an
    arbitrary class (``subprocess.Popen``)."""
    system = ormsgpack.Ext(EXT_CONSTRUCTOR_SINGLE_ARG, ormsgpack.packb(["os", "system", f"touch {marker}"]))
    popen = ormsgpack.Ext(EXT_CONSTRUCTOR_KW_ARGS, ormsgpack.packb(
        ["subprocess", "Popen", {"args": ["touch", f"{marker}-popen"]}]))
    return {"system": system, "popen": popen}


def _tamper_latest_checkpoint(db: str | Path, thread: str, marker: Path) -> None:
    """Rewrite the thread's latest checkpoint with the hostile records inside its channel values, as someone with
    write access to the file could."""
    conn = sqlite3.connect(str(db))
    row = conn.execute("SELECT checkpoint_id, type, checkpoint FROM checkpoints WHERE thread_id = ? "
                       "ORDER BY checkpoint_id DESC LIMIT 1", (thread,)).fetchone()
    checkpoint_id, kind, blob = row
    assert kind == "msgpack"
    raw = ormsgpack.unpackb(blob, ext_hook=lambda code, data: ormsgpack.Ext(code, data),
                            option=ormsgpack.OPT_NON_STR_KEYS)
    raw["channel_values"]["prompt"] = _evil(marker)["system"]
    raw["channel_values"]["stop_reason"] = _evil(marker)["popen"]
    conn.execute("UPDATE checkpoints SET checkpoint = ? WHERE thread_id = ? AND checkpoint_id = ?",
                 (ormsgpack.packb(raw, option=ormsgpack.OPT_NON_STR_KEYS), thread, checkpoint_id))
    conn.commit()
    conn.close()


def test_a_tampered_thread_is_refused_and_nothing_in_it_runs(settings, tmp_path: Path) -> None:
    runner = make_runner(settings, tmp_path, [NO_CRADLE])
    result = runner.run("a retriever and a cradle", planner="fixed", max_rounds=2, run_id="victim")
    assert result["status"] == "budget_exhausted"
    kept = runner.run("a rocket", planner="fixed", max_rounds=1, run_id="bystander")
    marker = tmp_path / "pwned"
    _tamper_latest_checkpoint(settings.threads_db, "victim", marker)

    # The file really is hostile: LangGraph's permissive default serializer runs the command when it reads it.
    permissive = SqliteSaver(sqlite3.connect(settings.threads_db, check_same_thread=False),
                             serde=JsonPlusSerializer(allowed_msgpack_modules=True))
    permissive.get_tuple({"configurable": {"thread_id": "victim"}})
    deadline = time.monotonic() + 10
    while not Path(f"{marker}-popen").exists() and time.monotonic() < deadline:  # Popen's child runs on its own
        time.sleep(0.05)
    assert marker.exists() and Path(f"{marker}-popen").exists()
    marker.unlink()
    Path(f"{marker}-popen").unlink()

    fresh = make_runner(settings, tmp_path, [MATCH])  # a new process's runner over the same file
    with pytest.raises(UntrustedThread) as refused:
        fresh.resume("victim")
    line = str(refused.value)
    assert "thread 'victim'" in line and settings.threads_db in line and "\n" not in line
    assert "os.system" in line and "subprocess.Popen" in line and "nothing of it was run" in line
    with pytest.raises(UntrustedThread, match="'victim'"):
        fresh.thread_state("victim")
    with pytest.raises(UntrustedThread, match="'victim'"):
        list(fresh.checkpointer.list({"configurable": {"thread_id": "victim"}}))
    assert not marker.exists() and not Path(f"{marker}-popen").exists()
    # The other thread of the same file is read as before; the whole file is not lost for one thread.
    assert fresh.resume("bystander")["status"] == kept["status"]
    assert fresh.checkpointer.thread_ids() == ["bystander", "victim"]  # newest first, read without deserialising


def test_the_chat_lists_a_tampered_thread_as_refused_and_will_not_open_it(settings, tmp_path: Path) -> None:
    runner = make_runner(settings, tmp_path, [MATCH])
    good = ChatSession(runner, planner="fixed", rounds=1)
    good.send("a retriever and a cradle")
    bad = ChatSession(runner, planner="fixed", rounds=1)
    bad.send("a rocket")
    marker = tmp_path / "pwned"
    _tamper_latest_checkpoint(settings.threads_db, bad.thread_id, marker)

    fresh = make_runner(settings, tmp_path, [MATCH])
    listed = {t["id"]: t for t in list_threads(fresh.graph(), fresh.checkpointer)}
    assert listed[good.thread_id]["first"] == "a retriever and a cradle"
    assert listed[bad.thread_id]["status"].startswith("refused") and listed[bad.thread_id]["first"] == ""
    with pytest.raises(UntrustedThread, match=bad.thread_id):
        ChatSession(fresh, planner="fixed", rounds=1).resume(bad.thread_id)
    assert not marker.exists()


@pytest.mark.parametrize("kind, blob", [
    ("pickle", b"cos\nsystem\n(S'true'\ntR."),  # a pickle that would call os.system
    ("json", json.dumps({"lc": 2, "type": "constructor", "id": ["os", "system"], "args": ["true"]}).encode()),
    ("msgpack", b"\xc1\xc1 not msgpack"),
])
def test_records_of_a_kind_imgrag_never_writes_are_refused(settings, tmp_path: Path, kind: str, blob: bytes) -> None:
    runner = make_runner(settings, tmp_path, [MATCH])
    runner.run("a retriever and a cradle", planner="fixed", max_rounds=1, run_id="victim")
    conn = sqlite3.connect(settings.threads_db)
    conn.execute("UPDATE checkpoints SET type = ?, checkpoint = ? WHERE thread_id = 'victim'", (kind, blob))
    conn.commit()
    conn.close()
    with pytest.raises(UntrustedThread, match="'victim'"):
        make_runner(settings, tmp_path, [MATCH]).resume("victim")


def test_a_tampered_pending_write_refuses_the_thread(settings, tmp_path: Path) -> None:
    runner = make_runner(settings, tmp_path, [MATCH])
    runner.run("a retriever and a cradle", planner="fixed", max_rounds=1, run_id="victim")
    conn = sqlite3.connect(settings.threads_db)
    checkpoint_id = conn.execute("SELECT checkpoint_id FROM checkpoints WHERE thread_id = 'victim' "
                                 "ORDER BY checkpoint_id DESC LIMIT 1").fetchone()[0]
    popen = ormsgpack.Ext(EXT_PYDANTIC_V2, ormsgpack.packb(["subprocess", "Popen", {"args": ["true"]}, None]))
    conn.execute("INSERT INTO writes (thread_id, checkpoint_ns, checkpoint_id, task_id, task_path, idx, channel, "
                 "type, value) VALUES ('victim', '', ?, 'task', '', 0, 'prompt', 'msgpack', ?)",
                 (checkpoint_id, ormsgpack.packb(popen)))
    conn.commit()
    conn.close()
    with pytest.raises(UntrustedThread, match="subprocess.Popen"):
        make_runner(settings, tmp_path, [MATCH]).thread_state("victim")


def test_the_allow_list_reads_back_everything_a_run_writes(settings, tmp_path: Path) -> None:
    """Every record a real run (a chat with a review pause, so an Interrupt too) writes is read back strictly."""
    runner = make_runner(settings, tmp_path, [NO_CRADLE])
    session = ChatSession(runner, planner="fixed", rounds=2, approve=True,
                          reviewer=lambda proposal: {"reference_ids": proposal.proposed, "references": {}})
    session.send("a retriever and a cradle")
    conn = sqlite3.connect(settings.threads_db)
    rows = conn.execute("SELECT type, checkpoint FROM checkpoints").fetchall() + \
        conn.execute("SELECT type, value FROM writes").fetchall()
    conn.close()
    serde = StrictSerializer()
    assert rows and all(serde.read((kind, blob))[1] is None for kind, blob in rows)
    seen = set()

    def hook(code: int, data: bytes):
        payload = ormsgpack.unpackb(data, ext_hook=hook, option=ormsgpack.OPT_NON_STR_KEYS)
        if code in (0, 1, 2, 3, 4, 5):
            seen.add((payload[0], payload[1]))

    for kind, blob in rows:
        if kind == "msgpack":
            ormsgpack.unpackb(blob, ext_hook=hook, option=ormsgpack.OPT_NON_STR_KEYS)
    assert seen and seen <= set(CHECKPOINT_TYPES), seen - set(CHECKPOINT_TYPES)
    assert {("tools.records", "Candidate"), ("tools.records", "Reference")} <= seen  # a Verdict rides inside


# ----- patient writes -----

LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")  # the write lock, held until this process ends
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


def hold_lock(db: str | Path, seconds: float) -> subprocess.Popen:
    """Another process holding the database's write lock for ``seconds``; returns once it holds it."""
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(db), str(seconds)], stdout=subprocess.PIPE,
                              text=True)
    assert locker.stdout.readline().strip() == "locked"
    return locker


def test_the_database_waits_for_other_writers_and_uses_wal(tmp_path: Path) -> None:
    saver = open_checkpointer(tmp_path / "threads.sqlite")
    assert saver.conn.execute("PRAGMA busy_timeout").fetchone()[0] == int(DEFAULT_BUSY_TIMEOUT_S * 1000)
    assert saver.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert DEFAULT_BUSY_TIMEOUT_S > 5  # sqlite3's own default
    settings = load_settings("default", environ={"IMGRAG_HOME": str(tmp_path / "h"),
                                                 "IMGRAG_THREADS_BUSY_TIMEOUT": "12.5"})
    assert settings.threads_busy_timeout == 12.5


def test_a_lock_held_for_a_moment_is_waited_out(settings, tmp_path: Path) -> None:
    runner = make_runner(settings, tmp_path, [MATCH], busy_timeout_s=20)
    runner.checkpointer.setup()
    locker = hold_lock(settings.threads_db, 1.0)
    start = time.monotonic()
    result = runner.run("a retriever and a cradle", planner="fixed", max_rounds=1)
    locker.wait(timeout=30)
    assert result["status"] == "matched" and time.monotonic() - start >= 0.9


class LockingGenerator(FakeGenerator):
    """Draws, then another process takes the database's write lock and keeps it (a chat or page busy on it)."""

    def __init__(self, db: str | Path, at_call: int = 1) -> None:
        super().__init__()
        self.db, self.at_call, self.locker = db, at_call, None

    def generate(self, prompt: str, **kwargs):
        image = super().generate(prompt, **kwargs)
        if len(self.calls) == self.at_call and self.locker is None:
            self.locker = hold_lock(self.db, 60)
        return image


def test_a_lock_held_past_the_timeout_ends_the_run_with_its_record(settings, tmp_path: Path) -> None:
    generator = LockingGenerator(settings.threads_db, at_call=2)
    runner = make_runner(settings, tmp_path, [NO_CRADLE], generator=generator, busy_timeout_s=0.5)
    try:
        with pytest.raises(CheckpointFailed) as failed:
            runner.run("a retriever and a cradle", planner="fixed", max_rounds=3, run_id="locked-out")
    finally:
        if generator.locker is not None:
            generator.locker.kill()
            generator.locker.wait()
    line = str(failed.value)
    assert "\n" not in line and "locked-out" in line and "database is locked" in line
    assert "0.5 s busy timeout (threads_busy_timeout)" in line and "--resume locked-out" in line
    on_disk = json.loads((Path(settings.output_dir) / "locked-out" / "result.json").read_text())
    assert on_disk == failed.value.result
    assert on_disk["status"] == "interrupted" and on_disk["stop_reason"].startswith("the thread database failed")
    # Both drawings are in the record, the second one's checkpoint never written (it comes from the trace).
    assert [c["id"] for c in on_disk["candidates"]] == ["c0", "c1"] and len(generator.calls) == 2
    assert on_disk["final_image"]
    trace = [json.loads(line) for line in (Path(settings.output_dir) / "locked-out" / "trace.jsonl").open()]
    assert trace[-1]["event"] == "checkpoint_failed"
    # Once the database is free the run goes on from its last written checkpoint, redrawing nothing.
    resumed = make_runner(settings, tmp_path, [NO_CRADLE], generator=generator).resume("locked-out")
    assert resumed["status"] == "budget_exhausted" and resumed["rounds"] == 3
    assert len(generator.calls) == 3


def test_a_failed_write_in_a_batch_stops_it_resumably(settings, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a retriever\na cradle\na rocket\n", encoding="utf-8")
    generator = LockingGenerator(settings.threads_db, at_call=2)
    runner = make_runner(settings, tmp_path, [NO_CRADLE], generator=generator, busy_timeout_s=0.5)
    try:
        with pytest.raises(CheckpointFailed, match=r"the batch stopped at prompt 2 \(imgrag batch .* --resume"):
            runner.batch(prompts, planner="fixed", max_rounds=1)
    finally:
        generator.locker.kill()
        generator.locker.wait()
    batch = json.loads(next(Path(settings.output_dir).glob("batch-prompts-*/batch.json")).read_text())
    assert [i["status"] for i in batch["items"]] == ["budget_exhausted", "interrupted", "pending"]
    summary = make_runner(settings, tmp_path, [NO_CRADLE]).batch(prompts, resume=True, planner="fixed",
                                                                  max_rounds=1)
    assert [i["status"] for i in summary["items"]] == ["budget_exhausted"] * 3


def test_a_write_error_names_the_thread_and_the_database(tmp_path: Path) -> None:
    error = CheckpointWriteError("chat-1", tmp_path / "threads.sqlite", "database is locked", 30)
    assert str(error) == (f"cannot write the checkpoint of thread 'chat-1' to {tmp_path / 'threads.sqlite'}: "
                          "database is locked: another process held it longer than the 30 s busy timeout "
                          "(threads_busy_timeout)")


def test_a_file_name_that_is_not_utf8_survives_a_checkpoint() -> None:
    """ormsgpack would write a lone surrogate as "?" (another, missing file): the serializer keeps the bytes."""
    import os

    from agent.thread_store import StrictSerializer

    odd = os.fsdecode(b"/pics/caf\xe9.png")
    state = {"references": {"r1": {"path": odd, "caption": "plain"}}, "paths": [odd, "/pics/ok.png"], "n": 3}
    serde = StrictSerializer()
    assert serde.loads_typed(serde.dumps_typed(state)) == state
    assert serde.loads_typed(serde.dumps_typed({"p": "/pics/ok.png"})) == {"p": "/pics/ok.png"}


# ----- the state's records in checkpoints -----

def _records_as_plain_dicts(db: str | Path) -> int:
    """Rewrite every checkpoint and pending write with the state's records as the plain dicts an imgrag of before
    the records wrote; the number of records rewritten."""
    rewritten = 0

    def hook(code: int, data: bytes) -> object:
        nonlocal rewritten
        payload = ormsgpack.unpackb(data, ext_hook=hook, option=ormsgpack.OPT_NON_STR_KEYS)
        if code == EXT_PYDANTIC_V2 and payload[0] == "tools.records":
            rewritten += 1
            return payload[2]
        return ormsgpack.Ext(code, ormsgpack.packb(payload, option=ormsgpack.OPT_NON_STR_KEYS))

    conn = sqlite3.connect(str(db))
    for table, column in (("checkpoints", "checkpoint"), ("writes", "value")):
        for rowid, kind, blob in conn.execute(f"SELECT rowid, type, {column} FROM {table}").fetchall():
            if kind == "msgpack":
                plain = ormsgpack.unpackb(blob, ext_hook=hook, option=ormsgpack.OPT_NON_STR_KEYS)
                conn.execute(f"UPDATE {table} SET {column} = ? WHERE rowid = ?",
                             (ormsgpack.packb(plain, option=ormsgpack.OPT_NON_STR_KEYS), rowid))
    conn.commit()
    conn.close()
    return rewritten


def test_the_records_round_trip_a_checkpoint(settings, tmp_path: Path) -> None:
    """A run's candidates, verdicts, references and retrievals are checkpointed as records and read back as records,
    and result.json keeps the plain shape."""
    from tools.records import Candidate, Reference, Retrieval, Verdict

    runner = make_runner(settings, tmp_path, [NO_CRADLE, MATCH])
    result = runner.run("a retriever and a cradle", planner="fixed", max_rounds=2, run_id="typed")
    values = runner.thread_state("typed").values
    assert values["candidates"] and all(isinstance(c, Candidate) for c in values["candidates"].values())
    assert isinstance(values["candidates"]["c0"].verdict, Verdict)
    assert all(isinstance(r, Reference) for r in values["references"].values())
    assert values["retrievals"] and all(isinstance(r, Retrieval) for r in values["retrievals"])
    assert values["retrievals"][0].for_ == "c0"
    assert result["candidates"] == [c.model_dump() for c in values["candidates"].values()]
    on_disk = json.loads((Path(result["run_dir"]) / "result.json").read_text())
    assert on_disk["candidates"][0]["verdict"]["missing"] == ["a wooden cradle"]
    assert "concepts" not in on_disk["candidates"][0]  # a key never given is not written


def test_an_unlisted_type_in_a_checkpoint_is_still_refused(settings, tmp_path: Path) -> None:
    """The records are allowed by name: any other pydantic model in a checkpoint refuses the thread."""
    runner = make_runner(settings, tmp_path, [MATCH])
    runner.run("a retriever and a cradle", planner="fixed", max_rounds=1, run_id="victim")
    conn = sqlite3.connect(settings.threads_db)
    checkpoint_id, blob = conn.execute("SELECT checkpoint_id, checkpoint FROM checkpoints WHERE thread_id = 'victim' "
                                       "ORDER BY checkpoint_id DESC LIMIT 1").fetchone()
    raw = ormsgpack.unpackb(blob, ext_hook=lambda code, data: ormsgpack.Ext(code, data),
                            option=ormsgpack.OPT_NON_STR_KEYS)
    raw["channel_values"]["candidates"]["c0"] = ormsgpack.Ext(EXT_PYDANTIC_V2, ormsgpack.packb(
        ["imgrag.settings", "Settings", {}, "model_validate_json"]))
    conn.execute("UPDATE checkpoints SET checkpoint = ? WHERE thread_id = 'victim' AND checkpoint_id = ?",
                 (ormsgpack.packb(raw, option=ormsgpack.OPT_NON_STR_KEYS), checkpoint_id))
    conn.commit()
    conn.close()
    with pytest.raises(UntrustedThread, match="imgrag.settings.Settings"):
        make_runner(settings, tmp_path, [MATCH]).thread_state("victim")


def test_a_thread_written_with_plain_dicts_resumes(settings, tmp_path: Path) -> None:
    """A thread database of an imgrag whose state held plain dicts: read back as records, and a chat follow-up goes
    on from it."""
    from tools.records import Candidate

    runner = make_runner(settings, tmp_path, [NO_CRADLE, NO_CRADLE, MATCH])
    session = ChatSession(runner, planner="fixed", rounds=1)
    first = session.send("a retriever and a cradle")
    assert first["status"] == "budget_exhausted"
    assert _records_as_plain_dicts(settings.threads_db) > 0
    later = make_runner(settings, tmp_path, [MATCH])
    values = later.thread_state(session.thread_id).values
    assert isinstance(values["candidates"]["c0"], Candidate) and values["candidates"]["c0"].verdict.match is False
    resumed = ChatSession(later, planner="fixed", rounds=2)
    resumed.open(session.thread_id)
    second = resumed.send("try again")
    assert second["status"] == "matched" and len(second["candidates"]) > len(first["candidates"])
    assert second["candidates"][0] == first["candidates"][0]  # the old record, in the same plain shape

"""Finding the run a ``--resume`` names, and the profile it was drawn with.

A run is resumed by its thread id, typed by a person: the exact id or a unique start of it (as the chat takes a
thread id), and a typo is one line naming the closest saved ids. A run goes on under the profile it started with
(its trace's start line records it): the tiny kit's candidates judged by the real judge, or the reverse, would be
a record of two model sets, and a profile whose models are absent would fail every remaining step."""

from __future__ import annotations

from pathlib import Path

from langgraph.checkpoint.base import BaseCheckpointSaver

from agent.thread_store import closest_thread_ids, match_thread_id, thread_ids
from imgrag.errors import UserError
from imgrag.records.runs import RUN_ID_PATTERN, RunRecord


def find_run(checkpointer: BaseCheckpointSaver, output_dir: str | Path, text: str, database: str | Path) -> str:
    """The run id a typed ``text`` names: a thread of ``checkpointer``, or a run folder of ``output_dir`` with a
    trace (a run stopped before its first checkpoint); exact, else a unique start of one.

    Raises UserError when it names none (with the closest ids and where they were looked for) or several."""
    text = text.strip()
    if not text:
        raise UserError("give the run id to resume (the line `resume with: …` of the stopped run names it)")
    ids = thread_ids(checkpointer)
    if text in ids:
        return text
    if RUN_ID_PATTERN.match(text) and (Path(output_dir) / text / "trace.jsonl").exists():
        return text
    found = match_thread_id(ids, text)
    if found is not None:
        return found
    close = closest_thread_ids(ids, text)
    hint = f"closest: {', '.join(close)}" if close else ("no run is saved there yet" if not ids else
                                                          "none is close; the run folders' names are their ids")
    raise UserError(f"no run with thread id {text!r} in {database} ({hint})")


def recorded_profile(run_dir: str | Path) -> str | None:
    """The profile the run in ``run_dir`` started with ("default", "tiny"), from its trace's start line; None when
    the folder has no readable start line."""
    record = RunRecord(run_dir)
    if not record.trace_path.exists():
        return None
    start = next((step for step in record.read_steps() if step.get("event") == "start"), None)
    profile = start.get("profile") if start else None
    return profile if isinstance(profile, str) else None


def check_resume_profile(run_dir: str | Path, profile: str, what: str, how: str = "resume it with") -> None:
    """Refuse to go on with ``what`` ("run ID", "thread ID"), recorded in ``run_dir``, under ``profile`` when it
    started under another one (see the module's docstring); the error ends "``how`` --profile P". A run whose
    trace names no profile goes on."""
    started = recorded_profile(run_dir)
    if started is not None and started != profile:
        raise UserError(f"{what} was started with the {started} profile, and the {profile} profile's models "
                        f"would draw and judge the rest; {how} --profile {started}")

"""Running the graph: one prompt (``imgrag run``), a resumed thread, or a batch of prompts.

A ``Runner`` holds one model manager and one checkpointer for its whole life, so a batch loads each
model once. Every run has a thread id (= its run id) in the SQLite checkpointer; a killed run
continues from its last checkpoint with ``resume``.

Beside it: agent/run_result.py (what result.json holds), agent/run_errors.py (how a run stops short),
agent/batch_run.py (the batch loop). The Runner stays one class over 400 lines: starting, resuming, stopping and
closing a run share its checkpointer, manager and compiled graph, and each path closes the record the same way
(``_drive``), which reads best in one place.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, ToolMessage
from langgraph.checkpoint.base import BaseCheckpointSaver

from agent.batch import (
    FINISHED,
    claim_item,
    fail_item,
    open_batch,
    read_prompt_file,
    settle_item,
)
from agent.batch_run import run_batch
from agent.context import RunContext
from agent.graph import build_graph, initial_state
from agent.memory_guide import check_user_references, learn_from_run, start_references
from agent.nodes import outcome
from agent.run_errors import CheckpointFailed, DiskFull, RunInterrupted
from agent.run_lookup import check_resume_profile, find_run
from agent.run_result import RUN_END_KEYS, build_result, finished_calls
from agent.thread_store import CheckpointWriteError, UntrustedThread, open_checkpointer
from imgrag.drawing.draw_options import DrawOptions, parse_options
from imgrag.drawing.schedulers import check_with_fast
from imgrag.errors import ModelLoadError, UserError, check_seed, check_text
from imgrag.management.engine import build_manager
from imgrag.management.manager import add_loads
from imgrag.models.chat_model import check_endpoint
from imgrag.models.embedder import prompt_length_notice
from imgrag.records.runs import RUN_ID_PATTERN, RunRecord, disk_full_line, is_disk_full, new_run_id
from imgrag.settings import Settings
from imgrag.store import ReferenceStore, index_hint, store_census
from imgrag.text import describe_error
from tools.budget import Clock, check_rounds, recursion_limit, run_budget
from tools.context import EventSink, Models
from tools.final_redraw import redraw_final_full

PLANNERS = ("agent", "fixed")
# The batch record's functions live in agent/batch.py; importable from here too, as before.
__all__ = ["FINISHED", "PLANNERS", "CheckpointFailed", "DiskFull", "RunInterrupted", "Runner",
           "claim_item", "fail_item", "open_batch", "open_checkpointer", "read_prompt_file", "settle_item"]


class Runner:
    """Runs prompts through the agent graph with models loaded once."""

    def __init__(self, settings: Settings, manager: Models | None = None, on_event: EventSink | None = None,
                 checkpointer: BaseCheckpointSaver | None = None, reference_store: Any = None,
                 previews: bool = False) -> None:
        if manager is None:
            manager = build_manager(settings)
        self.settings = settings
        self.manager = manager
        self.on_event = on_event or (lambda event: None)
        self.checkpointer = checkpointer or open_checkpointer(settings.threads_db, settings.threads_busy_timeout)
        self.reference_store = reference_store  # None: opened from settings.store when a run starts
        # Live previews of the drawings as "preview" events (imgrag/models/previews.py): a front end that shows them
        # asks.
        self.previews = previews
        self._store_told = False  # the store's picture count is said once per runner (a batch, a chat)
        self._llm_checked = False
        # Compiled once per runner (so once per process): each run passes its own RunContext when it invokes it.
        self._graph = build_graph().compile(checkpointer=self.checkpointer)

    # ----- one run -----
    def run(self, prompt: str, *, seed: int | None = None, max_rounds: int | None = None, planner: str = "agent",
            run_id: str | None = None, approve: bool = False,
            references: list[dict[str, Any]] | None = None, options: DrawOptions | None = None) -> dict[str, Any]:
        """Run one prompt to a match or the budget; return result.json's document.

        ``options`` (negative prompt, guidance, scheduler, drawings per round; default the settings') are kept in
        the run's state, so a resume draws the same way (:mod:`imgrag.drawing.draw_options`).

        With ``approve`` (the chat's /approve on) the thread pauses before each regenerate: the result then
        has ``pending`` (the interrupt's question) and is not final; answer with :meth:`continue_thread`.
        ``references`` (``[{"path", "weight"?, "mode"?}]``, a batch line's) guide round 1; so do remembered ones
        for the concepts the prompt names (``retrieval.memory``; see agent/memory_guide.py)."""
        user_refs = check_user_references(references, self.settings)
        prompt = (prompt or "").strip()
        if not prompt:
            raise UserError("the prompt is empty")
        check_text(prompt)
        if planner not in PLANNERS:
            raise UserError(f"unknown planner {planner!r} (use {' or '.join(PLANNERS)})")
        check_rounds(max_rounds)
        run_id = run_id or new_run_id()
        if not RUN_ID_PATTERN.match(run_id):
            raise UserError(f"run id {run_id!r} may hold only letters, digits, '.', '_' and '-'")
        run_dir = Path(self.settings.output_dir) / run_id
        if run_dir.exists() and any(run_dir.iterdir()):
            raise UserError(f"run {run_id} already exists in {run_dir}; use --resume {run_id} to continue it")
        seed = check_seed(self.settings.generation.seed if seed is None else seed)
        options = options or DrawOptions.from_settings(self.settings)
        check_with_fast(options.scheduler, self.settings.generation.fast)
        if planner == "agent":
            self.check_llm()
        loads_before = self.manager.load_counts()  # the run's checks load models too (the embedder): they count
        if options.loras and self.settings.generation.draw_with == "sdxl":
            # A LoRA made for another base model is one line now, not a failed tool call in every round.
            self.manager.run("generator", lambda generator: generator.prepare_loras(options.loras))
        budget = run_budget(self.settings, max_rounds, options.per_round)
        census = self._store_census()  # before check_retrieval opens the store (a typo'd path reads as empty)
        retrieval_off = self.check_retrieval()
        start_refs, start_guidance, memory_event = start_references(self.settings, self.manager, prompt, user_refs,
                                                                    self.on_event)
        state = initial_state(prompt, seed=seed, run_id=run_id, run_dir=str(run_dir), planner=planner, budget=budget,
                              approve=approve, retrieval_off=retrieval_off, references=start_refs,
                              start_guidance=start_guidance, drawing=options.to_state())
        record = RunRecord(run_dir)
        record.append_step({"event": "start", "prompt": prompt, "planner": planner, "budget": budget,
                            "seed": state["seed"], "profile": self.settings.profile, "drawing": options.to_state(),
                            **({"references": user_refs} if user_refs else {})})
        if memory_event:
            record.append_step(memory_event)  # which remembered references guide round 1, and which did not
        self._tell_store(record, census)
        too_long = prompt_length_notice(prompt)
        if too_long:  # said once, in words, rather than as the embedder's log line at every score
            record.append_step({"event": "warning", "warning": too_long})
            self.on_event({"event": "note", "text": too_long})
        if retrieval_off:
            record.append_step({"event": "retrieval_off", "reason": retrieval_off})
            self.on_event({"event": "note", "text": f"retrieval is unavailable ({retrieval_off}); drawing without "
                                                    "references"})
        return self._drive(state, run_id, record, state, loads_before)

    def _store_census(self) -> tuple[str, int | None] | None:
        """(location, picture count) of the store, the first time a runner asks; None after that, or when the
        store cannot be read (check_retrieval then says why)."""
        if self._store_told:
            return None
        self._store_told = True
        try:
            if self.reference_store is not None:  # given by the caller (tests, a batch's opened store)
                location = str(getattr(self.reference_store, "location", "the given store"))
                return location, int(self.reference_store.count())
            return store_census(self.settings.store)
        except Exception:  # an unreachable server, another embedder's store: check_retrieval names it once
            return None

    def _tell_store(self, record: RunRecord, census: tuple[str, int | None] | None) -> None:
        """Say which store the run retrieves from and how many pictures it holds, once per runner: an empty
        store, or a --store path that does not exist (a typo), is a warning now rather than a surprise at the
        first retrieve. A store event for the front end; the trace keeps warnings."""
        if census is None:
            return
        location, pictures = census
        warning = None
        hint = index_hint(self.settings.profile, location)
        if pictures is None:
            what = "holds no store yet" if Path(location).is_dir() else "does not exist"
            warning = (f"the store {location} {what}, so retrieval will find no reference; check "
                       f"--store, or add pictures with {hint}")
        elif pictures == 0:
            warning = (f"the store {location} holds no pictures, so retrieval will find no reference; add some "
                       f"with {hint}")
        if warning:
            record.append_step({"event": "warning", "warning": warning})
        self.on_event({"event": "store", "location": location, "pictures": pictures, "warning": warning})

    def check_llm(self) -> None:
        """An OpenAI-compatible agent LLM must answer before a run starts: a UserError of one line otherwise.
        Checked once per runner (a batch or a chat asks once)."""
        if self.settings.models.llm_backend == "openai" and not self._llm_checked:
            check_endpoint(self.settings)
            self._llm_checked = True

    def check_retrieval(self) -> str | None:
        """Why retrieval cannot work for a run (the store unreachable, built by another embedder), or None.

        Checked once when a run starts, so the run says so once and draws without references instead of
        failing the same retrieval every round. Opens the store (loading the embedder, which every run needs
        for its CLIP scores) and keeps it for the run."""
        try:
            if self.reference_store is None:
                model_id, dim = self.manager.run("embedder", lambda embedder: (embedder.model_id, embedder.dim))
                self.reference_store = ReferenceStore.open(self.settings, model_id, dim)
            self.reference_store.count()
        except ModelLoadError:
            raise  # the embedder itself cannot load: the user's setting to fix, before any work
        except UserError as exc:
            return str(exc)
        except Exception as exc:  # a store that fails in another way is still no reason to stop the run
            return describe_error(exc)
        return None

    def resume(self, run_id: str) -> dict[str, Any]:
        """Continue a run from its last checkpoint; finished steps are not redone. ``run_id`` may be a unique start of
        the id; a run started under another profile is refused (:mod:`agent.run_lookup`).

        A finished run is left as it is: its result.json is returned, not rewritten. A run stopped before its
        first checkpoint (Ctrl-C or a kill while the first model loaded) starts again from its trace's start line.
        """
        run_id = find_run(self.checkpointer, self.settings.output_dir, run_id, self.settings.threads_db)
        snapshot = self.graph().get_state({"configurable": {"thread_id": run_id}})
        if not snapshot.values:
            return self._restart(run_id)
        record = RunRecord(snapshot.values["run_dir"])
        if not snapshot.next and not snapshot.interrupts:
            finished = record.read_result()
            if finished and finished.get("status") != "interrupted":
                self.on_event({"event": "already_finished", "run_id": run_id, "status": finished["status"]})
                return finished
        check_resume_profile(record.dir, self.settings.profile, f"run {run_id}")
        record.append_step({"event": "resume", "from_checkpoint": snapshot.config["configurable"].get("checkpoint_id")})
        return self._drive(None, run_id, record, snapshot.values)

    def _restart(self, run_id: str) -> dict[str, Any]:
        """Run again from the start a run that has a trace but no checkpoint (see :meth:`resume`)."""
        if not RUN_ID_PATTERN.match(run_id):
            raise UserError(f"run id {run_id!r} may hold only letters, digits, '.', '_' and '-'")
        record = RunRecord(Path(self.settings.output_dir) / run_id)
        start = next((s for s in record.read_steps() if s.get("event") == "start"), None)
        if start is None:
            raise UserError(f"no run with thread id {run_id!r} in {self.settings.threads_db}")
        check_resume_profile(record.dir, self.settings.profile, f"run {run_id}")
        # The references round 1 was to be guided by: the run's own (as its start line recorded them), and the
        # memory's as it stands now.
        user_refs = check_user_references(start.get("references"), self.settings)
        start_refs, start_guidance, _ = start_references(self.settings, self.manager, start["prompt"], user_refs)
        drawing = start.get("drawing")  # the run's drawing options as its start line recorded them (None: settings')
        state = initial_state(start["prompt"], seed=start["seed"], run_id=run_id, run_dir=str(record.dir),
                              planner=start["planner"], budget=start["budget"], approve=False,
                              references=start_refs, start_guidance=start_guidance,
                              drawing=parse_options(drawing, f"{record.trace_path}: drawing").to_state()
                              if isinstance(drawing, dict) else None)
        record.append_step({"event": "restart", "reason": "no checkpoint was written before the run stopped"})
        return self._drive(state, run_id, record, state)

    # ----- threads (the chat) -----
    def graph(self):
        """The graph over this runner's checkpointer, compiled once: runs invoke it with their context, and the chat
        reads and edits threads through it (state, history), which needs no context."""
        return self._graph

    def thread_state(self, thread_id: str):
        """The thread's latest StateSnapshot; a UserError when the checkpointer has no such thread."""
        snapshot = self.graph().get_state({"configurable": {"thread_id": thread_id}})
        if not snapshot.values:
            raise UserError(f"no run with thread id {thread_id!r} in {self.settings.threads_db}")
        return snapshot

    def continue_thread(self, thread_id: str, graph_input: Any, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Invoke the graph again on an existing thread and return the result as :meth:`run` does.

        ``graph_input`` is a state update (a chat follow-up: its HumanMessage, the new prompt and budget, merged by
        the state's reducers), a ``Command(resume=...)`` answering a pause, or None to go on from the checkpoint.
        ``event`` is appended to the thread's trace first."""
        snapshot = self.thread_state(thread_id)
        record = RunRecord(snapshot.values["run_dir"])
        if event:
            record.append_step(event)
        self._tell_store(record, self._store_census())
        values = {**snapshot.values, **graph_input} if isinstance(graph_input, dict) else snapshot.values
        return self._drive(graph_input, thread_id, record, values)

    def stop(self, thread_id: str, reason: str, unmatched: str = "interrupted") -> dict[str, Any] | None:
        """Close a request that was cut off (Ctrl-C, a killed process, an unanswered pause) at its last checkpoint:
        answer its dangling tool calls, end with the best candidate so far, write result.json. None when the
        thread has nothing in flight. ``unmatched`` is the status when the best candidate did not match:
        "interrupted" for a request cut off by the user, "budget_exhausted" for a run ended by an error."""
        graph = self.graph()
        config = {"configurable": {"thread_id": thread_id}}
        snapshot = graph.get_state(config)
        if not snapshot.values or not snapshot.next:
            return None
        values = snapshot.values
        messages = values.get("messages") or []
        answered = {m.tool_call_id for m in messages if isinstance(m, ToolMessage)}
        last_ai = next((m for m in reversed(messages) if isinstance(m, AIMessage)), None)
        closing = [ToolMessage(f"Not run: {reason}.", tool_call_id=c["id"], name=c["name"], status="error")
                   for c in (last_ai.tool_calls if last_ai else []) if c["id"] not in answered]
        # As if finalize ran: the next step is END, so the thread is settled and takes new requests. The request was
        # cut off, not out of budget: unless the best candidate already matched, its status says so.
        ended = outcome(values)
        if ended["status"] == "budget_exhausted":
            ended["status"] = unmatched
        graph.update_state(config, {"messages": closing, "stop_reason": reason, **ended}, as_node="finalize")
        record = RunRecord(values["run_dir"])
        result = self.result_of(graph.get_state(config).values, record)
        record.append_step({"event": "stopped", "reason": reason, "final_image": result["final_image"]})
        record.write_result(result)
        return result

    def _drive(self, graph_input: Any, run_id: str, record: RunRecord, values: dict[str, Any],
               loads_before: dict[str, int] | None = None) -> dict[str, Any]:
        """Stream the graph from ``graph_input`` (a state, an update, a Command, or None for the checkpoint) and
        write result.json; ``values`` is the state the run starts from (for its clock and budget)."""
        clock = Clock(seconds_before=float(values.get("seconds") or 0.0))
        ctx = RunContext(self.settings, self.manager, record, on_event=self.on_event,
                         reference_store=self.reference_store, clock=clock, previews=self.previews,
                         deadline=clock.deadline(float(values["budget"]["max_seconds"])))
        graph = self._graph
        config = {"configurable": {"thread_id": run_id}, "recursion_limit": recursion_limit(values["budget"])}
        self.on_event({"event": "run_start", "run_id": run_id, "run_dir": str(record.dir)})
        # model_loads in result.json: what this run loaded, in this process and in the ones before it (a resume).
        earlier = (record.read_result() or {}).get("model_loads") if record.result_path.exists() else None
        before = self.manager.load_counts() if loads_before is None else loads_before
        record.reserve_space()  # given back when the run ends, or on a full disk to close the record
        latest = values  # the state after the last step, in memory: the record if the database fails under the run
        try:
            # Each checkpoint is written before the next step starts ("sync"): a write that fails stops the run at
            # that step, so the record closed from memory and a --resume from the last checkpoint meet there.
            for chunk in graph.stream(graph_input, config, stream_mode="values", context=ctx, durability="sync"):
                if isinstance(chunk, dict) and "run_id" in chunk:
                    latest = chunk
            snapshot = graph.get_state(config)
            # The matched fast draft redrawn at full steps, when asked: inside this handling, as a tool is.
            final_full = None if snapshot.interrupts else redraw_final_full(ctx, snapshot.values)
        except KeyboardInterrupt:
            # Ctrl-C: close the record from the last checkpoint, leaving the thread as it is so --resume goes on.
            record.release_space()
            result = self._partial_result(graph, config, values, record, add_loads(earlier, self.loads_since(before)),
                                          "interrupted (Ctrl-C)")
            record.append_step({"event": "interrupted", "checkpoint": result.pop("_checkpoint")})
            record.write_result(result)
            raise RunInterrupted(result) from None
        except UntrustedThread:
            record.release_space()
            raise  # nothing of the thread was read, so nothing ran: one line, the record left as it was
        except CheckpointWriteError as exc:  # the database failed under the run: its record from the state in memory
            raise self._checkpoint_failed(exc, latest, record, add_loads(earlier, self.loads_since(before))) from None
        except Exception as exc:  # no error ends a run without its result: close it at its last checkpoint
            if is_disk_full(exc):
                raise self._full_disk(exc, graph, config, values, record,
                                      add_loads(earlier, self.loads_since(before))) from None
            record.release_space()
            reason = f"error: {describe_error(exc)}"
            record.append_step({"event": "error", "error": reason, "exception": traceback.format_exc(limit=8)[-4000:]})
            self.reference_store = ctx.reference_store
            result = self.stop(run_id, reason, unmatched="budget_exhausted")  # ended, with its best candidate
            if result is None:
                raise
            self.on_event({"event": "run_end", **{k: result.get(k) for k in RUN_END_KEYS}})
            return result
        self.reference_store = ctx.reference_store  # keep the opened store for the next run of a batch
        record.release_space()
        result = self.result_of(snapshot.values, record, add_loads(earlier, self.loads_since(before)))
        if final_full:
            result["final_full"] = final_full  # the matched fast draft redrawn at full steps, when asked
        if snapshot.interrupts:  # paused for the user (review): not over, so no result.json yet
            result["pending"] = [i.value for i in snapshot.interrupts]
            self.on_event({"event": "paused", "run_id": run_id})
            return result
        learned = learn_from_run(self.settings, {**snapshot.values, "status": result["status"]})
        if learned:
            record.append_step(learned)
        record.append_step({"event": "end", "status": result["status"], "final_image": result["final_image"],
                            "final_source": result["final_source"]})
        record.write_result(result)
        self.on_event({"event": "run_end", **{k: result.get(k) for k in RUN_END_KEYS}})
        return result

    def _partial_result(self, graph: Any, config: dict[str, Any], values: dict[str, Any], record: RunRecord,
                        model_loads: dict[str, int], reason: str, *, in_memory: bool = False) -> dict[str, Any]:
        """result.json of a run cut off mid-way (status ``interrupted``): its last checkpoint (with ``in_memory``,
        ``values`` as they are, the database unread) plus the tool calls that finished after it, with the best
        candidate so far as its answer (finalize never ran to name it). ``_checkpoint`` (popped by the caller) is
        the checkpoint id the thread stays at (None when unread)."""
        state, checkpoint = values, None
        if not in_memory:
            try:
                snapshot = graph.get_state(config)
                state, checkpoint = snapshot.values or values, (snapshot.config or {}).get("configurable", {}).get(
                    "checkpoint_id")
            except Exception:  # the checkpointer itself failed (a full disk under it): the run's starting state
                state, checkpoint = values, None
        state = finished_calls(state, record)
        state = {**state, "final_candidate": outcome(state)["final_candidate"]}
        result = self.result_of(state, record, model_loads)
        result.update(status="interrupted", stop_reason=reason, _checkpoint=checkpoint)
        return result

    def _full_disk(self, exc: BaseException, graph: Any, config: dict[str, Any], values: dict[str, Any],
                   record: RunRecord, model_loads: dict[str, int]) -> DiskFull:
        """Close the record of a run whose disk filled up, as Ctrl-C does (the thread stays at its checkpoint, so
        ``--resume`` goes on), using the space the run set aside; return the one-line error to raise."""
        fallback = self.settings.threads_db if "sqlite" in type(exc).__module__ else record.dir
        line = disk_full_line(exc, fallback)
        record.release_space()
        result = self._partial_result(graph, config, values, record, model_loads, f"the disk is full ({line})")
        checkpoint = result.pop("_checkpoint")
        kept = "result.json"
        try:
            record.append_step({"event": "disk_full", "error": line, "checkpoint": checkpoint})
            record.write_result(result)
        except OSError:
            kept = "its trace up to the last step (result.json could not be written)"
        drawn = len(result["candidates"])
        message = (f"{line}; run {result['run_id']} kept {drawn} candidate(s) and {kept} in {record.dir}"
                   + (f", best so far {result['final_image']}" if result["final_image"] else ""))
        return DiskFull(message, result)

    def _checkpoint_failed(self, exc: CheckpointWriteError, latest: dict[str, Any], record: RunRecord,
                           model_loads: dict[str, int]) -> CheckpointFailed:
        """Close the record of a run whose checkpoint could not be written (the database locked past its busy
        timeout, an I/O error) from ``latest``, the state the run holds in memory, without reading the database;
        the thread stays at its last written checkpoint, so ``--resume`` goes on. Returns the one-line error."""
        record.release_space()
        result = self._partial_result(None, {}, latest, record, model_loads, f"the thread database failed: "
                                      f"{exc.reason}", in_memory=True)
        result.pop("_checkpoint")
        record.append_step({"event": "checkpoint_failed", "error": str(exc)})
        record.write_result(result)
        self.on_event({"event": "run_end", **{k: result.get(k) for k in RUN_END_KEYS}})
        drawn = len(result["candidates"])
        message = (f"{exc}; run {result['run_id']} kept {drawn} candidate(s) and result.json in {record.dir}"
                   + (f", best so far {result['final_image']}" if result["final_image"] else "")
                   + f"; once the database is free, continue it with --resume {result['run_id']}")
        return CheckpointFailed(message, result)

    def result_of(self, state: dict[str, Any], record: RunRecord,
                   model_loads: dict[str, int] | None = None) -> dict[str, Any]:
        """result.json for ``state`` (:func:`agent.run_result.build_result`) with this runner's settings and models."""
        return build_result(state, record, self.settings, self.manager.stats(), model_loads)

    # ----- batches -----
    def batch(self, path: str | Path, *, resume: bool = False, planner: str | None = None,
              max_rounds: int | None = None, on_item: Callable[[dict], None] | None = None,
              options: DrawOptions | None = None) -> dict[str, Any]:
        """Run every prompt of a .txt or .jsonl file with this runner's models (:func:`agent.batch_run.run_batch`)."""
        return run_batch(self, path, resume=resume, planner=planner, max_rounds=max_rounds, on_item=on_item,
                         options=options)

    def loads_since(self, before: dict[str, int]) -> dict[str, int]:
        """The models loaded since ``before`` (an earlier :meth:`ModelManager.load_counts`), name -> count."""
        now = self.manager.load_counts()
        return {name: n - before.get(name, 0) for name, n in now.items()}

"""A batch of prompts run one after another by one runner (``imgrag batch``): resumable, one failure never stops
the rest, but Ctrl-C, a full disk or a thread database that cannot be written stop it with the batch record saved
(``--resume`` continues). The batch record itself (reading the file, batch.json) is agent/batch.py's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from agent.batch import (
    FINISHED,
    claim_item,
    fail_item,
    line_options,
    open_batch,
    read_prompt_file,
    settle_item,
)
from agent.run_errors import CheckpointFailed, DiskFull, RunInterrupted
from imgrag.atomic_files import write_json_atomic
from imgrag.drawing.draw_options import DrawOptions
from imgrag.records.runs import disk_full_line, is_disk_full
from imgrag.settings import Settings
from tools.context import Models


class BatchRunner(Protocol):
    """What a batch asks of :class:`agent.runner.Runner` (which calls this module, so it is named by its methods)."""

    settings: Settings
    manager: Models

    def run(self, prompt: str, **kwargs: Any) -> dict[str, Any]: ...

    def resume(self, run_id: str) -> dict[str, Any]: ...

    def loads_since(self, before: dict[str, int]) -> dict[str, int]: ...


def run_batch(runner: BatchRunner, path: str | Path, *, resume: bool = False, planner: str | None = None,
              max_rounds: int | None = None, on_item: Callable[[dict], None] | None = None,
              options: DrawOptions | None = None) -> dict[str, Any]:
    """Run every prompt of a .txt (one a line) or .jsonl file; resumable, one failure never stops the rest.

    ``planner`` (None: "agent") and ``max_rounds`` are recorded in batch.json, and a resume goes on with them
    (:func:`agent.batch.open_batch`). ``options``: how every prompt is drawn (default the settings'); a .jsonl
    line's own keys change them for it."""
    path = Path(path)
    items = read_prompt_file(path, settings=runner.settings)  # every bad line named at once, before any run
    batch_dir, state = open_batch(path, runner.settings.output_dir, resume=resume, items=items,
                                  profile=runner.settings.profile, planner=planner, max_rounds=max_rounds)
    planner, max_rounds = state["planner"], state.get("max_rounds")
    start = time.perf_counter()
    if resume and (batch_dir / "summary.json").exists() and all(
            item["status"] in FINISHED for item in state["items"]):
        # Nothing left to do: the record of the finished batch stays as it was.
        return json.loads((batch_dir / "summary.json").read_text(encoding="utf-8"))
    for item in state["items"]:
        if item["status"] in FINISHED:
            continue  # finished in an earlier process
        before = runner.manager.load_counts()
        try:
            if item["run_id"] and item["status"] in ("running", "interrupted"):
                result = runner.resume(item["run_id"])
            else:
                claim_item(batch_dir, state, item)
                result = runner.run(item["prompt"], seed=item.get("seed"),
                                  max_rounds=max_rounds or item.get("max_rounds"), planner=planner,
                                  run_id=item["run_id"], references=item.get("references"),
                                  options=line_options(options or runner.settings, item))
            settle_item(item, result)
        except KeyboardInterrupt as exc:
            # Kept as interrupted with its run id: the next --resume continues it from its checkpoint.
            item.update(status="interrupted", error=None, model_loads=runner.loads_since(before))
            write_json_atomic(batch_dir / "batch.json", state)
            result = exc.result if isinstance(exc, RunInterrupted) else {"run_id": item["run_id"]}
            raise RunInterrupted(result, batch_dir=str(batch_dir)) from None
        except Exception as exc:  # one broken prompt must not stop the batch; the error is kept
            if isinstance(exc, DiskFull) or is_disk_full(exc):  # but a full disk stops every prompt after it
                item.update(status="interrupted", error=None, model_loads=runner.loads_since(before))
                try:
                    write_json_atomic(batch_dir / "batch.json", state)
                except OSError:
                    pass  # the item stays "running" on disk: --resume continues it the same way
                message = str(exc) if isinstance(exc, DiskFull) else disk_full_line(exc, batch_dir)
                raise DiskFull(message, getattr(exc, "result", None), batch_dir=str(batch_dir)) from None
            if isinstance(exc, CheckpointFailed):  # the database is not writable now: the prompts after it neither
                item.update(status="interrupted", error=None, model_loads=runner.loads_since(before))
                write_json_atomic(batch_dir / "batch.json", state)
                raise CheckpointFailed(f"{exc}; the batch stopped at prompt {item['index'] + 1} (imgrag batch "
                                       f"{path} --resume continues it)", exc.result,
                                       batch_dir=str(batch_dir)) from None
            fail_item(item, exc)
        # This prompt's loads (its run's record), not the process's running total; that stays in the summary.
        item.setdefault("model_loads", runner.loads_since(before))
        write_json_atomic(batch_dir / "batch.json", state)
        if on_item:
            on_item(item)
    summary = {"batch_dir": str(batch_dir), "file": str(path), "items": state["items"],
               "model_loads": runner.manager.load_counts(), "seconds": round(time.perf_counter() - start, 3)}
    write_json_atomic(batch_dir / "summary.json", summary)
    return summary

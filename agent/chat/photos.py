"""The chat's "use photo N as the answer": a photo of the collection can be the answer, not only a drawing.

The user names a photo of the thread: a /refs number or id (a reference retrieved for a repair, or a photo the
agent considered), or a photo candidate's id. It becomes a candidate marked ``"source": "retrieved"`` with its
own path, and the thread's answer: the request ends as if finalize ran, with status ``chosen`` (the user's
choice, not the judge's) and result.json written. Nothing is drawn or judged.
"""

from __future__ import annotations

import re
from typing import Any

from agent.chat.commands import resolve_reference
from agent.nodes import outcome
from imgrag.candidate_ids import next_candidate_id
from imgrag.errors import UserError
from imgrag.records.runs import RunRecord
from tools.records import Finished
from tools.retrieved_tools import SOURCE_RETRIEVED, photo_candidate

USE_PHOTO = re.compile(r"^\s*(?:please\s+)?use\s+(?:the\s+)?(?:photo|picture|reference|ref)\s*(?:number\s+|#)?"
                       r"(\S+?)\s+as\s+(?:the\s+|my\s+|your\s+)?answer\s*[.!]?\s*$", re.IGNORECASE)


def parse_use_photo(text: str) -> str | None:
    """The photo named by "use photo N as the answer" (N, an id, or a candidate id), or None for other text."""
    m = USE_PHOTO.match(text or "")
    return m.group(1) if m else None


def use_photo(session: Any, token: str) -> dict[str, Any]:
    """Make the thread's photo ``token`` its answer; return result.json's document (as a request does).

    ``session`` is an :class:`agent.chat.ChatSession` with a thread. Raises a one-line UserError for an unknown
    photo."""
    runner = session.runner
    values = session.values()
    if not values:
        raise UserError("no request on this thread yet: describe a picture first")
    candidates = values.get("candidates") or {}
    key = token.strip().lower()
    photo = candidates.get(key)
    if photo is not None and photo.source != SOURCE_RETRIEVED:
        raise UserError(f"{key} is a drawing, not a photo; /show {key} shows it (the best drawing is the answer)")
    if photo is None:
        references = values.get("references") or {}
        ref_id = resolve_reference(token, references)
        photo = next((c for c in candidates.values() if c.reference_id == ref_id), None)
        if photo is None:
            record = RunRecord(values["run_dir"])
            cid = next_candidate_id(candidates, lambda c: record.candidate_path(c).exists())
            photo = photo_candidate(cid, references[ref_id].replace(id=ref_id), values["prompt"],
                                    int(values.get("rounds", 0)), chosen_by="user")
    config = {"configurable": {"thread_id": session.thread_id}}
    graph = runner.graph()
    reason = f"the user chose photo {token} as the answer"
    update = {"candidates": {photo.id: photo}, "finished": None}
    graph.update_state(config, update, as_node="finalize")
    graph.update_state(config, {"finished": Finished(candidate_id=photo.id, reason=reason)}, as_node="finalize")
    state = graph.get_state(config).values
    ended = {**outcome(state), "stop_reason": reason}
    if ended["status"] != "matched":
        ended["status"] = "chosen"
    graph.update_state(config, ended, as_node="finalize")
    record = RunRecord(values["run_dir"])
    result = runner.result_of(graph.get_state(config).values, record)
    record.append_step({"event": "use_photo", "candidate_id": photo.id, "path": photo.path,
                        "final_source": SOURCE_RETRIEVED, "status": result["status"]})
    record.write_result(result)
    return result

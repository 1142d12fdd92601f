"""A run's first round guided by references it starts with: the user's own (a batch line's ``references``) and the
ones the concept memory (:mod:`imgrag.store.memory`) holds for concepts the prompt names.

:func:`start_references` is called by the runner when a run starts, before the graph: it turns both into reference
records (``source`` "user" or "memory", with their weight and mode) and the state's ``start_guidance``
(``{"reference_ids", "concepts", "source"}``). The fixed policy then draws round 1 with them (``regenerate``
instead of ``generate``); the agent LLM sees them in its status summary. :func:`learn_from_run` is called when a
run ends: the references of a matched guided answer are remembered for the concepts they stood for, and a
remembered reference that guided a mismatch is demoted.

The memory's rule, in full: a remembered concept guides a run when the prompt names it (every word of the concept
but articles appears in the prompt), the reference is not demoted (fewer mismatches than matches), its file is
still there with the same content (sha256), and CLIP's cosine of the picture and the concept's text reaches
``retrieval.memory_min_score``. At most ``MAX_REFERENCES`` references guide a drawing; the user's come first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imgrag.drawing.steering import check_mode, check_weight
from imgrag.errors import UserError
from imgrag.images import probe_image
from imgrag.management.engine import ManagedEmbedder
from imgrag.models.safety import excluded_by
from imgrag.records.provenance import file_sha256
from imgrag.store.memory import ConceptMemory, recall_references
from tools.budget import MAX_REFERENCES


def check_user_references(references: Any, settings: Any, *, base: Path | None = None,
                          where: str = "references") -> list[dict[str, Any]]:
    """A batch line's (or a caller's) ``references`` checked and resolved before any model loads:
    ``[{"path", "weight"?, "mode"?}]`` -> ``[{"path" (absolute), "weight", "mode", "sha256"}]``. Relative paths
    are read from ``base`` (the batch file's folder). Raises a UserError naming ``where`` for a reference that is
    missing, not a picture, excluded by ``safety.exclude``, or steered out of bounds."""
    if references is None:
        return []
    if not isinstance(references, list):
        raise UserError(f"{where}: \"references\" must be a list of {{\"path\", \"weight\"?, \"mode\"?}} objects")
    if len(references) > MAX_REFERENCES:
        raise UserError(f"{where}: at most {MAX_REFERENCES} references per prompt, got {len(references)}")
    checked = []
    for n, item in enumerate(references, 1):
        item = {"path": item} if isinstance(item, str) else item
        if not isinstance(item, dict) or not isinstance(item.get("path"), str) or not item["path"].strip():
            raise UserError(f"{where}: reference {n} needs a \"path\"")
        unknown = set(item) - {"path", "weight", "mode", "sha256"}  # a checked list may be checked again
        if unknown:
            raise UserError(f"{where}: reference {n} has unknown keys {sorted(unknown)} (allowed: path, weight, mode)")
        path = Path(item["path"]).expanduser()
        if not path.is_absolute() and base is not None:
            path = base / path
        # excluded_by sees the path as written (a link kept in an excluded folder) and resolved (a link into one)
        pattern = excluded_by(path, settings.safety.exclude)
        path = path.resolve()
        weight = check_weight(item.get("weight", 1.0), f"{where}: reference {n}'s weight")
        mode = check_mode(item.get("mode", "both"), f"{where}: reference {n}'s mode")
        if pattern is not None:
            raise UserError(f"{where}: reference {path} is excluded by safety.exclude {pattern!r}")
        try:
            probe_image(path)
        except UserError as exc:
            raise UserError(f"{where}: reference {n}: {exc}") from None
        checked.append({"path": str(path), "weight": weight, "mode": mode, "sha256": file_sha256(path)})
    return checked


def start_references(settings: Any, manager: Any, prompt: str, user: list[dict[str, Any]],
                     on_event: Any = None) -> tuple[dict[str, dict], dict[str, Any] | None, dict[str, Any] | None]:
    """(reference records, the state's ``start_guidance`` or None, a trace event or None) for a new run.

    ``user`` comes from :func:`check_user_references`. Memory is read when ``retrieval.memory`` is on; the CLIP
    similarities run on the manager's embedder (loaded anyway: every run scores its candidates with it)."""
    records: dict[str, dict] = {}
    for ref in user:
        rid = f"user-{ref['sha256'][:12]}"
        records[rid] = {"id": rid, "path": ref["path"], "caption": "", "score": None, "query": None,
                        "weight": ref["weight"], "mode": ref["mode"], "source": "user"}
    event = None
    concepts: list[str] = []
    if settings.retrieval.memory and len(records) < MAX_REFERENCES:
        memory = ConceptMemory.for_settings(settings)
        recalled = memory.recall(prompt)
        chosen, considered = recall_references(memory, prompt, ManagedEmbedder(manager),
                                               settings.retrieval.memory_min_score,
                                               MAX_REFERENCES - len(records)) if recalled else ({}, [])
        for rid, record in chosen.items():
            records.setdefault(rid, record)
        concepts = list(dict.fromkeys(r["query"] for r in chosen.values()))
        if recalled:
            event = {"event": "memory", "concepts": concepts, "reference_ids": list(chosen),
                     "considered": considered, "min_score": settings.retrieval.memory_min_score}
            if on_event is not None and chosen:
                on_event({"event": "note", "text": f"round 1 is guided by remembered references for "
                                                   f"{', '.join(concepts)} (concept memory; --no-memory to skip)"})
    if not records:
        return {}, None, event
    sources = sorted({r["source"] for r in records.values()})
    start = {"reference_ids": list(records), "concepts": concepts, "source": "+".join(sources)}
    return records, start, event


def learn_from_run(settings: Any, state: dict[str, Any]) -> dict[str, Any] | None:
    """Update the concept memory from a finished run (see the module docstring); the trace event, or None when
    there was nothing to learn. Never raises for a memory problem: the run's result is already settled."""
    if not settings.retrieval.memory or state.get("status") not in ("matched", "budget_exhausted"):
        return None
    memory = ConceptMemory.for_settings(settings)
    references = state.get("references") or {}
    candidates = state.get("candidates") or {}
    remembered, demoted = [], []
    try:
        for candidate in candidates.values():
            if candidate.verdict is None or candidate.verdict.match:
                continue
            for rid in candidate.reference_ids:
                ref = references.get(rid)
                if ref is not None and ref.source == "memory" and ref.query:
                    if memory.demote(ref.query, file_sha256(ref.path) or ""):
                        demoted.append({"concept": ref.query, "path": ref.path, "candidate": candidate.id})
        final = candidates.get(state.get("final_candidate") or "")
        if state.get("status") == "matched" and final and final.reference_ids:
            weights = final.reference_weights or {}
            modes = final.reference_modes or {}
            seen: set[tuple[str, str | None]] = set()
            for rid in final.reference_ids:
                ref = references.get(rid)
                if ref is None or not ref.query or ref.source == "user":
                    continue  # a user's reference stands for no concept the run named
                sha = file_sha256(ref.path)
                if (ref.query, sha) in seen:  # one picture under two ids (the store's and the memory's): one match
                    continue
                seen.add((ref.query, sha))
                record = ref.model_dump()  # the memory keeps plain records (imgrag/store/memory.py)
                memory.remember(ref.query, {**record, "sha256": sha, "id": record.get("store_id") or ref.id,
                                            "weight": weights.get(rid, 1.0 if ref.weight is None else ref.weight),
                                            "mode": modes.get(rid, ref.mode or "both")},
                                run_id=state["run_id"], reason=final.verdict.reason if final.verdict else "")
                remembered.append({"concept": ref.query, "path": ref.path})
    except (UserError, OSError) as exc:
        return {"event": "memory_update", "error": str(exc)}
    if not remembered and not demoted:
        return None
    return {"event": "memory_update", "remembered": remembered, "demoted": demoted, "file": str(memory.path)}

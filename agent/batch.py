"""The batch record (``batch.json``), shared by the in-process batch (:meth:`agent.runner.Runner.batch`) and the
Ray batch (:mod:`agent.ray_batch`): the prompt file read, a batch folder opened or resumed, and each item claimed,
settled or failed. Every change is written atomically, so a killed batch resumes from its record.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from imgrag.atomic_files import write_json_atomic
from imgrag.errors import UserError, check_seed, read_user_text
from imgrag.text import describe_error
from tools.budget import check_rounds

FINISHED = ("matched", "budget_exhausted")  # a batch item in one of these is never run again


def open_batch(path: Path, output_dir: str | Path, *, resume: bool,
               items: list[dict[str, Any]] | None = None) -> tuple[Path, dict[str, Any]]:
    """The batch folder and its batch.json state: the latest one of this file (same name and content) with
    ``resume``, else a new one with every prompt pending (``items``: the file's, already read and checked).
    Raises UserError for a bad prompt file."""
    items = read_prompt_file(path) if items is None else items
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    root = Path(output_dir)
    # The batch's runs live beside it under names with the same prefix: only a folder with batch.json counts.
    existing = sorted(p.parent for p in root.glob(f"batch-{path.stem}-{digest}-*/batch.json"))
    if resume and existing:
        batch_dir = existing[-1]
        state = json.loads((batch_dir / "batch.json").read_text(encoding="utf-8"))
    else:
        batch_dir = root / f"batch-{path.stem}-{digest}-{time.strftime('%Y%m%d-%H%M%S')}"
        batch_dir.mkdir(parents=True, exist_ok=True)
        state = {"file": str(path), "items": [{**item, "index": i, "run_id": None, "status": "pending"}
                                              for i, item in enumerate(items)]}
        write_json_atomic(batch_dir / "batch.json", state)
    return batch_dir, state


def claim_item(batch_dir: Path, state: dict[str, Any], item: dict[str, Any]) -> str:
    """Mark an item running under a fresh run id (a retried prompt gets ``-r2``, ``-r3``...), save batch.json,
    and return the run id."""
    attempt = item.get("attempts", 0) + 1
    item["attempts"] = attempt
    item["run_id"] = f"{batch_dir.name}-{item['index']:03d}" + (f"-r{attempt}" if attempt > 1 else "")
    item["status"] = "running"
    write_json_atomic(batch_dir / "batch.json", state)
    return item["run_id"]


def settle_item(item: dict[str, Any], result: dict[str, Any]) -> None:
    """Copy a finished run's outcome into its batch item."""
    item.update(status=result["status"], final_image=result["final_image"], rounds=result["rounds"],
                seconds=result["seconds"], error=None)
    if "model_loads" in result:  # what this run loaded (its result.json), not the process's running total
        item["model_loads"] = result["model_loads"]


def fail_item(item: dict[str, Any], exc: BaseException) -> None:
    """Record a prompt that failed: a UserError's line as it is, anything else with its type."""
    item.update(status="failed", error=str(exc) if isinstance(exc, UserError) else describe_error(exc))


def _relative_to(references: Any, base: Path) -> Any:
    """A batch line's reference paths read from the batch file's folder when they are relative."""
    if not isinstance(references, list):
        return references
    out = []
    for ref in references:
        path = ref.get("path") if isinstance(ref, dict) else ref
        if isinstance(path, str) and path.strip() and not Path(path).expanduser().is_absolute():
            path = str(base.resolve() / path)
            ref = {**ref, "path": path} if isinstance(ref, dict) else path
        out.append(ref)
    return out


def check_batch_references(path: Path, items: list[dict[str, Any]], settings: Any) -> None:
    """Every line's ``references`` checked before the first run (a missing or excluded file, a bad weight or
    mode); one UserError naming every bad line at once, each as ``FILE:LINE: reason``."""
    from agent.memory_guide import check_user_references

    problems = []
    for item in items:
        if item.get("references") is None:
            continue
        try:
            item["references"] = check_user_references(item["references"], settings, where=f"{path}:{item['line']}")
        except UserError as exc:
            problems.append(str(exc))
    if problems:
        raise UserError("; ".join(problems))


# A .jsonl line's keys for how its prompt is drawn: imgrag.draw_options.DrawOptions's fields, named as the settings.
DRAWING_KEYS = ("negative_prompt", "guidance", "scheduler", "per_round")


def line_options(base: Any, item: dict[str, Any]) -> Any:
    """The drawing options of a batch item: ``base`` (a :class:`~imgrag.draw_options.DrawOptions`: the settings' and
    the command line's, or a Settings to take them from) changed by the line's own keys (:data:`DRAWING_KEYS`); the
    line's ``loras`` add to the base's (one naming a file already there sets its weight)."""
    from imgrag.draw_options import DrawOptions

    options = base if isinstance(base, DrawOptions) else DrawOptions.from_settings(base)
    where = f"line {item.get('line', '?')}"
    return options.changed(where, **(item.get("drawing") or {})).with_loras(item.get("loras") or [], where)


def line_loras(value: Any, where: str, folder: Path) -> list[tuple[str, float | None]]:
    """A .jsonl line's ``"loras": [{"path", "weight"?}]`` read strictly (paths relative to the batch file's folder),
    each file checked as ``--lora`` checks it: ``[(absolute path, weight)]``; a bad entry is one UserError naming
    ``where`` (the file and line)."""
    from imgrag.loras import LoraChoice, check_lora_file

    if not isinstance(value, list):
        raise UserError(f"{where}: \"loras\" must be a list of {{\"path\", \"weight\"}} objects")
    out: list[tuple[str, float | None]] = []
    for n, entry in enumerate(value, 1):
        if not isinstance(entry, dict) or set(entry) - {"path", "weight"} or not isinstance(entry.get("path"), str):
            raise UserError(f"{where}: LoRA {n} must be an object {{\"path\", \"weight\"}} (weight optional), "
                            f"got {json.dumps(entry)[:80]}")
        path = Path(entry["path"]).expanduser()
        path = path if path.is_absolute() else folder.resolve() / path
        try:
            checked = LoraChoice(path=check_lora_file(path, f"{where}: LoRA"), weight=entry.get("weight", 1.0))
        except ValidationError as exc:
            raise UserError(f"{where}: LoRA {n}'s {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}") from None
        out.append((checked.path, checked.weight))
    return out


def read_prompt_file(path: Path) -> list[dict[str, Any]]:
    """Prompts from .txt (one per line; blank lines and # comments skipped) or .jsonl objects
    ({"prompt", "seed"?, "max_rounds"?, "references"?: [{"path", "weight"?, "mode"?}], "negative_prompt"?,
    "guidance"?, "scheduler"?, "per_round"?, "loras"?: [{"path", "weight"?}]}). Errors name the file and line."""
    from imgrag.draw_options import parse_options

    if not path.exists():
        raise UserError(f"{path}: no such file")
    lines = read_user_text(path, "prompt file").splitlines()
    items: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if path.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not str(obj.get("prompt", "")).strip():
                raise UserError(f"{path}:{number}: each line needs an object with a non-empty \"prompt\"")
            if "max_rounds" in obj:
                check_rounds(obj["max_rounds"], f'{path}:{number}: "max_rounds"')
            if obj.get("seed") is not None:
                if not isinstance(obj["seed"], int) or isinstance(obj["seed"], bool):
                    raise UserError(f"{path}:{number}: \"seed\" must be an integer")
                check_seed(obj["seed"], f"{path}:{number}: seed")
            item = {"prompt": obj["prompt"].strip(), "seed": obj.get("seed"), "max_rounds": obj.get("max_rounds")}
            if obj.get("references") is not None:  # checked (files, exclusions, bounds) by check_batch_references
                item.update(references=_relative_to(obj["references"], path.parent), line=number)
            if obj.get("negative") is not None and obj.get("negative_prompt") is None:  # as the flag is named
                obj["negative_prompt"] = obj["negative"]
            if obj.get("loras") is not None:  # files checked now, relative to the batch file, named with the line
                item.update(loras=line_loras(obj["loras"], f"{path}:{number}", path.parent), line=number)
            drawing = {k: obj[k] for k in DRAWING_KEYS if obj.get(k) is not None}
            if drawing:  # checked now: a bad scheduler name or guidance is named with its line
                checked = parse_options(drawing, f"{path}:{number}")
                item.update(drawing={k: getattr(checked, k) for k in drawing}, line=number)
            items.append(item)
        else:
            items.append({"prompt": line, "seed": None, "max_rounds": None})
    if not items:
        raise UserError(f"{path}: no prompts in the file")
    return items

"""The batch record (``batch.json``), shared by the in-process batch (:meth:`agent.runner.Runner.batch`) and the
Ray batch (:mod:`agent.frontends.ray_batch`): the prompt file read, a batch folder opened or resumed, and each item
claimed, settled or failed. Every change is written atomically, so a killed batch resumes from its record.
"""

from __future__ import annotations

import difflib
import glob
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError, field_validator

from agent.memory_guide import check_user_references
from agent.run_lookup import recorded_profile
from imgrag.atomic_files import write_json_atomic
from imgrag.drawing.draw_options import DrawOptions, parse_options
from imgrag.drawing.loras import LoraChoice, check_lora_file
from imgrag.errors import UserError, check_seed, read_user_text
from imgrag.text import describe_error
from tools.budget import check_rounds

FINISHED = ("matched", "budget_exhausted")  # a batch item in one of these is never run again


def _batch_prefix(path: Path) -> str:
    """What the folders of this file's batches are named with: the file's name and a hash of its content."""
    return f"batch-{path.stem}-{hashlib.sha256(path.read_bytes()).hexdigest()[:10]}-"


def latest_batch(path: Path, output_dir: str | Path) -> Path | None:
    """The folder of the latest batch of this file (same name and content) under ``output_dir``, or None."""
    # The batch's runs live beside it under names with the same prefix: only a folder with batch.json counts.
    existing = sorted(p.parent for p in Path(output_dir).glob(f"{glob.escape(_batch_prefix(path))}*/batch.json"))
    return existing[-1] if existing else None


def open_batch(path: Path, output_dir: str | Path, *, resume: bool, items: list[dict[str, Any]] | None = None,
               profile: str | None = None, planner: str | None = None,
               max_rounds: int | None = None) -> tuple[Path, dict[str, Any]]:
    """The batch folder and its batch.json state: the latest one of this file (same name and content) with
    ``resume``, else a new one with every prompt pending (``items``: the file's, already read and checked) that
    records ``profile``, ``planner`` (None: "agent") and ``max_rounds`` (None: each line's, else the settings').

    A resumed batch goes on as it began: its recorded planner and max_rounds stand for the ones not given, and
    the state holds them (``state["planner"]``, ``state.get("max_rounds")``). Raises UserError for a bad prompt
    file, and for a resume under another profile, planner or max_rounds than the batch started with
    (:func:`agent.run_lookup.check_resume_profile`'s reason)."""
    items = read_prompt_file(path) if items is None else items
    batch_dir = latest_batch(path, output_dir) if resume else None
    if batch_dir is not None:
        state = json.loads((batch_dir / "batch.json").read_text(encoding="utf-8"))
        started = batch_profile(batch_dir, state)
        if profile is not None and started is not None and started != profile:
            raise UserError(f"the batch in {batch_dir} was started with the {started} profile, and the {profile} "
                            f"profile's models would draw the rest; resume it with --profile {started}")
        for key, flag, given in (("planner", "--planner", planner), ("max_rounds", "--max-rounds", max_rounds)):
            if given is not None and state.get(key) is not None and given != state[key]:
                raise UserError(f"the batch in {batch_dir} was started with {flag} {state[key]}; resume it with "
                                f"the same (or leave {flag} out), or start a new batch without --resume")
        state["planner"] = state.get("planner") or planner or "agent"
        state["max_rounds"] = state.get("max_rounds") if state.get("max_rounds") is not None else max_rounds
    else:
        batch_dir = Path(output_dir) / f"{_batch_prefix(path)}{time.strftime('%Y%m%d-%H%M%S')}"
        batch_dir.mkdir(parents=True, exist_ok=True)
        state = {"file": str(path), **({"profile": profile} if profile else {}), "planner": planner or "agent",
                 "max_rounds": max_rounds,
                 "items": [{**item, "index": i, "run_id": None, "status": "pending"} for i, item in enumerate(items)]}
        write_json_atomic(batch_dir / "batch.json", state)
    return batch_dir, state


def batch_profile(batch_dir: Path, state: dict[str, Any] | None = None) -> str | None:
    """The profile a batch started with: its batch.json's, else (a batch.json from before it was recorded) the
    profile of its first run that has a trace; None when neither says."""
    if state is None:
        try:
            state = json.loads((batch_dir / "batch.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    if isinstance(state.get("profile"), str):
        return state["profile"]
    for item in state.get("items") or []:
        started = recorded_profile(batch_dir.parent / item["run_id"]) if item.get("run_id") else None
        if started is not None:
            return started
    return None


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


def _reference_problem(path: Path, item: dict[str, Any], settings: Any) -> str | None:
    """A line's ``references`` checked (a missing or excluded file, a bad weight or mode) and resolved in place;
    the ``FILE:LINE: reason`` when one does not hold."""
    if item.get("references") is None:
        return None
    try:
        item["references"] = check_user_references(item["references"], settings, where=f"{path}:{item['line']}")
    except UserError as exc:
        return str(exc)
    return None


# A .jsonl line's keys for how its prompt is drawn: imgrag.drawing.draw_options.DrawOptions's fields, named as the
# settings.
DRAWING_KEYS = ("negative_prompt", "guidance", "scheduler", "per_round")


def line_options(base: Any, item: dict[str, Any]) -> Any:
    """The drawing options of a batch item: ``base`` (a :class:`~imgrag.drawing.draw_options.DrawOptions`: the settings'
    and the command line's, or a Settings to take them from) changed by the line's own keys (:data:`DRAWING_KEYS`); the
    line's ``loras`` add to the base's (one naming a file already there sets its weight)."""
    options = base if isinstance(base, DrawOptions) else DrawOptions.from_settings(base)
    where = f"line {item.get('line', '?')}"
    return options.changed(where, **(item.get("drawing") or {})).with_loras(item.get("loras") or [], where)


def line_loras(value: Any, where: str, folder: Path) -> list[tuple[str, float | None]]:
    """A .jsonl line's ``"loras": [{"path", "weight"?}]`` read strictly (paths relative to the batch file's folder),
    each file checked as ``--lora`` checks it: ``[(absolute path, weight)]``; a bad entry is one UserError naming
    ``where`` (the file and line)."""
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


# Bad lines listed in one error: the first ones, then how many more (a file of thousands of bad lines stays readable).
MAX_LISTED_LINES = 20


class _LineReference(BaseModel):
    """A batch line's reference: ``{"path", "weight"?, "mode"?}`` (or its path alone). Only the shape is read here;
    the file, the exclusions and the bounds are checked by :func:`read_prompt_file` when given the settings."""

    model_config = ConfigDict(extra="forbid")

    path: StrictStr
    weight: Any = None
    mode: Any = None


class _LineLora(BaseModel):
    """A batch line's LoRA: ``{"path", "weight"?}``; its file is checked by :func:`line_loras`."""

    model_config = ConfigDict(extra="forbid")

    path: StrictStr
    weight: Any = None


class BatchLine(BaseModel):
    """One line of a ``.jsonl`` batch file, read strictly: any other key is refused (a typo such as ``"sed"`` is never
    silently ignored). The values are checked by the same rules as the command line's flags after this shape
    (:func:`read_prompt_file`); ``negative`` is the flag's name for ``negative_prompt``."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr
    seed: Any = None
    max_rounds: Any = None
    references: list[_LineReference] | None = None
    negative_prompt: StrictStr | None = None
    negative: StrictStr | None = None
    guidance: Any = None
    scheduler: Any = None
    per_round: Any = None
    loras: list[_LineLora] | None = None

    @field_validator("references", mode="before")
    @classmethod
    def _paths_alone(cls, value: Any) -> Any:
        if isinstance(value, list):  # a reference given as its path alone
            return [{"path": ref} if isinstance(ref, str) else ref for ref in value]
        return value


BATCH_KEYS = tuple(BatchLine.model_fields)  # every key a .jsonl line may have, in the order the README lists them

_SHAPES = {  # what a key's value must be, for a value of the wrong shape
    "prompt": "a non-empty text",
    "negative_prompt": "a text",
    "negative": "a text",
    "references": 'a list of {"path", "weight"?, "mode"?} objects (or paths)',
    "loras": 'a list of {"path", "weight"?} objects',
}


def _entry_problem(error: dict[str, Any]) -> str:
    """One of pydantic's errors inside a reference or LoRA entry, in a few words."""
    loc = error["loc"]
    if error["type"] == "extra_forbidden" and len(loc) > 2:
        return f"unknown key \"{loc[2]}\""
    if error["type"] == "missing" and len(loc) > 2:
        return f"\"{loc[2]}\" is missing"
    return error["msg"].lower() if len(loc) == 2 else f"{loc[2]}: {error['msg'].lower()}"


def _shape_problems(error_list: list[dict[str, Any]]) -> list[str]:
    """pydantic's errors for one line's known keys as reasons naming the key (one per key, in the line's order)."""
    reasons: dict[str, str] = {}
    entries: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for error in error_list:
        loc = error["loc"]
        key = str(loc[0]) if loc else "line"
        if key in ("references", "loras") and len(loc) >= 2 and isinstance(loc[1], int):
            entries.setdefault((key, loc[1]), []).append(error)
            reasons.setdefault(key, "")
            continue
        if key in reasons:
            continue
        if error["type"] == "missing":
            reasons[key] = f"\"{key}\" is missing: each line needs an object with a non-empty \"prompt\""
        else:
            reasons[key] = f"\"{key}\" must be {_SHAPES.get(key, 'a valid value')}"
    for (key, index), errors in entries.items():
        if reasons[key]:
            continue  # the first bad entry of the list names it
        what = "reference" if key == "references" else "LoRA"
        fields = '{"path", "weight"?, "mode"?}' if key == "references" else '{"path", "weight"} (weight optional)'
        errors = sorted(errors, key=lambda e: e["type"] != "extra_forbidden")  # a misspelt key explains the rest
        reasons[key] = f"{what} {index + 1} must be an object {fields}: {', '.join(map(_entry_problem, errors))}"
    return [reason for reason in reasons.values() if reason]


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads' object hook: a key given twice is refused (JSON readers disagree on which one wins)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key \"{key}\" is given twice")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_json_line(line: str) -> Any:
    """A line's JSON, read strictly (no repeated key, no NaN or Infinity); ValueError with the reason."""
    try:
        return json.loads(line, object_pairs_hook=_strict_object, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg})") from None
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None


def bad_lines_error(path: Path, problems: list[str]) -> UserError:
    """One UserError listing every bad line of a prompt file, one per line of the message (each ``FILE:LINE:
    reason``), the first :data:`MAX_LISTED_LINES` and then how many more; a single bad line is that line alone."""
    if len(problems) == 1:
        return UserError(problems[0])
    listed = problems[:MAX_LISTED_LINES]
    more = len(problems) - len(listed)
    return UserError("\n".join([f"{path}: {len(problems)} bad lines (nothing was run; fix them and run again):",
                                *listed, *([f"… and {more} more bad line(s)"] if more else [])]))


def read_jsonl_line(obj: Any, path: Path, number: int, extra_keys: tuple[str, ...],
                    reasons: list[str]) -> dict[str, Any] | None:
    """One parsed .jsonl line as a batch item, or None with ``reasons`` filled (each naming its key)."""
    where = f"{path}:{number}"

    def checked(fn, *args):  # a rule's UserError as one reason of this line, its "FILE:LINE: " left off
        try:
            return fn(*args)
        except UserError as exc:
            reasons.append(str(exc).removeprefix(f"{where}: "))
            return None

    if not isinstance(obj, dict):
        reasons.append("each line needs an object with a non-empty \"prompt\"")
        return None
    accepted = (*BATCH_KEYS, *extra_keys)
    extra = {k: obj[k] for k in extra_keys if k in obj}
    for key in obj:  # unknown keys first; the known ones are still checked, so every bad key of the line is named
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"did you mean \"{close[0]}\"? " if close else ""
            reasons.append(f"unknown key \"{key}\" ({hint}accepted: {', '.join(accepted)})")
    try:
        line = BatchLine.model_validate({k: v for k, v in obj.items() if k in BATCH_KEYS})
    except ValidationError as exc:
        reasons.extend(_shape_problems(exc.errors()))
        return None
    if not line.prompt.strip():
        reasons.append("\"prompt\" is empty: each line needs an object with a non-empty \"prompt\"")
    checked(check_rounds, line.max_rounds, f'{where}: "max_rounds"')
    if line.seed is not None:
        if not isinstance(line.seed, int) or isinstance(line.seed, bool):
            reasons.append(f"\"seed\" must be an integer, got {json.dumps(line.seed)[:40]}")
        else:
            checked(check_seed, line.seed, f"{where}: seed")
    values = line.model_dump(exclude_none=True)
    if "negative" in values and "negative_prompt" not in values:  # as the flag is named
        values["negative_prompt"] = values["negative"]
    drawing = {}
    for key in DRAWING_KEYS:  # each key checked alone, so every bad one of the line is named
        if key in values:
            options = checked(parse_options, {key: values[key]}, where)
            if options is not None:
                drawing[key] = getattr(options, key)
    loras = None
    if line.loras is not None:  # files checked now, relative to the batch file, named with the line
        loras = checked(line_loras, [lora.model_dump(exclude_none=True) for lora in line.loras], where, path.parent)
    if reasons:
        return None
    item: dict[str, Any] = {"prompt": line.prompt.strip(), "seed": line.seed, "max_rounds": line.max_rounds,
                            "line": number, **extra}
    if line.references is not None:  # checked (files, exclusions, bounds) by _reference_problem
        item["references"] = _relative_to([ref.model_dump(exclude_none=True) for ref in line.references],
                                          path.parent)
    if loras is not None:
        item["loras"] = loras
    if drawing:
        item["drawing"] = drawing
    return item


# What a prompt file may be: text, one prompt a line (also without a suffix), or JSON Lines.
PROMPT_FILE_SUFFIXES = ("", ".txt", ".jsonl")


# Reads one parsed .jsonl line (the object, the file, the line's number) into an item, or None with the reasons
# appended to its list; see read_prompt_file's ``read_line``.
LineReader = Callable[[Any, Path, int, list[str]], "dict[str, Any] | None"]


def read_prompt_file(path: Path, *, extra_keys: tuple[str, ...] = (), settings: Any = None,
                     read_line: LineReader | None = None) -> list[dict[str, Any]]:
    """Prompts from .txt (one per line; blank lines and # comments skipped) or .jsonl objects (:class:`BatchLine`:
    ``{"prompt", "seed"?, "max_rounds"?, "references"?: [{"path", "weight"?, "mode"?}], "negative_prompt"?
    (or "negative"), "guidance"?, "scheduler"?, "per_round"?, "loras"?: [{"path", "weight"?}]}``; ``extra_keys`` are
    accepted too and kept in the item as given, e.g. ``imgrag eval``'s ``"gold"``).

    Every line is read before any is used: one UserError lists every bad line (:func:`bad_lines_error`), each as
    ``FILE:LINE: reason`` naming the key (an unknown key, a value of the wrong kind or out of bounds, a LoRA file
    that is not one). With ``settings``, each line's references are checked in the same pass (the file there, a
    picture, not excluded by ``safety.exclude``; :func:`agent.memory_guide.check_user_references`) and resolved, so
    a missing reference is listed with the other bad lines, not found on a second try. A file that is not UTF-8 is
    one line saying to re-save it as UTF-8. ``read_line`` replaces the batch line reader (:func:`read_jsonl_line`)
    for a command whose lines take other keys (``imgrag eval``'s), in the same pass and the same error."""
    if not path.exists():
        raise UserError(f"{path}: no such file")
    kind = path.suffix.lower()
    if kind not in PROMPT_FILE_SUFFIXES:  # a picture, a .json array or a .csv would run as prompts of raw text
        raise UserError(f"{path}: a prompt file is .txt (one prompt a line) or .jsonl (one JSON object a line), "
                        f"not {kind}; save the prompts as one of those")
    lines = read_user_text(path, "prompt file").splitlines()
    items: list[dict[str, Any]] = []
    problems: list[str] = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if kind != ".jsonl":
            items.append({"prompt": line, "seed": None, "max_rounds": None})
            continue
        reasons: list[str] = []
        try:
            obj = parse_json_line(line)
            item = (read_line(obj, path, number, reasons) if read_line is not None
                    else read_jsonl_line(obj, path, number, extra_keys, reasons))
        except ValueError as exc:
            item, reasons = None, [str(exc)]
        if item is None:
            problems.append(f"{path}:{number}: {'; '.join(reasons)}")
            continue
        problem = _reference_problem(path, item, settings) if settings is not None else None
        if problem is not None:
            problems.append(problem)
        else:
            items.append(item)
    if problems:
        raise bad_lines_error(path, problems)
    if not items:
        raise UserError(f"{path}: no prompts in the file")
    return items

"""Reading ``imgrag eval``'s prompt files: ``.txt`` or ``.jsonl`` lines with an optional ``gold`` picture, every
bad line named at once, as ``imgrag batch`` reads its own (:func:`agent.batch.read_prompt_file`)."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from agent.batch import BATCH_KEYS, read_jsonl_line, read_prompt_file
from imgrag.images import UnreadableImage, probe_image

# The keys of an eval .jsonl line; a batch line's other keys (references, drawing options, LoRAs) would do nothing
# here, so they are refused like any unknown key.
EVAL_KEYS = ("prompt", "seed", "gold", "max_rounds")


def read_eval_file(path: str | Path) -> list[dict[str, Any]]:
    """Prompts to evaluate: ``.txt`` (one a line) or ``.jsonl`` objects ``{"prompt", "seed"?, "gold"?,
    "max_rounds"?}``. A ``gold`` path is taken relative to the prompt file's folder, else to the current
    folder, and must be a picture.

    Read as ``imgrag batch`` reads its files (:func:`agent.batch.read_prompt_file`, with this module's line
    reader): every line before any is used, one UserError listing every bad line, each ``FILE:LINE: reason``, a
    missing or unreadable gold picture beside a bad seed or an unknown key."""
    path = Path(path)
    if path.suffix != ".jsonl":
        return [{**item, "gold": None} for item in read_prompt_file(path)]
    return read_prompt_file(path, read_line=_eval_line)


def _eval_line(obj: Any, path: Path, number: int, reasons: list[str]) -> dict[str, Any] | None:
    """One parsed eval line as an item with its ``gold``, or None with ``reasons`` filled: its keys are
    :data:`EVAL_KEYS`, the shared ones read by the batch line's rules."""
    if not isinstance(obj, dict):
        return read_jsonl_line(obj, path, number, (), reasons)  # says what a line must be
    reasons += [_unknown_key(key) for key in obj if key not in EVAL_KEYS]
    known = {k: v for k, v in obj.items() if k in EVAL_KEYS}
    gold = _gold_path(path, known.pop("gold", None), reasons)
    item = read_jsonl_line(known, path, number, (), reasons)  # the same rules as a batch line's
    return None if reasons or item is None else {**item, "gold": gold}


def _unknown_key(key: str) -> str:
    """Why a key of an eval line is refused: a batch key that does nothing here, or a key nobody reads."""
    if key in BATCH_KEYS:
        return f"\"{key}\" does nothing in imgrag eval (its lines take {', '.join(EVAL_KEYS)})"
    close = difflib.get_close_matches(key, EVAL_KEYS, n=1)
    hint = f"did you mean \"{close[0]}\"? " if close else ""
    return f"unknown key \"{key}\" ({hint}accepted: {', '.join(EVAL_KEYS)})"


def _gold_path(path: Path, gold: Any, reasons: list[str]) -> str | None:
    """A line's ``gold`` as the resolved path of a readable picture, or None (none given, or ``reasons`` filled:
    not found, with every place looked named once, or not a picture, with :mod:`imgrag.images`' reason)."""
    if gold in (None, ""):
        return None
    if not isinstance(gold, str):
        reasons.append("\"gold\" must be the path of an image")
        return None
    given = Path(gold).expanduser()
    candidates = [given] if given.is_absolute() else [path.parent / given, given]
    places: dict[str, Path] = {}  # each place once (the file's folder is often the current one)
    for candidate in candidates:
        places.setdefault(str(candidate.resolve()), candidate)
    found = next((c for c in places.values() if c.is_file()), None)
    if found is None:
        reasons.append(f"gold image {gold!r} not found (looked in {', '.join(map(str, places.values()))})")
        return None
    try:
        probe_image(found)
    except UnreadableImage as exc:
        reasons.append(f"gold image {gold!r} is not a usable picture: {exc.reason}")
        return None
    return str(found.resolve())

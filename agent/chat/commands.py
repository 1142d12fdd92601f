"""The chat's command line: slash commands (``/help``, ``/resume ID``...), the answer to a review pause
(``drop 2``, ``use 1 3``, ``replace 2 with PATH``), and references named by /refs number, id or file.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgrag.errors import UserError
from imgrag.images import IMAGE_SUFFIXES, open_image
from tools.budget import MAX_REFERENCES

# name -> (usage, what it does); /help prints them in this order.
COMMANDS: dict[str, tuple[str, str]] = {
    "help": ("/help", "this list"),
    "new": ("/new", "start a new thread: the next message describes a new picture"),
    "threads": ("/threads", "the saved chat threads, newest first, with their first request and date"),
    "resume": ("/resume ID", "continue a saved thread (a unique start of its id is enough)"),
    "show": ("/show [CANDIDATE]", "the best picture (or c2, or 2): a preview where the terminal can, else its path"),
    "refs": ("/refs", "the references retrieved on this thread, numbered"),
    "budget": ("/budget N", "rounds (pictures) each request may draw"),
    "approve": ("/approve on|off", "pause before each guided redraw to accept, drop or replace its references"),
    "negative": ("/negative [TEXT|off]", "what the drawings leave out from the next request on (the judge never "
                 "sees it); alone: the current one"),
    "guidance": ("/guidance [N|default]", "classifier-free guidance, 0..30 (default: the settings', or the fast "
                 "mode's)"),
    "scheduler": ("/scheduler [NAME|default|list]", "the sampler by its A1111 name (\"Euler a\", \"DPM++ 2M "
                  "Karras\"); list: every name"),
    "per-round": ("/per-round N", "drawings per round, 1..8: each judged, the request goes on from the best"),
    "lora": ("/lora [PATH[:WEIGHT]|off]", "draw with a LoRA (.safetensors) at WEIGHT (default 1; a LoRA already "
             "used: its new weight, 0 off); off: none; alone: the current ones"),
    "undo": ("/undo", "take back the last request: the thread returns to where the one before ended"),
    "save": ("/save PATH", "copy the best picture to PATH (a file, or a folder)"),
    "quit": ("/quit", "leave (Ctrl-D too); threads are kept"),
}
ALIASES = {"exit": "quit", "?": "help"}
NO_ARGUMENT = {"help", "new", "threads", "refs", "undo", "quit"}

REVIEW_HELP = ("Enter accepts; 'drop 2' leaves reference 2 out; 'use 1 3' or 'use PATH' draws with exactly those; "
               "'replace 2 with PATH' swaps one; 'add PATH' adds one; 'none' draws without references. Numbers and "
               "ids are those of /refs.")



# ----- the command line of the chat -----

@dataclass(frozen=True)
class SlashCommand:
    name: str
    arg: str = ""


def resolve_command(word: str) -> str:
    """A command name from what was typed after '/': exact, an alias, or an unambiguous prefix."""
    word = word.lower()
    if word in COMMANDS:
        return word
    if word in ALIASES:
        return ALIASES[word]
    if not word:
        raise UserError("a command name must follow '/'; /help lists them")
    matches = [name for name in COMMANDS if name.startswith(word)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UserError(f"/{word} is ambiguous: " + ", ".join(f"/{m}" for m in matches))
    close = difflib.get_close_matches(word, list(COMMANDS) + list(ALIASES), n=1, cutoff=0.5)
    hint = f"did you mean /{ALIASES.get(close[0], close[0])}? " if close else ""
    raise UserError(f"unknown command /{word}; {hint}/help lists the commands")


def parse_line(line: str) -> str | SlashCommand | None:
    """What a typed line is: None (blank), a request (text), or a slash command (UserError if unknown)."""
    text = line.strip()
    if not text:
        return None
    if not text.startswith("/"):
        return text
    word, _, arg = text[1:].partition(" ")
    name = resolve_command(word)
    arg = arg.strip()
    if arg and name in NO_ARGUMENT and name != "help":
        raise UserError(f"/{name} takes no argument (usage: {COMMANDS[name][0]})")
    return SlashCommand(name, arg)


# ----- references: numbers, ids, files -----

def resolve_reference(token: str, references: dict[str, dict]) -> str:
    """A reference id of the thread from a /refs number (1-based, -1 the last) or an id (a unique start is enough)."""
    ids = list(references)
    token = token.strip().lstrip("#")
    if re.fullmatch(r"-?\d+", token):
        n = int(token)
        if not ids:
            raise UserError("this thread has no references yet (they come from retrieval)")
        if n == -1:
            return ids[-1]
        if not 1 <= n <= len(ids):
            raise UserError(f"there is no reference {n}: this thread has {len(ids)} (/refs lists them)")
        return ids[n - 1]
    if token in references:
        return token
    matches = [i for i in ids if i.startswith(token)] if len(token) >= 3 else []
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UserError(f"{token!r} matches several references: {', '.join(matches)}")
    raise UserError(f"no reference {token!r} on this thread; give a number or id from /refs, or an image file")


def file_reference(path_text: str) -> dict[str, Any]:
    """A reference record for an image file the user names (checked to open as an image)."""
    path = Path(path_text).expanduser()
    open_image(path)  # a UserError naming the file if it is missing or not an image
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return {"id": f"file-{digest}", "path": str(path.resolve()), "caption": path.name, "score": None,
            "query": "chosen by the user"}


def _looks_like_path(token: str) -> bool:
    return "/" in token or token.startswith("~") or Path(token).suffix.lower() in IMAGE_SUFFIXES


def _references_from(tokens: list[str], references: dict[str, dict]) -> tuple[list[str], dict[str, dict]]:
    ids, added = [], {}
    for token in tokens:
        if token.strip().lstrip("#").lstrip("-").isdigit() or not _looks_like_path(token):
            ids.append(resolve_reference(token, references))
        else:
            record = file_reference(token)
            added[record["id"]] = record
            ids.append(record["id"])
    return ids, added


def parse_review(text: str, proposed: list[str], references: dict[str, dict]) -> dict[str, Any]:
    """The answer to a review pause: ``{"reference_ids": [...], "references": {id: record}}`` (see REVIEW_HELP)."""
    low = text.strip().lower()
    if low in ("", "y", "yes", "ok", "accept", "a", "keep"):
        return {"reference_ids": list(proposed), "references": {}}
    if low in ("n", "no", "none", "drop all", "without", "no references"):
        return {"reference_ids": [], "references": {}}
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise UserError(f"cannot read that ({exc}); {REVIEW_HELP}") from None
    verb, args = words[0].lower(), [w for w in words[1:] if w.lower() not in ("and", ",")]
    added: dict[str, dict] = {}
    if verb in ("drop", "remove", "skip") and args:
        dropped, _ = _references_from(args, references)
        strangers = [d for d in dropped if d not in proposed]
        if strangers:
            raise UserError(f"{', '.join(strangers)} is not among this drawing's references")
        ids = [i for i in proposed if i not in dropped]
    elif verb in ("use", "only") and args:
        ids, added = _references_from(args, references)
    elif verb == "add" and args:
        new, added = _references_from(args, references)
        ids = list(dict.fromkeys(list(proposed) + new))
    elif verb == "replace" and "with" in [a.lower() for a in args]:
        cut = [a.lower() for a in args].index("with")
        old_ids, _ = _references_from(args[:cut], references)
        if len(old_ids) != 1:
            raise UserError("replace one reference at a time: 'replace 2 with PATH'")
        old = old_ids[0]
        if old not in proposed:
            raise UserError(f"{old} is not among this drawing's references")
        replacement, added = _references_from(args[cut + 1:], references)
        position = proposed.index(old)
        ids = list(dict.fromkeys(proposed[:position] + replacement + proposed[position + 1:]))
    else:
        raise UserError(f"cannot read {text.strip()!r}. {REVIEW_HELP}")
    ids = check_reference_count(list(dict.fromkeys(ids)))
    return {"reference_ids": ids, "references": added}


def check_reference_count(ids: list[str]) -> list[str]:
    """``ids`` if one drawing may use that many references, else a UserError."""
    if len(ids) > MAX_REFERENCES:
        raise UserError(f"at most {MAX_REFERENCES} references per drawing, got {len(ids)}")
    return ids


def reference_number(references: dict[str, dict], reference_id: str) -> int | None:
    """A reference's number as /refs shows it (1-based, in the thread's order), or None if unknown."""
    ids = list(references)
    return ids.index(reference_id) + 1 if reference_id in ids else None

"""File names as the file system has them, and as people and databases can read them.

On Linux a file name is bytes, not text: a folder copied from an old camera, a Windows share or a zip made on
another system can hold names that are not valid UTF-8 (``caf\\xe9.png`` in Latin-1). Python hands such a name over
as a ``str`` with lone surrogates (PEP 383's ``surrogateescape``): it opens the file, but it cannot be encoded as
UTF-8, so a database (Chroma), a terminal or a JSON reader that wants real text refuses it.

Three forms, one rule each:

- the **path** itself (a ``str``, surrogates and all): what opens the file, kept in memory;
- its **display name** (:func:`display_name`): the undecodable bytes written as ``\\xe9``, valid text for a
  terminal, a table or a store's readable ``path`` field, never used to open the file;
- its **stored form** (:func:`stored_name` / :func:`from_stored`): the display name plus, only when the two
  differ, the file system's bytes as hex, so a database of text holds the name and gives back the same path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import PlainValidator


def is_text_name(path: str | Path) -> bool:
    """Whether ``path`` is valid text (no undecodable bytes), so it can be stored and shown as it is."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def display_name(path: str | Path) -> str:
    """``path`` as printable text: bytes that are not UTF-8 written as ``\\xNN`` (the name on disk is unchanged)."""
    text = str(path)
    if is_text_name(text):
        return text
    return os.fsencode(text).decode("utf-8", errors="backslashreplace")


def stored_name(path: str | Path) -> tuple[str, str]:
    """(display name, hex of the file system's bytes or ``""`` when the name is valid text): what a text-only
    database keeps of a path so that :func:`from_stored` gives back the same path."""
    text = str(path)
    if is_text_name(text):
        return text, ""
    return display_name(text), os.fsencode(text).hex()


def from_stored(name: str | None, raw_hex: str | None = None) -> str | None:
    """The path a :func:`stored_name` pair stands for: the bytes when they were kept (a name that is not UTF-8),
    else the name itself. A malformed hex string falls back to the name."""
    if raw_hex:
        try:
            return os.fsdecode(bytes.fromhex(raw_hex))
        except ValueError:
            pass
    return name


def _file_path(value: Any) -> str:
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError(f"input should be a string (a file's path), got a {type(value).__name__}")
    if not value.strip():
        raise ValueError("the path is empty")
    return value


FilePath = Annotated[str, PlainValidator(_file_path)]
"""A file path in a pydantic record: a non-empty ``str`` (or a ``Path``), kept as it is. Not a constrained
``str`` (``min_length``, ``StringConstraints``): pydantic-core refuses one that holds lone surrogates, which is how
Python hands over a name that is not UTF-8 (see above), and such a name is a real file."""


def with_name_bytes(document: Any) -> Any:
    """``document`` (JSON-shaped) with ``KEY_bytes`` beside every string value ``KEY`` that is not UTF-8 text: the
    name's bytes as hex (:func:`stored_name`). JSON keeps such a name in ``\\udcNN`` escapes, which Python reads
    back whole but jq or JavaScript turn into U+FFFD; the hex gives any reader the name that opens the file.
    Everything else is as it was; a document without such a name comes back equal."""
    if isinstance(document, dict):
        copy = {key: with_name_bytes(value) for key, value in document.items()}
        for key, value in document.items():
            if isinstance(value, str) and not is_text_name(value):
                copy.setdefault(f"{key}_bytes", stored_name(value)[1])
        return copy
    if isinstance(document, (list, tuple)):
        return [with_name_bytes(value) for value in document]
    return document

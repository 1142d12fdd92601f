"""Text made short enough to show: cutting a text to a length, and turning an error into one line.

Every message imgrag prints, records or hands to a model goes through these, so the rules are one each:

- :func:`shorten`: at most ``limit`` characters, ending in "…" when it was cut (spaces collapsed by default).
- :func:`first_line`: an error's (or a text's) first line, cut to a length, for a message that must be one line.
- :func:`last_line`: the same from the end, for errors that wrap a remote traceback and state the cause last.
- :func:`describe_error`: ``"TypeName: first line"``, the form used wherever the type says more than the text.
"""

from __future__ import annotations

__all__ = ["ELLIPSIS", "ERROR_CHARS", "describe_error", "first_line", "last_line", "shorten"]

ELLIPSIS = "…"
# An error line longer than this is cut: a library's message can carry a whole tensor or config, and the line must
# still fit a terminal, a trace record and the LLM's context.
ERROR_CHARS = 300


def shorten(text: object, limit: int, *, collapse: bool = True) -> str:
    """``text`` in at most ``limit`` characters; when it is longer, its first ``limit - 1`` characters (trailing
    spaces dropped) and "…", so a reader sees that it was cut.

    ``collapse`` (default) first makes every run of whitespace (newlines included) one space, for text shown on one
    line; ``collapse=False`` keeps the text's own spacing. ``None`` is the empty string; anything else is ``str()``-ed.
    E.g. ``shorten("a  red\\nfox", 5) == "a re…"``, ``shorten("a red fox", 20) == "a red fox"``.
    """
    text = "" if text is None else str(text)
    if collapse:
        text = " ".join(text.split())
    if len(text) <= limit:
        return text
    return text[: max(limit - 1, 0)].rstrip() + ELLIPSIS


def _lines(error: BaseException | str) -> list[str]:
    return [line.strip() for line in str(error).splitlines() if line.strip()]


def first_line(error: BaseException | str, limit: int = ERROR_CHARS) -> str:
    """The first non-blank line of an error's message (or of a text), stripped and cut to ``limit`` characters.

    An exception with an empty message gives its type's name (``"KeyError"``), so the line is never empty; an empty
    text gives ``""``."""
    lines = _lines(error)
    if lines:
        return lines[0][:limit]
    return type(error).__name__[:limit] if isinstance(error, BaseException) else ""


def last_line(error: BaseException | str, limit: int = ERROR_CHARS) -> str:
    """The last non-blank line, stripped and cut to ``limit`` characters; for errors that carry a traceback from
    another process before their cause (Ray's ``RayActorError`` ends with the remote ``ModuleNotFoundError: ...``).
    Empty messages as in :func:`first_line`."""
    lines = _lines(error)
    if lines:
        return lines[-1][:limit]
    return type(error).__name__[:limit] if isinstance(error, BaseException) else ""


def describe_error(exc: BaseException, limit: int = ERROR_CHARS) -> str:
    """An exception as one line: ``"ValueError: the first line of its message"`` (the message cut to ``limit``),
    or only the type's name when the message is empty. For failures that are not the user's mistake, where the type
    tells the reader (or the LLM) what kind of failure it was."""
    name = type(exc).__name__
    lines = _lines(exc)
    return f"{name}: {lines[0][:limit]}" if lines else name

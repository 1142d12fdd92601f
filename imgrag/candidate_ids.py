"""Candidate ids: ``c<N>``, N counting 0, 1, 2... in the order the run drew (or chose) its candidates.

The id names the candidate in the graph's state, in the trace, in ``result.json`` and on disk
(``candidates/c3.png``), and users type it (``/show c2``, or just ``2``). Every sort, allocation and reading of
one goes through here, so a malformed id (a tampered checkpoint, a stray file) sorts first instead of crashing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

__all__ = ["candidate_id", "candidate_number", "next_candidate_id", "parse_candidate", "sorted_ids"]

# ASCII digits only: str.isdigit() also accepts "²", which int() refuses.
_ID = re.compile(r"c([0-9]+)", re.ASCII)


def candidate_id(number: int) -> str:
    """The id of the ``number``-th candidate: ``candidate_id(3) == "c3"``."""
    return f"c{int(number)}"


def candidate_number(cid: object) -> int:
    """N of ``c<N>`` (``"c12"`` -> 12); -1 for anything else, so that it sorts before every real candidate and is
    never taken for one when the next id is chosen."""
    match = _ID.fullmatch(str(cid))
    return int(match.group(1)) if match else -1


def sorted_ids(ids: Iterable[str]) -> list[str]:
    """``ids`` in the order drawn (c2 before c10); malformed ones first."""
    return sorted(ids, key=candidate_number)


def parse_candidate(text: str) -> str:
    """What a user typed for a candidate, as its id: ``"c2"``, ``" C2 "`` and ``"2"`` are all ``"c2"`` (``"02"``
    too). Anything else comes back stripped and lowercased, for the caller to look up and refuse by name."""
    key = text.strip().lower()
    if key.isascii() and key.isdigit():
        return candidate_id(int(key))
    number = candidate_number(key)
    return candidate_id(number) if number >= 0 else key


def next_candidate_id(existing: Iterable[str], exists: Callable[[str], bool], at_least: int = 0) -> str:
    """A fresh id: past every id in ``existing`` and at least ``c<at_least>``, skipping ids for which ``exists``
    (a file on disk that the state no longer lists: a chat /undo, a crash before the checkpoint) is true, so a
    new candidate never overwrites an old picture."""
    n = max([at_least, *(candidate_number(cid) + 1 for cid in existing)])
    while exists(candidate_id(n)):
        n += 1
    return candidate_id(n)

"""Every text imgrag sends to a model lives in this folder, one Markdown file each.

A file names the variables it takes as ``{name}``; ``render`` fills them and refuses to send a
prompt with a variable left unfilled. Literal braces (a JSON example) are written doubled: ``{{`` and ``}}``.
"""

from __future__ import annotations

import string
from importlib import resources


def load(name: str) -> str:
    """The raw text of ``prompts/<name>.md``."""
    return resources.files(__package__).joinpath(f"{name}.md").read_text(encoding="utf-8")


def variables(name: str) -> set[str]:
    """The ``{variables}`` a prompt file takes."""
    return {field for _, field, _, _ in string.Formatter().parse(load(name)) if field}


def render(name: str, **values: str) -> str:
    """Fill a prompt's variables; a missing or unexpected variable is a programming error."""
    expected = variables(name)
    if set(values) != expected:
        raise KeyError(f"prompt {name!r} takes {sorted(expected)}, got {sorted(values)}")
    return load(name).format(**values)

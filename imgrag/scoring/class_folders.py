"""Class folders for ``imgrag eval --classes``: read them, and split each class into retrieval and gold pictures.

The layout is torchvision's ImageFolder convention, which Hugging Face ``datasets``' ``imagefolder`` loader also
reads: ``DIR/<class name>/**/<picture>``; a ``datasets`` image folder with split folders
(``DIR/train/<class>/...``, ``DIR/test/<class>/...``) is read with its splits merged, since the protocol makes
its own split. Pictures are the files ``imgrag index`` would take (by extension, :data:`imgrag.images.IMAGE_SUFFIXES`).

The split follows ImageRAG (arXiv 2502.09411): references come from a retrieval set, and the drawings are
scored against *other* real pictures of the class. Per class, pictures are grouped by content (the sha256 of
their bytes, the store's own id), so a duplicate file can never sit on both sides, the groups are shuffled
by ``random.Random("<seed>:<class>")`` (the same on every machine and independent of the other classes), the
first ``gold_per_class`` pictures become gold and the next ``retrieval_per_class`` (0: all the rest) retrieval.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from imgrag.errors import UserError
from imgrag.file_names import display_name
from imgrag.images import IMAGE_SUFFIXES, UnreadableImage, probe_image  # what `imgrag index` takes
from imgrag.store.walking import content_digest

SPLIT_FOLDERS = {"train", "test", "validation", "valid", "val", "dev"}
_NUMBER_PREFIX = re.compile(r"^\d+[._\-\s]+")


@dataclass(frozen=True)
class ClassSplit:
    """One class of the protocol: its folder name, the words the prompt uses, and its two disjoint parts
    (absolute paths, sorted within each part)."""

    folder: str
    name: str
    retrieval: list[str] = field(default_factory=list)
    gold: list[str] = field(default_factory=list)
    # Files of the class that cannot be read as pictures ({"path", "reason"}): on neither side, said in eval.json.
    skipped: list[dict[str, str]] = field(default_factory=list)


def class_words(folder: str) -> str:
    """The class as prompt words: a leading number and separator dropped (CUB's ``001.Black_footed_Albatross``,
    iNaturalist's ``00042_...``), underscores as spaces, runs of spaces squeezed."""
    words = _NUMBER_PREFIX.sub("", folder).replace("_", " ")
    return " ".join(words.split()) or folder


def read_class_folder(root: str | Path) -> dict[str, list[str]]:
    """``{class folder name: [absolute picture paths, sorted]}`` of ``root``; a UserError (one line) when it
    is not a folder or holds no class folder with pictures. Hidden entries are skipped."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"{root}: not a folder (give a folder with one sub-folder of pictures per class)")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs and all(p.name.lower() in SPLIT_FOLDERS for p in subdirs):
        tops = [c for split in subdirs for c in split.iterdir() if c.is_dir() and not c.name.startswith(".")]
    else:
        tops = subdirs
    classes: dict[str, list[str]] = {}
    for folder in tops:
        classes.setdefault(folder.name, []).extend(_pictures(folder))
    classes = {name: sorted(set(paths)) for name, paths in sorted(classes.items()) if paths}
    if not classes:
        raise UserError(f"{root}: no class folders with pictures (expected {root}/<class name>/<picture>.jpg)")
    return classes


def _pictures(folder: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(os.path.abspath(os.path.join(dirpath, name)))
    return found


def split_classes(classes: dict[str, list[str]], *, gold_per_class: int, retrieval_per_class: int = 0,
                  seed: int = 0, on_skip: Callable[[str, str], None] | None = None) -> list[ClassSplit]:
    """Split every class (see the module docstring); classes in sorted order.

    A file that cannot be read as a picture is left out of both parts, listed in the split's ``skipped`` and handed
    to ``on_skip(path, reason)`` as it is found (the reason is :mod:`imgrag.images`' one line, as ``imgrag index``
    gives it). A class with fewer than ``gold_per_class + 1`` distinct readable pictures is refused: every such
    class is checked first, then one UserError names them all, one a line, each with how many of its files were
    unreadable (the protocol needs at least one retrieval picture beside its gold ones). ``retrieval_per_class`` 0
    keeps all the rest."""
    if gold_per_class < 1:
        raise UserError(f"eval.gold_per_class must be at least 1, got {gold_per_class}")
    if retrieval_per_class < 0:
        raise UserError(f"eval.retrieval_per_class must be 0 (all the rest) or more, got {retrieval_per_class}")
    splits, problems = [], []
    for folder in sorted(classes):
        groups: dict[str, list[str]] = {}
        skipped: list[dict[str, str]] = []
        for path in sorted(classes[folder]):
            try:  # one unreadable picture is that picture's problem: left out of both sides, with its reason
                probe_image(path)
                digest = content_digest(Path(path).read_bytes())
            except UnreadableImage as exc:
                reason = exc.reason
            except OSError as exc:
                reason = f"cannot read: {exc.strerror or exc}"
            else:
                groups.setdefault(digest, []).append(path)
                continue
            skipped.append({"path": path, "reason": reason})
            if on_skip is not None:
                on_skip(path, reason)
        if len(groups) < gold_per_class + 1:
            problems.append(_too_few(folder, len(groups), skipped, gold_per_class))
            continue
        order = sorted(groups, key=lambda d: groups[d][0])  # by first path: independent of hash order
        random.Random(f"{seed}:{folder}").shuffle(order)
        gold = order[:gold_per_class]
        rest = order[gold_per_class:]
        retrieval = rest if retrieval_per_class == 0 else rest[:retrieval_per_class]
        splits.append(ClassSplit(folder, class_words(folder),
                                 retrieval=sorted(p for d in retrieval for p in groups[d]),
                                 gold=sorted(p for d in gold for p in groups[d]), skipped=skipped))
    if problems:
        raise UserError("\n".join(problems if len(problems) == 1 else
                                  [f"{len(problems)} classes are too small for the protocol:", *problems]))
    return splits


def _too_few(folder: str, readable: int, skipped: list[dict[str, str]], gold_per_class: int) -> str:
    """The line of a class with too few readable pictures: how many, how many files could not be read (the first
    named with its reason), and what the protocol needs."""
    unreadable = ""
    if skipped:
        first = f"{display_name(skipped[0]['path'])}: {skipped[0]['reason']}"
        unreadable = (f" and {len(skipped)} unreadable file{'s' if len(skipped) > 1 else ''} "
                      f"({'the first ' if len(skipped) > 1 else ''}{first})")
    return (f"class {folder!r} has {readable} distinct readable picture(s){unreadable}; the protocol needs at least "
            f"{gold_per_class + 1} (eval.gold_per_class = {gold_per_class}, plus one to retrieve)")

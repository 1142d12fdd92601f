"""Concept memory: which references fixed which concept, so the next prompt naming it starts guided.

When a run ends matched and its answer was drawn guided by references, each of those references is remembered
under the concept it was retrieved for (its query: the judge's missing phrase, or the prompt), with the run id and
the judge's reason. A later run whose prompt names a remembered concept may draw its first round guided by the
remembered references instead of drawing plain, being judged, and retrieving again (:mod:`agent.memory_guide`).

Wrong memories cannot stick: a remembered reference that guided a drawing the judge did not match is demoted (its
``mismatches`` count grows); one with at least as many mismatches as matches is not used again until a later match
with it promotes it back. ``imgrag memory list`` shows the entries, ``imgrag memory forget CONCEPT`` drops one;
``imgrag memory forget --all`` starts over, even from a file that is not a valid memory: that one is set aside
(renamed ``concept_memory.json.broken-<time>``, nothing deleted) and an empty memory is started.

Format: one JSON document, ``concept_memory.json``, in the store's folder (``<output_dir>`` for a Chroma server),
validated by a pydantic schema when read (it is a file a user or another program can edit: an invalid one is a
one-line error, never a traceback) and written atomically under a file lock, so two processes never lose an update.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from imgrag.atomic_files import write_json_atomic
from imgrag.errors import UserError
from imgrag.images import open_image
from imgrag.records.provenance import file_sha256
from imgrag.settings import imgrag_home
from imgrag.text import first_line

FILE_NAME = "concept_memory.json"
SCHEMA = "imgrag.memory/1"
MAX_REFERENCES_PER_CONCEPT = 8  # the best-kept ones; older, weaker entries make room


class RememberedReference(BaseModel):
    """One reference remembered for a concept: where it is, its content hash, how it steered, its record."""

    model_config = ConfigDict(extra="forbid")
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    store_id: str | None = None
    caption: str = ""
    weight: float = Field(default=1.0, ge=0.0, le=2.0)
    mode: Literal["both", "style", "content"] = "both"
    matches: int = Field(default=1, ge=0)
    mismatches: int = Field(default=0, ge=0)
    run_ids: list[str] = Field(default_factory=list)  # the latest few runs that matched with it
    reason: str = ""  # the judge's reason in the latest matched run
    updated: float = 0.0  # unix seconds

    @property
    def demoted(self) -> bool:
        """Not used to guide: it led to as many mismatches as matches (or more)."""
        return self.mismatches >= self.matches


class ConceptEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    concept: str
    references: list[RememberedReference] = Field(default_factory=list)


class MemoryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_: Literal["imgrag.memory/1"] = Field(default=SCHEMA, alias="schema")
    concepts: dict[str, ConceptEntry] = Field(default_factory=dict)


def concept_key(concept: str) -> str:
    """The key a concept is kept under: lower case, words only (``"The wooden cradle!"`` -> ``"the wooden
    cradle"``)."""
    return " ".join(re.findall(r"[\w]+", concept.lower()))


_ARTICLES = {"a", "an", "the", "some", "photo", "of", "picture"}


def names_concept(text: str, concept: str) -> bool:
    """Whether ``text`` (a prompt, a judge's missing phrase) names ``concept``: every word of the concept other
    than articles ("a", "the", "a photo of") appears in the text as a whole word."""
    words = [w for w in concept_key(concept).split() if w not in _ARTICLES]
    have = set(concept_key(text).split())
    return bool(words) and all(w in have for w in words)


def memory_folder(settings: Any) -> Path:
    """The folder the memory file lives in: a local store's folder, or ``output_dir`` for a Chroma server."""
    store = str(settings.store)
    if store.startswith(("http://", "https://")):
        return Path(settings.output_dir)
    return Path(store).expanduser()


def memory_flags(settings: Any) -> list[str]:
    """The flags that make ``imgrag memory`` reach the memory of ``settings``' store: ``--profile P`` when the
    profile is not the default, ``--store S`` when the store is not that profile's own default folder (given by
    --store or a config file). For callers that do not have the command line's own flags (a run)."""
    profile = str(settings.profile)
    flags = [] if profile == "default" else ["--profile", profile]
    suffix = "" if profile == "default" else f"-{profile}"  # the default store's name, as imgrag.settings makes it
    if str(settings.store) != str(imgrag_home() / f"store{suffix}"):
        flags += ["--store", str(settings.store)]
    return flags


class ConceptMemory:
    """The memory file of one store (see the module docstring).

    ``flags`` are the command-line flags that reach this same store (``--profile P``, ``--store S``): every
    command this class names in a message carries them, so following it acts on this memory, not another one."""

    def __init__(self, folder: str | Path, flags: list[str] | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / FILE_NAME
        self.flags = list(flags or [])

    @classmethod
    def for_settings(cls, settings: Any, flags: list[str] | None = None) -> ConceptMemory:
        """The memory of ``settings``' store; ``flags`` as the command line gave them (default:
        :func:`memory_flags`)."""
        return cls(memory_folder(settings), memory_flags(settings) if flags is None else flags)

    def command(self, *words: str) -> str:
        """``imgrag memory WORDS...`` with this store's flags, in backticks: a command to follow as it is."""
        return "`" + shlex.join(["imgrag", "memory", *words, *self.flags]) + "`"

    def read(self) -> MemoryFile:
        """The file's content (empty when there is none); a UserError of one line when it is not valid."""
        if not self.path.is_file():
            return MemoryFile()
        try:
            return MemoryFile.model_validate(json.loads(self.path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValidationError) as exc:
            first = first_line(exc, 200)
            raise UserError(f"{self.path}: not a valid concept memory ({first}); fix it, or set it aside and start "
                            f"an empty memory with {self.command('forget', '--all')}") from None

    @contextmanager
    def _editing(self) -> Iterator[MemoryFile]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock", timeout=30):
            doc = self.read()
            yield doc
            write_json_atomic(self.path, doc.model_dump(by_alias=True))

    def entries(self) -> list[ConceptEntry]:
        """Every remembered concept, in the order they were first remembered."""
        return list(self.read().concepts.values())

    def recall(self, text: str) -> list[tuple[ConceptEntry, list[RememberedReference]]]:
        """The concepts ``text`` names (:func:`names_concept`), each with its references that are not demoted,
        the most matched first."""
        found = []
        for entry in self.read().concepts.values():
            if names_concept(text, entry.concept):
                usable = sorted((r for r in entry.references if not r.demoted),
                                key=lambda r: (r.mismatches - r.matches, -r.updated))
                if usable:
                    found.append((entry, usable))
        return found

    def remember(self, concept: str, reference: dict[str, Any], *, run_id: str, reason: str = "") -> None:
        """Record that ``reference`` (a dict with ``path``, ``sha256`` and optionally ``id``, ``caption``,
        ``weight``, ``mode``) guided a matched answer for ``concept``: a new entry, or one more match."""
        key = concept_key(concept)
        if not key or not reference.get("sha256"):
            return
        now = time.time()
        with self._editing() as doc:
            entry = doc.concepts.setdefault(key, ConceptEntry(concept=concept.strip()))
            known = next((r for r in entry.references if r.sha256 == reference["sha256"]), None)
            if known is None:
                entry.references.append(RememberedReference(
                    path=str(reference["path"]), sha256=reference["sha256"], store_id=reference.get("id"),
                    caption=str(reference.get("caption") or "")[:300], weight=float(reference.get("weight", 1.0)),
                    mode=reference.get("mode", "both"), run_ids=[run_id], reason=reason[:300], updated=now))
            else:
                known.matches += 1
                known.path, known.updated, known.reason = str(reference["path"]), now, reason[:300]
                known.run_ids = [*known.run_ids, run_id][-5:]
            entry.references.sort(key=lambda r: (r.mismatches - r.matches, -r.updated))
            del entry.references[MAX_REFERENCES_PER_CONCEPT:]

    def demote(self, concept: str, sha256: str) -> bool:
        """Count a mismatch against a remembered reference of ``concept``; True when there was one to demote."""
        key = concept_key(concept)
        with self._editing() as doc:
            entry = doc.concepts.get(key)
            known = next((r for r in entry.references if r.sha256 == sha256), None) if entry else None
            if known is None:
                return False
            known.mismatches += 1
            known.updated = time.time()
            return True

    def forget(self, concept: str | None) -> int:
        """Drop one concept (None: all of them, as :meth:`start_over`); how many concepts were dropped."""
        if concept is None:
            return self.start_over()[0]
        with self._editing() as doc:
            return 1 if doc.concepts.pop(concept_key(concept), None) is not None else 0

    def start_over(self) -> tuple[int, Path | None]:
        """Forget every concept and start an empty memory: (how many concepts were dropped, where a file that was
        not a valid memory was set aside, else None). Such a file is renamed beside itself,
        ``concept_memory.json.broken-YYYYmmdd-HHMMSS``, never deleted: a user may want what it held."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock", timeout=30):
            try:
                dropped, aside = len(self.read().concepts), None
            except UserError:
                dropped, aside = 0, self._set_aside()
            write_json_atomic(self.path, MemoryFile().model_dump(by_alias=True))
        return dropped, aside

    def _set_aside(self) -> Path:
        """Rename the memory file to a free ``.broken-<local time>`` name beside it; the new name."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.path.with_name(f"{FILE_NAME}.broken-{stamp}")
        count = 1
        while aside.exists():  # two in the same second: never overwrite the earlier one
            count += 1
            aside = self.path.with_name(f"{FILE_NAME}.broken-{stamp}-{count}")
        self.path.rename(aside)
        return aside


def recall_references(memory: ConceptMemory, text: str, embedder: Any, min_score: float,
                      room: int) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The remembered references that may guide a drawing for ``text`` (a prompt, or a judge's missing phrase), as
    reference records keyed ``mem-<sha256[:12]>`` (``source`` "memory", ``query`` the concept, ``score`` the CLIP
    cosine), at most ``room``; and a note per reference considered (its score, or why it was skipped).

    A reference is used when the concept is named by ``text`` (:func:`names_concept`), it is not demoted, its file
    is still there with the same content (sha256), and the cosine of its picture and the concept's text under
    ``embedder`` (``embed_images``/``embed_texts``, unit rows) reaches ``min_score``."""
    chosen: dict[str, dict[str, Any]] = {}
    considered: list[dict[str, Any]] = []
    for entry, references in memory.recall(text):
        for ref in references:
            if len(chosen) >= room:
                break
            note: dict[str, Any] = {"concept": entry.concept, "path": ref.path}
            considered.append(note)
            if file_sha256(ref.path) != ref.sha256:
                note["skipped"] = "the file is gone or has changed since it was remembered"
                continue
            try:
                image = open_image(ref.path)
            except UserError as exc:
                note["skipped"] = str(exc)
                continue
            score = float((embedder.embed_images([image]) @ embedder.embed_texts([entry.concept]).T)[0, 0])
            note["score"] = round(score, 4)
            if score < min_score:
                note["skipped"] = "below retrieval.memory_min_score"
                continue
            rid = f"mem-{ref.sha256[:12]}"
            chosen[rid] = {"id": rid, "path": ref.path, "caption": ref.caption, "score": round(score, 4),
                           "query": entry.concept, "weight": ref.weight, "mode": ref.mode, "source": "memory",
                           "store_id": ref.store_id}
    return chosen, considered

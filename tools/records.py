"""The records the graph state holds: candidates, verdicts, references, retrievals, a finish, a failed step.

Each is a pydantic model the tools build and the nodes read by attribute. The rules derived from them (may a
candidate be the answer, which is best) live in tools/answers.py, their one home.

Three boundaries, one rule each:

- **Checkpoints.** LangGraph's msgpack serializer writes a record as its ``model_dump()`` and rebuilds it with the
  class, which agent/thread_store.py allows by name (:data:`RECORD_TYPES`).
- **Files** (result.json, trace.jsonl, ``--json``). A record dumps the keys it was given, in the order given, and
  only those (:meth:`Record.model_dump`): a candidate drawn without references has no ``concepts`` key, exactly as
  the plain dicts the state held before had none. :func:`to_plain` turns any value holding records into JSON types.
- **Plain dicts coming in** (a thread database written before these records, a trace step's kept result replayed, a
  chat follow-up's update): :meth:`Record.of` converts them, and the state's reducers call it on every write.
  Unknown keys are kept (``extra="allow"``), so a record from another imgrag version loses nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_serializer, model_validator


class Record(BaseModel):
    """A state record: validated on the way in, dumped as the keys it was given (see the module docstring)."""

    model_config = ConfigDict(extra="allow", validate_by_name=True, validate_by_alias=True,
                              serialize_by_alias=True)

    _order: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _keep_order(cls, data: Any, handler: Any) -> Any:
        """Remember the order of the keys given, so a record dumps them as the dict it replaced listed them."""
        record = handler(data)
        if isinstance(data, Mapping) and isinstance(record, Record):
            fields = cls.model_fields
            record._order = tuple(fields[k].alias or k if k in fields else str(k) for k in data)
        return record

    @model_serializer(mode="wrap")
    def _given_keys(self, handler: Any) -> dict[str, Any]:
        """Only the keys given (a field left at its default is not written), in the order given."""
        data = handler(self)
        fields = type(self).model_fields
        given = {fields[name].alias or name if name in fields else name for name in self.model_fields_set}
        given |= set(self.__pydantic_extra__ or {})
        order = [k for k in self._order if k in given and k in data]
        order += [k for k in data if k in given and k not in order]
        return {k: data[k] for k in order}

    @classmethod
    def of(cls, value: Self | Mapping[str, Any]) -> Self:
        """``value`` as this record: a record as it is, a plain dict (an older checkpoint, a replayed result)
        validated. Raises pydantic's ValidationError for a dict that is no such record."""
        return value if isinstance(value, cls) else cls.model_validate(value)

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` (validated, like the record itself); the keys given stay given."""
        return type(self).model_validate({**self.model_dump(), **changes})


class Verdict(Record):
    """The judge's answer on a candidate (:class:`imgrag.models.judge.Verdict` as the state keeps it)."""

    match: bool = False
    missing: list[str] = Field(default_factory=list)  # the concepts the judge found missing
    reason: str = ""
    raw: str = ""  # the judge's own text
    parsed: bool = True  # False: the judge's answer could not be read, and match is False


class Candidate(Record):
    """One picture of the run: a drawing (generate, regenerate) or a photo of the collection (consider_photos).

    ``round`` is the round that drew it (for a photo: the rounds drawn before it); ``clip_score`` is CLIP's cosine
    similarity with the user's prompt, rounded to 4 places; ``verdict`` the judge's on the current prompt (None: not
    critiqued, or a chat follow-up moved its verdict to ``stale_verdict``)."""

    id: str
    path: str
    prompt: str | None = None  # the text drawn from (the LLM's, which may differ from the user's prompt)
    seed: int | None = None
    ip_scale: float | None = None  # set only when the IP-Adapter drew it with references
    round: int = 0
    clip_score: float | None = None
    verdict: Verdict | None = None
    backbone: str | None = None  # "sdxl", "sdxl+ip-adapter" or "omnigen" (tools/repair.py)
    reference_ids: list[str] = Field(default_factory=list)
    concepts: list[dict[str, Any]] | None = None  # which reference stood for which concept
    sent_prompt: str | None = None  # the in-context prompt OmniGen read
    negative_prompt: str | None = None
    guidance: float | None = None
    sampler: str | None = None
    loras: list[dict[str, Any]] | None = None
    reference_weights: dict[str, float] | None = None
    reference_modes: dict[str, str] | None = None
    guided_by: list[str] | None = None  # where its references came from: "retrieved", "memory", "user"
    encoder: dict[str, Any] | None = None  # the IP-Adapter's image-encoder calls and cached embeddings
    batch: dict[str, Any] | None = None  # {size, index, candidates} when its round drew several
    flagged: dict[str, Any] | None = None  # the safety gate's {concept, score}, or None
    answer_blocked: bool = False  # flagged and not allowed as the answer
    source: str | None = None  # "retrieved": a photo of the collection (tools/answers.py)
    reference_id: str | None = None  # the photo's store id
    chosen_by: str | None = None  # "agent" or "user" (the chat's "use photo N")
    stale_verdict: Verdict | None = None  # the verdict on an earlier prompt of a chat thread
    stale_prompt: str | None = None


class Reference(Record):
    """A picture that may guide a drawing: retrieved from the store, remembered (concept memory), or the user's.

    ``score`` is the retrieval score; ``weight`` and ``mode`` are set only when someone chose them (the user, a
    remembered repair), so a drawing otherwise derives them (:mod:`imgrag.drawing.steering`)."""

    id: str | None = None
    path: str
    score: float | None = None
    caption: str | None = None
    query: str | None = None  # the query (a missing concept) that found it
    similarity: float | None = None  # sim(query, ref) before reflective re-ranking
    weight: float | None = None
    mode: str | None = None
    source: str | None = None  # "memory", "user"; None: the store's retrieval


class Retrieval(Record):
    """One retrieve call: the candidate it repaired (None before any drawing), its queries, what it found (the ids
    may be none: the planner then knows this repair was tried)."""

    for_: str | None = Field(default=None, alias="for")
    queries: list[str] = Field(default_factory=list)
    reference_ids: list[str] = Field(default_factory=list)


class Finished(Record):
    """A finish: the candidate the run ends with, and why (a finish call's reason, or the user's choice)."""

    candidate_id: str
    reason: str = ""


class FailedStep(Record):
    """A tool call that failed: the fixed policy reads these so it never repeats a step as it was."""

    tool: str
    target: str | None = None  # the candidate the call was for
    args: dict[str, Any] = Field(default_factory=dict)
    error: str = ""
    kind: str = "error"  # "argument": the caller's mistake; "error": the step itself failed


# The classes a checkpoint may rebuild (agent/thread_store.py's allow-list names them).
RECORD_TYPES: tuple[type[Record], ...] = (Verdict, Candidate, Reference, Retrieval, Finished, FailedStep)


def candidates_of(values: Mapping[str, Any] | None) -> dict[str, Candidate]:
    """An id -> record map of candidates as records (plain dicts converted); empty for None."""
    return {cid: Candidate.of(c) for cid, c in (values or {}).items()}


def references_of(values: Mapping[str, Any] | None) -> dict[str, Reference]:
    """An id -> record map of references as records (plain dicts converted); empty for None."""
    return {rid: Reference.of(r) for rid, r in (values or {}).items()}


def records_of(kind: type[Record], values: Iterable[Any] | None) -> list[Any]:
    """A list of ``kind`` records (plain dicts converted); empty for None."""
    return [kind.of(v) for v in values or []]


# The graph state's keys that hold records (agent/state.py), and how a plain value of each becomes records.
_STATE_RECORDS = {
    "candidates": candidates_of,
    "references": references_of,
    "retrievals": lambda v: records_of(Retrieval, v),
    "failed_steps": lambda v: records_of(FailedStep, v),
    "finished": lambda v: None if v is None else Finished.of(v),
}


def from_state(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (a graph state, or a checkpoint's channel values) with its records as records: a thread database
    written when the state held plain dicts resumes as if written today, and a node or tool driven with a plain
    state (a test, a run's starting input) reads records. Keys it lacks stay absent; records pass as they are."""
    return {k: _STATE_RECORDS[k](v) if k in _STATE_RECORDS else v for k, v in values.items()}


def to_plain(value: Any) -> Any:
    """``value`` with every record in it (inside dicts, lists and tuples) dumped: what JSON files are written from."""
    if isinstance(value, Record):
        return value.model_dump()
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    return value

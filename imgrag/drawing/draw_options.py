"""How a run draws beyond its prompt: negative prompt, guidance, scheduler, drawings per round, LoRAs.

One typed record, :class:`DrawOptions`, for every way these arrive: the settings (``generation.negative_prompt``,
``generation.scheduler``, ``generation.per_round``, ``[[models.loras]]``), the command line (``--negative``,
``--guidance``, ``--scheduler``, ``--per-round``, ``--lora``), a batch line's keys of the same names, the chat's
slash commands and the web page's fields. LoRAs are added rather than replaced
(:func:`imgrag.drawing.loras.merge_loras`):
``--lora`` adds to the settings' LoRAs or sets the weight of one of them. A run keeps its options in its graph
state (``state["drawing"]``), so a resumed run and a chat thread go on drawing the same way, and every drawing of it
reads them from there (:func:`options_of`).

The judge never sees the negative prompt: it checks the picture against the user's prompt alone (what to leave
out is a drawing instruction, not part of what the picture must show).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from imgrag.drawing.loras import LoraChoice, check_loras, merge_loras, settings_loras
from imgrag.drawing.schedulers import check_scheduler
from imgrag.errors import UserError

# Drawings one round may make in one batched call; each is judged. Eight 1024² SDXL drawings in one batch already
# need about 40 GiB of working memory by the engine's estimate (imgrag.management.engine.working_memory_gb).
MAX_PER_ROUND = 8
# Classifier-free guidance past 30 burns SDXL's pictures to noise; A1111's slider stops there too.
MAX_GUIDANCE = 30.0
# CLIP reads 77 tokens of a negative prompt, as of the prompt; this bounds what a record keeps of a pasted essay.
MAX_NEGATIVE_CHARS = 2000


class DrawOptions(BaseModel):
    """The drawing options of one run (see the module docstring).

    ``guidance`` None: the fast mode's guidance, else ``generation.guidance`` (:func:`imgrag.models.fast.draw_plan`); a
    value given here wins over both, as ``--steps`` does. ``scheduler`` "": the checkpoint's own (or the fast mode's);
    else one of :data:`imgrag.drawing.schedulers.SCHEDULER_NAMES`, in its canonical spelling. ``loras``: the LoRAs every
    drawing of the run uses (:mod:`imgrag.drawing.loras`), their files checked and made absolute when the record is
    made."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    negative_prompt: Annotated[str, Field(max_length=MAX_NEGATIVE_CHARS)] = ""
    guidance: Annotated[float, Field(ge=0.0, le=MAX_GUIDANCE)] | None = None
    scheduler: str = ""
    per_round: Annotated[int, Field(ge=1, le=MAX_PER_ROUND)] = 1
    loras: tuple[LoraChoice, ...] = ()

    @field_validator("negative_prompt")
    @classmethod
    def _trimmed(cls, value: str) -> str:
        return value.strip()

    @field_validator("scheduler", mode="before")
    @classmethod
    def _known_scheduler(cls, value: Any) -> str:
        try:
            return check_scheduler(value)
        except UserError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("loras", mode="after")
    @classmethod
    def _lora_files(cls, value: tuple[LoraChoice, ...], info: ValidationInfo) -> tuple[LoraChoice, ...]:
        if not (info.context or {}).get("check_files", True):  # a run's own state: checked when the run began
            return value
        try:
            return check_loras(value)
        except UserError as exc:
            raise ValueError(str(exc)) from None

    @classmethod
    def from_settings(cls, settings: Any) -> DrawOptions:
        """The options ``settings.generation`` and ``[[models.loras]]`` give a new run (guidance stays None: the
        settings' own rule). A LoRA file that is missing or not a LoRA is one UserError naming it."""
        g = settings.generation
        return parse_options({"negative_prompt": g.negative_prompt, "scheduler": g.scheduler,
                              "per_round": g.per_round, "loras": settings_loras(settings)}, "[[models.loras]]")

    def to_state(self) -> dict[str, Any]:
        """The plain dict the graph state keeps (checkpointed as msgpack)."""
        state = self.model_dump()
        state["loras"] = [dict(entry) for entry in state["loras"]]
        return state

    def with_loras(self, given: list[tuple[str, float | None]], where: str = "--lora",
                   relative_to: Any = None) -> DrawOptions:
        """A copy with ``given`` LoRAs (``(PATH or NAME, WEIGHT or None)``) added to these, or reweighting one of them
        (:func:`imgrag.drawing.loras.merge_loras`); a bad one is one UserError naming ``where``."""
        if not given:
            return self
        return self.model_copy(update={"loras": merge_loras(self.loras, given, where, relative_to)})

    def changed(self, where: str = "drawing options", **changes: Any) -> DrawOptions:
        """A copy with ``changes`` (None values ignored), checked; a bad value is one UserError naming ``where``."""
        given = {k: v for k, v in changes.items() if v is not None}
        return parse_options({**self.model_dump(), **given}, where)


def check_guidance(value: float | None, where: str = "guidance") -> float | None:
    """``value`` as a float within 0..:data:`MAX_GUIDANCE`, or None; else a one-line UserError naming ``where``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= MAX_GUIDANCE:
        raise UserError(f"{where} must be a number from 0 to {MAX_GUIDANCE:g} (SDXL's usual is 5 to 8; 1 or less "
                        f"switches guidance off), got {value!r}")
    return float(value)


def parse_options(values: dict[str, Any], where: str = "drawing options", *, check_files: bool = True) -> DrawOptions:
    """:class:`DrawOptions` from untrusted values (a batch line, a recipe, the page's fields): unknown keys and bad
    values are one :class:`~imgrag.errors.UserError` (``where: key: why``). ``check_files=False`` skips the LoRA
    files' checks (a run's state, whose files were checked when it began: a file removed since must not stop its
    record from being written; the generator checks them again before it draws)."""
    try:
        return DrawOptions.model_validate(values, context={"check_files": check_files})
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(p) for p in error["loc"]) or "options"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = f"unknown key (known: {', '.join(DrawOptions.model_fields)})"
        if error["loc"] == ("loras",) and error["type"] == "value_error":
            raise UserError(f"{where}: {message}") from None  # the message names the LoRA and its file
        raise UserError(f"{where}: {key}: {message}") from None


def options_of(state: dict[str, Any] | None, settings: Any) -> DrawOptions:
    """The drawing options of a run: its state's (``state["drawing"]``), else the settings' (a state made before
    runs kept them, or none at all)."""
    kept = (state or {}).get("drawing")
    if isinstance(kept, dict):
        return parse_options(kept, "the run's drawing options", check_files=False)
    return DrawOptions.from_settings(settings)

"""Schedulers (samplers) by the names AUTOMATIC1111 users know, mapped to diffusers' classes and options.

The table follows diffusers' own mapping (the "Schedulers" overview page of the diffusers docs, its
"A1111/k-diffusion -> Diffusers" table): "DPM++ 2M Karras" is ``DPMSolverMultistepScheduler`` initialised with
``use_karras_sigmas=True``, "DPM++ 2M SDE" the same class with ``algorithm_type="sde-dpmsolver++"``, and so on.
A1111's samplers diffusers has no class for (DPM++ 2S a, DPM adaptive, DPM fast) are left out rather than
approximated; DDIM, PLMS, UniPC and DEIS (diffusers names, also in A1111's list or ComfyUI's) are in.

A scheduler is swapped on the loaded pipeline with ``Class.from_config(pipe.scheduler.config, **options)``: the
checkpoint's own scheduler config (its betas, prediction type, timestep spacing) is kept and only the sampling
algorithm changes, so no model is reloaded. The empty name means the checkpoint's own scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from imgrag.errors import UserError


@dataclass(frozen=True)
class SchedulerChoice:
    """One named sampler: the diffusers class and the options it is initialised with beside the checkpoint's config."""

    name: str
    cls: str
    options: dict[str, Any] = field(default_factory=dict)


_KARRAS = {"use_karras_sigmas": True}
_DPMPP = {"algorithm_type": "dpmsolver++"}  # the classes' default, said so that a record tells it from the SDE one
_SDE = {"algorithm_type": "sde-dpmsolver++"}

# In A1111's order of its sampler list, then the diffusers-only ones.
SCHEDULERS: tuple[SchedulerChoice, ...] = (
    SchedulerChoice("DPM++ 2M", "DPMSolverMultistepScheduler", _DPMPP),
    SchedulerChoice("DPM++ 2M Karras", "DPMSolverMultistepScheduler", {**_DPMPP, **_KARRAS}),
    SchedulerChoice("DPM++ 2M SDE", "DPMSolverMultistepScheduler", _SDE),
    SchedulerChoice("DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler", {**_SDE, **_KARRAS}),
    SchedulerChoice("DPM++ SDE", "DPMSolverSinglestepScheduler", _DPMPP),
    SchedulerChoice("DPM++ SDE Karras", "DPMSolverSinglestepScheduler", {**_DPMPP, **_KARRAS}),
    SchedulerChoice("DPM2", "KDPM2DiscreteScheduler"),
    SchedulerChoice("DPM2 Karras", "KDPM2DiscreteScheduler", _KARRAS),
    SchedulerChoice("DPM2 a", "KDPM2AncestralDiscreteScheduler"),
    SchedulerChoice("DPM2 a Karras", "KDPM2AncestralDiscreteScheduler", _KARRAS),
    SchedulerChoice("Euler", "EulerDiscreteScheduler"),
    SchedulerChoice("Euler a", "EulerAncestralDiscreteScheduler"),
    SchedulerChoice("Heun", "HeunDiscreteScheduler"),
    SchedulerChoice("LMS", "LMSDiscreteScheduler"),
    SchedulerChoice("LMS Karras", "LMSDiscreteScheduler", _KARRAS),
    SchedulerChoice("DDIM", "DDIMScheduler"),
    SchedulerChoice("PLMS", "PNDMScheduler", {"skip_prk_steps": True}),  # A1111's PLMS: no Runge-Kutta warm-up
    SchedulerChoice("UniPC", "UniPCMultistepScheduler"),
    SchedulerChoice("DEIS", "DEISMultistepScheduler"),
)
SCHEDULER_NAMES: tuple[str, ...] = tuple(s.name for s in SCHEDULERS)
_BY_KEY = {" ".join(s.name.lower().split()): s for s in SCHEDULERS}
# What a drawing's record calls the scheduler of a few-step mode (imgrag.models.fast), which is not a user choice.
_OTHER_NAMES = {"LCMScheduler": "LCM", "TCDScheduler": "TCD"}


def choices_text() -> str:
    """The list of names, quoted where they hold spaces, for help texts and errors."""
    return ", ".join(f'"{n}"' if " " in n else n for n in SCHEDULER_NAMES)


def check_scheduler(name: str | None, where: str = "scheduler") -> str:
    """``name`` as its canonical spelling (case and spacing do not matter), or "" for the checkpoint's own (None,
    "", "default"). Anything else is a one-line :class:`~imgrag.errors.UserError` listing the choices."""
    if name is None:
        return ""
    if not isinstance(name, str):
        raise UserError(f"{where} must be a name, got {name!r}; choose one of {choices_text()}")
    key = " ".join(name.lower().split())
    if key in ("", "default"):
        return ""
    found = _BY_KEY.get(key)
    if found is None:
        raise UserError(f"unknown {where} {name!r}; choose one of {choices_text()} (or default, the checkpoint's own)")
    return found.name


def choice(name: str) -> SchedulerChoice:
    """The table entry of a (checked) name."""
    return _BY_KEY[" ".join(check_scheduler(name).lower().split())]


def make_scheduler(name: str, base: Any, **extra: Any) -> Any:
    """A new scheduler of the named kind on ``base``'s config (the checkpoint's own scheduler): diffusers'
    ``Class.from_config(base.config, **options, **extra)``. ``extra`` is a few-step mode's (``timestep_spacing``)."""
    import diffusers

    entry = choice(name)
    return getattr(diffusers, entry.cls).from_config(base.config, **entry.options, **extra)


def describe(scheduler: Any) -> str:
    """What a scheduler object is called in a drawing's record (the ``Sampler:`` of the parameters line): the A1111
    name whose class and options it matches (the SDXL base checkpoint's own EulerDiscreteScheduler is "Euler"),
    "LCM" for the LCM-LoRA's, else its class name. The Karras option is read from the config, so
    "DPM++ 2M Karras" is told from "DPM++ 2M"."""
    cls = type(scheduler).__name__
    config = getattr(scheduler, "config", {}) or {}
    for entry in SCHEDULERS:
        wanted = {"use_karras_sigmas": False, **entry.options}
        if entry.cls == cls and all(config.get(k, False) == v for k, v in wanted.items()):
            return entry.name
    return _OTHER_NAMES.get(cls, cls)


def check_with_fast(name: str, fast: str) -> None:
    """A scheduler choice beside a few-step mode (:mod:`imgrag.models.fast`): the LCM-LoRA draws only with diffusers'
    ``LCMScheduler`` (its model card), so a choice there is a one-line UserError; the distilled mode takes it,
    stepping from the last timestep ("trailing") as that mode does."""
    if name and fast == "lcm-lora":
        raise UserError(f"the scheduler {name!r} does not apply with fast = lcm-lora: the LCM-LoRA draws with "
                        "LCMScheduler only; drop the scheduler, or draw with --fast off or distilled")


class SchedulerSwitch:
    """Which scheduler object a pipeline draws with, per (few-step mode, chosen name): each made once, from the
    checkpoint's own config, and swapped in as an object (never a reload)."""

    def __init__(self) -> None:
        self._made: dict[tuple[str, str], Any] = {}

    def pick(self, name: str, fast: str, own: Any, mode_default: Any) -> Any:
        """The scheduler for a drawing: ``mode_default`` (the mode's own: the checkpoint's, LCM's, the trailing one)
        when ``name`` is "", else the named one on ``own``'s config (trailing spacing in the distilled mode)."""
        check_with_fast(name, fast)
        if not name:
            return mode_default
        key = (fast, name)
        if key not in self._made:
            extra = {"timestep_spacing": "trailing"} if fast == "distilled" else {}
            self._made[key] = make_scheduler(name, own, **extra)
        return self._made[key]

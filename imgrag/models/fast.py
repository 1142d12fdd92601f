"""Few-step drawing: an LCM-LoRA or a distilled checkpoint, so a repair round draws in seconds.

``generation.fast`` (settings, or ``--fast`` on the command line) picks one of:

- ``off``: the checkpoint's own scheduler, ``generation.steps`` and ``generation.guidance``;
- ``lcm-lora``: load ``models.lcm_lora`` (latent-consistency/lcm-lora-sdxl) into the SAME pipeline
  and swap in diffusers' ``LCMScheduler``; 4 steps, guidance 1.0. The LCM-LoRA model card: "reduce
  the number of inference steps to just 2 to 8 steps ... either disable guidance_scale or use values
  between 1.0 and 2.0". Guidance 1.0 switches classifier-free guidance off, which also halves the
  UNet's work per step.
- ``distilled``: ``models.generator`` itself is a few-step model (SDXL-Turbo, SDXL-Lightning merged
  into SDXL): keep its scheduler class with ``timestep_spacing="trailing"`` (the Lightning recipe;
  SDXL-Turbo ships it already); 4 steps, guidance 0, as both model cards do (Turbo also draws in 1
  step: ``generation.fast_steps = 1``; it was trained at 512x512).

``generation.fast_steps`` and ``generation.fast_guidance`` override a method's defaults;
``generation.steps``/``guidance`` stay the full-step values, so switching back needs no re-configuration.

IP-Adapter: unchanged in every mode, at ``generation.ip_scale``; none of the methods documents another
scale (the adapter's image tokens enter the cross-attention beside the text's, LoRA or not, so tests check
that references still change the fast drawings, in either loading order). Without classifier-free guidance
(guidance <= 1) there is no unconditional branch, so the pipeline takes one image embedding instead of
a pair; the generator's zero embedding for unguided calls already follows that (it is keyed by the
guidance mode).

Switching modes never reloads SDXL: the LoRA is loaded once (lazily, on the first ``lcm-lora`` draw) and then switched
by its adapter name, beside the user's own LoRAs (:class:`imgrag.drawing.lora_switch.LoraSwitch`: diffusers'
``set_adapters``, or ``disable_lora()`` when no adapter draws); schedulers are swapped as objects. The LoRA is
deliberately not fused into the UNet: ``fuse_lora`` + ``unfuse_lora`` adds and subtracts the LoRA's product in the
weights' dtype, so in float16 every on/off cycle leaves rounding error in SDXL's weights and a long-lived process (chat,
batch, serve) would drift (a test shows it). The price is the LoRA's own matmuls at every step (BENCHMARKS.md, "Few-step
drawing", measures both). Unfused, "off" is bit for bit the plain pipeline (a test checks it). The LoRA's parameters
live in the UNet, so the model manager counts them as part of the generator (it measures the generator after each use).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from imgrag.drawing.lora_switch import LoraSwitch, lora_load_quiet
from imgrag.drawing.loras import LoraChoice
from imgrag.errors import ModelLoadError, UserError
from imgrag.settings import GenerationSettings, Settings
from imgrag.weights.checkpoints import loading

FAST_MODES = ("off", "lcm-lora", "distilled")
LORA_ADAPTER_NAME = "lcm-lora"
LCM_LORA_EXPECTED = ("an SDXL LCM-LoRA in diffusers' format (a folder with pytorch_lora_weights.safetensors, "
                     "like latent-consistency/lcm-lora-sdxl)")


@dataclass(frozen=True)
class FastMethod:
    """A few-step method's documented defaults."""

    steps: int
    guidance: float


METHODS: dict[str, FastMethod] = {
    "lcm-lora": FastMethod(steps=4, guidance=1.0),  # latent-consistency/lcm-lora-sdxl model card
    "distilled": FastMethod(steps=4, guidance=0.0),  # ByteDance/SDXL-Lightning 4-step; stabilityai/sdxl-turbo
}


@dataclass(frozen=True)
class DrawPlan:
    """What one drawing uses: the fast mode, denoising steps and classifier-free guidance scale."""

    mode: str
    steps: int
    guidance: float


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is a fast mode, else raise a one-line UserError."""
    if mode not in FAST_MODES:
        raise UserError(f"fast must be one of {', '.join(FAST_MODES)}, got {mode!r}")
    return mode


def draw_plan(g: GenerationSettings, mode: str | None = None) -> DrawPlan:
    """Steps and guidance for ``mode`` (default ``g.fast``): the method's defaults unless the settings override them."""
    mode = check_mode(g.fast if mode is None else mode)
    if mode == "off":
        return DrawPlan("off", g.steps, g.guidance)
    method = METHODS[mode]
    return DrawPlan(mode, g.fast_steps or method.steps,
                    method.guidance if g.fast_guidance is None else g.fast_guidance)


class FastSwitch:
    """The few-step state of one diffusers SDXL pipeline: which scheduler is in and whether the LCM-LoRA is on.

    ``apply(mode, loras)`` before each drawing puts the pipeline in that mode with those user LoRAs active beside
    the LCM-LoRA (``loras``: :class:`imgrag.drawing.lora_switch.LoraSwitch`, shared with the generator); it is cheap
    when nothing changes.
    """

    def __init__(self, pipe: Any, settings: Settings, loras: LoraSwitch | None = None) -> None:
        self.pipe = pipe
        self.settings = settings
        self.loras = loras if loras is not None else LoraSwitch(pipe)
        self.mode = "off"
        self.lora_loaded = False
        self._schedulers: dict[str, Any] = {"off": pipe.scheduler}  # the checkpoint's own, kept for "off"

    def apply(self, mode: str, loras: tuple[LoraChoice, ...] | list[LoraChoice] = ()) -> None:
        """Switch the pipeline to ``mode`` (loading the LCM-LoRA on its first use) with the user's ``loras`` active
        at their weights; SDXL itself is never reloaded."""
        check_mode(mode)
        if mode == "lcm-lora":
            self.load_lora()
        self.loras.use(loras, [(LORA_ADAPTER_NAME, 1.0)] if mode == "lcm-lora" else [])
        if mode == self.mode:
            return
        self.pipe.scheduler = self.scheduler_for(mode)
        self.mode = mode

    def load_lora(self) -> None:
        """Load ``models.lcm_lora`` into the pipeline's UNet (once), as the adapter named ``lcm-lora``."""
        if self.lora_loaded:
            return
        ref = self.settings.models.lcm_lora
        with loading("LCM-LoRA", ref, LCM_LORA_EXPECTED), _diffusers_silent(), lora_load_quiet():
            self.pipe.load_lora_weights(ref, adapter_name=LORA_ADAPTER_NAME)
        # A LoRA for another model can load "successfully" with nothing matched (diffusers only warns).
        self.loras.adopt(LORA_ADAPTER_NAME)
        if LORA_ADAPTER_NAME not in self.pipe.get_list_adapters().get("unet", []):
            raise ModelLoadError(f"{ref} holds no LoRA weights for this generator's UNet "
                                 f"(expected {LCM_LORA_EXPECTED})")
        self.lora_loaded = True

    @property
    def own_scheduler(self) -> Any:
        """The checkpoint's own scheduler, as loaded (the base every other scheduler is made from)."""
        return self._schedulers["off"]

    def scheduler_for(self, mode: str) -> Any:
        """The scheduler object ``mode`` draws with (made once per mode from the checkpoint's own config)."""
        if mode not in self._schedulers:
            base = self._schedulers["off"]
            if mode == "lcm-lora":
                from diffusers import LCMScheduler

                self._schedulers[mode] = LCMScheduler.from_config(base.config)
            else:  # distilled: the checkpoint's sampler, stepping from the last timestep ("trailing")
                self._schedulers[mode] = type(base).from_config(base.config, timestep_spacing="trailing")
        return self._schedulers[mode]


@contextmanager
def _diffusers_silent() -> Iterator[None]:
    """diffusers logs a failed LoRA load at ERROR level before raising; the raised error is reported in one line."""
    from diffusers.utils import logging as dlog

    saved = dlog.get_verbosity()
    dlog.set_verbosity(dlog.CRITICAL)
    try:
        yield
    finally:
        dlog.set_verbosity(saved)

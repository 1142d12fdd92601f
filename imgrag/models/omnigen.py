"""OmniGen: the in-context drawing backbone (ImageRAG-O's), beside SDXL + IP-Adapter.

OmniGen (Xiao et al., arXiv 2409.11340; diffusers' ``OmniGenPipeline``, checkpoint
``Shitao/OmniGen-v1-diffusers``) is one Phi-3 transformer over text and image tokens, with SDXL's VAE. Its prompt
is multimodal: ``<img><|image_1|></img>`` marks where the first of ``input_images`` goes. So a repair can say which
reference shows which concept (:mod:`imgrag.drawing.concept_refs` builds that prompt), where IP-Adapter blends every
reference into one image embedding.

Cost, as the processor counts it: the drawing is ``(width/16) * (height/16)`` tokens (4096 at 1024²) and each
input image up to ``(max_input_image_size/16)²`` more (4096 at 1024), in three guidance branches when there are
input images (text+images, neither, images only) and two without. Hence the cap on references
(``omnigen.max_references``, ImageRAG-O's 3) and the model manager's estimate of its working memory
(:func:`imgrag.management.engine.working_memory_gb`).

It runs in the dtype of the device (``settings.torch_dtype()``) except that float16 becomes bfloat16: the
checkpoint is stored in bfloat16 (diffusers' conversion script casts it so) and diffusers' OmniGen guide loads it
in bfloat16. What does not apply: LCM-LoRA and the distilled few-step mode (``--fast``) are SDXL's; OmniGen draws
with its own steps (``omnigen.steps``) whatever ``generation.fast`` says, and its provenance says ``fast: off``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from imgrag.errors import ModelLoadError, TimeBudgetSpent, UserError, check_seed, check_text
from imgrag.models.decoding import NonFiniteDrawingError
from imgrag.settings import Settings, check_drawing_bounds
from imgrag.text import first_line
from imgrag.weights.checkpoints import loading, quiet_libraries

OMNIGEN_EXPECTED = "an OmniGen diffusers pipeline folder (model_index.json of OmniGenPipeline)"
GUIDANCE_BRANCHES = 3  # with input images: text+images, neither, images only (two without)
TEXT_TOKENS = 320  # OmniGen's instruction wrapper + a long prompt + the concepts' captions, in Phi-3 tokens


class _DeadlinePassed(Exception):
    """Raised from the step callback: OmniGenPipeline's loop has no interrupt flag, so this ends it."""


class OmniGenDrawer:
    """An ``OmniGenPipeline`` drawing plain and in-context pictures; see the module docstring."""

    def __init__(self, pipe: Any, settings: Settings) -> None:
        self.pipe = pipe
        self.settings = settings
        pipe.set_progress_bar_config(disable=True)  # the command line draws its own bar from on_step

    @classmethod
    def from_pretrained(cls, settings: Settings, device: str | None = None, *, place: bool = True) -> OmniGenDrawer:
        """Load ``settings.models.omnigen`` (safetensors only) with ``OmniGenPipeline.from_pretrained``.

        ``place=False`` leaves it in CPU RAM (in the dtype for ``device``) for the model manager to move. A folder
        holding another pipeline is a :class:`~imgrag.errors.ModelLoadError` naming what was expected."""
        from diffusers import OmniGenPipeline

        ref = settings.models.omnigen
        device = device or settings.resolved_device()
        with loading("OmniGen", ref, OMNIGEN_EXPECTED):
            _check_pipeline_class(ref)
            pipe = OmniGenPipeline.from_pretrained(ref, dtype=omnigen_dtype(settings, device),
                                                   use_safetensors=True)
        drawer = cls(pipe, settings)
        return drawer.to(device) if place else drawer

    def to(self, device: str) -> OmniGenDrawer:
        """Move the whole pipeline; the model manager calls this."""
        with quiet_libraries():
            self.pipe.to(device)
        return self

    @property
    def device(self) -> Any:
        return self.pipe.device

    def generate(
        self,
        prompt: str,
        *,
        seed: int,
        input_images: list[Image.Image] | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        img_guidance: float | None = None,
        on_step: Callable[[int, int], None] | None = None,
        deadline: float | None = None,
    ) -> Image.Image:
        """Draw one picture from ``prompt``, a multimodal prompt whose ``<img><|image_k|></img>`` slots name
        ``input_images[k-1]`` (build it with :func:`imgrag.drawing.concept_refs.concept_prompt`; untrusted text must
        have gone through :func:`imgrag.drawing.concept_refs.as_content`).

        Unset values come from ``settings.omnigen`` (steps, guidance_scale, img_guidance_scale) and
        ``settings.generation`` (width, height). Same arguments and seed on the same device give the same picture.
        ``on_step(done, total)`` after every step; ``deadline`` (a ``time.monotonic()`` instant) stops at the first
        step past it with :class:`~imgrag.errors.TimeBudgetSpent`. A picture with NaN or inf pixels is refused
        (:class:`~imgrag.models.generator.NonFiniteDrawingError`)."""
        import numpy as np
        import torch

        o, g = self.settings.omnigen, self.settings.generation
        width = g.width if width is None else width
        height = g.height if height is None else height
        steps = o.steps if steps is None else steps
        guidance = o.guidance_scale if guidance is None else guidance
        img_guidance = o.img_guidance_scale if img_guidance is None else img_guidance
        images = list(input_images or [])
        validate_omnigen_request(prompt, width, height, steps, images, generation=g)
        seed = check_seed(seed)

        stopped: list[int] = []

        def callback(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
            if on_step is not None:
                on_step(step + 1, steps)
            if deadline is not None and time.monotonic() >= deadline:
                stopped.append(step + 1)
                raise _DeadlinePassed
            return tensors

        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        # The pipeline samples the input images' VAE latents from torch's global generator, not from ``generator``:
        # seed that too, in a fork, so the same seed gives the same picture and the caller's random state is kept.
        device = self.pipe.device
        forked = [device.index or 0] if device.type == "cuda" else []
        try:
            with quiet_libraries(), torch.no_grad(), torch.random.fork_rng(devices=forked):
                torch.manual_seed(int(seed))
                result = self.pipe(prompt=prompt, input_images=images or None, width=width, height=height,
                                   num_inference_steps=steps, guidance_scale=guidance,
                                   img_guidance_scale=img_guidance, max_input_image_size=o.max_input_image_size,
                                   generator=generator, output_type="np", callback_on_step_end=callback)
        except _DeadlinePassed:
            raise TimeBudgetSpent(f"the time budget ran out during the drawing (stopped after step {stopped[0]} "
                                  f"of {steps})") from None
        except (ValueError, AssertionError) as exc:  # the pipeline's and its processor's own argument checks
            raise UserError(f"OmniGen refused the drawing: {first_line(exc)}") from exc
        pixels = result.images
        if not bool(np.isfinite(pixels).all()):
            raise NonFiniteDrawingError(
                "OmniGen's picture holds NaN or inf (numeric overflow); set dtype = \"float32\" or \"bfloat16\" in the "
                "profile (IMGRAG_DTYPE), or lower omnigen.guidance_scale")
        return self.pipe.image_processor.numpy_to_pil(pixels)[0]


def omnigen_dtype(settings: Settings, device: str) -> Any:
    """The dtype OmniGen runs in on ``device``: the settings' dtype, with float16 as bfloat16 (see the module
    docstring); float32 on a CPU unless the settings say otherwise."""
    import torch

    name = settings.dtype if settings.dtype != "auto" else ("float16" if device.startswith("cuda") else "float32")
    return torch.bfloat16 if name == "float16" else getattr(torch, name)


def validate_omnigen_request(prompt: str, width: int, height: int, steps: int,
                             images: list[Image.Image] | None = None, generation: Any = None) -> None:
    """Raise a UserError for a drawing OmniGen cannot make (checked before the model is asked), or one past the
    bounds of ``generation`` (``max_side``/``max_steps``, the same as SDXL's; the defaults when None)."""
    try:
        check_drawing_bounds(width, height, steps, generation)
    except ValueError as exc:
        raise UserError(f"OmniGen: {exc}") from None
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError("the prompt is empty: say what to draw")
    check_text(prompt)
    for name, value in (("width", width), ("height", height)):
        if value < 16 or value % 16:
            raise UserError(f"{name} must be a positive multiple of 16 for OmniGen (latents 1/8 size, 2x2 patches), "
                            f"got {value}")
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    slots = prompt.count("<|image_")
    for image in images or []:
        if not isinstance(image, Image.Image):
            raise UserError(f"an input image must be a picture (PIL image), got {type(image).__name__}")
    if images and slots != len(images):
        raise UserError(f"the prompt has {slots} image slot(s) for {len(images)} input image(s)")


def _check_pipeline_class(ref: str) -> None:
    """Refuse a local folder whose model_index.json names another pipeline, before reading any weights."""
    index = Path(ref).expanduser() / "model_index.json"
    if not index.is_file():
        return  # a hub id: diffusers reads the cached index itself
    try:
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return
    if name != "OmniGenPipeline":
        raise ModelLoadError(f"{ref} holds a {name}, not OmniGen (expected {OMNIGEN_EXPECTED}); check models.omnigen")


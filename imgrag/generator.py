"""The generator: SDXL text-to-image, optionally guided by reference images through IP-Adapter.

One diffusers pipeline serves both modes. The adapter (its weights and its CLIP image encoder) is
loaded into that same pipeline on the first guided call, never a second SDXL (TinyIMGRAG loads SDXL
twice per guided image). Lazily, so that plain generation needs only the SDXL checkpoint.

Plain generation once the adapter is loaded: diffusers' UNet then insists on image embeddings, so a
plain call sets the adapter scale to 0 and passes a zero embedding. At scale 0 diffusers' IP-Adapter
attention processor skips the adapter branch entirely, so the picture is bit for bit the one the
plain pipeline draws (a test checks it) and the only extra work is projecting one zero vector.
The alternative, ``unload_ip_adapter()`` before a plain call, means re-reading the adapter and its
image encoder at the next guided call. Measured on the tiny kit (64x64, 2 steps, medians of 10):

    ================================  ======================  =================
                                      2-core CPU (fp32)       H100 (fp16)
    plain, adapter never loaded       0.143 s                 0.054 s
    plain at scale 0, adapter loaded  0.148 s                 0.044 s
    unload_ip_adapter()               0.005 s                 -
    re-load after an unload           0.075 s                 0.047 s
    ================================  ======================  =================

so scale 0 costs nothing measurable per plain call while unloading costs a reload per switch. For
real SDXL (parameter counts of the published configs) the reload re-reads 0.35 B adapter parameters
and the 0.63 B ViT-H encoder, 1.96 GB in fp16, against one 1024x8192 projection of a zero vector
per guidance branch (~17 MFLOP each) for scale 0. We use scale 0 and never unload; the ~2 GB stay
resident, counted by the model manager.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from PIL import Image

from imgrag.checkpoints import first_line, loading, quiet_libraries
from imgrag.errors import ModelLoadError, UserError
from imgrag.settings import Settings

SDXL_EXPECTED = "an SDXL diffusers pipeline folder (model_index.json of StableDiffusionXLPipeline)"
IP_ADAPTER_EXPECTED = "an h94/IP-Adapter style folder: <subfolder>/<weight>.safetensors and its image encoder"


class Generator:
    """An SDXL pipeline with an IP-Adapter loaded into it on demand; see the module docstring."""

    def __init__(self, pipe: Any, settings: Settings) -> None:
        self.pipe = pipe
        self.settings = settings
        self.adapter_loaded = False
        self._zero_embeds: dict[bool, Any] = {}  # per classifier-free-guidance mode; see _zero_image_embeds
        # Called with the adapter's GiB before it loads onto the pipeline's device (the engine asks the model
        # manager to make room: diffusers puts the adapter and its image encoder straight onto that device).
        self.before_adapter_load: Callable[[float], None] | None = None
        pipe.set_progress_bar_config(disable=True)  # the command line draws its own bar from on_step

    @classmethod
    def from_pretrained(cls, settings: Settings, device: str | None = None, *, place: bool = True) -> Generator:
        """Load ``settings.models.generator`` (safetensors only) onto ``device`` (default: the settings').

        ``place=False`` leaves it in CPU RAM (in the dtype chosen for ``device``) for the model manager to move."""
        from diffusers import AutoPipelineForText2Image, StableDiffusionXLPipeline

        ref = settings.models.generator
        with loading("generator", ref, SDXL_EXPECTED):
            pipe = AutoPipelineForText2Image.from_pretrained(ref, dtype=settings.torch_dtype(),
                                                             use_safetensors=True)
        if not isinstance(pipe, StableDiffusionXLPipeline):
            raise ModelLoadError(f"{ref} holds a {type(pipe).__name__}, not the generator (expected {SDXL_EXPECTED})")
        generator = cls(pipe, settings)
        return generator.to(device or settings.resolved_device()) if place else generator

    def to(self, device: str) -> Generator:
        """Move the whole pipeline (adapter included); the model manager calls this."""
        # Evicting an fp16 pipeline to CPU RAM makes diffusers warn that it cannot *run* there; it only waits.
        with quiet_libraries():
            self.pipe.to(device)
        return self

    @property
    def device(self) -> Any:
        return self.pipe.device

    def load_ip_adapter(self) -> None:
        """Load the IP-Adapter into this pipeline (once; later calls do nothing)."""
        if self.adapter_loaded:
            return
        m = self.settings.models
        if not m.ip_adapter_weight.endswith(".safetensors"):
            raise ModelLoadError(f"models.ip_adapter_weight must be a .safetensors file, got {m.ip_adapter_weight!r}")
        if self.before_adapter_load is not None:
            self.before_adapter_load(self.adapter_size_gb())
        with loading("IP-Adapter", m.ip_adapter, IP_ADAPTER_EXPECTED):
            self.pipe.load_ip_adapter(m.ip_adapter, subfolder=m.ip_adapter_subfolder, weight_name=m.ip_adapter_weight,
                                      image_encoder_folder=m.ip_adapter_image_encoder)
        self.adapter_loaded = True

    def adapter_size_gb(self) -> float:
        """GiB the IP-Adapter and its image encoder will take in the pipeline's dtype, read from the safetensors
        headers (nothing is loaded). Files not found on disk (a hub id not yet downloaded) count as the SDXL
        ViT-H adapter's published size: 0.35 B + 0.63 B parameters."""
        from imgrag.checkpoints import safetensors_parameters

        m = self.settings.models
        encoder = m.ip_adapter_image_encoder
        if "/" not in encoder.strip("/"):  # diffusers reads a bare folder name inside the subfolder
            encoder = f"{m.ip_adapter_subfolder}/{encoder}"
        count = safetensors_parameters(m.ip_adapter, [f"{m.ip_adapter_subfolder}/{m.ip_adapter_weight}",
                                                      f"{encoder}/*.safetensors"])
        parameters = count if count else 0.35e9 + 0.63e9
        return parameters * self.pipe.dtype.itemsize / 2**30

    def generate(
        self,
        prompt: str,
        *,
        seed: int,
        references: list[Image.Image] | None = None,
        ip_scale: float | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> Image.Image:
        """Draw one picture; with ``references``, guided by all of them through the one adapter.

        Same arguments and seed on the same device give the same picture. ``on_step(done, total)`` is
        called after every denoising step.
        """
        import torch

        g = self.settings.generation
        width = g.width if width is None else width
        height = g.height if height is None else height
        steps = g.steps if steps is None else steps
        guidance = g.guidance if guidance is None else guidance
        ip_scale = g.ip_scale if ip_scale is None else ip_scale
        validate_request(prompt, width, height, steps, ip_scale, references)

        kwargs: dict[str, Any] = {}
        if references:
            self.load_ip_adapter()
            self.pipe.set_ip_adapter_scale(ip_scale)
            kwargs["ip_adapter_image"] = [list(references)]  # one adapter, several images: [[r1, r2]]
        elif self.adapter_loaded:
            self.pipe.set_ip_adapter_scale(0.0)
            kwargs["ip_adapter_image_embeds"] = [self._zero_image_embeds(guidance)]

        if on_step is not None:
            def callback(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
                on_step(step + 1, pipe.num_timesteps)
                return tensors

            kwargs["callback_on_step_end"] = callback
        generator = torch.Generator(device=self.pipe.device).manual_seed(int(seed))
        try:
            # In fp16 the pipeline moves SDXL's VAE to fp32 for every decode (it overflows in fp16) and warns
            # twice about it each time ("should be kept in float32: []", upcast_vae deprecated): noise on stderr.
            with quiet_libraries(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*upcast_vae.*", category=FutureWarning)
                result = self.pipe(prompt=prompt, width=width, height=height, num_inference_steps=steps,
                                   guidance_scale=guidance, generator=generator, output_type="pil", **kwargs)
        except ValueError as exc:  # diffusers' own argument checks; anything else is a bug and should show
            raise UserError(f"generation refused: {first_line(exc)}") from exc
        return result.images[0]

    def _zero_image_embeds(self, guidance: float) -> Any:
        """All-zero image embeddings in the exact shape the pipeline expects for this adapter.

        The shape depends on the adapter type (a pooled vector for ``ip-adapter_sdxl``, hidden states
        for the "plus" ones) and on classifier-free guidance (negative and positive halves), so it is
        taken once from a real encoding of a blank image rather than written down here.
        """
        import torch

        cfg = guidance > 1 and self.pipe.unet.config.time_cond_proj_dim is None
        if cfg not in self._zero_embeds:
            blank = Image.new("RGB", (224, 224))
            embeds = self.pipe.prepare_ip_adapter_image_embeds(
                ip_adapter_image=[[blank]], ip_adapter_image_embeds=None, device=self.pipe.device,
                num_images_per_prompt=1, do_classifier_free_guidance=cfg)
            self._zero_embeds[cfg] = torch.zeros_like(embeds[0])
        return self._zero_embeds[cfg].to(self.pipe.device)


def validate_request(prompt: str, width: int, height: int, steps: int, ip_scale: float,
                     references: list[Image.Image] | None = None) -> None:
    """Raise a UserError for a request SDXL cannot draw (the command line checks before loading anything)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError("the prompt is empty: say what to draw")
    for name, value in (("width", width), ("height", height)):
        if value < 8 or value % 8:
            raise UserError(f"{name} must be a positive multiple of 8 (SDXL's latents are 1/8 size), got {value}")
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    if not 0.0 <= ip_scale <= 2.0:
        raise UserError(f"ip_scale must be within 0..2, got {ip_scale}")
    for ref in references or []:
        if not isinstance(ref, Image.Image):
            raise UserError(f"a reference must be a picture (PIL image), got {type(ref).__name__}")

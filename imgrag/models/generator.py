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

Loading the pipeline is :mod:`imgrag.models.sdxl_loader`, the VAE decode that refuses a non-finite drawing
:mod:`imgrag.models.decoding`, the request checks that need no model :mod:`imgrag.models.draw_checks`. torch and
diffusers are imported inside the methods that use them: they take seconds, and ``imgrag --help`` imports this
module.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from imgrag.drawing.draw_options import MAX_PER_ROUND
from imgrag.drawing.lora_switch import LoraSwitch
from imgrag.drawing.loras import LoraChoice, check_loras, settings_loras
from imgrag.drawing.schedulers import SchedulerSwitch, check_scheduler
from imgrag.drawing.schedulers import describe as describe_scheduler
from imgrag.drawing.steering import ReferenceSteer, instantstyle_scale
from imgrag.errors import TimeBudgetSpent, UserError, check_seed
from imgrag.models.decoding import decode_latents
from imgrag.models.draw_checks import reference_steers, validate_request
from imgrag.models.embed_cache import encoder_identity as embedding_encoder_identity
from imgrag.models.fast import FastSwitch, draw_plan
from imgrag.models.previews import due, latents_to_rgb
from imgrag.models.sdxl_loader import adapter_present, load_sdxl_pipeline
from imgrag.settings import Settings
from imgrag.text import first_line
from imgrag.weights.adapters import ResolvedAdapter, resolve_ip_adapter
from imgrag.weights.checkpoints import loading, quiet_libraries, safetensors_parameters

IP_ADAPTER_EXPECTED = "an h94/IP-Adapter style folder: <subfolder>/<weight>.safetensors and its image encoder"


class Generator:
    """An SDXL pipeline with an IP-Adapter loaded into it on demand; see the module docstring."""

    def __init__(self, pipe: Any, settings: Settings) -> None:
        self.pipe = pipe
        self.settings = settings
        self.adapter_loaded = False
        self.adapter: ResolvedAdapter | None = None  # the adapter files, checked once (see resolve_ip_adapter)
        self._zero_embeds: dict[bool, Any] = {}  # per classifier-free-guidance mode; see _zero_image_embeds
        # Called with an adapter's GiB before it loads onto the pipeline's device (the engine asks the model manager
        # to make room: diffusers puts the IP-Adapter, its image encoder and each LoRA straight onto that device).
        self.before_adapter_load: Callable[[float], None] | None = None
        # The user's LoRAs and the LCM-LoRA: loaded once each, switched by adapter name (imgrag.drawing.loras).
        self.loras = LoraSwitch(pipe, before_load=self._before_lora_load)
        # Few-step drawing (LCM-LoRA, distilled); see imgrag.models.fast.
        self.fast = FastSwitch(pipe, settings, self.loras)
        # Reference embeddings kept across drawings and processes (imgrag.models.embed_cache); None: encode every time.
        self.embed_cache: Any = None
        self.encoder_calls = 0  # forward passes of the adapter's image encoder (a hook counts them; see below)
        self.last_guidance: dict[str, Any] = {}  # what the latest guided drawing did: encoded, cached, scales
        self._encoder_ids: dict[str, str] = {}  # encoder identity per device type (imgrag.models.embed_cache)
        # The per-processor scale of each mode (imgrag.drawing.steering).
        self._mode_scales: dict[str, dict[str, float]] = {}
        self.schedulers = SchedulerSwitch()  # the chosen samplers (imgrag.drawing.schedulers), made once each
        self.last_scheduler = describe_scheduler(pipe.scheduler)  # what the latest drawing sampled with
        # Called with a batch's size before a drawing of several pictures (the engine asks the model manager for the
        # extra pictures' working memory: imgrag.management.engine.working_memory_gb counts one).
        self.before_batch: Callable[[int], None] | None = None
        pipe.set_progress_bar_config(disable=True)  # the command line draws its own bar from on_step

    @classmethod
    def from_pretrained(cls, settings: Settings, device: str | None = None, *, place: bool = True) -> Generator:
        """Load ``settings.models.generator`` (safetensors only; a folder, a hub id or a single file, see
        :func:`load_sdxl_pipeline`) onto ``device`` (default: the settings').

        ``place=False`` leaves it in CPU RAM (in the dtype chosen for ``device``) for the model manager to move."""
        generator = cls(load_sdxl_pipeline(settings), settings)
        if adapter_present(settings):
            # A wrong adapter file or encoder fails here, before the first drawing, not at the first guided one.
            generator.adapter = resolve_ip_adapter(settings)
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
        with loading("IP-Adapter", self.settings.models.ip_adapter, IP_ADAPTER_EXPECTED):
            a = self.adapter = self.adapter or resolve_ip_adapter(self.settings)
        if self.before_adapter_load is not None:
            self.before_adapter_load(self.adapter_size_gb())
        with loading("IP-Adapter", self.settings.models.ip_adapter, IP_ADAPTER_EXPECTED):
            self.pipe.load_ip_adapter(a.ref, subfolder=a.subfolder, weight_name=a.weight,
                                      image_encoder_folder=a.image_encoder)
        # Counting the encoder's real forward passes is how a cached drawing shows it ran none.
        self.pipe.image_encoder.register_forward_pre_hook(self._count_encoder_call)
        self.adapter_loaded = True

    def _count_encoder_call(self, module: Any, inputs: Any) -> None:
        self.encoder_calls += 1

    def _before_lora_load(self, gib: float) -> None:
        if self.before_adapter_load is not None:
            self.before_adapter_load(gib)

    def prepare_loras(self, loras: Sequence[LoraChoice]) -> None:
        """Load ``loras`` into the pipeline now (each file once), so that one which does not fit this generator is a
        one-line ModelLoadError before a run's first drawing rather than at it. Activates nothing."""
        for choice in loras:
            self.loras.adapter_for(choice)

    def adapter_size_gb(self) -> float:
        """GiB the IP-Adapter and its image encoder will take in the pipeline's dtype, read from the safetensors
        headers (nothing is loaded). Files not found on disk (a hub id not yet downloaded) count as the SDXL
        ViT-H adapter's published size: 0.35 B + 0.63 B parameters."""
        a = self.adapter = self.adapter or resolve_ip_adapter(self.settings)  # the files the folder really holds
        encoder = a.image_encoder
        if "/" not in encoder.strip("/"):  # diffusers reads a bare folder name inside the subfolder
            encoder = f"{a.subfolder}/{encoder}"
        count = safetensors_parameters(a.ref, [f"{a.subfolder}/{a.weight}", f"{encoder}/*.safetensors"])
        parameters = count if count else 0.35e9 + 0.63e9
        return parameters * self.pipe.dtype.itemsize / 2**30

    def generate(self, prompt: str, *, seed: int, **kwargs: Any) -> Image.Image:
        """Draw one picture: :meth:`generate_batch` with one seed (every other argument is the same)."""
        return self.generate_batch(prompt, seeds=[seed], **kwargs)[0]

    def generate_batch(
        self,
        prompt: str,
        *,
        seeds: list[int],
        references: list[Image.Image] | None = None,
        ip_scale: float | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        on_step: Callable[[int, int], None] | None = None,
        deadline: float | None = None,
        fast: str | None = None,
        weights: list[float] | None = None,
        modes: list[str] | None = None,
        reference_keys: list[str | None] | None = None,
        negative_prompt: str | None = None,
        scheduler: str | None = None,
        on_preview: Callable[[int, int, list[Image.Image]], None] | None = None,
        preview_every: int | None = None,
        loras: Sequence[LoraChoice] | None = None,
    ) -> list[Image.Image]:
        """Draw one picture per seed of ``seeds`` in ONE batched pipeline call; with ``references``, guided by all of
        them through the one adapter. Returns the pictures in the order of ``seeds``.

        The batch is diffusers' ``num_images_per_prompt`` with one ``torch.Generator`` per seed, so each picture is
        (up to floating-point batching) the one a single call with that seed draws, and one seed alone is exactly
        the single call. Before a batch of more than one the model manager is asked for the extra pictures' working
        memory (:attr:`before_batch`); the VAE decodes the pictures one at a time, so its share does not grow.

        ``weights`` (0..2 each, default 1) and ``modes`` ("both", "style", "content"; default "both") are aligned
        with ``references``: each reference is attended on its own and added at ``ip_scale x weight`` in the UNet
        blocks its mode selects (:mod:`imgrag.drawing.steering`). ``reference_keys`` are the references' content hashes
        (sha256 of the file): with an :attr:`embed_cache`, a reference whose embedding is cached for this encoder
        is not encoded again (:mod:`imgrag.models.embed_cache`); the picture is the same either way, byte for byte.

        ``negative_prompt`` (default ``generation.negative_prompt``; "" none) is what the drawing steers away from (it
        takes the unconditional branch of classifier-free guidance, so it does nothing at guidance <= 1). ``scheduler``
        (default ``generation.scheduler``) is an A1111 sampler name (:mod:`imgrag.drawing.schedulers`), swapped in from
        the checkpoint's config; "" keeps the checkpoint's own (or the fast mode's). :attr:`last_scheduler` then names
        the scheduler that drew. ``loras`` (default ``[[models.loras]]``; ``()`` none) are the LoRAs this drawing uses
        at their weights, each file loaded into the pipeline once and switched by adapter name beside the fast mode's
        LCM-LoRA (:mod:`imgrag.drawing.loras`); a file that does not fit this generator is a ModelLoadError.

        Same arguments and seeds on the same device give the same pictures. ``on_step(done, total)`` is called after
        every denoising step; ``on_preview(done, total, pictures)`` every ``preview_every`` steps (default
        ``generation.preview_every``; 0 never) with one small picture per seed made from the latents
        (:mod:`imgrag.models.previews`). ``deadline`` (a ``time.monotonic()`` instant) stops the drawing at the first
        step boundary past it (diffusers' ``callback_on_step_end`` sets the pipeline's interrupt flag) and raises
        :class:`~imgrag.errors.TimeBudgetSpent`: a half-denoised picture is noise, not a candidate. ``fast`` picks a
        few-step mode for this drawing (default ``generation.fast``; see :mod:`imgrag.models.fast`), whose steps and
        guidance apply unless given here.
        """
        import torch

        g = self.settings.generation
        width = g.width if width is None else width
        height = g.height if height is None else height
        plan = draw_plan(g, fast)
        steps = plan.steps if steps is None else steps
        guidance = plan.guidance if guidance is None else guidance
        ip_scale = g.ip_scale if ip_scale is None else ip_scale
        negative = (g.negative_prompt if negative_prompt is None else negative_prompt).strip()
        chosen = check_scheduler(g.scheduler if scheduler is None else scheduler)
        every = g.preview_every if preview_every is None else int(preview_every)
        validate_request(prompt, width, height, steps, ip_scale, references, generation=g)
        steers = reference_steers(len(references or []), weights, modes)
        if reference_keys is not None and len(reference_keys) != len(references or []):
            raise UserError(f"{len(reference_keys)} reference keys for {len(references or [])} references")
        seeds = [check_seed(seed) for seed in seeds]
        if not 1 <= len(seeds) <= MAX_PER_ROUND:
            raise UserError(f"a batch draws 1 to {MAX_PER_ROUND} pictures (one per seed), got {len(seeds)} seeds")

        chosen_loras = check_loras(settings_loras(self.settings) if loras is None else list(loras))
        self.fast.apply(plan.mode, chosen_loras)
        # The chosen sampler, or the mode's own; set at every call, since the previous drawing may have chosen another.
        self.pipe.scheduler = self.schedulers.pick(chosen, plan.mode, self.fast.own_scheduler,
                                                   self.fast.scheduler_for(plan.mode))
        self.last_scheduler = describe_scheduler(self.pipe.scheduler)
        if len(seeds) > 1 and self.before_batch is not None:
            self.before_batch(len(seeds))
        kwargs: dict[str, Any] = {}
        if negative:
            kwargs["negative_prompt"] = negative  # None (not ""): SDXL then zeroes the unconditional branch as before
        if len(seeds) > 1:
            kwargs["num_images_per_prompt"] = len(seeds)
        if references:
            self.load_ip_adapter()
            # One adapter, several images ([[r1, r2]]), each attended on its own at its own scale: diffusers'
            # per-image path, entered through an all-ones mask per image (see imgrag.drawing.steering for why).
            embeds = self._reference_embeds(list(references), reference_keys, self._cfg(guidance))
            kwargs["ip_adapter_image_embeds"] = [embeds]
            self._set_reference_scales(ip_scale, steers)
            kwargs["cross_attention_kwargs"] = {
                "ip_adapter_masks": [torch.ones(1, len(references), height // 8, width // 8)]}
        elif self.adapter_loaded:
            self.pipe.set_ip_adapter_scale(0.0)
            kwargs["ip_adapter_image_embeds"] = [self._zero_image_embeds(guidance)]

        stopped: list[int] = []
        previews = on_preview is not None and every > 0
        if on_step is not None or deadline is not None or previews:
            def callback(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
                if on_step is not None:
                    on_step(step + 1, pipe.num_timesteps)
                if previews and due(step + 1, pipe.num_timesteps, every) and "latents" in tensors:
                    on_preview(step + 1, pipe.num_timesteps, latents_to_rgb(tensors["latents"]))
                if deadline is not None and time.monotonic() >= deadline and not stopped:
                    stopped.append(step + 1)
                    pipe._interrupt = True  # the SDXL pipelines skip the remaining steps when it is set
                return tensors

            kwargs["callback_on_step_end"] = callback
        generators = [torch.Generator(device=self.pipe.device).manual_seed(int(seed)) for seed in seeds]
        try:
            with quiet_libraries():
                # The pipeline stops at the latents; _decode checks them and the pixels for NaN (see there).
                result = self.pipe(prompt=prompt, width=width, height=height, num_inference_steps=steps,
                                   guidance_scale=guidance, generator=generators[0] if len(seeds) == 1 else generators,
                                   output_type="latent", **kwargs)
        except ValueError as exc:  # diffusers' own argument checks; anything else is a bug and should show
            raise UserError(f"generation refused: {first_line(exc)}") from exc
        if stopped:
            raise TimeBudgetSpent(f"the time budget ran out during the drawing (stopped after step {stopped[0]} "
                                  f"of {steps})")
        # One picture at a time through the VAE: its decode is most of a drawing's working memory
        # (imgrag.management.engine).
        return [decode_latents(self.pipe, result.images[i:i + 1]) for i in range(len(seeds))]

    def _cfg(self, guidance: float) -> bool:
        """Whether this drawing runs classifier-free guidance (so image embeddings come in negative+positive)."""
        return guidance > 1 and self.pipe.unet.config.time_cond_proj_dim is None

    def _hidden_states_adapter(self) -> bool:
        """A "plus" adapter reads the encoder's hidden states, a plain one its projected embedding (as diffusers'
        ``prepare_ip_adapter_image_embeds`` decides)."""
        from diffusers.models.embeddings import ImageProjection

        layers = self.pipe.unet.encoder_hid_proj.image_projection_layers
        return not isinstance(layers[0], ImageProjection)

    def encoder_identity(self) -> str:
        """The loaded image encoder's identity for the embedding cache
        (:func:`imgrag.models.embed_cache.encoder_identity`),
        computed once per device type."""
        kind = self.pipe.device.type
        if kind not in self._encoder_ids:
            self._encoder_ids[kind] = embedding_encoder_identity(self.pipe, self._hidden_states_adapter())
        return self._encoder_ids[kind]

    def _reference_embeds(self, images: list[Image.Image], keys: list[str | None] | None, cfg: bool) -> Any:
        """``ip_adapter_image_embeds``' one entry for these references: [2 if cfg else 1, n, ...] (negative half
        first, as diffusers' ``prepare_ip_adapter_image_embeds`` lays it out). Each reference is encoded alone
        (so a cached one and a fresh one are the same tensor), or read from :attr:`embed_cache`."""
        import torch

        cache = self.embed_cache
        identity = self.encoder_identity() if cache is not None else ""
        hidden = self._hidden_states_adapter()
        dtype = next(self.pipe.image_encoder.parameters()).dtype
        conds, unconds, encoded, cached = [], [], 0, 0
        for image, key in zip(images, keys or [None] * len(images), strict=True):
            found = cache.get(identity, key) if cache is not None and key else None
            if found is None:
                with torch.no_grad():
                    cond, uncond = self.pipe.encode_image(image, self.pipe.device, 1, hidden)
                cond, uncond = cond[0], uncond[0]
                encoded += 1
                if cache is not None and key:
                    cache.put(identity, key, cond, uncond)
            else:
                cond, uncond = found
                cached += 1
            conds.append(cond.to(self.pipe.device, dtype))
            unconds.append(uncond.to(self.pipe.device, dtype))
        self.last_guidance = {"references": len(images), "encoded": encoded, "cached": cached}
        positive = torch.stack(conds)[None]
        return torch.cat([torch.stack(unconds)[None], positive]) if cfg else positive

    def mode_scales(self, mode: str) -> dict[str, float]:
        """Per attention processor name, the factor ``mode`` gives it: diffusers' ``set_ip_adapter_scale`` expands
        the InstantStyle dict (:func:`imgrag.drawing.steering.instantstyle_scale`) and the processors' scales are
        read."""
        if mode not in self._mode_scales:
            self.pipe.set_ip_adapter_scale(instantstyle_scale(self.pipe.unet.config, mode))
            self._mode_scales[mode] = {name: float(proc.scale[0])
                                       for name, proc in self.pipe.unet.attn_processors.items()
                                       if isinstance(getattr(proc, "scale", None), list)}
        return self._mode_scales[mode]

    def _set_reference_scales(self, ip_scale: float, steers: list[ReferenceSteer]) -> None:
        """Give every IP-Adapter attention processor one scale per reference: ``ip_scale x weight x`` the mode's
        factor for that processor (0 outside the blocks a style or content mode keeps)."""
        factors = [self.mode_scales(s.mode) for s in steers]
        for name, proc in self.pipe.unet.attn_processors.items():
            if name in factors[0]:
                proc.scale = [[ip_scale * s.weight * f[name]
                               for s, f in zip(steers, factors, strict=True)]]
        self.last_guidance["scales"] = [round(ip_scale * s.weight, 4) for s in steers]
        self.last_guidance["modes"] = [s.mode for s in steers]

    def _zero_image_embeds(self, guidance: float) -> Any:
        """All-zero image embeddings in the exact shape the pipeline expects for this adapter.

        The shape depends on the adapter type (a pooled vector for ``ip-adapter_sdxl``, hidden states
        for the "plus" ones) and on classifier-free guidance (negative and positive halves), so it is
        taken once from a real encoding of a blank image rather than written down here.
        """
        import torch

        cfg = self._cfg(guidance)
        if cfg not in self._zero_embeds:
            blank = Image.new("RGB", (224, 224))
            embeds = self.pipe.prepare_ip_adapter_image_embeds(
                ip_adapter_image=[[blank]], ip_adapter_image_embeds=None, device=self.pipe.device,
                num_images_per_prompt=1, do_classifier_free_guidance=cfg)
            self._zero_embeds[cfg] = torch.zeros_like(embeds[0])
        return self._zero_embeds[cfg].to(self.pipe.device)

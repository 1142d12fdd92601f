"""The engine's entry point: a model manager with every model of a profile registered.

``build_manager(settings)`` registers "generator", "judge", "llm" and "embedder" (and "omnigen" when
``generation.repair_with`` or ``draw_with`` is "omnigen"; "dino" and "siglip" are registered by
:class:`imgrag.scoring.scorers.Scorers` when an evaluation needs them, "omnigen" by an evaluation's OmniGen arms);
nothing is loaded until a ``manager.run(name, ...)`` or ``manager.use(name)`` asks for it. The wrappers are imported
inside the loaders so that a command needing one model never pays for importing the libraries of the others.

Each model is registered with a stated estimate of its working memory (:func:`working_memory_gb`),
which the manager counts beside its weights until it has measured the real peak on CUDA.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

from imgrag.errors import ModelLoadError, UserError
from imgrag.management.manager import ModelManager, measure_gb
from imgrag.models.chat_model import make_chat_model
from imgrag.models.dino import DinoScorer
from imgrag.models.embed_cache import EmbeddingCache, cache_folder
from imgrag.models.embedder import Embedder
from imgrag.models.generator import Generator
from imgrag.models.judge import Judge
from imgrag.models.omnigen import GUIDANCE_BRANCHES, TEXT_TOKENS, OmniGenDrawer
from imgrag.settings import Settings
from imgrag.text import describe_error

MODEL_NAMES = ("generator", "judge", "llm", "embedder")

_GIB = 2**30
# SDXL's working memory per megapixel drawn, GiB, in fp16: on an H100 a 1024x1024 generation peaked at 35.0 GiB
# with 30.0 GiB of weights resident (BENCHMARKS.md); the VAE decode at full size (in fp32) is most of it.
SDXL_WORKING_GIB_PER_MPX = 5.0


def build_manager(settings: Settings, *, device: str | None = None) -> ModelManager:
    """A manager for ``settings``' models; sizes are measured from the parameters after each first load.

    Loaders leave each model in CPU RAM, in the dtype for the manager's device: the manager moves it only after
    it has made room for it within the budget. A remote LLM (``llm_backend = "openai"``) is registered on the
    host: its calls take no GPU lock."""
    manager = ModelManager(settings, device=device)
    device = manager.device
    estimates = working_memory_gb(settings)
    manager.register("generator", lambda: _load_generator(settings, device, manager),
                     reserve_gb=estimates["generator"])
    manager.register("judge", lambda: _load_judge(settings, device), reserve_gb=estimates["judge"])
    manager.register("llm", lambda: load_llm(settings, device), reserve_gb=estimates["llm"],
                     on_host=settings.models.llm_backend == "openai")
    manager.register("embedder", lambda: load_embedder(settings, device), reserve_gb=estimates["embedder"])
    if uses_omnigen(settings):
        register_omnigen(manager, settings)
    # DINO and SigLIP score evaluations only: imgrag.scoring.scorers registers them when an evaluation asks, so a run's
    # model_loads names only the models a run can load.
    return manager


def uses_omnigen(settings: Settings) -> bool:
    """Whether OmniGen draws anything under these settings (``generation.repair_with`` or ``draw_with``)."""
    g = settings.generation
    return "omnigen" in (g.repair_with, g.draw_with)


def register_omnigen(manager: Any, settings: Settings) -> None:
    """Register OmniGen (``models.omnigen``) as "omnigen", with its working-memory estimate; a manager built for
    settings that never draw with it (an evaluation's OmniGen arms) gets it this way."""
    device = manager.device
    manager.register("omnigen", lambda: _load_omnigen(settings, device),
                     reserve_gb=working_memory_gb(settings)["omnigen"])


def register_siglip(manager: Any, settings: Settings) -> None:
    """Register the SigLIP of ``models.siglip`` as "siglip" (``imgrag eval``'s second text-image score): an open_clip
    model loaded by the embedder's own loader."""
    device = manager.device
    as_embedder = dataclasses.replace(settings, models=dataclasses.replace(
        settings.models, embedder=settings.models.siglip.strip(), embedder_pretrained=""))
    manager.register("siglip", lambda: load_embedder(as_embedder, device),
                     reserve_gb=working_memory_gb(settings)["embedder"])


def register_dino(manager: Any, settings: Settings) -> None:
    """Register the DINO scorer of ``models.dino`` as "dino" (``imgrag eval``'s image-image score)."""
    device = manager.device
    manager.register("dino", lambda: _load_dino(settings, device), reserve_gb=working_memory_gb(settings)["embedder"])


# ----- working memory: stated estimates, replaced by measured peaks once a model has run on CUDA -----

def working_memory_gb(settings: Settings) -> dict[str, Any]:
    """Per model, the estimate of its working memory in GiB: a function of the loaded model.

    - generator: ``SDXL_WORKING_GIB_PER_MPX`` per megapixel of the requested size (the VAE decode and the
      UNet's activations grow with the picture), scaled by the dtype's width; a batched round of several drawings
      asks for :func:`batch_extra_gb` more when it starts (the generator's ``before_batch``);
    - judge and LLM: the KV cache plus one layer's prefill activations for the longest prompt the call can
      have (the judge: its image tokens at ``judge.max_pixels`` + 512 text tokens + ``max_new_tokens``; the
      LLM: 4096 context tokens + ``max_new_tokens``), from the model's own config, plus a quarter;
    - embedder (and DINO): half its weights (a batch of 224x224 pictures through a ViT);
    - omnigen: per guidance branch (three when there are input images), one layer's keys, values and
      activations over its tokens (it keeps no KV cache across layers or steps): the drawing's ``(w/16)(h/16)``,
      ``omnigen.max_references`` input images of ``(max_input_image_size/16)²`` each, and the text; plus each
      branch's tokens² attention mask and the VAE (half SDXL's per-megapixel figure).
    """
    g, j = settings.generation, settings.judge
    width = _dtype_bytes(settings)

    def generator(model: Any) -> float:
        return generator_picture_gb(settings)

    def judge(model: Any) -> float:
        config = getattr(getattr(model, "model", None), "config", None)
        text = getattr(config, "text_config", None) or config
        image_tokens = j.max_pixels // (28 * 28)
        vision = getattr(config, "vision_config", None)
        # Qwen2.5-VL's ViT sees 14x14 patches (4 per image token) before merging them.
        vit = 4 * image_tokens * getattr(vision, "hidden_size", 0) * width * 12 / _GIB
        return transformer_working_gb(text, image_tokens + 512 + j.max_new_tokens, width) + vit

    def llm(model: Any) -> float:
        config = getattr(getattr(model, "model", None), "config", None)
        return transformer_working_gb(config, 4096 + settings.llm.max_new_tokens, width)

    def embedder(model: Any) -> float:
        return 0.5 * measure_gb(model)

    def omnigen(model: Any) -> float:
        config = getattr(getattr(getattr(model, "pipe", None), "transformer", None), "config", None)
        if config is None:
            return 0.0
        o = settings.omnigen
        tokens = (TEXT_TOKENS + (g.width // 16) * (g.height // 16)
                  + o.max_references * (o.max_input_image_size // 16) ** 2)
        # One layer at a time: OmniGen recomputes every layer at each step and keeps no KV cache across them.
        layers = SimpleNamespace(num_hidden_layers=1, hidden_size=config.hidden_size,
                                 num_attention_heads=config.num_attention_heads,
                                 num_key_value_heads=config.num_key_value_heads,
                                 intermediate_size=config.intermediate_size)
        masks = tokens * tokens * width / _GIB
        vae = 0.5 * SDXL_WORKING_GIB_PER_MPX * g.width * g.height / 2**20 * width / 2
        return GUIDANCE_BRANCHES * (transformer_working_gb(layers, tokens, width) + masks) + vae

    return {"generator": generator, "judge": judge, "llm": llm, "embedder": embedder, "omnigen": omnigen}


def generator_picture_gb(settings: Settings) -> float:
    """SDXL's stated working memory for one picture of ``settings.generation``'s size, GiB: the reserve of one
    drawing, and what each extra picture of a batched round asks for on top (:func:`batch_extra_gb`)."""
    g = settings.generation
    return SDXL_WORKING_GIB_PER_MPX * g.width * g.height / 2**20 * _dtype_bytes(settings) / 2


def batch_extra_gb(settings: Settings, pictures: int) -> float:
    """GiB a batched drawing of ``pictures`` needs beyond one picture's reserve: one picture's estimate per extra
    picture. An upper bound: the VAE decodes the batch one picture at a time (imgrag.models.generator), and the VAE
    decode is most of the per-picture figure; only the UNet's activations grow with the batch. Measured peaks on CUDA
    replace the one-picture reserve (imgrag.management.manager), not this extra."""
    return generator_picture_gb(settings) * max(0, int(pictures) - 1)


def transformer_working_gb(config: Any, tokens: int, dtype_bytes: int) -> float:
    """GiB a decoder needs beyond its weights for ``tokens`` positions: the KV cache (2 x layers x KV heads x
    head size per token) plus one layer's prefill activations (4 hidden-wide + 3 MLP-wide tensors per token),
    plus a quarter for the allocator's slack. 0 for a model without a config (a remote client)."""
    if config is None or not hasattr(config, "num_hidden_layers"):
        return 0.0
    hidden = int(config.hidden_size)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    inter = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    kv = 2 * int(config.num_hidden_layers) * kv_heads * head_dim * dtype_bytes * tokens
    activations = tokens * (4 * hidden + 3 * inter) * dtype_bytes
    return 1.25 * (kv + activations) / _GIB


def _dtype_bytes(settings: Settings) -> int:
    return 4 if settings.resolved_dtype() == "float32" else 2


# ----- loaders -----

def _load_generator(settings: Settings, device: str, manager: ModelManager | None = None) -> Any:
    generator = Generator.from_pretrained(settings, device, place=False)
    if settings.generation.embed_cache:
        generator.embed_cache = EmbeddingCache(cache_folder(settings))
    if manager is not None:
        # The IP-Adapter and its image encoder load straight onto the pipeline's device: make room for them first.
        generator.before_adapter_load = lambda gib: manager.make_room("generator", gib)
        # A round of several drawings in one call: the extra pictures' working memory, counted for this call only.
        generator.before_batch = lambda n: manager.make_room("generator", batch_extra_gb(settings, n), working=True)
    return generator


def _load_omnigen(settings: Settings, device: str) -> Any:
    return OmniGenDrawer.from_pretrained(settings, device, place=False)


def _load_judge(settings: Settings, device: str) -> Any:
    return Judge.from_pretrained(settings, device, place=False)


def load_llm(settings: Settings, device: str) -> Any:
    """The agent LLM of ``models.llm`` (local Qwen2.5 or an OpenAI-compatible server: :func:`make_chat_model`), not
    yet placed on ``device`` (the manager places it); tests swap this loader for a scripted one."""
    return make_chat_model(settings, device, place=False)


def _load_dino(settings: Settings, device: str) -> Any:
    return DinoScorer(settings.models.dino.strip(), "cpu", settings.torch_dtype() if device != "cpu" else None)


def load_embedder(settings: Settings, device: str) -> Any:
    """The CLIP embedder of ``models.embedder`` (open_clip), not yet placed on ``device``; any failure to load is one
    :class:`ModelLoadError` naming the checkpoint."""
    try:
        return Embedder.from_pretrained(settings, device, place=False)
    except UserError:
        raise
    except Exception as exc:  # the embedder wraps its own errors; this is the net for anything it missed
        raise ModelLoadError(f"cannot load the embedder from {settings.models.embedder} (expected an open_clip "
                             f"checkpoint): {describe_error(exc)}") from exc


class ManagedEmbedder:
    """The reference store's view of the manager's embedder: each embedding call runs on the model thread
    under the device lock, while the store's own work (walking folders, decoding files, Chroma queries and
    writes) runs in the caller and holds no lock. Has what the store needs: ``model_id``, ``dim``,
    ``embed_images``, ``embed_texts``."""

    def __init__(self, manager: Any, name: str = "embedder") -> None:
        self.manager = manager
        self.name = name
        self.model_id, self.dim = manager.run(name, lambda e: (e.model_id, e.dim))

    def embed_images(self, images: Any, **kwargs: Any) -> Any:
        """The embedder's ``embed_images`` (float32 [n, dim], unit rows), on the model thread."""
        return self.manager.run(self.name, lambda e: e.embed_images(images, **kwargs))

    def embed_texts(self, texts: Any) -> Any:
        """The embedder's ``embed_texts`` (float32 [n, dim], unit rows), on the model thread."""
        return self.manager.run(self.name, lambda e: e.embed_texts(texts))

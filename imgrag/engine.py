"""The engine's entry point: a model manager with every model of a profile registered.

``build_manager(settings)`` registers "generator", "judge", "llm" and "embedder"; nothing is loaded
until a ``manager.use(name)`` asks for it. The wrappers are imported inside the loaders so that a
command needing one model never pays for importing the libraries of the others.
"""

from __future__ import annotations

from typing import Any

from imgrag.errors import ModelLoadError, UserError
from imgrag.manager import ModelManager
from imgrag.settings import Settings

MODEL_NAMES = ("generator", "judge", "llm", "embedder")


def build_manager(settings: Settings, *, device: str | None = None) -> ModelManager:
    """A manager for ``settings``' models; sizes are measured from the parameters after each first load."""
    manager = ModelManager(settings, device=device)
    manager.register("generator", lambda: _load_generator(settings))
    manager.register("judge", lambda: _load_judge(settings))
    manager.register("llm", lambda: _load_llm(settings))
    manager.register("embedder", lambda: _load_embedder(settings))
    return manager


def _load_generator(settings: Settings) -> Any:
    from imgrag.generator import Generator

    return Generator.from_pretrained(settings)


def _load_judge(settings: Settings) -> Any:
    from imgrag.judge import Judge

    return Judge.from_pretrained(settings)


def _load_llm(settings: Settings) -> Any:
    from imgrag.chat_model import make_chat_model

    return make_chat_model(settings)


def _load_embedder(settings: Settings) -> Any:
    from imgrag.embedder import Embedder

    try:
        return Embedder.from_pretrained(settings)
    except UserError:
        raise
    except Exception as exc:  # the embedder wraps its own errors; this is the net for anything it missed
        raise ModelLoadError(f"cannot load the embedder from {settings.models.embedder} (expected an open_clip "
                             f"checkpoint): {type(exc).__name__}: {exc}") from exc

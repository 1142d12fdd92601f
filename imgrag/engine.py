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
    """A manager for ``settings``' models; sizes are measured from the parameters after each first load.

    Loaders leave each model in CPU RAM, in the dtype for the manager's device: the manager moves it only after
    it has made room for it within the budget."""
    manager = ModelManager(settings, device=device)
    device = manager.device
    manager.register("generator", lambda: _load_generator(settings, device))
    manager.register("judge", lambda: _load_judge(settings, device))
    manager.register("llm", lambda: _load_llm(settings, device))
    manager.register("embedder", lambda: _load_embedder(settings, device))
    return manager


def _load_generator(settings: Settings, device: str) -> Any:
    from imgrag.generator import Generator

    return Generator.from_pretrained(settings, device, place=False)


def _load_judge(settings: Settings, device: str) -> Any:
    from imgrag.judge import Judge

    return Judge.from_pretrained(settings, device, place=False)


def _load_llm(settings: Settings, device: str) -> Any:
    from imgrag.chat_model import make_chat_model

    return make_chat_model(settings, device, place=False)


def _load_embedder(settings: Settings, device: str) -> Any:
    from imgrag.embedder import Embedder

    try:
        return Embedder.from_pretrained(settings, device, place=False)
    except UserError:
        raise
    except Exception as exc:  # the embedder wraps its own errors; this is the net for anything it missed
        raise ModelLoadError(f"cannot load the embedder from {settings.models.embedder} (expected an open_clip "
                             f"checkpoint): {type(exc).__name__}: {exc}") from exc

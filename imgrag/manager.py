"""The model manager: one owner for every model, and the process-wide GPU lock.

``with manager.use("judge") as judge:`` takes the lock, makes the model resident on the device
(loading it on first use, evicting the least recently used others when the memory budget would be
exceeded), yields it, and releases the lock. Tools never load models themselves.

- The lock is ONE ``threading.RLock`` for the whole process, shared by every manager: parallel tool
  calls (LangGraph runs them in threads) are serialised, and a model used inside another's ``use()``
  by the same thread does not deadlock.
- The budget is ``settings.gpu_memory_gb`` (0 = no limit). Sizes come from ``register(size_gb=...)``
  or are measured from the parameters and buffers after the first load. The accounting applies on a
  CPU too, so eviction behaves (and is tested) the same everywhere.
- Eviction moves a model to CPU RAM (``offload="cpu"``) or drops it (``"drop"``; reloaded on next use).
- An out-of-memory error while making a model resident evicts every other model, empties the CUDA
  cache and retries once; a second one, or one inside the ``with`` body, becomes a ``UserError``
  that names the budget. Models need only a ``.to(device)`` method; one without it (a remote chat
  model) counts as size 0 and is never moved.

Modelled on ComfyUI's ``model_management.load_models_gpu`` / ``free_memory``.
"""

from __future__ import annotations

import gc
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from imgrag.errors import UserError
from imgrag.settings import Settings

log = logging.getLogger(__name__)

# One lock for the process: every manager (a runner's, a command's) guards the same device.
GPU_LOCK = threading.RLock()
_GIB = 2**30


@dataclass
class _Entry:
    name: str
    loader: Callable[[], Any]
    size_gb: float | None
    measured: bool = False  # size from the parameters (re-measured: a model may grow, e.g. an adapter)
    model: Any = None
    resident: bool = False  # on the device and counted against the budget
    in_use: int = 0  # nesting depth of use() on this model; an in-use model is never evicted
    last_used: int = 0
    loads: int = 0
    evictions: int = 0
    load_seconds: float = 0.0
    move_seconds: float = 0.0


class ModelManager:
    """A registry of named models kept resident on one device within a memory budget (see module doc)."""

    def __init__(self, settings: Settings, *, device: str | None = None, lock: threading.RLock | None = None) -> None:
        self.settings = settings
        self.device = device or settings.resolved_device()
        self.budget_gb = float(settings.gpu_memory_gb)
        self.offload = settings.offload
        self.lock = lock or GPU_LOCK
        self._entries: dict[str, _Entry] = {}
        self._clock = itertools.count(1)

    # ----- registry -----
    def register(self, name: str, loader: Callable[[], Any], size_gb: float | None = None) -> None:
        """Declare a model; ``loader()`` is called on first use. Without ``size_gb`` it is measured after load."""
        with self.lock:
            if name in self._entries:
                raise ValueError(f"model {name!r} is already registered")
            self._entries[name] = _Entry(name, loader, size_gb, measured=size_gb is None)

    def names(self) -> list[str]:
        return list(self._entries)

    def resident(self) -> list[str]:
        """The models on the device now, least recently used first."""
        return [e.name for e in sorted(self._entries.values(), key=lambda e: e.last_used) if e.resident]

    # ----- use -----
    @contextmanager
    def use(self, name: str) -> Iterator[Any]:
        """Hold the lock, make ``name`` resident, yield it; see the module docstring for OOM handling."""
        if name not in self._entries:
            raise KeyError(f"no model named {name!r} (registered: {', '.join(self._entries) or 'none'})")
        with self.lock:
            entry = self._entries[name]
            try:
                self._make_resident(entry)
            except Exception as exc:
                if not _is_oom(exc):
                    raise
                log.warning("out of memory making %s resident; evicting the others and retrying once", name)
                self._free_all_but(entry)
                try:
                    self._make_resident(entry)
                except Exception as exc2:
                    if _is_oom(exc2):
                        raise UserError(self._oom_message(name, "loading")) from None
                    raise
            entry.last_used = next(self._clock)
            entry.in_use += 1
            try:
                yield entry.model
            except Exception as exc:
                if not _is_oom(exc):
                    raise
                # A context manager cannot re-run its body; free what we can so the caller's retry fits.
                self._free_all_but(entry)
                raise UserError(self._oom_message(name, "running")) from None
            finally:
                entry.in_use -= 1
                if entry.measured and entry.model is not None:
                    entry.size_gb = measure_gb(entry.model)  # the generator grows when its adapter loads

    def evict(self, name: str) -> None:
        """Take one model off the device now (to CPU or dropped, per ``settings.offload``)."""
        with self.lock:
            self._evict(self._entries[name])
            _empty_cache()

    # ----- counters -----
    def stats(self) -> dict[str, dict]:
        """Per model: loads, evictions, load_seconds (in loaders), move_seconds, size_gb, resident."""
        return {e.name: {"loads": e.loads, "evictions": e.evictions, "load_seconds": round(e.load_seconds, 3),
                         "move_seconds": round(e.move_seconds, 3),
                         "size_gb": None if e.size_gb is None else round(e.size_gb, 4), "resident": e.resident}
                for e in self._entries.values()}

    def load_counts(self) -> dict[str, int]:
        """How many times each model was loaded (1 per process unless the budget forced drops)."""
        return {e.name: e.loads for e in self._entries.values()}

    # ----- internals (called with the lock held) -----
    def _make_resident(self, entry: _Entry) -> None:
        if entry.resident:
            return
        if entry.model is None:
            # Size known in advance: make room before loading too, for a loader that places its model on the
            # device itself (the engine's loaders leave theirs in CPU RAM for _move).
            if entry.size_gb is not None:
                self._fit(entry)
            start = time.perf_counter()
            model = entry.loader()
            entry.load_seconds += time.perf_counter() - start
            entry.loads += 1
            entry.model = model
        if entry.measured:
            entry.size_gb = measure_gb(entry.model)
        self._fit(entry)
        self._move(entry, self.device)
        entry.resident = True

    def _move(self, entry: _Entry, device: str) -> None:
        if not hasattr(entry.model, "to"):
            return  # e.g. a remote LLM: nothing on the device
        start = time.perf_counter()
        moved = entry.model.to(device)
        # nn.Module.to returns self; a wrapper might return a new object: keep whatever it returns.
        entry.model = moved if moved is not None else entry.model
        entry.move_seconds += time.perf_counter() - start

    def _fit(self, entry: _Entry) -> None:
        """Evict least recently used models until ``entry`` fits in the budget (0 = no limit)."""
        if not self.budget_gb:
            return
        need = entry.size_gb or 0.0
        if need > self.budget_gb:
            raise UserError(f"model {entry.name!r} needs {need:.2f} GiB, more than the whole GPU budget "
                            f"(gpu_memory_gb = {self.budget_gb:g}); raise gpu_memory_gb or use a smaller checkpoint")
        evicted = False
        for other in sorted(self._entries.values(), key=lambda e: e.last_used):
            if self._used_gb() + need <= self.budget_gb:
                break
            if other is not entry and other.resident and other.in_use == 0:
                self._evict(other)
                evicted = True
        if evicted:
            _empty_cache()  # once per pass: it runs gc.collect()
        if self._used_gb() + need > self.budget_gb:
            # Only models in use by an outer use() remain: go ahead, the device may still have room.
            log.warning("%s does not fit the %.2f GiB budget beside models in use; loading anyway",
                        entry.name, self.budget_gb)

    def _used_gb(self) -> float:
        return sum(e.size_gb or 0.0 for e in self._entries.values() if e.resident)

    def _evict(self, entry: _Entry) -> None:
        if not entry.resident:
            return
        if self.offload == "drop":
            entry.model = None
        else:
            self._move(entry, "cpu")
        entry.resident = False
        entry.evictions += 1
        log.info("evicted %s (%s)", entry.name, self.offload)  # the caller empties the cache once per pass

    def _free_all_but(self, keep: _Entry) -> None:
        for other in self._entries.values():
            if other is not keep and other.in_use == 0:
                self._evict(other)
        _empty_cache()

    def _oom_message(self, name: str, doing: str) -> str:
        budget = f"gpu_memory_gb = {self.budget_gb:g} GiB" if self.budget_gb else "gpu_memory_gb = 0 (no limit)"
        return (f"out of GPU memory {doing} {name!r} on {self.device} even after evicting every other model "
                f"({budget}); lower gpu_memory_gb to what the card really has free, set offload = \"drop\", "
                "or use smaller checkpoints or image sizes")


def measure_gb(model: Any) -> float:
    """GiB of parameters and buffers in ``model``: an nn.Module, a diffusers pipeline, or a wrapper of those.

    A wrapper that knows better may say so with a ``memory_bytes`` attribute (an int, or a method).
    """
    declared = getattr(model, "memory_bytes", None)
    if declared is not None:
        return float(declared() if callable(declared) else declared) / _GIB
    seen: set[int] = set()
    total = 0
    for module in _modules(model, depth=2):
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            if id(tensor) not in seen:  # tied weights count once
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total / _GIB


def _modules(obj: Any, depth: int) -> Iterator[Any]:
    import torch

    if isinstance(obj, torch.nn.Module):
        yield obj
        return
    if depth == 0 or obj is None or isinstance(obj, (str, bytes, int, float)):
        return
    components = getattr(obj, "components", None)  # a diffusers pipeline
    children = components.values() if isinstance(components, dict) else getattr(obj, "__dict__", {}).values()
    for child in children:
        yield from _modules(child, depth - 1)


def _is_oom(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def _empty_cache() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

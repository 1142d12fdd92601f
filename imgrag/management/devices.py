"""What the model manager builds on, per device: one model thread and one lock per device, the peak working
memory of a call on CUDA, pinned host swaps, and model sizes. Used by :mod:`imgrag.management.manager`; see its
docstring for why each exists."""

from __future__ import annotations

import contextvars
import gc
import itertools
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, TypeVar

_GIB = 2**30
T = TypeVar("T")

# ----------------------------------------------------------------------------------------------
# One lock and one model thread per device, shared by every manager in the process
# ----------------------------------------------------------------------------------------------

_DEVICES_LOCK = threading.Lock()
_LOCKS: dict[str, threading.RLock] = {}
_THREADS: dict[str, ModelThread] = {}
_HELD = threading.local()  # per thread: id(lock) -> how many use() calls of this thread hold it


def device_key(device: str) -> str:
    """One name per card: ``"cuda"`` is the current CUDA device, so it shares ``"cuda:0"``'s lock and thread."""
    device = str(device)
    if device == "cuda":
        import torch

        return f"cuda:{torch.cuda.current_device() if torch.cuda.is_available() else 0}"
    return device


def device_lock(device: str) -> threading.RLock:
    """The process-wide re-entrant lock of ``device``: whoever holds it owns that device's models."""
    key = device_key(device)
    with _DEVICES_LOCK:
        return _LOCKS.setdefault(key, threading.RLock())


def model_thread(device: str) -> ModelThread:
    """The process-wide model thread of ``device`` (started on first use)."""
    key = device_key(device)
    with _DEVICES_LOCK:
        if key not in _THREADS:
            _THREADS[key] = ModelThread(key)
        return _THREADS[key]


class ModelThread:
    """One long-lived daemon thread that runs the calls handed to it, one at a time, in order.

    :meth:`call` runs ``fn`` there and returns its result (or raises its exception) in the caller; a
    call made from the model thread itself runs at once (nested calls do not deadlock). Daemon: a
    process that ends (Ctrl-C) does not wait for a model call in flight.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: queue.SimpleQueue[tuple[Future, Callable[[], Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=f"imgrag-model-{name}", daemon=True)
        self._thread.start()

    @property
    def ident(self) -> int | None:
        """The thread id every model call of this device runs on."""
        return self._thread.ident

    def on_thread(self) -> bool:
        return threading.get_ident() == self._thread.ident

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on the model thread with the caller's context variables; wait for it."""
        if self.on_thread():
            return fn(*args, **kwargs)
        context = contextvars.copy_context()  # LangChain callbacks and configs live in context variables
        future: Future = Future()
        self._queue.put((future, lambda: context.run(fn, *args, **kwargs)))
        return future.result()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, job = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(job())
                except BaseException as exc:  # handed to the caller, who re-raises it
                    future.set_exception(exc)
            # The finished call is forgotten before waiting for the next: its closure holds the caller's context
            # variables (a run's LangGraph config and context, with everything the run built), which would otherwise
            # stay alive as long as this thread waits.
            del item, future, job


def held_depth(lock: Any) -> int:
    """How many times the calling thread holds ``lock`` through :func:`holding` (0: not at all); a re-entrant
    lock's own count is not public, and the manager must know whether a model call is already inside it."""
    return getattr(_HELD, "depth", {}).get(id(lock), 0)


@contextmanager
def holding(lock: Any) -> Iterator[None]:
    """``with lock``, counted for :func:`held_depth`."""
    depth = _HELD.__dict__.setdefault("depth", {})
    with lock:
        depth[id(lock)] = depth.get(id(lock), 0) + 1
        try:
            yield
        finally:
            depth[id(lock)] -= 1


# ----------------------------------------------------------------------------------------------
# Working memory: the measured peak of a call
# ----------------------------------------------------------------------------------------------

class CudaPeak:
    """Measures a call's working memory on one CUDA device: the peak allocated during it, above what was
    allocated before and after it (so weights that joined during the call, an adapter, do not count)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._before = 0

    @classmethod
    def for_device(cls, device: str) -> CudaPeak | None:
        """A probe for a CUDA device, None for any other (nothing to measure there)."""
        import torch

        return cls(device) if str(device).startswith("cuda") and torch.cuda.is_available() else None

    def start(self) -> None:
        import torch

        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._before = torch.cuda.memory_allocated(self.device)

    def working_gb(self) -> float | None:
        import torch

        torch.cuda.synchronize(self.device)
        after = torch.cuda.memory_allocated(self.device)
        return max(0, torch.cuda.max_memory_allocated(self.device) - max(self._before, after)) / _GIB


# ----------------------------------------------------------------------------------------------
# Pinned swaps
# ----------------------------------------------------------------------------------------------

def pinning_available(device: str) -> bool:
    """Page-locked host memory needs a CUDA device (CPU-only torch, or a CUDA build without a driver,
    raises on ``pin_memory=True``)."""
    import torch

    return str(device).startswith("cuda") and torch.cuda.is_available()


def tensor_slots(model: Any) -> Iterator[tuple[tuple[int, str, str], Any, Any]]:
    """Every parameter and buffer of the model's modules, once each (tied weights once): (key, module, name)."""
    seen: set[int] = set()
    for root in _modules(model, depth=2):
        for module in root.modules():
            for kind, slots in (("p", module._parameters), ("b", module._buffers)):
                for name, tensor in slots.items():
                    if tensor is None or id(tensor) in seen:
                        continue
                    seen.add(id(tensor))
                    yield (id(module), kind, name), module, tensor


def _assign(module: Any, key: tuple[int, str, str], tensor: Any, value: Any) -> None:
    if key[1] == "p":
        tensor.data = value  # the Parameter object stays (optimisers, tied modules and hooks keep it)
    else:
        module._buffers[key[2]] = value


def swap_out(model: Any, host: dict, *, pin: bool = True) -> int:
    """Copy every device tensor of ``model`` into its host copy and point the model at it; returns bytes moved.

    Host copies are allocated once per tensor (page-locked when ``pin``) and kept in ``host`` across swaps,
    so later evictions only copy. Copies are non-blocking; one synchronisation waits for all of them."""
    import torch

    moves = []
    for key, module, tensor in tensor_slots(model):
        if tensor.device.type == "cpu":
            continue
        copy = host.get(key)
        if copy is None or copy.shape != tensor.shape or copy.dtype != tensor.dtype:
            copy = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
            host[key] = copy
        copy.copy_(tensor.detach(), non_blocking=pin)
        moves.append((module, key, tensor, copy))
    if pin and moves:
        torch.cuda.synchronize()
    for module, key, tensor, copy in moves:
        _assign(module, key, tensor, copy)
    return sum(c.numel() * c.element_size() for *_, c in moves)


def swap_in(model: Any, device: str) -> int:
    """Copy every host tensor of ``model`` to ``device`` (non-blocking from pinned memory); returns bytes moved.

    The host copies stay where they are for the next :func:`swap_out`."""
    import torch

    moves = []
    for key, module, tensor in tensor_slots(model):
        if tensor.device.type != "cpu":
            continue
        moves.append((module, key, tensor, tensor.detach().to(device, non_blocking=tensor.is_pinned())))
    if moves and str(device).startswith("cuda"):
        torch.cuda.synchronize()
    for module, key, tensor, moved in moves:
        _assign(module, key, tensor, moved)
    return sum(m.numel() * m.element_size() for *_, m in moves)


# ----------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------

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


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is a device out-of-memory error (torch's own type, or a RuntimeError saying so, as older
    torch and some kernels raise)."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def empty_cache() -> None:
    """Collect garbage and give the CUDA allocator's cached blocks back, after an eviction or an OOM."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

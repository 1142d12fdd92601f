"""The model manager: one owner for every model, one model thread and one lock per device.

``manager.run("judge", lambda judge: judge.judge(image, prompt))`` hands the call to the device's
model thread, which takes the device's lock, makes the model resident (loading it on first use,
evicting the least recently used others when the memory budget would be exceeded), runs the call
and gives the answer back to the calling thread. ``with manager.use("judge") as judge:`` does the
same in the calling thread (the model thread uses it; so may scripts that own the process). Tools
never load models themselves.

- **One model thread per device.** Every ``run()`` for a device executes on one long-lived thread.
  LangGraph runs each tool call in a fresh worker thread, and PyTorch keeps cuBLAS handles and
  workspaces per thread and device (pytorch/pytorch#6962): on an H100 the first model call in a new
  thread was 2.5-3.5x slower (BENCHMARKS.md). The caller's ``contextvars`` travel with the call.
- **One lock per device** (:func:`device_lock`), shared by every manager of that device, re-entrant
  so that a model used inside another's ``use()`` by the same thread does not deadlock. A model
  registered ``on_host=True`` (a remote LLM: an HTTP client) takes no device lock and runs in the
  caller's thread, so a remote call never holds the GPU.
- **The budget counts what the card holds** (``settings.gpu_memory_gb``; 0 = no limit): each
  resident model's weights (``register(size_gb=...)``, or measured from parameters and buffers after
  loading, again after each use: the generator grows when its adapter loads), plus the *working
  memory* (activations, KV cache, VAE decode) of every model in use. Working memory starts as a
  stated estimate (``register(reserve_gb=...)``, a number or a function of the loaded model) and is
  replaced by the measured peak once the model has run on CUDA (peak allocated during the call,
  above what was allocated before and after it). A model that grows while in use asks for room
  first with :meth:`ModelManager.make_room`. The accounting applies on a CPU too, so eviction
  behaves (and is tested) the same everywhere.
- **Loading past the budget is an error**, not a warning: when evicting every model not in use still
  leaves too little room, ``use()`` raises a ``UserError`` naming the budget and the models in use.
- Eviction moves a model to CPU RAM (``offload="cpu"``) or drops it (``"drop"``; reloaded on next
  use). On CUDA the evicted weights go to **page-locked host memory** allocated once per tensor and
  kept for the process, with non-blocking copies (:func:`swap_out`, :func:`swap_in`): pageable copies
  ran at 2-4 GB/s, pinned ones run near the bus's speed. Host RAM then holds a copy of every model
  that has been evicted once (README, "GPU memory per profile").
- An out-of-memory error while making a model resident evicts every other model, empties the CUDA
  cache and retries once; a second one, or one inside the call, becomes a ``UserError`` that names
  the budget. Models need only a ``.to(device)`` method; one without it counts as size 0, never moves.

Modelled on ComfyUI's ``model_management.load_models_gpu`` / ``free_memory`` (its
``minimum_inference_memory`` is the same idea as the working-memory reserve).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from imgrag.errors import UserError
from imgrag.management.devices import (
    CudaPeak,
    ModelThread,
    device_lock,
    empty_cache,
    held_depth,
    holding,
    is_oom,
    measure_gb,
    model_thread,
    pinning_available,
    swap_in,
    swap_out,
)
from imgrag.settings import Settings


def add_loads(*counts: Mapping[str, int] | None) -> dict[str, int]:
    """Per-model load counts (:meth:`ModelManager.load_counts`) added up: a run's earlier processes plus this one,
    a batch's workers, an evaluation arm's prompts. Every model any count names is kept, with 0 when it never loaded
    (``Counter.update`` keeps zeros, where ``+`` would drop them); None counts are skipped.
    E.g. ``add_loads({"judge": 1}, None, {"judge": 2, "llm": 0}) == {"judge": 3, "llm": 0}``."""
    total: Counter[str] = Counter()
    for count in counts:
        total.update({name: int(n) for name, n in (count or {}).items()})
    return dict(total)

log = logging.getLogger(__name__)

T = TypeVar("T")

# ----------------------------------------------------------------------------------------------
# The manager
# ----------------------------------------------------------------------------------------------

Reserve = float | Callable[[Any], float]


@dataclass
class _Entry:
    name: str
    loader: Callable[[], Any]
    size_gb: float | None
    measured: bool = False  # size from the parameters (re-measured: a model may grow, e.g. an adapter)
    reserve: Reserve = 0.0  # the stated working-memory estimate, GiB (or a function of the loaded model)
    reserve_gb: float = 0.0  # the estimate, then the measured peak once the model has run on CUDA
    reserve_measured: bool = False
    on_host: bool = False  # never on the device (a remote model): no device lock, no model thread
    model: Any = None
    resident: bool = False  # on the device and counted against the budget
    in_use: int = 0  # nesting depth of use() on this model; an in-use model is never evicted
    growth_gb: float = 0.0  # room asked for with make_room() during the current use
    call_working_gb: float = 0.0  # of growth_gb, the working memory of this call alone (a batch's extra pictures)
    last_used: int = 0
    loads: int = 0
    evictions: int = 0
    load_seconds: float = 0.0
    move_seconds: float = 0.0
    host_copies: dict = field(default_factory=dict)  # pinned host tensors kept between swaps (see swap_out)


class ModelManager:
    """A registry of named models kept resident on one device within a memory budget (see module doc)."""

    def __init__(self, settings: Settings, *, device: str | None = None, lock: Any = None,
                 thread: ModelThread | None = None, memory_probe: Any = None) -> None:
        self.settings = settings
        self.device = device or settings.resolved_device()
        self.budget_gb = float(settings.gpu_memory_gb)
        self.offload = settings.offload
        self.lock = lock or device_lock(self.device)
        self.thread = thread or model_thread(self.device)
        self.probe = memory_probe if memory_probe is not None else CudaPeak.for_device(self.device)
        self.pinned = pinning_available(self.device)
        self._entries: dict[str, _Entry] = {}
        self._clock = itertools.count(1)
        self._host_lock = threading.Lock()  # loads on_host models once; never the device lock

    # ----- registry -----
    def register(self, name: str, loader: Callable[[], Any], size_gb: float | None = None, *,
                 reserve_gb: Reserve = 0.0, on_host: bool = False) -> None:
        """Declare a model; ``loader()`` is called on first use (and should leave the model in CPU RAM).

        ``size_gb``: its weights, GiB (default: measured after loading). ``reserve_gb``: the stated estimate
        of its working memory in GiB, or a function of the loaded model giving it; replaced by the measured
        peak once the model has run on CUDA. ``on_host``: it never touches the device (a remote LLM client):
        no lock, no model thread, size 0."""
        with self.lock:
            if name in self._entries:
                raise ValueError(f"model {name!r} is already registered")
            self._entries[name] = _Entry(name, loader, size_gb, measured=size_gb is None, reserve=reserve_gb,
                                         reserve_gb=reserve_gb if isinstance(reserve_gb, (int, float)) else 0.0,
                                         on_host=on_host)

    def names(self) -> list[str]:
        return list(self._entries)

    def resident(self) -> list[str]:
        """The models on the device now, least recently used first."""
        return [e.name for e in sorted(self._entries.values(), key=lambda e: e.last_used) if e.resident]

    # ----- use -----
    def run(self, name: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``fn(model, *args, **kwargs)`` with ``name`` resident, on the device's model thread; its result.

        Exceptions (``UserError`` for out-of-memory, see the module doc) reach the caller. A model
        registered ``on_host`` runs in the calling thread without the device lock; so does a call from a
        thread already inside ``use()`` of this device (it holds the lock: handing over would deadlock)."""
        entry = self._entry(name)
        if entry.on_host or held_depth(self.lock):
            return self._run_here(name, fn, args, kwargs)
        return self.thread.call(self._run_here, name, fn, args, kwargs)

    def _run_here(self, name: str, fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
        with self.use(name) as model:
            return fn(model, *args, **kwargs)

    @contextmanager
    def use(self, name: str) -> Iterator[Any]:
        """Hold the device lock, make ``name`` resident, yield it; see the module docstring for OOM handling."""
        entry = self._entry(name)
        if entry.on_host:
            with self._host_lock:
                self._load(entry)
            yield entry.model
            return
        with holding(self.lock):
            try:
                self._make_resident(entry)
            except Exception as exc:
                if not is_oom(exc):
                    raise
                log.warning("out of memory making %s resident; evicting the others and retrying once", name)
                self._free_all_but(entry)
                try:
                    self._make_resident(entry)
                except Exception as exc2:
                    if is_oom(exc2):
                        raise UserError(self._oom_message(name, "loading")) from None
                    raise
            entry.last_used = next(self._clock)
            entry.in_use += 1
            # The peak is measured for the outermost model in use only: a nested call would reset it.
            measuring = (self.probe is not None and entry.in_use == 1
                         and not any(e.in_use for e in self._entries.values() if e is not entry))
            if measuring:
                self.probe.start()
            try:
                yield entry.model
            except Exception as exc:
                if not is_oom(exc):
                    raise
                # A context manager cannot re-run its body; free what we can so the caller's retry fits.
                self._free_all_but(entry)
                raise UserError(self._oom_message(name, "running")) from None
            finally:
                entry.in_use -= 1
                call_working, entry.growth_gb, entry.call_working_gb = entry.call_working_gb, 0.0, 0.0
                if entry.measured and entry.model is not None:
                    entry.size_gb = measure_gb(entry.model)  # the generator grows when its adapter loads
                if measuring:
                    peak = self.probe.working_gb()
                    if peak is not None:
                        # A batch's extra pictures were asked for on top of the reserve: the reserve stays the
                        # working memory of one call of the usual size, so the next batch does not count them twice.
                        peak = max(0.0, peak - call_working)
                        entry.reserve_gb = peak if not entry.reserve_measured else max(entry.reserve_gb, peak)
                        entry.reserve_measured = True

    def make_room(self, name: str, extra_gb: float, *, working: bool = False) -> None:
        """Before ``name`` (in use by this thread) grows by ``extra_gb`` GiB on the device (the generator's
        IP-Adapter and image encoder): evict others until it fits, or raise a ``UserError`` as ``use()`` does.

        ``working``: the room is working memory of this call alone (the extra pictures of a batched drawing), not
        weights; it is left out of the peak measured for the model's reserve (see :meth:`use`)."""
        entry = self._entry(name)
        with holding(self.lock):
            if entry.resident:
                extra = max(0.0, float(extra_gb))
                entry.growth_gb += extra
                if working:
                    entry.call_working_gb += extra
                self._fit(entry)

    def evict(self, name: str) -> None:
        """Take one model off the device now (to CPU or dropped, per ``settings.offload``)."""
        with holding(self.lock):
            self._evict(self._entry(name))
            empty_cache()

    # ----- counters -----
    def stats(self) -> dict[str, dict]:
        """Per model: loads, evictions, load_seconds (in loaders), move_seconds, size_gb (weights), reserve_gb
        (working memory) and whether that was measured, resident."""
        return {e.name: {"loads": e.loads, "evictions": e.evictions, "load_seconds": round(e.load_seconds, 3),
                         "move_seconds": round(e.move_seconds, 3),
                         "size_gb": None if e.size_gb is None else round(e.size_gb, 4),
                         "reserve_gb": round(e.reserve_gb, 4), "reserve_measured": e.reserve_measured,
                         "resident": e.resident}
                for e in self._entries.values()}

    def load_counts(self) -> dict[str, int]:
        """How many times each model was loaded (1 per process unless the budget forced drops)."""
        return {e.name: e.loads for e in self._entries.values()}

    # ----- internals (called with the lock held) -----
    def _entry(self, name: str) -> _Entry:
        if name not in self._entries:
            raise KeyError(f"no model named {name!r} (registered: {', '.join(self._entries) or 'none'})")
        return self._entries[name]

    def _load(self, entry: _Entry) -> None:
        if entry.model is not None:
            return
        start = time.perf_counter()
        model = entry.loader()
        entry.load_seconds += time.perf_counter() - start
        entry.loads += 1
        entry.model = model
        entry.host_copies = {}
        if not entry.reserve_measured and callable(entry.reserve):
            entry.reserve_gb = float(entry.reserve(model))

    def _make_resident(self, entry: _Entry) -> None:
        if entry.model is None:
            # Size known in advance: make room before loading too, for a loader that places its model on the
            # device itself (the engine's loaders leave theirs in CPU RAM for _move).
            if entry.size_gb is not None:
                self._fit(entry)
            self._load(entry)
        if not hasattr(entry.model, "to"):
            entry.size_gb, entry.reserve_gb, entry.resident = 0.0, 0.0, True  # e.g. a remote LLM: nothing here
            return
        if entry.measured and not entry.resident:
            entry.size_gb = measure_gb(entry.model)
        self._fit(entry)  # also when resident: its working memory must fit beside the others' weights
        if not entry.resident:
            self._move(entry, self.device)
            entry.resident = True

    def _move(self, entry: _Entry, device: str) -> None:
        if not hasattr(entry.model, "to"):
            return  # e.g. a remote LLM: nothing on the device
        start = time.perf_counter()
        if self.pinned:
            if device == "cpu":
                swap_out(entry.model, entry.host_copies)
            else:
                swap_in(entry.model, device)
        # With pinned swaps the tensors have moved already and this only lets a wrapper update its own state.
        moved = entry.model.to(device)
        # nn.Module.to returns self; a wrapper might return a new object: keep whatever it returns.
        entry.model = moved if moved is not None else entry.model
        entry.move_seconds += time.perf_counter() - start

    def _need_gb(self, entry: _Entry) -> float:
        """GiB the device must hold with ``entry`` in use: resident weights, plus the working memory of
        every model in use (nested uses run inside one another) and ``entry``'s."""
        weights = sum(e.size_gb or 0.0 for e in self._entries.values() if e.resident and e is not entry)
        working = sum(e.reserve_gb + e.growth_gb for e in self._entries.values() if e.in_use and e is not entry)
        return weights + working + self._own_gb(entry)

    @staticmethod
    def _own_gb(entry: _Entry) -> float:
        return (entry.size_gb or 0.0) + entry.reserve_gb + entry.growth_gb

    def _fit(self, entry: _Entry) -> None:
        """Evict least recently used models until ``entry`` fits in the budget (0 = no limit); a
        ``UserError`` when it cannot (see the module docstring)."""
        if not self.budget_gb:
            return
        own = self._own_gb(entry)
        if own > self.budget_gb:
            raise UserError(f"model {entry.name!r} needs {own:.3g} GiB ({entry.size_gb or 0:.3g} weights + "
                            f"{entry.reserve_gb + entry.growth_gb:.3g} working memory), more than the whole GPU "
                            f"budget (gpu_memory_gb = {self.budget_gb:g}); raise gpu_memory_gb, use a smaller "
                            "checkpoint or smaller images")
        evicted = False
        for other in sorted(self._entries.values(), key=lambda e: e.last_used):
            if self._need_gb(entry) <= self.budget_gb:
                break
            if other is not entry and other.resident and other.in_use == 0:
                self._evict(other)
                evicted = True
        if evicted:
            empty_cache()  # once per pass: it runs gc.collect()
        if self._need_gb(entry) > self.budget_gb:
            busy = [e for e in self._entries.values() if e.in_use and e is not entry]
            listing = ", ".join(f"{e.name} {self._own_gb(e):.3g} GiB" for e in busy) or "none"
            raise UserError(f"model {entry.name!r} needs {own:.3g} GiB beside the models in use ({listing}), "
                            f"more than gpu_memory_gb = {self.budget_gb:g} allows; raise gpu_memory_gb, use smaller "
                            "checkpoints, or do not nest these models' calls")

    def _used_gb(self) -> float:
        return sum(e.size_gb or 0.0 for e in self._entries.values() if e.resident)

    def _evict(self, entry: _Entry) -> None:
        if not entry.resident:
            return
        if self.offload == "drop":
            entry.model = None
            entry.host_copies = {}
        else:
            self._move(entry, "cpu")
        entry.resident = False
        entry.evictions += 1
        log.info("evicted %s (%s)", entry.name, self.offload)  # the caller empties the cache once per pass

    def _free_all_but(self, keep: _Entry) -> None:
        for other in self._entries.values():
            if other is not keep and other.in_use == 0:
                self._evict(other)
        empty_cache()

    def _oom_message(self, name: str, doing: str) -> str:
        budget = f"gpu_memory_gb = {self.budget_gb:g} GiB" if self.budget_gb else "gpu_memory_gb = 0 (no limit)"
        return (f"out of GPU memory {doing} {name!r} on {self.device} even after evicting every other model "
                f"({budget}); lower gpu_memory_gb to what the card really has free, set offload = \"drop\", "
                "or use smaller checkpoints or image sizes")

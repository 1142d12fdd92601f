"""The model manager: one load per model, LRU eviction within the budget, the lock, the OOM path."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

from imgrag.errors import UserError
from imgrag.management.manager import ModelManager, measure_gb
from imgrag.settings import Settings, load_settings

GIB = 2**30


class FakeModel(torch.nn.Module):
    """A real module of a known size that records where it was moved."""

    def __init__(self, n: int = 256) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(n, n))
        self.moves: list[str] = []

    def to(self, device: Any, *args: Any, **kwargs: Any) -> FakeModel:  # no real device here: just record it
        self.moves.append(str(device))
        return self


ONE_MODEL_GB = 256 * 256 * 4 / GIB


def _settings(budget_gb: float = 0.0, offload: str = "cpu") -> Settings:
    return load_settings("default", overrides={"gpu_memory_gb": budget_gb, "offload": offload, "device": "cpu"},
                         environ={})


def _manager(budget_gb: float = 0.0, offload: str = "cpu", names: tuple[str, ...] = ("a", "b", "c"),
             device: str = "gpu-fake") -> tuple[ModelManager, dict[str, list[FakeModel]]]:
    # Its own lock: the process-wide one would serialise these tests with anything else running.
    manager = ModelManager(_settings(budget_gb, offload), device=device, lock=threading.RLock())
    built: dict[str, list[FakeModel]] = {name: [] for name in names}

    def loader(name: str) -> FakeModel:
        model = FakeModel()
        built[name].append(model)
        return model

    for name in names:
        manager.register(name, lambda name=name: loader(name))
    return manager, built


def test_measure_gb_counts_parameters_of_modules_and_wrappers() -> None:
    class Wrapper:
        def __init__(self) -> None:
            self.model = FakeModel()
            self.tied = self.model  # the same tensors reached twice count once

    assert measure_gb(FakeModel()) == pytest.approx(ONE_MODEL_GB)
    assert measure_gb(Wrapper()) == pytest.approx(ONE_MODEL_GB)
    assert measure_gb(object()) == 0.0


def test_each_model_loads_once_across_three_uses() -> None:
    manager, built = _manager()
    for _ in range(3):
        for name in ("a", "b"):
            with manager.use(name) as model:
                assert model is built[name][0]
    assert manager.load_counts() == {"a": 1, "b": 1, "c": 0}
    assert manager.stats()["a"]["evictions"] == 0
    assert manager.stats()["a"]["size_gb"] == pytest.approx(ONE_MODEL_GB, abs=1e-3)
    assert set(manager.resident()) == {"a", "b"}
    assert built["a"][0].moves == ["gpu-fake"]  # moved to the device once, never off it


def test_budget_that_fits_one_model_evicts_to_cpu() -> None:
    manager, built = _manager(budget_gb=ONE_MODEL_GB * 1.5)
    for name in ("a", "b", "a", "b"):
        with manager.use(name):
            assert manager.resident() == [name]
    stats = manager.stats()
    assert manager.load_counts() == {"a": 1, "b": 1, "c": 0}  # offload="cpu": evicted models are kept
    assert (stats["a"]["evictions"], stats["b"]["evictions"]) == (2, 1)
    assert built["a"][0].moves == ["gpu-fake", "cpu", "gpu-fake", "cpu"]


def test_budget_evicts_least_recently_used_first() -> None:
    manager, _ = _manager(budget_gb=ONE_MODEL_GB * 2.5)
    for name in ("a", "b", "a", "c"):  # b is the least recently used when c arrives
        with manager.use(name):
            pass
    assert set(manager.resident()) == {"a", "c"}
    assert manager.stats()["b"]["evictions"] == 1


def test_drop_offload_reloads_and_counts() -> None:
    manager, built = _manager(budget_gb=ONE_MODEL_GB * 1.5, offload="drop")
    for name in ("a", "b", "a"):
        with manager.use(name):
            pass
    assert manager.load_counts()["a"] == 2
    assert len(built["a"]) == 2 and manager.stats()["a"]["evictions"] == 1


def test_model_larger_than_the_budget_is_a_clear_error() -> None:
    manager, _ = _manager(budget_gb=ONE_MODEL_GB / 2)
    with pytest.raises(UserError, match="gpu_memory_gb"):
        with manager.use("a"):
            pass


def test_nested_use_by_one_thread_neither_deadlocks_nor_evicts_the_outer_model() -> None:
    manager, built = _manager(budget_gb=ONE_MODEL_GB * 2.5)
    with manager.use("a") as a:
        with manager.use("b") as b:
            assert a is built["a"][0] and b is built["b"][0]
            assert set(manager.resident()) == {"a", "b"}
    with manager.use("c"):
        pass
    assert manager.stats()["a"]["evictions"] == 1 and manager.stats()["b"]["evictions"] == 0


def test_loading_past_the_budget_beside_a_model_in_use_is_an_error() -> None:
    """The budget is a promise about the card: a model that cannot fit beside the one in use is not loaded
    anyway (it used to be, with a warning), and the message names the model in the way."""
    manager, built = _manager(budget_gb=ONE_MODEL_GB * 1.5)
    with manager.use("a"):
        with pytest.raises(UserError, match=r"'b' needs .* beside the models in use \(a .*gpu_memory_gb"):
            with manager.use("b"):
                pass
        assert manager.resident() == ["a"] and built["b"][0].moves == []  # b never went to the device
    with manager.use("b"):  # a is no longer in use: it is evicted instead
        pass
    assert manager.resident() == ["b"]

def test_two_threads_never_overlap_inside_use() -> None:
    manager, _ = _manager()
    inside = 0
    peak = 0
    entered: list[str] = []
    guard = threading.Lock()

    def worker(name: str) -> None:
        nonlocal inside, peak
        for _ in range(5):
            with manager.use(name):
                with guard:
                    inside += 1
                    peak = max(peak, inside)
                    entered.append(name)
                time.sleep(0.005)  # long enough for the other thread to try to enter
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=worker, args=(name,)) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert peak == 1
    assert sorted(entered) == ["a"] * 5 + ["b"] * 5


def test_oom_while_loading_evicts_the_others_and_retries_once() -> None:
    manager, built = _manager()
    with manager.use("a"):
        pass
    calls = 0

    def flaky_loader() -> FakeModel:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return FakeModel()

    manager.register("big", flaky_loader)
    with manager.use("big") as model:
        assert isinstance(model, FakeModel)
    assert calls == 2
    assert manager.stats()["a"]["evictions"] == 1 and "a" not in manager.resident()
    assert manager.load_counts()["big"] == 1


def test_oom_twice_is_a_user_error_naming_the_budget() -> None:
    manager, _ = _manager(budget_gb=3.0)

    def always_oom() -> FakeModel:
        raise torch.OutOfMemoryError("CUDA out of memory")

    manager.register("huge", always_oom)
    with pytest.raises(UserError, match=r"gpu_memory_gb = 3 GiB"):
        with manager.use("huge"):
            pass


def test_oom_inside_the_body_frees_the_others_and_names_the_budget() -> None:
    manager, _ = _manager()
    with manager.use("a"):
        pass
    with pytest.raises(UserError, match="out of GPU memory running 'b'"):
        with manager.use("b"):
            raise torch.OutOfMemoryError("CUDA out of memory")
    assert manager.resident() == ["b"]


def test_other_errors_pass_through_untouched() -> None:
    manager, _ = _manager()
    manager.register("broken", lambda: (_ for _ in ()).throw(ValueError("bad checkpoint")))
    with pytest.raises(ValueError, match="bad checkpoint"):
        with manager.use("broken"):
            pass
    with pytest.raises(KeyError, match="registered: a, b, c, broken"):
        with manager.use("nope"):
            pass


def test_a_model_without_to_is_size_zero_and_never_moved() -> None:
    manager, _ = _manager(budget_gb=ONE_MODEL_GB * 1.5)
    remote = object()
    manager.register("remote", lambda: remote)
    with manager.use("a"):
        pass
    with manager.use("remote") as model:
        assert model is remote
    assert manager.stats()["remote"]["size_gb"] == 0.0
    assert set(manager.resident()) == {"a", "remote"}


def test_real_tiny_models_load_once_each(tiny_settings: Settings) -> None:
    from PIL import Image

    from imgrag.management.engine import build_manager

    manager = build_manager(tiny_settings)
    picture = Image.new("RGB", (32, 32), (200, 10, 10))
    answers = []
    for _ in range(3):
        with manager.use("embedder") as embedder:
            assert embedder.embed_images([picture]).shape == (1, embedder.dim)
        with manager.use("judge") as judge:
            answers.append(judge.judge(picture, "a red square").raw)
            assert 1 <= judge.last_tokens["output"] <= tiny_settings.judge.max_new_tokens
    assert len(set(answers)) == 1  # greedy decoding of one model, kept loaded: the same answer each time
    assert manager.load_counts() == {"generator": 0, "judge": 1, "llm": 0, "embedder": 1}
    assert manager.stats()["judge"]["load_seconds"] > 0


def test_loaders_leave_models_in_cpu_ram_for_the_manager_to_move(tiny_settings: Settings) -> None:
    """A loader must not put a model on the GPU before the manager has made room for it: for a CUDA manager
    it loads in the GPU's dtype but stays in CPU RAM (this runs without CUDA, so any move would fail)."""
    import dataclasses

    import torch

    from imgrag.management.engine import load_embedder

    # float16, not the checkpoint's float32: a loader that ignored the GPU's dtype would fail here.
    embedder = load_embedder(dataclasses.replace(tiny_settings, dtype="float16"), "cuda")
    weights = next(embedder.model.parameters())
    assert weights.device.type == "cpu"
    assert weights.dtype == torch.float16


# ----- working memory: reserved beside the weights -----

class FakeProbe:
    """Stands in for CudaPeak: reports a scripted working-memory peak for each measured call."""

    def __init__(self, peaks: list[float]) -> None:
        self.peaks = list(peaks)
        self.started = 0

    def start(self) -> None:
        self.started += 1

    def working_gb(self) -> float | None:
        return self.peaks.pop(0) if self.peaks else None


def test_working_memory_estimate_counts_beside_the_weights_even_when_resident() -> None:
    manager = ModelManager(_settings(ONE_MODEL_GB * 2.5), device="gpu-fake", lock=threading.RLock())
    manager.register("a", FakeModel)
    seen: list[Any] = []

    def estimate(model: Any) -> float:  # a function of the loaded model, as the engine states them
        seen.append(model)
        return ONE_MODEL_GB
    manager.register("b", FakeModel, reserve_gb=estimate)
    with manager.use("a"):
        pass
    with manager.use("b") as b:  # weights 2 + working 1 = 3 units > 2.5: a must go
        assert manager.resident() == ["b"]
    assert seen == [b] and manager.stats()["b"]["reserve_gb"] == pytest.approx(ONE_MODEL_GB, abs=1e-4)
    with manager.use("a"):  # a and b's weights fit (2 units); b's working memory is not needed now
        pass
    assert set(manager.resident()) == {"a", "b"}
    with manager.use("b"):  # b resident already, but its working memory does not fit beside a: a goes
        assert manager.resident() == ["b"]


def test_a_model_whose_working_memory_exceeds_the_budget_is_a_clear_error() -> None:
    manager = ModelManager(_settings(ONE_MODEL_GB * 1.5), device="gpu-fake", lock=threading.RLock())
    manager.register("a", FakeModel, reserve_gb=ONE_MODEL_GB)
    with pytest.raises(UserError, match=r"working memory\), more than the whole GPU budget"):
        with manager.use("a"):
            pass


def test_measured_peak_replaces_the_estimate_and_keeps_the_largest() -> None:
    probe = FakeProbe([0.25, 0.5, 0.125])
    manager = ModelManager(_settings(), device="gpu-fake", lock=threading.RLock(), memory_probe=probe)
    manager.register("a", FakeModel, reserve_gb=3.0)
    manager.register("b", FakeModel)
    assert manager.stats()["a"]["reserve_gb"] == 3.0 and not manager.stats()["a"]["reserve_measured"]
    with manager.use("a"):
        with manager.use("b"):  # nested: not measured (it would reset the outer call's peak)
            pass
    assert manager.stats()["a"]["reserve_gb"] == 0.25 and manager.stats()["a"]["reserve_measured"]
    assert not manager.stats()["b"]["reserve_measured"] and probe.started == 1
    manager.run("a", lambda model: None)
    manager.run("a", lambda model: None)
    assert manager.stats()["a"]["reserve_gb"] == 0.5  # the largest peak seen


def test_make_room_evicts_before_a_model_grows_and_refuses_past_the_budget() -> None:
    manager, _ = _manager(budget_gb=ONE_MODEL_GB * 2.5)
    with manager.use("a"):
        pass
    with manager.use("b"):
        manager.make_room("b", ONE_MODEL_GB)  # the generator's adapter: a must leave first
        assert manager.resident() == ["b"]
        with pytest.raises(UserError, match="gpu_memory_gb"):
            manager.make_room("b", ONE_MODEL_GB * 2)
    assert manager.stats()["b"]["resident"]


# ----- one model thread, one lock per device -----

def test_run_executes_on_the_device_model_thread_with_the_callers_context() -> None:
    import contextvars

    from imgrag.management.devices import ModelThread

    worker = ModelThread("test")
    manager = ModelManager(_settings(), device="gpu-fake", lock=threading.RLock(), thread=worker)
    manager.register("a", FakeModel)
    manager.register("b", FakeModel)
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    var.set("from the caller")
    seen: list[tuple[int | None, str]] = []

    def call(model: Any) -> str:
        seen.append((threading.get_ident(), var.get()))
        # A nested run from the model thread runs at once (no deadlock on the one thread).
        return manager.run("b", lambda b: f"{type(model).__name__}+{type(b).__name__}")

    def caller(n: int) -> None:  # a tool thread: its own context, as LangGraph gives each
        var.set(f"from caller {n}")
        seen.append((None, manager.run("a", call)))

    callers = [threading.Thread(target=caller, args=(n,)) for n in range(3)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(timeout=10)
    assert manager.run("a", call) == "FakeModel+FakeModel"
    model_calls = [ident for ident, _ in seen if ident is not None]
    assert set(model_calls) == {worker.ident} and worker.ident != threading.get_ident()
    assert sorted(v for ident, v in seen if ident is not None) == [
        "from caller 0", "from caller 1", "from caller 2", "from the caller"]
    with pytest.raises(ValueError, match="boom"):  # exceptions come back to the caller
        manager.run("a", lambda model: (_ for _ in ()).throw(ValueError("boom")))


def test_run_from_a_thread_inside_use_does_not_deadlock() -> None:
    manager, _ = _manager()
    with manager.use("a"):
        assert manager.run("b", lambda b: threading.get_ident()) == threading.get_ident()


def test_a_host_model_runs_without_the_device_lock() -> None:
    """A remote LLM's HTTP call must not wait for (or hold) the GPU: it takes no device lock and runs in the
    caller's thread."""
    manager, _ = _manager()
    remote = object()
    manager.register("remote", lambda: remote, on_host=True)
    inside, release = threading.Event(), threading.Event()

    def hold_the_device() -> None:
        with manager.use("a"):
            inside.set()
            release.wait(10)

    holder = threading.Thread(target=hold_the_device)
    holder.start()
    try:
        assert inside.wait(10)
        start = time.perf_counter()
        assert manager.run("remote", lambda model: (model, threading.get_ident())) == (remote, threading.get_ident())
        assert time.perf_counter() - start < 2
    finally:
        release.set()
        holder.join(10)
    assert manager.stats()["remote"]["size_gb"] is None and not manager.stats()["remote"]["resident"]


def test_one_lock_and_one_thread_per_device() -> None:
    from imgrag.management.devices import device_lock, model_thread

    assert device_lock("cuda") is device_lock("cuda:0")
    assert device_lock("cuda:1") is not device_lock("cuda:0") and device_lock("cpu") is not device_lock("cuda:0")
    assert model_thread("cuda") is model_thread("cuda:0") and model_thread("cpu") is not model_thread("cuda:0")
    settings = _settings()
    assert ModelManager(settings, device="cpu").lock is ModelManager(settings, device="cpu").lock
    assert ModelManager(settings, device="cpu").lock is not ModelManager(settings, device="cuda:1").lock


def test_remote_llm_is_registered_on_the_host(tiny_settings: Settings) -> None:
    from dataclasses import replace

    from imgrag.management.engine import build_manager

    remote = replace(tiny_settings, models=replace(tiny_settings.models, llm_backend="openai",
                                                   llm_base_url="http://127.0.0.1:9/v1"))
    manager = build_manager(remote)
    with manager.lock:  # the device is busy; the remote LLM's client still answers at once
        done = []
        t = threading.Thread(target=lambda: done.append(manager.run("llm", lambda llm: type(llm).__name__)))
        t.start()
        t.join(10)
    assert done == ["ChatOpenAI"]


# ----- pinned swaps (the tensor walk; page-locked memory itself needs CUDA) -----

class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(8, 4)
        self.head = torch.nn.Linear(4, 8, bias=False)
        self.head.weight = self.embed.weight  # tied, as in many LMs
        self.register_buffer("scale", torch.full((4,), 2.0))


def test_swaps_walk_every_tensor_once_tied_weights_included() -> None:
    from imgrag.management.devices import tensor_slots

    class Wrapper:  # a model wrapper, as the engine's are (Judge.model, Generator.pipe)
        def __init__(self) -> None:
            self.model = Tied()

    wrapper = Wrapper()
    slots = list(tensor_slots(wrapper))
    assert sorted((key[1], key[2]) for key, _, _ in slots) == [("b", "scale"), ("p", "weight")]
    assert any(tensor is wrapper.model.embed.weight for _, _, tensor in slots)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked host memory needs a CUDA device")
def test_pinned_swap_round_trip_on_cuda() -> None:
    from imgrag.management.devices import swap_in, swap_out

    model = Tied()
    expected = model.embed.weight.detach().clone()
    host: dict = {}
    swap_in(model, "cuda")
    assert model.head.weight.device.type == "cuda" and model.head.weight is model.embed.weight
    swap_out(model, host)
    assert model.embed.weight.is_pinned() and torch.equal(model.embed.weight.detach(), expected)
    first = model.embed.weight.data
    swap_in(model, "cuda")
    swap_out(model, host)
    assert model.embed.weight.data.data_ptr() == first.data_ptr()  # one host copy per tensor, reused
    assert model.scale.is_pinned() and float(model.scale[0]) == 2.0


def test_pinning_only_for_cuda() -> None:
    from imgrag.management.devices import pinning_available

    assert not pinning_available("cpu")
    assert not ModelManager(_settings(), device="cpu").pinned
    assert pinning_available("cuda") == torch.cuda.is_available()


def test_the_model_thread_forgets_a_finished_call() -> None:
    """A call's closure and the caller's context variables (a run's LangGraph config) are not kept by the waiting
    thread: nothing of a finished run stays alive through the model thread."""
    import contextvars
    import gc
    import weakref

    from imgrag.management.devices import ModelThread

    class Payload:
        pass

    var: contextvars.ContextVar = contextvars.ContextVar("run")
    thread = ModelThread("test-forget")
    payload = Payload()
    var.set(payload)
    assert thread.call(lambda held=payload: var.get() is held)
    var.set(None)
    alive = weakref.ref(payload)
    del payload
    gc.collect()
    assert alive() is None

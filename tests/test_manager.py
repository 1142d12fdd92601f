"""The model manager: one load per model, LRU eviction within the budget, the lock, the OOM path."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

from imgrag.errors import UserError
from imgrag.manager import ModelManager, measure_gb
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
    manager, built = _manager(budget_gb=ONE_MODEL_GB * 1.5)
    with manager.use("a") as a:
        with manager.use("b") as b:
            assert a is built["a"][0] and b is built["b"][0]
            assert set(manager.resident()) == {"a", "b"}  # over budget, but a is in use
    with manager.use("c"):
        pass
    assert manager.stats()["a"]["evictions"] == 1 and manager.stats()["b"]["evictions"] == 1


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

    from imgrag.engine import build_manager

    manager = build_manager(tiny_settings)
    picture = Image.new("RGB", (32, 32), (200, 10, 10))
    for _ in range(3):
        with manager.use("embedder") as embedder:
            assert embedder.embed_images([picture]).shape == (1, embedder.dim)
        with manager.use("judge") as judge:
            assert judge.judge(picture, "a red square").raw is not None
    assert manager.load_counts() == {"generator": 0, "judge": 1, "llm": 0, "embedder": 1}
    assert manager.stats()["judge"]["load_seconds"] > 0


def test_loaders_leave_models_in_cpu_ram_for_the_manager_to_move(tiny_settings: Settings) -> None:
    """A loader must not put a model on the GPU before the manager has made room for it: for a CUDA manager
    it loads in the GPU's dtype but stays in CPU RAM (this runs without CUDA, so any move would fail)."""
    from imgrag.engine import _load_embedder

    embedder = _load_embedder(tiny_settings, "cuda")
    weights = next(embedder.model.parameters())
    assert weights.device.type == "cpu"
    assert weights.dtype == tiny_settings.torch_dtype()

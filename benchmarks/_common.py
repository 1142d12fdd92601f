"""What the load and overhead benchmarks share: the machine's description, a tiny-profile setup with
an indexed reference folder, the prompts, and two wrappers around the real model manager.

- :class:`LoadPerStepManager` reproduces TinyIMGRAG's pattern: every tool step loads the model it
  needs and frees it afterwards. It is the real manager with ``offload="drop"`` and an eviction after
  every ``use()``, so the next use loads from disk again: the same loaders, the same files, the same
  ``gc.collect()`` + ``torch.cuda.empty_cache()`` as imgrag's own eviction.
- :class:`TimedManager` measures the seconds spent inside ``use()`` (making the model resident, and the
  caller's body that runs it), so a tool step's time splits into model time and everything else.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Benchmarks run offline, like the tests; every script imports this module before any model library.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PROMPTS = [
    "a golden retriever puppy sleeping in a wooden cradle",
    "a red vintage rocket standing on a launch pad at dawn",
    "a steaming cup of coffee on a stack of old books",
    "a lighthouse on a rocky island during a storm",
    "a blue bicycle leaning against a yellow brick wall",
]


def machine() -> dict[str, Any]:
    """nproc, RAM, CPU model and GPU (if any): the line every BENCHMARKS.md section starts with."""
    info: dict[str, Any] = {"nproc": os.cpu_count(), "python": platform.python_version()}
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        info["ram_gib"] = round(int(meminfo["MemTotal"].split()[0]) / 2**20, 1)
    except (OSError, KeyError, ValueError):
        info["ram_gib"] = None
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown"
    info["cpu"] = cpu
    import torch

    info["torch"] = torch.__version__
    info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return info


def measured_on(doc: dict[str, Any]) -> str:
    """The first line of a CPU benchmark's report: the machine, the commit and how busy the machine was."""
    quiet = doc.get("quiet") or {}
    return (f"Machine: {machine_line(doc['machine'])}; commit {doc['commit']}; 1-minute load average "
            f"{quiet.get('load_average_1m')} when timing started.")


def machine_line(info: dict[str, Any]) -> str:
    gpu = info.get("gpu") or "no GPU"
    return (f"{info['nproc']} cores (nproc), {info['ram_gib']} GiB RAM, {info['cpu']}, {gpu}; "
            f"Python {info['python']}, torch {info['torch']}")


def free_port() -> int:
    """A loopback TCP port nothing listens on now (the kernel's choice), for a server a benchmark starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def read_prompts(path: Path | None, count: int) -> list[str]:
    """``count`` prompts: from ``path`` (.txt or .jsonl), else the first file of datasets/prompts, else built-in."""
    from agent.runner import read_prompt_file

    if path is None:
        folder = REPO / "datasets" / "prompts"
        found = sorted(folder.glob("*.txt")) + sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
        path = found[0] if found else None
    if path is None:
        return DEFAULT_PROMPTS[:count]
    prompts = [item["prompt"] for item in read_prompt_file(Path(path))]
    return (prompts * count)[:count]


def isolated_environ(home: Path) -> dict[str, str]:
    """This process's environment without the caller's IMGRAG_* settings, with IMGRAG_HOME at ``home``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("IMGRAG_")}
    environ["IMGRAG_HOME"] = str(home)
    return environ


def tiny_settings(home: Path, **overrides: Any) -> Any:
    """Settings of the tiny profile with everything under ``home``; the kit is built if missing."""
    from imgrag.kits.tiny_kit import ensure_tiny_kit
    from imgrag.settings import load_settings

    settings = load_settings("tiny", environ=isolated_environ(home), overrides=overrides or None)
    ensure_tiny_kit(Path(settings.tiny_kit_dir))
    return settings


def index_references(settings: Any, folder: Path, count: int = 8) -> int:
    """Write ``count`` small pictures with caption files and index them, so retrieve finds references and
    regenerate runs the IP-Adapter path. Returns the store's size."""
    from PIL import Image, ImageDraw

    from imgrag.models.embedder import Embedder
    from imgrag.store import ReferenceStore

    folder.mkdir(parents=True, exist_ok=True)
    words = ["cradle", "rocket", "coffee", "lighthouse", "bicycle", "retriever", "books", "storm"]
    for i in range(count):
        image = Image.new("RGB", (96, 96), (30 * i % 256, 90, 200 - 20 * i % 200))
        ImageDraw.Draw(image).ellipse((10 + i, 10, 80, 70 + i), fill=(200, 40 * i % 256, 60))
        image.save(folder / f"ref{i}.png")
        (folder / f"ref{i}.txt").write_text(f"a photo of a {words[i % len(words)]}\n")
    embedder = Embedder.from_pretrained(settings, device="cpu")
    store = ReferenceStore.open(settings, embedder.model_id, embedder.dim, for_writing=True)
    return store.index([folder], embedder)["total"]


def write_prompt_file(prompts: list[str], path: Path, seed: int = 0) -> Path:
    """A .jsonl batch file with a fixed seed per prompt, so both modes draw the same pictures."""
    path.write_text("".join(json.dumps({"prompt": p, "seed": seed + i}) + "\n" for i, p in enumerate(prompts)))
    return path


class LoadPerStepManager:
    """TinyIMGRAG's pattern on imgrag's own manager: load at every step, free after it (see module doc)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        inner.offload = "drop"  # eviction frees the model; the next use() calls its loader again
        self.lock = inner.lock

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[Any]:
        with self.inner.lock:
            try:
                with self.inner.use(name) as model:
                    yield model
            finally:
                self.inner.evict(name)

    def run(self, name: str, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        """The inner manager's run() (on its model thread), then the model is dropped."""
        try:
            return self.inner.run(name, fn, *args, **kwargs)
        finally:
            self.inner.evict(name)

    def load_counts(self) -> dict[str, int]:
        return self.inner.load_counts()

    def stats(self) -> dict[str, dict]:
        return self.inner.stats()


class TimedManager:
    """Counts the seconds spent inside ``use()``, in total and per model (see module doc)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.lock = inner.lock
        self.model_seconds = 0.0
        self.by_model: dict[str, float] = {}

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[Any]:
        start = time.perf_counter()
        try:
            with self.inner.use(name) as model:
                yield model
        finally:
            spent = time.perf_counter() - start
            self.model_seconds += spent
            self.by_model[name] = self.by_model.get(name, 0.0) + spent

    def run(self, name: str, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        """The inner manager's run() (on its model thread), timed like use()."""
        start = time.perf_counter()
        try:
            return self.inner.run(name, fn, *args, **kwargs)
        finally:
            spent = time.perf_counter() - start
            self.model_seconds += spent
            self.by_model[name] = self.by_model.get(name, 0.0) + spent

    def load_counts(self) -> dict[str, int]:
        return self.inner.load_counts()

    def stats(self) -> dict[str, dict]:
        return self.inner.stats()


def warm_up(settings: Any) -> float:
    """Load every model once in a throwaway manager, so that neither mode pays Python's first imports
    of diffusers/transformers/open_clip or a cold page cache. Returns the seconds it took."""
    from imgrag.management.engine import build_manager

    start = time.perf_counter()
    manager = build_manager(settings)
    for name in ("generator", "judge", "embedder", "llm"):
        with manager.use(name):
            pass
    with manager.use("generator") as generator:
        generator.load_ip_adapter()
    del manager
    return time.perf_counter() - start


def wait_quiet(max_seconds: float, threshold: float = 0.6) -> dict[str, float]:
    """Wait (up to ``max_seconds``) until the 1-minute load average is under ``threshold``: on a small
    shared machine another process's work would land in these timings. Returns what was seen."""
    start = time.monotonic()
    while max_seconds > 0 and os.getloadavg()[0] >= threshold and time.monotonic() - start < max_seconds:
        time.sleep(5)
    return {"waited_seconds": round(time.monotonic() - start, 1), "load_average_1m": round(os.getloadavg()[0], 2)}

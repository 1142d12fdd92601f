"""``imgrag batch FILE --ray [ADDRESS]``: one batch spread over a Ray cluster.

One long-lived worker (a Ray actor) per GPU, each with its own :class:`agent.runner.Runner` and so its own
model manager: a worker loads each model once and keeps it for every prompt it is given. The driver (the
process that runs the command) hands out prompts one at a time to whichever worker is free, and keeps the
one batch record (``batch.json``, via ``agent.batch``'s ``open_batch``/``claim_item``/``settle_item``) in the
same layout as the in-process batch, so ``--resume`` works the same way.

- **No shared filesystem.** A worker runs each prompt in a scratch folder of its own, then returns the run's
  files (candidates, trace.jsonl, result.json) as bytes; Ray carries them through its object store. The driver
  writes them under its own output folder, with the worker's paths rewritten to the driver's.
- **Shared services.** Every worker must see the same reference store, so the store must be a Chroma server
  (``http://host:port``); an embedded store path is a user error. The agent LLM is either loaded by each
  worker (the ``local`` backend) or one OpenAI-compatible endpoint shared by all.
- **Same settings.** Workers get the driver's resolved :class:`~imgrag.settings.Settings` object as it is;
  only the two paths that are a process's own (``output_dir``, ``threads_db``) point into the worker's scratch.
- **A dead worker loses nothing.** A prompt whose worker died is handed to another worker and a fresh worker
  takes the dead one's place (Ray reports the death as ``RayActorError``; its work in flight is lost, so the
  prompt starts over).
- **Ctrl-C on the driver** keeps every finished prompt in batch.json and puts the prompts in flight back to
  pending: the workers' checkpoints are not on the driver, so ``--resume`` draws those again from the start.

The driver's progress display on the terminal is ``agent.frontends.cli.run_display.RayProgress``.

Why one module of ~400 lines: the worker (:class:`BatchWorker`, what it sends back) and the driver's loop
(:func:`run_batch`, what it does with that) are two ends of one protocol, read side by side.

Ray's own docs on actors and fault tolerance: https://docs.ray.io/en/latest/ray-core/actors.html and
https://docs.ray.io/en/latest/ray-core/fault_tolerance/actors.html.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.batch import (
    FINISHED,
    claim_item,
    fail_item,
    line_options,
    open_batch,
    read_prompt_file,
    settle_item,
)
from imgrag.atomic_files import atomic_path, write_json_atomic
from imgrag.drawing.draw_options import parse_options
from imgrag.errors import UserError
from imgrag.kits.tiny_kit import ensure_tiny_kit
from imgrag.management.manager import add_loads
from imgrag.settings import Settings
from imgrag.store import chroma_client, is_server_uri
from imgrag.text import describe_error, last_line

# agent.runner (LangGraph) is imported where used: the CLI imports this module on every start for expand_ray_flag.

LOCAL = "local"
# What `--ray` may be followed by to count as its ADDRESS: "local", "auto", ray://host:port, host:port.
ADDRESS_PATTERN = re.compile(r"^(local|auto|ray://\S+|[A-Za-z0-9.\-\[\]:]+:\d+)$")
# A prompt whose worker died this many times is failed rather than handed out again (it may be what kills them).
MAX_DEATHS_PER_PROMPT = 3
# Switches (not paths: those are each node's own) that change how a worker loads and runs models, passed on
# from the driver so a worker behaves as the driver would.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "ANONYMIZED_TELEMETRY", "OMP_NUM_THREADS")
# Paths that belong to one process: a worker's point into its scratch folder.
PROCESS_PATHS = ("output_dir", "threads_db")

Progress = Callable[[dict[str, Any]], None]


def expand_ray_flag(argv: list[str]) -> list[str]:
    """Give a bare ``--ray`` its default value, so that ``--ray [ADDRESS]`` reads as the contract says.

    ``--ray`` not followed by something shaped like an address (``local``, ``auto``, ``ray://host:port`` or
    ``host:port``) becomes ``--ray local``. Why not Click's optional-value option (``is_flag=False, flag_value=``):
    Typer (0.29.2) parses with its own copy of Click's parser, and ``typer.Option(is_flag=False, flag_value=...)``
    warns that both are "not supported by Typer and will be removed", then a bare ``--ray`` still "requires an
    argument" (tried: exit 2). And Click's own form takes whatever follows as the value, so ``imgrag batch --ray
    prompts.txt`` would read the prompt file as an address. Only the value's shape tells the two apart."""
    expanded: list[str] = []
    for i, arg in enumerate(argv):
        expanded.append(arg)
        if arg == "--ray" and (i + 1 == len(argv) or not ADDRESS_PATTERN.match(argv[i + 1])):
            expanded.append(LOCAL)
    return expanded


def check_shared_services(settings: Settings) -> None:
    """Distribution needs services every worker can reach: the store must be a Chroma server.

    Raises UserError naming the alternative when it is an embedded store (a folder)."""
    if not is_server_uri(settings.store):
        raise UserError(f"--ray needs a store every worker can reach, and {settings.store} is an embedded store "
                        "(a folder on this machine): start a Chroma server (`chroma run --path DIR --host 0.0.0.0 "
                        "--port 8000`) and pass --store http://HOST:8000")
    # Reaching it now fails fast, before a cluster starts and workers load models.
    chroma_client(settings.store, create=False)


def settings_digest(settings: Settings) -> str:
    """A short hash of the settings a worker runs with, leaving out the process's own paths."""
    doc = {k: v for k, v in settings.as_dict().items() if k not in PROCESS_PATHS}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install ray (imgrag's `ray` extra)") from None
    return ray


# ----------------------------------------------------------------------------------------------
# The worker (a Ray actor: one process, one model manager)
# ----------------------------------------------------------------------------------------------


class BatchWorker:
    """Runs prompts with one Runner (one model manager) for its whole life; Ray makes it an actor."""

    def __init__(self, settings: Settings, name: str) -> None:
        self.name = name
        self.digest = settings_digest(settings)
        scratch = Path(tempfile.mkdtemp(prefix=f"imgrag-ray-{name}-"))
        own = dataclasses.replace(settings, output_dir=str(scratch / "runs"),
                                  threads_db=str(scratch / "threads.sqlite"))
        if own.is_tiny:  # a worker on another machine builds the kit there (same seed, same models)
            ensure_tiny_kit(Path(own.tiny_kit_dir))
        from agent.runner import Runner

        self.runner = Runner(own)

    def identity(self) -> dict[str, Any]:
        """Who this worker is: name, process id, node address and the digest of the settings it received."""
        import ray

        return {"name": self.name, "pid": os.getpid(), "node": ray.util.get_node_ip_address(),
                "settings_digest": self.digest}

    def run(self, prompt: str, seed: int | None, max_rounds: int | None, planner: str, run_id: str,
            references: list[dict[str, Any]] | None = None, drawing: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run one prompt; return its result.json document and every file of its run folder as bytes.

        ``references`` (a batch line's, checked by the driver) are read by the worker at the same paths: a
        cluster sharing the pictures' filesystem. ``drawing``: the line's drawing options (checked by the driver;
        :mod:`imgrag.drawing.draw_options`). The scratch run folder is removed afterwards: the driver keeps the
        record."""
        start = time.perf_counter()
        options = parse_options(drawing, "drawing options") if drawing is not None else None
        result = self.runner.run(prompt, seed=seed, max_rounds=max_rounds, planner=planner, run_id=run_id,
                                 references=references, options=options)
        run_dir = Path(result["run_dir"])
        files = {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
        shutil.rmtree(run_dir, ignore_errors=True)
        # The process's running total (the run's own loads are in its result): the summary's per-worker count.
        return {"result": result, "files": files, "worker": self.name, "pid": os.getpid(),
                "seconds": time.perf_counter() - start, "model_loads": self.runner.manager.load_counts()}


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------


def _rebase(value: Any, old: str, new: str) -> Any:
    """``value`` with every string that starts with ``old`` (a worker's run folder) moved under ``new``."""
    if isinstance(value, str):
        return new + value[len(old):] if value == old or value.startswith(old + "/") else value
    if isinstance(value, dict):
        return {k: _rebase(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_rebase(v, old, new) for v in value]
    return value


def write_run_files(run_dir: Path, payload: dict[str, Any]) -> dict[str, Any]:
    """Write a worker's run (its files as bytes) into ``run_dir`` on the driver and return its result with the
    driver's paths. result.json is written last, so a run folder with one is complete."""
    result = payload["result"]
    old = result["run_dir"]
    for rel, data in payload["files"].items():
        if rel == "result.json":
            continue
        target = run_dir / rel
        if rel == "trace.jsonl":
            lines = []
            for line in data.decode("utf-8").splitlines():
                try:
                    lines.append(json.dumps(_rebase(json.loads(line), old, str(run_dir)), default=str))
                except json.JSONDecodeError:
                    lines.append(line)
            data = ("\n".join(lines) + "\n").encode("utf-8")
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
    result = _rebase(result, old, str(run_dir))
    write_json_atomic(run_dir / "result.json", result)
    return result


@dataclasses.dataclass
class _Slot:
    """One place in the pool: the actor now in it and what its incarnations did."""

    name: str
    actor: Any
    prompts: int = 0
    model_loads: dict[str, int] = dataclasses.field(default_factory=dict)
    deaths: int = 0
    retired_loads: dict[str, int] = dataclasses.field(default_factory=dict)  # loads of the incarnations that died
    pid: int | None = None


def connect(ray: Any, address: str | None, workers: int | None) -> bool:
    """Join the cluster at ``address`` ("local" or None starts one on this machine); True when this call started
    the connection (and so must end it). Already connected (a test, a notebook): that connection is used."""
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "WARNING",
                               "configure_logging": True}
    try:
        if address in (None, LOCAL):
            # A local cluster gets a CPU per requested worker even on a smaller machine (the workers then share).
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, workers or 1), **options)
        else:
            ray.init(address=address, **options)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise UserError(f"cannot join the Ray cluster at {address} ({describe_error(exc, 200)}); "
                        "start one with `ray start --head` or leave out the address for a local one") from None
    return True


def _worker_resources(ray: Any, settings: Settings, workers: int | None) -> tuple[int, dict[str, Any]]:
    """How many workers and what each asks of Ray: a whole GPU per worker when the cluster has GPUs and the
    settings do not pin the CPU, else one CPU."""
    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    use_gpu = gpus > 0 and settings.device != "cpu"
    count = workers or (gpus if use_gpu else 1)
    available = gpus if use_gpu else int(total.get("CPU", 0))
    kind = "GPU" if use_gpu else "CPU"
    if count > available:
        raise UserError(f"--workers {count} needs {count} {kind}s and the Ray cluster has {available}")
    return count, ({"num_gpus": 1, "num_cpus": 0} if use_gpu else {"num_cpus": 1})


def run_batch(settings: Settings, path: str | Path, *, address: str | None = None, workers: int | None = None,
              resume: bool = False, planner: str | None = None, max_rounds: int | None = None,
              on_progress: Progress | None = None, options: Any = None) -> dict[str, Any]:
    """Run every prompt of ``path`` on Ray workers and return the batch summary (summary.json).

    ``address``: a Ray address (``auto``, ``host:port``, ``ray://host:port``), or None/"local" for a cluster on
    this machine. ``workers``: how many (default: one per GPU of the cluster, or 1 without GPUs).
    ``on_progress`` gets events: ``workers`` (their identities), ``item`` (a prompt settled, with its worker),
    ``worker_died``. ``options``: how every prompt is drawn (an :class:`imgrag.drawing.draw_options.DrawOptions`;
    default the settings'), changed by a .jsonl line's own keys; ``planner`` and ``max_rounds`` as
    :func:`agent.batch_run.run_batch` takes them. Raises UserError for an embedded store, a missing Ray, an
    unreachable cluster; a Ctrl-C saves batch.json (prompts in flight back to pending) and propagates."""
    progress = on_progress or (lambda event: None)
    check_shared_services(settings)
    path = Path(path)
    items = read_prompt_file(path, settings=settings)  # every bad line named at once, before any worker starts
    batch_dir, state = open_batch(path, settings.output_dir, resume=resume, items=items, profile=settings.profile,
                                  planner=planner, max_rounds=max_rounds)
    planner, max_rounds = state["planner"], state.get("max_rounds")  # a resume goes on as the batch began
    queue = deque(item for item in state["items"] if item["status"] not in FINISHED)
    if not queue:  # a resume with nothing left: no cluster, no worker, the record as it is
        return _summary(batch_dir, path, state, [], [], settings, address, {}, time.perf_counter())
    ray = _import_ray()
    owns = connect(ray, address, workers)
    start = time.perf_counter()
    slots: list[_Slot] = []
    in_flight: dict[Any, tuple[_Slot, dict[str, Any]]] = {}
    try:
        count, resources = _worker_resources(ray, settings, workers)
        count = min(count, len(queue))  # a worker with no prompt would only load models
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        actor_class = ray.remote(BatchWorker).options(runtime_env={"env_vars": env} if env else None, **resources)

        def spawn(name: str) -> Any:
            return actor_class.remote(settings, name)

        slots = [_Slot(f"w{i}", spawn(f"w{i}")) for i in range(count)]
        try:
            identities = ray.get([s.actor.identity.remote() for s in slots])
        except ray.exceptions.RayActorError as exc:  # e.g. imgrag missing on a node, or its models
            reason = last_line(exc)  # the remote traceback comes first, its cause last
            raise UserError(f"the Ray workers could not start: {reason}") from None
        for slot, ident in zip(slots, identities, strict=True):
            slot.pid = ident["pid"]
        progress({"event": "workers", "workers": identities, "batch_dir": str(batch_dir),
                  "done": sum(item["status"] in FINISHED for item in state["items"])})
        idle = list(slots)
        retrying: set[int] = set()  # prompts whose worker died in this batch: they keep their run id
        submitted: dict[Any, float] = {}
        replacements_left = 2 * count
        deaths = 0

        def dispatch() -> None:
            while queue and idle:
                slot, item = idle.pop(0), queue.popleft()
                if item["index"] not in retrying:  # anything else (pending, failed, cut off) starts a fresh run
                    claim_item(batch_dir, state, item)
                ref = slot.actor.run.remote(item["prompt"], item.get("seed"), max_rounds or item.get("max_rounds"),
                                            planner, item["run_id"], item.get("references"),
                                            line_options(options or settings, item).to_state())
                in_flight[ref] = (slot, item)
                submitted[ref] = time.perf_counter()

        while queue or in_flight:
            settled: list[dict[str, Any]] = []
            dispatch()
            if not in_flight:
                break
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            for ref in ready:
                slot, item = in_flight.pop(ref)
                try:
                    payload = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    deaths += 1
                    slot.deaths += 1
                    slot.retired_loads = add_loads(slot.retired_loads, slot.model_loads)
                    slot.model_loads = {}
                    item["worker_deaths"] = item.get("worker_deaths", 0) + 1
                    progress({"event": "worker_died", "worker": slot.name, "index": item["index"],
                              "error": type(exc).__name__})
                    if item["worker_deaths"] >= MAX_DEATHS_PER_PROMPT:
                        item.update(status="failed", error=f"the worker running it died {item['worker_deaths']} "
                                                           "times")
                        settled.append(item)
                    else:
                        retrying.add(item["index"])
                        queue.appendleft(item)  # first in line for the next free worker
                    if replacements_left > 0:
                        replacements_left -= 1
                        slot.actor = spawn(slot.name)
                        idle.append(slot)
                    elif not idle and not in_flight:
                        write_json_atomic(batch_dir / "batch.json", state)
                        raise UserError(f"every Ray worker died ({deaths} deaths); see Ray's logs "
                                        "(/tmp/ray/session_latest/logs on each node), then --resume") from None
                except ray.exceptions.RayTaskError as exc:  # the prompt's own error: the worker lives on
                    fail_item(item, getattr(exc, "cause", None) or exc)
                    idle.append(slot)
                    settled.append(item)
                else:
                    result = write_run_files(Path(settings.output_dir) / item["run_id"], payload)
                    settle_item(item, result)
                    # What Ray added to this prompt: the call, the files through the object store, writing them
                    # here (a worker's first prompt also waits for the worker to start).
                    wait = time.perf_counter() - submitted.pop(ref)
                    item["ray_overhead_seconds"] = round(wait - payload["seconds"], 3)
                    item["worker"] = slot.name
                    slot.prompts += 1
                    slot.pid = payload["pid"]
                    slot.model_loads = payload["model_loads"]  # this worker's loads so far, all its prompts
                    idle.append(slot)
                    settled.append(item)
                write_json_atomic(batch_dir / "batch.json", state)
            dispatch()  # hand out the next prompts before reporting, so the workers never wait on the display
            for item in settled:
                progress({"event": "item", "item": item, "worker": item.get("worker")})
    except KeyboardInterrupt:
        for _, item in in_flight.values():
            # The worker's half-run (and its checkpoint) is not on the driver: --resume starts the prompt over.
            item.update(status="pending", error="interrupted (Ctrl-C on the driver); --resume draws it again")
        write_json_atomic(batch_dir / "batch.json", state)
        raise
    finally:
        for slot in slots:
            try:
                ray.kill(slot.actor)
            except Exception:  # already dead: nothing to end
                pass
        if owns:
            ray.shutdown()

    return _summary(batch_dir, path, state, slots, identities, settings, address, resources, start)


def _summary(batch_dir: Path, path: Path, state: dict[str, Any], slots: list[_Slot], identities: list[dict],
             settings: Settings, address: str | None, resources: dict[str, Any], start: float) -> dict[str, Any]:
    """summary.json: the in-process batch's fields, plus the workers and what each did."""
    total = add_loads(*(loads for s in slots for loads in (s.retired_loads, s.model_loads)))
    summary = {
        "batch_dir": str(batch_dir), "file": str(path), "items": state["items"], "model_loads": total,
        "workers": [{"name": s.name, "pid": s.pid, "prompts": s.prompts, "model_loads": s.model_loads,
                     "deaths": s.deaths} for s in slots],
        "worker_deaths": sum(s.deaths for s in slots), "settings_digest": settings_digest(settings),
        "worker_settings_digests": sorted({i["settings_digest"] for i in identities}),
        "ray": {"address": address or LOCAL, "workers": len(slots), "resources": resources},
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_json_atomic(batch_dir / "summary.json", summary)
    return summary

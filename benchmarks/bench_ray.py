"""``imgrag batch --ray`` against the in-process batch: prompts per minute with 1 and 2 workers, and what
going through Ray costs per prompt.

    python benchmarks/bench_ray.py [--count 10] [--max-rounds 2] [--repeat 2] [--prompts FILE] [--json OUT.json]

One local Ray cluster (``ray.init(num_cpus=2)``) and one Chroma server (``chroma run``, started here) serve
every configuration; the tiny profile, ``--planner fixed``, the same prompts and seeds throughout.

- **in-process**: :meth:`agent.runner.Runner.batch` after a one-prompt warm-up batch (models loaded), so its
  seconds per prompt are the steady state;
- **ray, N workers**: :func:`agent.frontends.ray_batch.run_batch` with N workers. *Wall* counts everything (the worker
  processes start, import and load their models); *steady* is the throughput after every worker has settled
  its first prompt: ``(prompts settled after that) / (seconds from then to the last)``, so start-up is out.

Ray overhead per prompt, two ways: (ray, 1 worker, steady seconds per prompt) − (in-process seconds per prompt),
which on a busy shared machine drowns in noise; and measured directly: the driver's wait for a prompt (submit to
files written) minus the worker's own seconds in ``run`` (each item's ``ray_overhead_seconds``; median over the
prompts after each worker's first). Both count the task call, the files shipped back through the object store
and written on the driver.

The three modes run in turn, ``--repeat`` times (interleaved, so a busy spell of a shared machine spreads over
all of them); the report gives each mode's median, and the 1-minute load average seen before each run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    free_port,
    git_commit,
    index_references,
    machine,
    measured_on,
    read_prompts,
    tiny_settings,
    wait_quiet,
    write_prompt_file,
)


def start_chroma(data: Path) -> tuple[subprocess.Popen, str]:
    """A Chroma server on a free loopback port; returns the process and its URL once it accepts connections."""
    port = free_port()
    exe = Path(sys.executable).parent / "chroma"
    proc = subprocess.Popen([str(exe if exe.exists() else shutil.which("chroma")), "run", "--path", str(data),
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("chroma run did not start") from None
            time.sleep(0.2)


def in_process(settings: Any, prompt_file: Path, warm_file: Path, max_rounds: int) -> dict[str, Any]:
    from agent.runner import Runner

    runner = Runner(settings)
    runner.batch(warm_file, planner="fixed", max_rounds=max_rounds)  # loads every model the runs use
    start = time.perf_counter()
    summary = runner.batch(prompt_file, planner="fixed", max_rounds=max_rounds)
    wall = time.perf_counter() - start
    n = len(summary["items"])
    return {"mode": "in-process", "workers": 1, "prompts": n, "wall": wall, "steady_prompts": n,
            "steady_seconds": wall, "statuses": sorted({i["status"] for i in summary["items"]})}


def on_ray(settings: Any, prompt_file: Path, workers: int, max_rounds: int) -> dict[str, Any]:
    from agent.frontends.ray_batch import run_batch

    settled: list[tuple[float, str]] = []
    overheads: list[float] = []  # per prompt, leaving out each worker's first (it waits for the worker to start)

    def progress(event: dict[str, Any]) -> None:
        if event["event"] == "item":
            if any(worker == event["worker"] for _, worker in settled):
                overheads.append(event["item"]["ray_overhead_seconds"])
            settled.append((time.perf_counter(), event["worker"]))

    start = time.perf_counter()
    summary = run_batch(settings, prompt_file, workers=workers, planner="fixed", max_rounds=max_rounds,
                        on_progress=progress)
    wall = time.perf_counter() - start
    # Steady state: from the moment every worker has settled its first prompt to the last settle.
    seen: set[str] = set()
    ready_at = None
    for i, (_t, worker) in enumerate(settled):
        seen.add(worker)
        if len(seen) == workers:
            ready_at = i
            break
    steady_prompts = len(settled) - 1 - ready_at if ready_at is not None else 0
    steady_seconds = settled[-1][0] - settled[ready_at][0] if ready_at is not None else 0.0
    return {"mode": "ray", "workers": workers, "prompts": len(settled), "wall": wall,
            "steady_prompts": steady_prompts, "steady_seconds": steady_seconds,
            "per_worker": {w["name"]: w["prompts"] for w in summary["workers"]},
            "ray_overhead_seconds": statistics.median(overheads) if overheads else None,
            "model_loads": summary["model_loads"], "statuses": sorted({i["status"] for i in summary["items"]})}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=Path, default=None)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--max-rounds", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--wait-quiet", type=float, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import ray

    home = args.home or Path(tempfile.mkdtemp(prefix="imgrag-bench-ray-"))
    chroma, url = start_chroma(home / "chroma")
    try:
        settings = tiny_settings(home, store=url)
        references = index_references(settings, home / "references")
        prompts = read_prompts(args.prompts, args.count)
        prompt_file = write_prompt_file(prompts, home / "prompts.jsonl")
        warm_file = write_prompt_file(prompts[:1], home / "warm.jsonl", seed=1000)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        quiet = wait_quiet(args.wait_quiet)
        runs = []
        for _ in range(args.repeat):
            for mode in ("ray1", "ray2", "in-process"):
                load = round(os.getloadavg()[0], 2)
                if mode == "in-process":
                    run = in_process(settings, prompt_file, warm_file, args.max_rounds)
                else:
                    run = on_ray(settings, prompt_file, int(mode[-1]), args.max_rounds)
                runs.append({**run, "load_average_1m": load})
    finally:
        if ray.is_initialized():
            ray.shutdown()
        chroma.terminate()
        chroma.wait(timeout=30)
    for c in runs:
        c["prompts_per_minute_wall"] = 60 * c["prompts"] / c["wall"]
        c["prompts_per_minute_steady"] = 60 * c["steady_prompts"] / c["steady_seconds"] if c["steady_seconds"] else None
        c["seconds_per_prompt_steady"] = c["steady_seconds"] / c["steady_prompts"] if c["steady_prompts"] else None
    configs = [median_of([r for r in runs if (r["mode"], r["workers"]) == key])
               for key in (("ray", 1), ("ray", 2), ("in-process", 1))]
    one, two, local = configs
    doc = {"benchmark": "ray", "machine": machine(), "commit": git_commit(), "profile": "tiny", "planner": "fixed",
           "max_rounds": args.max_rounds, "prompts": prompts, "references": references, "quiet": quiet,
           "ray": ray.__version__, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "repeat": args.repeat,
           "runs": runs, "configs": configs,
           "ratio_2_to_1_steady": two["prompts_per_minute_steady"] / one["prompts_per_minute_steady"],
           "ratio_2_to_1_wall": two["prompts_per_minute_wall"] / one["prompts_per_minute_wall"],
           "ray_overhead_seconds_per_prompt": one["seconds_per_prompt_steady"] - local["seconds_per_prompt_steady"],
           "ray_overhead_measured_seconds": one["ray_overhead_seconds"]}
    print(report(doc))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's runs summarised by the median of each timing (and every load average seen)."""
    keys = ("wall", "prompts_per_minute_wall", "prompts_per_minute_steady", "seconds_per_prompt_steady",
            "ray_overhead_seconds")
    return {"mode": runs[0]["mode"], "workers": runs[0]["workers"], "runs": len(runs),
            "load_averages": [r["load_average_1m"] for r in runs],
            **{k: statistics.median(r[k] for r in runs) if runs[0].get(k) is not None else None for k in keys}}


def report(doc: dict[str, Any]) -> str:
    lines = [measured_on(doc),
             f"{len(doc['prompts'])} prompts, `--planner fixed`, max {doc['max_rounds']} rounds, "
             f"{doc['references']} references on a Chroma server, tiny profile, Ray {doc['ray']}, "
             f"OMP_NUM_THREADS={doc['omp_num_threads']}.", "",
             f"Medians of {doc['repeat']} interleaved runs per mode.", "",
             "| mode | workers | wall s (start-up included) | prompts/min, wall | prompts/min, steady | "
             "s/prompt, steady | load averages seen |",
             "|---|---|---|---|---|---|---|"]
    for c in doc["configs"]:
        lines.append(f"| {c['mode']} | {c['workers']} | {c['wall']:.1f} | {c['prompts_per_minute_wall']:.1f} | "
                     f"{c['prompts_per_minute_steady']:.1f} | {c['seconds_per_prompt_steady']:.2f} | "
                     f"{', '.join(str(x) for x in c['load_averages'])} |")
    lines += ["", f"2 workers / 1 worker, steady prompts per minute: **{doc['ratio_2_to_1_steady']:.2f}x** "
              f"(wall, start-up included: {doc['ratio_2_to_1_wall']:.2f}x). Ray overhead per prompt (1 worker, steady, "
              f"minus in-process): **{doc['ray_overhead_seconds_per_prompt']:+.2f} s**; "
              f"measured directly (driver's wait for a prompt minus the worker's own seconds, median, 1 worker): "
              f"**{doc['ray_overhead_measured_seconds']:.3f} s**."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

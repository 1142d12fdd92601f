"""Model loads and wall time per prompt: imgrag's runner against TinyIMGRAG's load-per-step pattern.

    python benchmarks/bench_loads.py [--prompts FILE] [--count 5] [--max-rounds 2] [--planner fixed]
                                     [--json OUT.json]

One process, one machine, the same tiny-profile models, the same prompts and seeds, one batch each:

- ``imgrag``: :class:`agent.runner.Runner` with the engine's model manager; each model loads once
  for the whole batch;
- ``load-per-step``: the same runner over :class:`_common.LoadPerStepManager`, which loads the model
  of every step from disk and frees it afterwards (TinyIMGRAG's pattern, on imgrag's own loaders).

Before both, every model is loaded once and thrown away, so Python's first imports and a cold page
cache count for neither. The pictures of the two modes are compared byte for byte: the modes must
differ in loading only. The tiny models make loading cheap relative to what real checkpoints cost
(a few MB instead of ~32 GB), so the ratio here is a floor, not an estimate of the real one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    LoadPerStepManager,
    git_commit,
    index_references,
    machine,
    measured_on,
    read_prompts,
    tiny_settings,
    wait_quiet,
    warm_up,
    write_prompt_file,
)


def _digest(path: str | None) -> str | None:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path and Path(path).exists() else None


def run_mode(mode: str, home: Path, prompt_file: Path, planner: str, max_rounds: int) -> dict[str, Any]:
    """One batch in one mode; returns wall time, per-prompt seconds, loads and the final pictures' digests."""
    from agent.runner import Runner
    from imgrag.management.engine import build_manager

    settings = tiny_settings(home, output_dir=str(home / f"runs-{mode}"), threads_db=str(home / f"{mode}.sqlite"))
    manager = build_manager(settings)
    if mode == "load-per-step":
        manager = LoadPerStepManager(manager)
    runner = Runner(settings, manager=manager)
    start = time.perf_counter()
    summary = runner.batch(prompt_file, planner=planner, max_rounds=max_rounds)
    wall = time.perf_counter() - start
    items = summary["items"]
    stats = manager.stats()
    return {
        "mode": mode,
        "wall_seconds": round(wall, 3),
        "seconds_per_prompt": round(wall / len(items), 3),
        "run_seconds": [it.get("seconds") for it in items],
        "statuses": [it.get("status") for it in items],
        "rounds": [it.get("rounds") for it in items],
        "model_loads": summary["model_loads"],
        "total_loads": sum(summary["model_loads"].values()),
        "load_seconds": round(sum(s["load_seconds"] for s in stats.values()), 3),
        "final_images": [_digest(it.get("final_image")) for it in items],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=Path, default=None, help="a .txt/.jsonl prompt file (default: "
                        "datasets/prompts, else five built-in prompts)")
    parser.add_argument("--count", type=int, default=5)
    parser.add_argument("--max-rounds", type=int, default=2)
    parser.add_argument("--planner", choices=("fixed", "agent"), default="fixed")
    parser.add_argument("--home", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--wait-quiet", type=float, default=0, help="wait up to this many seconds for an idle "
                        "machine before timing")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    home = args.home or Path(tempfile.mkdtemp(prefix="imgrag-bench-loads-"))
    settings = tiny_settings(home)
    references = index_references(settings, home / "references")
    prompts = read_prompts(args.prompts, args.count)
    prompt_file = write_prompt_file(prompts, home / "prompts.jsonl")
    warm = warm_up(settings)
    quiet = wait_quiet(args.wait_quiet)
    results = [run_mode(mode, home, prompt_file, args.planner, args.max_rounds)
               for mode in ("imgrag", "load-per-step")]
    ours, theirs = results
    doc = {
        "benchmark": "loads", "machine": machine(), "commit": git_commit(), "profile": "tiny",
        "planner": args.planner, "max_rounds": args.max_rounds, "prompts": prompts, "references": references,
        "warm_up_seconds": round(warm, 3), "quiet": quiet, "load_average_after": round(os.getloadavg()[0], 2),
        "modes": results,
        "ratio_wall": round(theirs["wall_seconds"] / ours["wall_seconds"], 2),
        "ratio_loads": round(theirs["total_loads"] / max(ours["total_loads"], 1), 2),
        "same_pictures": ours["final_images"] == theirs["final_images"],
    }
    print(report(doc))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def report(doc: dict[str, Any]) -> str:
    """The results as a Markdown table (what goes into BENCHMARKS.md)."""
    lines = [measured_on(doc),
             f"{len(doc['prompts'])} prompts, planner {doc['planner']}, max {doc['max_rounds']} rounds, "
             f"{doc['references']} indexed references, tiny profile (random weights: the pictures are noise).", "",
             "| mode | model loads | load seconds | wall seconds | seconds per prompt |",
             "|---|---|---|---|---|"]
    for m in doc["modes"]:
        loads = ", ".join(f"{k} {v}" for k, v in sorted(m["model_loads"].items()))
        lines.append(f"| {m['mode']} | {m['total_loads']} ({loads}) | {m['load_seconds']:.2f} | "
                     f"{m['wall_seconds']:.2f} | {m['seconds_per_prompt']:.2f} |")
    lines += ["", f"load-per-step / imgrag: **{doc['ratio_wall']}x** the wall time, {doc['ratio_loads']}x the loads; "
              f"identical final pictures in both modes: {doc['same_pictures']}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

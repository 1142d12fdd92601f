"""The agent's overhead: seconds per step spent outside model calls.

    python benchmarks/bench_overhead.py [--prompts FILE] [--count 5] [--max-rounds 2]
                                        [--planners fixed,agent] [--json OUT.json]

Each prompt runs through :class:`agent.runner.Runner` with the engine's manager wrapped in
:class:`_common.TimedManager`, which counts the seconds spent inside ``manager.use()`` (loading or
moving the model, and running it). The runner's events mark where each tool step starts and ends, so

- **in-tool overhead** = a tool step's seconds (as traced) − the model seconds inside it: argument
  checks, opening and saving pictures, the trace line (written and fsynced), the tool message;
- **outside-tool overhead** = the run's wall time − its tool steps − its LLM planner calls: the graph
  (plan node, routing, state merges), the SQLite checkpoint after every node, the policy;

both per step. Models are loaded once before timing (a warm-up batch), so loading is not in it.
With ``--planners agent`` the tiny LLM plans (and, being random, fails and falls back to the policy
each step): its calls are model time too, and are reported apart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    TimedManager,
    git_commit,
    index_references,
    machine,
    measured_on,
    read_prompts,
    tiny_settings,
    wait_quiet,
    write_prompt_file,
)


class StepClock:
    """Splits each tool step into model time and the rest, from the runner's events."""

    def __init__(self, manager: TimedManager) -> None:
        self.manager = manager
        self.steps: list[dict[str, Any]] = []
        self._model_at_start = 0.0

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "tool_start":
            self._model_at_start = self.manager.model_seconds
        elif kind == "tool_end":
            model = self.manager.model_seconds - self._model_at_start
            self.steps.append({"tool": event["tool"], "seconds": event["seconds"], "model_seconds": model,
                               "overhead": event["seconds"] - model})


def run_planner(home: Path, prompt_file: Path, planner: str, max_rounds: int) -> dict[str, Any]:
    from agent.runner import Runner, read_prompt_file
    from imgrag.management.engine import build_manager
    from imgrag.records.runs import RunRecord

    settings = tiny_settings(home, output_dir=str(home / f"runs-{planner}"),
                             threads_db=str(home / f"{planner}.sqlite"))
    manager = TimedManager(build_manager(settings))
    clock = StepClock(manager)
    runner = Runner(settings, manager=manager, on_event=clock)
    runner.batch(prompt_file, planner=planner, max_rounds=1)  # warm-up: loads every model it will use
    clock.steps.clear()
    manager.model_seconds = 0.0
    runs = []
    for i, item in enumerate(read_prompt_file(prompt_file)):
        before_model, before_steps = manager.model_seconds, len(clock.steps)
        start = time.perf_counter()
        result = runner.run(item["prompt"], seed=item["seed"], planner=planner, max_rounds=max_rounds,
                            run_id=f"overhead-{planner}-{i}")
        wall = time.perf_counter() - start
        trace = RunRecord(result["run_dir"]).read_steps()
        llm = sum(s["seconds"] for s in trace if s.get("planner") == "llm")
        steps = clock.steps[before_steps:]
        tool_seconds = sum(s["seconds"] for s in steps)
        runs.append({"wall": wall, "steps": len(steps), "tool_seconds": tool_seconds, "llm_seconds": llm,
                     "llm_calls": sum(1 for s in trace if s.get("planner") == "llm"),
                     "model_seconds": manager.model_seconds - before_model,
                     "outside_tools": wall - tool_seconds - llm})
    steps = clock.steps
    n_steps = sum(r["steps"] for r in runs)
    by_tool: dict[str, dict[str, float]] = {}
    for tool in sorted({s["tool"] for s in steps}):
        mine = [s for s in steps if s["tool"] == tool]
        by_tool[tool] = {"calls": len(mine), "seconds": statistics.mean(s["seconds"] for s in mine),
                         "model_seconds": statistics.mean(s["model_seconds"] for s in mine),
                         "overhead_ms": 1000 * statistics.mean(s["overhead"] for s in mine)}
    return {
        "planner": planner, "runs": runs, "steps": n_steps, "by_tool": by_tool,
        "in_tool_overhead_ms_per_step": 1000 * sum(s["overhead"] for s in steps) / max(n_steps, 1),
        "outside_tool_overhead_ms_per_step": 1000 * sum(r["outside_tools"] for r in runs) / max(n_steps, 1),
        "llm_seconds_per_step": sum(r["llm_seconds"] for r in runs) / max(n_steps, 1),
        "llm_calls": sum(r["llm_calls"] for r in runs),
        "wall_per_step": sum(r["wall"] for r in runs) / max(n_steps, 1),
        "model_share": sum(r["model_seconds"] for r in runs) / max(sum(r["wall"] for r in runs), 1e-9),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=Path, default=None)
    parser.add_argument("--count", type=int, default=5)
    parser.add_argument("--max-rounds", type=int, default=2)
    parser.add_argument("--planners", default="fixed,agent")
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--wait-quiet", type=float, default=0, help="wait up to this many seconds for an idle "
                        "machine before timing")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    home = args.home or Path(tempfile.mkdtemp(prefix="imgrag-bench-overhead-"))
    settings = tiny_settings(home)
    references = index_references(settings, home / "references")
    prompts = read_prompts(args.prompts, args.count)
    prompt_file = write_prompt_file(prompts, home / "prompts.jsonl")
    planners = [p.strip() for p in args.planners.split(",") if p.strip()]
    quiet = wait_quiet(args.wait_quiet)
    doc = {"benchmark": "overhead", "machine": machine(), "commit": git_commit(), "profile": "tiny",
           "prompts": prompts, "max_rounds": args.max_rounds, "references": references, "quiet": quiet,
           "planners": [run_planner(home, prompt_file, p, args.max_rounds) for p in planners]}
    print(report(doc))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def report(doc: dict[str, Any]) -> str:
    lines = [measured_on(doc),
             f"{len(doc['prompts'])} prompts, max {doc['max_rounds']} rounds, {doc['references']} indexed references, "
             "tiny profile, models loaded before timing.", "",
             "| planner | steps | wall s/step | model s/step | LLM s/step | in-tool overhead ms/step | "
             "graph+checkpoint ms/step | model share of wall |",
             "|---|---|---|---|---|---|---|---|"]
    for p in doc["planners"]:
        model_per_step = sum(r["model_seconds"] for r in p["runs"]) / max(p["steps"], 1)
        lines.append(f"| {p['planner']} | {p['steps']} | {p['wall_per_step']:.3f} | {model_per_step:.3f} | "
                     f"{p['llm_seconds_per_step']:.3f} | {p['in_tool_overhead_ms_per_step']:.1f} | "
                     f"{p['outside_tool_overhead_ms_per_step']:.1f} | {100 * p['model_share']:.0f}% |")
    lines += ["", "| planner | tool | calls | mean s | model s | overhead ms |", "|---|---|---|---|---|---|"]
    for p in doc["planners"]:
        for tool, t in p["by_tool"].items():
            lines.append(f"| {p['planner']} | {tool} | {t['calls']} | {t['seconds']:.3f} | {t['model_seconds']:.3f} | "
                         f"{t['overhead_ms']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

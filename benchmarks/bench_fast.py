"""Few-step drawing: seconds per drawing at 30 steps against 4 (LCM-LoRA), and one round in each mode.

    python benchmarks/bench_fast.py --tiny [--wait-quiet 600] [--json OUT.json]      # CPU, the tiny kit
    python benchmarks/bench_fast.py --kit /tmp/imgrag-full-kit [--json OUT.json]     # GPU, the full-size kit
    python benchmarks/bench_fast.py --dry-run                                        # the GPU path, small models, CPU

``--kit`` takes a kit built with ``imgrag models build-tiny --scale full`` (random weights, real shapes,
including a random LCM-LoRA of the published rank and modules: 197 M parameters). Everything goes through
imgrag's own engine: the generator's ``fast`` modes, the model manager, the runner with the fixed policy.

Stages, each written to the JSON as soon as it ends:
- ``draw``: medians of ``--repeat`` drawings (after one warm-up each) at the profile's size: ``off`` at 30
  steps (guidance 5) and ``lcm-lora`` at its 4 steps (guidance 1: no classifier-free guidance), each plain and
  guided by 2 references through the IP-Adapter; the ratio 30-step / 4-step.
- ``switch``: the first switch to ``lcm-lora`` (it loads the LoRA), then later off/on switches (no reload),
  and the generator's load count, which must stay 1.
- ``rounds``: one fixed-policy run of 2 rounds (generate, critique, retrieve, regenerate, critique) in each
  mode, judge included, references from an in-memory list ranked with the store's maths.

Random weights: the pictures are noise, and a random judge never stops early, so each critique generates its
full ``judge.max_new_tokens``; nothing here says anything about picture quality.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import git_commit, machine, machine_line, tiny_settings, wait_quiet  # noqa: E402  (offline env)
from bench_gpu import PROMPT, ListStore, Results, gpu_gib, make_settings, timed  # noqa: E402

MODES = (("off", 30), ("lcm-lora", None))  # None: the method's own step count (4)


def _settings(args: argparse.Namespace, home: Path) -> Any:
    if args.tiny:  # the tiny kit at its 64x64, but at SDXL's real 30 steps for "off"
        return tiny_settings(home, generation={"steps": 30, "guidance": 5.0})
    kit = args.kit or home / "kit"
    return make_settings(kit, home, args.dry_run, models={"lcm_lora": str(kit / "lcm-lora")},
                         generation={"steps": 30, "guidance": 5.0})


def run(args: argparse.Namespace) -> dict[str, Any]:
    from PIL import Image

    home = Path(tempfile.mkdtemp(prefix="bench-fast-"))
    quiet = wait_quiet(args.wait_quiet) if args.wait_quiet else None
    doc: dict[str, Any] = {"machine": machine(), "commit": git_commit(), "quiet": quiet,
                           "kind": "tiny" if args.tiny else ("dry-run" if args.dry_run else "full"),
                           "repeat": args.repeat}
    res = Results(args.json, doc)
    if not args.tiny and (args.dry_run or args.build):
        from imgrag.kits.full_configs import FULL, smoke_configs
        from imgrag.kits.full_scale import build_full_kit

        kit = args.kit or home / "kit"
        res.stage("build", lambda: {"seconds": round(timed(lambda: build_full_kit(
            kit, configs=smoke_configs() if args.dry_run else FULL))[0], 1)})
    settings = _settings(args, home)
    from imgrag.management.engine import build_manager

    manager = build_manager(settings)
    refs = [Image.open(p) for _, p, _ in ListStore(home / "refs", count=2, size=256).items]

    def draw() -> dict[str, Any]:
        from imgrag.models.fast import draw_plan

        out: dict[str, Any] = {"size": f"{settings.generation.width}x{settings.generation.height}"}
        with manager.use("generator") as generator:
            generator.load_ip_adapter()
            for mode, steps in MODES:
                for guided in (False, True):
                    def once(mode: str = mode, steps: int | None = steps, guided: bool = guided) -> float:
                        return timed(lambda: generator.generate(PROMPT, seed=1, fast=mode, steps=steps,
                                                                references=refs if guided else None))[0]
                    once()  # warm-up: the LoRA load, first kernels
                    times = [once() for _ in range(args.repeat)]
                    key = f"{mode}{'_guided' if guided else ''}"
                    out[key] = {"seconds": [round(t, 4) for t in times], "median": round(statistics.median(times), 4),
                                "steps": steps or draw_plan(settings.generation, mode).steps}
            # The alternative imgrag does not take (see imgrag.models.fast): the LoRA fused into the UNet's weights.
            generator.fast.apply("lcm-lora")
            generator.pipe.fuse_lora(adapter_names=["lcm-lora"])
            times = [timed(lambda: generator.generate(PROMPT, seed=1, fast="lcm-lora"))[0]
                     for _ in range(args.repeat + 1)][1:]
            generator.pipe.unfuse_lora()
            out["lcm-lora_fused"] = {"seconds": [round(t, 4) for t in times],
                                     "median": round(statistics.median(times), 4)}
        out["ratio_plain"] = round(out["off"]["median"] / out["lcm-lora"]["median"], 2)
        out["ratio_guided"] = round(out["off_guided"]["median"] / out["lcm-lora_guided"]["median"], 2)
        out["gpu_gib"] = gpu_gib()
        return out

    def switch() -> dict[str, Any]:
        fresh = build_manager(settings)  # a generator that has not loaded the LoRA yet
        out: dict[str, Any] = {}
        with fresh.use("generator") as generator:
            size_before = fresh.stats()["generator"]["size_gb"]
            out["first_lcm_lora_seconds"] = round(timed(lambda: generator.fast.apply("lcm-lora"))[0], 4)
            later = []
            for mode in ("off", "lcm-lora") * 3:
                later.append(timed(lambda mode=mode: generator.fast.apply(mode))[0])
            out["later_switch_seconds_max"] = round(max(later), 5)
        out["generator_size_gb"] = {"before": size_before, "with_lora": fresh.stats()["generator"]["size_gb"]}
        out["generator_loads"] = fresh.load_counts()["generator"]
        del fresh
        return out

    def rounds() -> dict[str, Any]:
        from agent.runner import Runner
        from imgrag.records.runs import RunRecord

        out = {}
        for mode, _ in MODES:
            settings.generation.fast = mode
            runner = Runner(settings, manager=manager, reference_store=ListStore(home / f"store-{mode}"))
            seconds, result = timed(lambda runner=runner: runner.run(PROMPT, seed=1, planner="fixed", max_rounds=2))
            trace = RunRecord(result["run_dir"]).read_steps()
            steps = [(s["tool"], s["seconds"]) for s in trace if "tool" in s and "seconds" in s]
            out[mode] = {"seconds": round(seconds, 2), "status": result["status"], "rounds": result["rounds"],
                         "steps": steps}
        settings.generation.fast = "off"
        out["model_loads"] = manager.load_counts()
        return out

    res.stage("draw", draw)
    res.stage("switch", switch)
    res.stage("rounds", rounds)
    res.doc["done"] = True
    res.save()
    return res.doc


def summary(doc: dict[str, Any]) -> str:
    """The figures as Markdown (what goes into BENCHMARKS.md)."""
    d, s, r = doc.get("draw") or {}, doc.get("switch") or {}, doc.get("rounds") or {}
    lines = [f"Machine: {machine_line(doc['machine'])}; commit {doc.get('commit')}; "
             f"1-minute load average {(doc.get('quiet') or {}).get('load_average_1m')} when timing started.", "",
             "| what | seconds |", "|---|---|"]
    if d:
        for key, title in (("off", "off, 30 steps, guidance 5"), ("lcm-lora", "lcm-lora, 4 steps, guidance 1"),
                           ("off_guided", "off, 30 steps, 2 references"),
                           ("lcm-lora_guided", "lcm-lora, 4 steps, 2 references")):
            lines.append(f"| drawing {d['size']}, {title} (median of {len(d[key]['seconds'])}) | {d[key]['median']} |")
        if "lcm-lora_fused" in d:
            lines.append(f"| same as lcm-lora plain, the LoRA fused into the UNet (not what imgrag does) | "
                         f"{d['lcm-lora_fused']['median']} |")
        lines.append(f"| **ratio 30-step / 4-step**: plain / guided | **{d['ratio_plain']} / {d['ratio_guided']}** |")
    if s:
        lines.append(f"| first switch to lcm-lora (loads the LoRA) / later switches (max) | "
                     f"{s['first_lcm_lora_seconds']} / {s['later_switch_seconds_max']} |")
    for mode in ("off", "lcm-lora"):
        if mode in r:
            steps = " → ".join(f"{t} {sec}" for t, sec in r[mode]["steps"])
            lines.append(f"| one run of 2 rounds, fixed policy, {mode} ({steps}) | {r[mode]['seconds']} |")
    if s or r:
        lines.append(f"| generator loads (switch stage / rounds stage) | {s.get('generator_loads')} / "
                     f"{(r.get('model_loads') or {}).get('generator')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--tiny", action="store_true", help="the tiny kit on this machine (CPU)")
    where.add_argument("--kit", type=Path, help="a kit built with `imgrag models build-tiny --scale full`")
    where.add_argument("--dry-run", action="store_true", help="the full-kit code path with small models on a CPU")
    parser.add_argument("--build", action="store_true", help="build the full kit into --kit first")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--wait-quiet", type=float, default=0, help="wait up to this many seconds for a quiet CPU")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    doc = run(args)
    print(summary(doc))
    print(f"[bench_fast] {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if args.json:
        print(f"[bench_fast] wrote {args.json}", file=sys.stderr)
    return doc


if __name__ == "__main__":
    main()

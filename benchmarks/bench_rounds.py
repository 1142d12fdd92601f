"""Several drawings per round and live previews: one batched call of N drawings against N single calls, and what
a preview every few steps costs a drawing.

    python benchmarks/bench_rounds.py --tiny [--repeat 5] [--wait-quiet 600] [--json OUT.json]    # CPU, tiny kit
    python benchmarks/bench_rounds.py --kit /tmp/imgrag-full-kit [--json OUT.json]                # GPU, full size

Everything goes through imgrag's own generator (``Generator.generate`` for one drawing, ``generate_batch`` for a
round of N, as the tools call them). Stages, each written to the JSON as it ends:

- ``batch``: for N = 1, 2, 3, 4: the median seconds of one ``generate_batch`` of N seeds against N ``generate``
  calls on the same seeds (after a warm-up of each), and their ratio;
- ``previews``: a drawing with a preview at every step, every 5 steps and none (the default is 5), medians;
  and the preview alone (latents to RGB, :func:`imgrag.models.previews.latents_to_rgb`, on a 1024x1024 drawing's
  ``[1, 4, 128, 128]`` latents and on the kit's own), so the cost can be set against a real SDXL step.

The tiny kit's models are random and tiny (64x64, a UNet of 32/64 channels): its pictures are noise, and its
seconds say how imgrag's plumbing scales, not how SDXL does; the full-size kit (random weights, real shapes) on a
GPU gives the real figures.
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
from bench_gpu import PROMPT, Results, make_settings, timed  # noqa: E402

BATCH_SIZES = (1, 2, 3, 4)


def _median(fn: Any, repeat: int) -> float:
    fn()  # warm-up
    return round(statistics.median(timed(fn)[0] for _ in range(repeat)), 4)


def batch_stage(generator: Any, repeat: int) -> dict[str, Any]:
    rows = []
    for n in BATCH_SIZES:
        seeds = list(range(10, 10 + n))
        batched = _median(lambda seeds=seeds: generator.generate_batch(PROMPT, seeds=seeds, preview_every=0), repeat)
        singles = _median(lambda seeds=seeds: [generator.generate(PROMPT, seed=s, preview_every=0) for s in seeds],
                          repeat)
        rows.append({"n": n, "batched_s": batched, "singles_s": singles,
                     "singles_over_batched": round(singles / batched, 3) if batched else None})
        print(f"[bench_rounds] n={n}: batched {batched:.3f} s, {n} single calls {singles:.3f} s", flush=True)
    return {"rows": rows}


def preview_stage(generator: Any, repeat: int) -> dict[str, Any]:
    import torch

    from imgrag.models.previews import latents_to_rgb, strip

    steps = generator.settings.generation.steps
    sink: list[Any] = []

    def draw(every: int) -> Any:
        return generator.generate(PROMPT, seed=3, preview_every=every, on_preview=lambda s, t, p: sink.append(p))

    none = _median(lambda: draw(0), repeat)
    sink.clear()
    every_step = _median(lambda: draw(1), repeat)
    per_draw_every = len(sink) // (repeat + 1)
    sink.clear()
    every_5 = _median(lambda: draw(5), repeat)
    g = generator.settings.generation
    own = torch.randn(1, 4, g.height // 8, g.width // 8)
    full = torch.randn(1, 4, 128, 128)
    batch3 = torch.randn(3, 4, 128, 128)
    alone = {"own_latents_ms": _median(lambda: strip(latents_to_rgb(own)), max(repeat, 20)) * 1000,
             "latents_1024_ms": _median(lambda: strip(latents_to_rgb(full)), max(repeat, 20)) * 1000,
             "latents_1024_batch3_ms": _median(lambda: strip(latents_to_rgb(batch3)), max(repeat, 20)) * 1000}
    result = {"steps": steps, "drawing_no_previews_s": none, "drawing_preview_every_step_s": every_step,
              "previews_per_drawing_every_step": per_draw_every, "drawing_preview_every_5_s": every_5,
              "overhead_every_step_pct": round(100 * (every_step - none) / none, 2),
              "overhead_every_5_pct": round(100 * (every_5 - none) / none, 2),
              **{k: round(v, 3) for k, v in alone.items()}}
    print(f"[bench_rounds] previews: {result}", flush=True)
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    from imgrag.models.generator import Generator

    home = Path(tempfile.mkdtemp(prefix="bench-rounds-"))
    quiet = wait_quiet(args.wait_quiet) if args.wait_quiet else None
    doc: dict[str, Any] = {"machine": machine(), "commit": git_commit(), "quiet": quiet,
                           "kind": "tiny" if args.tiny else "full", "repeat": args.repeat}
    res = Results(args.json, doc)
    if args.tiny:  # the tiny kit at its 64x64, at SDXL's usual 30 steps
        settings = tiny_settings(home, generation={"steps": 30, "guidance": 5.0})
    else:
        settings = make_settings(Path(args.kit), home, False)
    doc["size"] = f"{settings.generation.width}x{settings.generation.height}, {settings.generation.steps} steps"
    start = time.perf_counter()
    generator = Generator.from_pretrained(settings)
    doc["load_s"] = round(time.perf_counter() - start, 2)
    res.stage("batch", lambda: batch_stage(generator, args.repeat))
    res.stage("previews", lambda: preview_stage(generator, args.repeat))
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--tiny", action="store_true", help="the tiny kit on this machine (CPU)")
    which.add_argument("--kit", help="a full-size kit (imgrag models build-tiny --scale full DIR), on a GPU")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to this long for a quiet machine")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    doc = run(args)
    print(f"[bench_rounds] {machine_line(doc['machine'])}; commit {doc['commit']}", flush=True)


if __name__ == "__main__":
    main()

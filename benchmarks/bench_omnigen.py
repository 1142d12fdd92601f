"""The two repair backbones side by side: seconds per guided drawing by number of references, SDXL + IP-Adapter
against OmniGen in context, peak GPU memory, and one repair round on each.

    .venv/bin/python benchmarks/bench_omnigen.py --json benchmarks/results/omnigen-cpu.json     # tiny kit, CPU
    python benchmarks/bench_omnigen.py --kit /tmp/imgrag-full-kit --json gpu-omnigen.json      # full kit, GPU

On the tiny kit (default) this measures the plumbing only: random-weight models of a few MB at 64x64 and 2 steps,
so the seconds are the code's overhead (prompt building, the processor, the manager), not OmniGen's cost. With
``--kit`` (a kit built by ``imgrag models build-tiny --scale full``: shape-true random-weight SDXL, IP-Adapter,
Qwen2.5-VL-3B, CLIP and OmniGen-v1) it draws at 1024x1024 with the profiles' real steps (SDXL 30, OmniGen 50) on
the GPU; random weights do not change the compute per step, only what the pictures look like (noise).

Stages, each written to the JSON as it ends:
``drawing`` (per backbone, 0-3 references: median seconds of ``--repeats`` drawings after one warm-up, and the
peak GPU memory of those drawings), ``round`` (per backbone: a plain SDXL drawing, a judge call, a guided redraw
with 2 references, a judge call, all through one model manager with both backbones resident).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import git_commit, isolated_environ, machine, tiny_settings  # noqa: E402

PROMPT = "a red fox curled up on a wooden cradle"
CONCEPTS = ["a red fox", "a wooden cradle", "a knitted blanket"]
BACKBONES = ("ip-adapter", "omnigen")


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any]) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def _peak_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def full_kit_settings(kit: Path, home: Path) -> Any:
    """The gpu-80gb profile pointed at a full-size kit: 1024x1024, SDXL 30 steps, OmniGen 50, both resident."""
    from imgrag.settings import load_settings

    layer = {"output_dir": str(home / "runs"), "threads_db": str(home / "threads.sqlite"),
             "store": str(home / "store"),
             "models": {"generator": str(kit / "sdxl"), "ip_adapter": str(kit / "ip-adapter"),
                        "judge": str(kit / "qwen2.5-vl"), "llm": str(kit / "qwen2.5-instruct"),
                        "embedder": f"local-dir:{kit / 'open-clip'}", "omnigen": str(kit / "omnigen")}}
    return load_settings("gpu-80gb", environ=isolated_environ(home), overrides=layer)


def references(count: int, side: int) -> list[Any]:
    """``count`` distinct coloured pictures of ``side`` pixels (their content does not change the cost)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(count)]


def draw(manager: Any, settings: Any, backbone: str, refs: list[Any], seed: int) -> Any:
    """One drawing on ``backbone`` ("ip-adapter": SDXL, "omnigen": OmniGen, text-to-image without ``refs``), with
    ``refs`` standing for the first ``len(refs)`` concepts, one reference each."""
    if backbone == "ip-adapter":  # SDXL, plain or guided
        return manager.run("generator", lambda gen: gen.generate(
            PROMPT, seed=seed, references=refs or None, ip_scale=settings.generation.ip_scale))
    from imgrag.drawing.concept_refs import ConceptReferences, concept_prompt

    ids = [f"ref{n}" for n in range(len(refs))]
    planned = concept_prompt(PROMPT, [ConceptReferences(concept=c, reference_ids=[i])
                                      for c, i in zip(CONCEPTS, ids, strict=False)],
                             settings.omnigen.max_references)
    by_id = dict(zip(ids, refs, strict=True))
    return manager.run("omnigen", lambda omnigen: omnigen.generate(
        planned.text, seed=seed, input_images=[by_id[i] for i in planned.image_ids] or None))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from imgrag.management.engine import build_manager

    home = Path(tempfile.mkdtemp(prefix="imgrag-bench-omnigen-"))
    if args.kit:
        settings = full_kit_settings(args.kit, home)
    else:
        settings = tiny_settings(home, generation={"repair_with": "omnigen"})
    g, o = settings.generation, settings.omnigen
    doc: dict[str, Any] = {
        "machine": machine(), "commit": git_commit(), "kit": str(args.kit) if args.kit else "tiny",
        "size": f"{g.width}x{g.height}", "steps": {"sdxl": g.steps, "omnigen": o.steps},
        "repeats": args.repeats, "drawing": {}, "round": {},
    }

    def save() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(doc, indent=2) + "\n")

    manager = build_manager(settings)
    refs = references(3, args.ref_side or (1024 if args.kit else 64))
    for backbone in BACKBONES:
        doc["drawing"][backbone] = {}
        for count in range(0, 4):
            draw(manager, settings, backbone, refs[:count], seed=0)  # warm-up: loads, adapter, first kernels
            _reset_peak()
            seconds = [_timed(lambda n=n, c=count, b=backbone: draw(manager, settings, b, refs[:c], seed=n + 1))
                       for n in range(args.repeats)]
            doc["drawing"][backbone][str(count)] = {"median_s": round(statistics.median(seconds), 3),
                                                    "all_s": [round(s, 3) for s in seconds],
                                                    "peak_gib": _peak_gib()}
            print(f"{backbone:10} {count} refs: {statistics.median(seconds):.3f} s", flush=True)
            save()
    judge_seconds: list[float] = []

    def judge(image: Any) -> None:
        judge_seconds.append(_timed(lambda: manager.run("judge", lambda j: j.judge(image, PROMPT))))

    for backbone in BACKBONES:
        _reset_peak()
        judge_seconds.clear()
        start = time.perf_counter()
        first = draw(manager, settings, "ip-adapter", [], seed=11)
        judge(first)
        repaired = draw(manager, settings, backbone, refs[:2], seed=11)
        judge(repaired)
        _sync()
        doc["round"][backbone] = {"seconds": round(time.perf_counter() - start, 3),
                                  "judge_s": [round(s, 3) for s in judge_seconds], "peak_gib": _peak_gib()}
        print(f"round on {backbone}: {doc['round'][backbone]['seconds']} s", flush=True)
        save()
    doc["model_loads"] = manager.load_counts()
    save()
    return doc


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kit", type=Path, default=None, help="a full-size kit (default: the tiny kit, on CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed drawings per point, after one warm-up")
    parser.add_argument("--ref-side", type=int, default=None, help="reference pictures' side (default 1024; tiny 64)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()

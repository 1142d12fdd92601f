"""Reference steering on the tiny kit: what the concept memory saves a batch, and what the embedding cache saves
a guided drawing.

1. **Memory.** A batch of prompts that share concepts ("a wooden cradle" in four scenes, "a red kettle" in two),
   run with the fixed policy and a scripted judge whose rule is explicit: a plain drawing misses the prompt's
   concept, a guided one matches (the tiny judge's verdicts are junk; this measures the plumbing, not quality).
   Once with ``retrieval.memory`` off, once on (threshold -1: the tiny CLIP's similarities are random too).
   Per matched prompt: rounds, and model calls (generator, judge, embedder, image-encoder forward passes).
2. **Embedding cache.** Guided drawings of the same two references, 64x64, 2 steps: seconds per drawing with the
   cache off (every drawing encodes both) and on (warm: none does), medians; and the encoder's own seconds.

Everything else is the real code: the tiny kit's generator, embedder and store, the runner, the policy.

    .venv/bin/python benchmarks/bench_steering.py --json benchmarks/results/steering-cpu.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import git_commit, index_references, machine, tiny_settings  # noqa: E402

PROMPTS = [  # (prompt, the concept the scripted judge says is missing from a plain drawing)
    ("a wooden cradle in a sunny nursery", "a wooden cradle"),
    ("a red kettle on a gas stove", "a red kettle"),
    ("a wooden cradle on a porch at dusk", "a wooden cradle"),
    ("a cat asleep beside a wooden cradle", "a wooden cradle"),
    ("a red kettle in a garden", "a red kettle"),
    ("a wooden cradle under a window", "a wooden cradle"),
]


class ScriptedJudge:
    """Matches a picture the benchmark saw drawn guided; names the prompt's concept missing otherwise."""

    def __init__(self, guided: set[str], concepts: dict[str, str]) -> None:
        self.guided, self.concepts = guided, concepts

    def judge(self, image: Any, prompt: str, **_: Any) -> Any:
        from imgrag.models.judge import Verdict

        if _digest(image) in self.guided:
            return Verdict(True, [], "scripted: guided drawings match")
        return Verdict(False, [self.concepts[prompt]], "scripted: plain drawings miss the concept")


def _digest(image: Any) -> str:
    return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


class CountingManager:
    """The real model manager, counting calls per model, recording which drawings were guided, and answering
    the judge's calls with :class:`ScriptedJudge` (everything else delegates to the real manager)."""

    def __init__(self, inner: Any, concepts: dict[str, str]) -> None:
        self.inner = inner
        self.calls: dict[str, int] = {}
        self.guided: set[str] = set()
        self.judge = ScriptedJudge(self.guided, concepts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def run(self, name: str, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.calls[name] = self.calls.get(name, 0) + 1
        if name == "judge":
            return fn(self.judge, *args, **kwargs)
        if name != "generator":
            return self.inner.run(name, fn, *args, **kwargs)

        def drawing(generator: Any, *a: Any, **k: Any) -> Any:
            generator.last_guidance = {}
            out = fn(generator, *a, **k)
            picture = out[0] if isinstance(out, tuple) else out
            if generator.last_guidance.get("references"):
                self.guided.add(_digest(picture))
            return out

        return self.inner.run(name, drawing, *args, **kwargs)


def memory_arm(home: Path, memory: bool) -> dict[str, Any]:
    """One batch of PROMPTS through the real runner; per prompt rounds, tools and model calls."""
    from agent.runner import Runner
    from imgrag.management.engine import build_manager

    settings = tiny_settings(home, retrieval={"memory": memory, "memory_min_score": -1.0},
                             generation={"embed_cache": True})
    index_references(settings, home / "refs")
    manager = CountingManager(build_manager(settings), dict(PROMPTS))
    runner = Runner(settings, manager=manager)
    items = []
    for n, (prompt, _) in enumerate(PROMPTS):
        before = dict(manager.calls)
        result = runner.run(prompt, planner="fixed", max_rounds=3, seed=n, run_id=f"m{int(memory)}-{n}")
        calls = {k: v - before.get(k, 0) for k, v in manager.calls.items() if v - before.get(k, 0)}
        items.append({"prompt": prompt, "status": result["status"], "rounds": result["rounds"],
                      "tools": [s["tool"] for s in result["steps"]], "model_calls": calls,
                      "image_encoder": result["image_encoder"],
                      "guided_by": [c.get("guided_by") for c in result["candidates"]]})
    matched = [i for i in items if i["status"] == "matched"]
    repeated = [i for i in matched if any(p == i["prompt"] for p, _ in PROMPTS[2:])]

    def mean(values: list[float]) -> float | None:
        return round(statistics.mean(values), 2) if values else None

    return {"memory": memory, "items": items, "matched": len(matched),
            "rounds_per_matched": mean([i["rounds"] for i in matched]),
            "rounds_per_matched_repeated_concept": mean([i["rounds"] for i in repeated]),
            "model_calls_per_matched": mean([sum(v for k, v in i["model_calls"].items()) for i in matched]),
            "calls_by_model_per_matched": {k: mean([i["model_calls"].get(k, 0) for i in matched])
                                           for k in ("generator", "judge", "embedder")},
            "image_encoder_calls_per_matched": mean([i["image_encoder"]["calls"] for i in matched])}


def cache_arm(home: Path, repeats: int) -> dict[str, Any]:
    """Seconds per guided drawing (2 references) with the embedding cache off and warm."""
    import torch
    from PIL import Image

    from imgrag.models.embed_cache import EmbeddingCache
    from imgrag.models.generator import Generator

    torch.set_num_threads(1)
    settings = tiny_settings(home)
    generator = Generator.from_pretrained(settings, device="cpu")
    refs = [Image.new("RGB", (96, 96), (200, 30, 30)), Image.new("RGB", (96, 96), (30, 30, 200))]
    keys = [hashlib.sha256(r.tobytes()).hexdigest() for r in refs]
    generator.generate("warm up", seed=0, references=refs, reference_keys=keys)

    def timed(cache: Any) -> tuple[float, int]:
        generator.embed_cache = cache
        seconds, calls = [], generator.encoder_calls
        for i in range(repeats):
            start = time.perf_counter()
            generator.generate("a cradle", seed=i, references=refs, reference_keys=keys)
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds), generator.encoder_calls - calls

    off, off_calls = timed(None)
    cache = EmbeddingCache(home / "ip_embeds")
    generator.embed_cache = cache
    generator.generate("fill", seed=0, references=refs, reference_keys=keys)
    on, on_calls = timed(cache)
    start = time.perf_counter()
    for _ in range(repeats):
        with torch.no_grad():
            for r in refs:
                generator.pipe.encode_image(r, generator.pipe.device, 1, False)
    encoder = (time.perf_counter() - start) / repeats
    return {"repeats": repeats, "seconds_per_drawing_cache_off": round(off, 4),
            "seconds_per_drawing_cache_warm": round(on, 4), "encoder_calls_cache_off": off_calls,
            "encoder_calls_cache_warm": on_calls, "encoder_seconds_per_drawing": round(encoder, 4)}


def full_encoder_arm(device: str, repeats: int) -> dict[str, Any]:
    """Seconds one reference costs the real-size ViT-H/14 image encoder (random weights of the published
    architecture, imgrag.kits.full_scale; fp16 on CUDA): what a cached reference saves per guided drawing."""
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from imgrag.kits.full_configs import IP_IMAGE_ENCODER

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**IP_IMAGE_ENCODER)).to(device, dtype).eval()
    pixels = CLIPImageProcessor()(Image.new("RGB", (512, 512), (120, 80, 40)), return_tensors="pt").pixel_values
    pixels = pixels.to(device, dtype)
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            encoder(pixels)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= 2:  # the first two are warm-up (kernels, allocator)
                times.append(time.perf_counter() - start)
    return {"device": device, "dtype": str(dtype), "parameters": sum(p.numel() for p in encoder.parameters()),
            "seconds_per_reference": round(statistics.median(times), 4), "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here as well")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--full-encoder", metavar="DEVICE", help="also time the full-size ViT-H encoder on DEVICE "
                        "(cuda: the GPU figure of BENCHMARKS.md)")
    parser.add_argument("--only-full-encoder", action="store_true", help="skip the tiny-kit parts")
    args = parser.parse_args()
    if args.only_full_encoder:
        doc = {"machine": machine(), "commit": git_commit(),
               "full_encoder": full_encoder_arm(args.full_encoder or "cuda", args.repeats)}
        print(json.dumps(doc, indent=2))
        if args.json:
            args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        doc = {"machine": machine(), "commit": git_commit(),
               "note": "tiny profile: noise pictures, scripted verdicts; plumbing only, never quality",
               "without_memory": memory_arm(root / "off", memory=False),
               "with_memory": memory_arm(root / "on", memory=True),
               "embedding_cache": cache_arm(root / "cache", args.repeats)}
        if args.full_encoder:
            doc["full_encoder"] = full_encoder_arm(args.full_encoder, args.repeats)
    text = json.dumps(doc, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

"""Full-size models on a GPU: seconds per 1024x1024 generation, per judge call, per model swap under a
24 GB budget against all models resident, and for one full round.

    python -m agent.cli models build-tiny --scale full /tmp/kit     # or let --build do it
    python benchmarks/bench_gpu.py --kit /tmp/kit [--build] [--json OUT.json] [--budget-gb 24]
    python benchmarks/bench_gpu.py --dry-run                        # the same code, small models, CPU

The models are the kit's shape-true random-weight copies of SDXL base (+ IP-Adapter ViT-H),
Qwen2.5-VL-3B, Qwen2.5-7B and CLIP ViT-B-32 (:mod:`imgrag.full_scale`), loaded through imgrag's own
engine (:func:`imgrag.engine.build_manager`) and driven through its own wrappers and runner, so the
figures are the cost of imgrag's code on real-sized models. What random weights change: the pictures
are noise; the judge and the LLM never stop early, so every call generates its full ``max_new_tokens``
(the figures are per call AND per token); the kit's small tokenizers split text into more tokens than
Qwen's real one, which inflates prompt (prefill) lengths, not the per-token decode cost.

Stages, each timed and written to the JSON as soon as it ends (a run cut short keeps what it measured):
load every model; plain and guided generation; judge calls; one LLM call; one full round (generate,
critique, retrieve, regenerate, critique) with the fixed policy, and with the agent LLM planning; the
same sequence of model uses with everything resident and under ``--budget-gb`` (models swapped to CPU).
Retrieval uses an in-memory list of reference pictures ranked with the store's own maths
(:func:`imgrag.store.rank_references`); Chroma itself is measured on CPU in BENCHMARKS.md's store section.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import git_commit, isolated_environ, machine, machine_line  # noqa: E402  (sets the offline env)

from imgrag.runs import RunRecord, write_json_atomic  # noqa: E402

PROMPT = "a golden retriever puppy sleeping in a wooden cradle beside a red toy rocket"


class Results:
    """The benchmark's document, rewritten after every stage."""

    def __init__(self, path: Path | None, doc: dict[str, Any]) -> None:
        self.path = path
        self.doc = doc
        self.start = time.perf_counter()

    def stage(self, name: str, fn: Callable[[], Any], deadline: float | None = None) -> Any:
        """Run one stage; record its result or its error; never let one stage stop the others."""
        if deadline is not None and time.perf_counter() - self.start > deadline:
            self.doc.setdefault("skipped", []).append(name)
            print(f"[bench_gpu] skip {name}: past the deadline", flush=True)
            return None
        print(f"[bench_gpu] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            value = fn()
            self.doc[name] = value
        except Exception as exc:  # keep going: a later stage may still work
            value = None
            self.doc.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        self.doc.setdefault("stage_seconds", {})[name] = round(time.perf_counter() - t0, 2)
        self.doc["elapsed"] = round(time.perf_counter() - self.start, 2)
        self.save()
        print(f"[bench_gpu] {name}: {json.dumps(self.doc.get(name), default=str)[:600]}", flush=True)
        return value

    def save(self) -> None:
        if self.path:
            write_json_atomic(self.path, self.doc)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    _sync()
    t0 = time.perf_counter()
    value = fn()
    _sync()
    return time.perf_counter() - t0, value


def gpu_gib() -> dict[str, float] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return {"allocated": round(torch.cuda.memory_allocated() / 2**30, 2),
            "peak": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def make_settings(kit: Path, home: Path, dry_run: bool, **overrides: Any) -> Any:
    """The default profile pointed at the kit: real sizes (1024x1024, 30 steps, the judge's real pixel
    bounds and token limits) unless ``dry_run``."""
    from imgrag.settings import load_settings

    layer: dict[str, Any] = {
        "output_dir": str(home / "runs"), "threads_db": str(home / "threads.sqlite"), "store": str(home / "store"),
        "models": {"generator": str(kit / "sdxl"), "ip_adapter": str(kit / "ip-adapter"),
                   "judge": str(kit / "qwen2.5-vl"), "llm": str(kit / "qwen2.5-instruct"),
                   "embedder": f"local-dir:{kit / 'open-clip'}"},
    }
    if dry_run:
        layer.update(device="cpu", generation={"width": 64, "height": 64, "steps": 2},
                     judge={"min_pixels": 4 * 28 * 28, "max_pixels": 16 * 28 * 28, "max_new_tokens": 8},
                     llm={"max_new_tokens": 8})
    for key, value in overrides.items():
        if isinstance(value, dict):
            layer.setdefault(key, {}).update(value)
        else:
            layer[key] = value
    return load_settings("default", environ=isolated_environ(home), overrides=layer)


class ListStore:
    """A reference store in memory: a few pictures, ranked with the real store's maths."""

    def __init__(self, folder: Path, count: int = 6, size: int = 512) -> None:
        import numpy as np
        from PIL import Image

        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        self.items = []
        for i in range(count):
            path = folder / f"ref{i}.png"
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
            self.items.append((f"ref{i}", str(path), f"a reference photo {i}"))
        self._vectors = None

    def count(self) -> int:
        return len(self.items)

    def retrieve(self, embedder: Any, queries: list[str], k: int = 2, avoid: Any = None,
                 rerank_lambda: float = 0.3, min_score: float = -1.0, **_: Any) -> list[Any]:
        from PIL import Image

        from imgrag.store import Reference, rank_references

        if self._vectors is None:
            self._vectors = embedder.embed_images([Image.open(p).convert("RGB") for _, p, _ in self.items])
        sims = embedder.embed_texts(queries) @ self._vectors.T
        avoid_sims = (embedder.embed_images([avoid]) @ self._vectors.T)[0] if avoid is not None else None
        picks = rank_references(sims, avoid_sims, k, rerank_lambda, min_score)
        return [Reference(self.items[p.ref][0], self.items[p.ref][1], p.score, self.items[p.ref][2],
                          queries[p.query], p.similarity) for p in picks]


def count_new_tokens(model: Any, sink: list[int]) -> Callable[[], None]:
    """Wrap ``model.generate`` to record how many tokens each call produced; returns the undo."""
    original = model.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        prompt = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        sink.append(int(out.shape[1] - prompt.shape[1]))
        return out

    model.generate = generate
    return lambda: setattr(model, "generate", original)


def decode_focus(manager: Any, reference: Any, settings: Any) -> dict[str, Any]:
    """Where a token-generation call's time goes: the same judge and LLM calls in the main thread and in
    a worker thread (LangGraph runs tools in one), back to back and right after a drawing."""
    from concurrent.futures import ThreadPoolExecutor

    from langchain_core.messages import HumanMessage

    image = reference.resize((settings.generation.width, settings.generation.height))
    pool = ThreadPoolExecutor(max_workers=1)
    out: dict[str, Any] = {}

    def judge_once() -> float:
        with manager.use("judge") as judge:
            return timed(lambda: judge.judge(image, PROMPT))[0]

    def llm_once(tokens: int) -> float:
        with manager.use("llm") as llm:
            llm.max_new_tokens = tokens
            return timed(lambda: llm.invoke([HumanMessage(PROMPT)]))[0]

    def draw() -> float:
        with manager.use("generator") as generator:
            return timed(lambda: generator.generate(PROMPT, seed=5))[0]

    out["draw_warm"] = round(draw(), 2)
    out["judge_main_x3"] = [round(judge_once(), 2) for _ in range(3)]
    out["judge_thread_x2"] = [round(pool.submit(judge_once).result(), 2) for _ in range(2)]
    out["draw_then_judge_main"] = [round(draw(), 2), round(judge_once(), 2), round(judge_once(), 2)]
    out["draw_then_judge_thread"] = [round(draw(), 2), round(pool.submit(judge_once).result(), 2)]
    out["llm128_main_x3"] = [round(llm_once(128), 2) for _ in range(3)]
    out["llm128_thread_x2"] = [round(pool.submit(llm_once, 128).result(), 2) for _ in range(2)]
    out["judge_after_llm_main"] = round(judge_once(), 2)
    pool.shutdown()
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    home = Path(tempfile.mkdtemp(prefix="imgrag-bench-gpu-"))
    kit = args.kit or home / "kit"
    doc: dict[str, Any] = {"benchmark": "gpu", "machine": machine(), "commit": git_commit(),
                           "dry_run": args.dry_run, "kit": str(kit), "budget_gb": args.budget_gb}
    if torch.cuda.is_available():
        doc["gpu_total_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    res = Results(args.json, doc)
    deadline = args.deadline

    if args.build or args.dry_run:
        def build() -> dict[str, Any]:
            from imgrag.full_scale import FULL, build_full_kit, smoke_configs

            seconds, _ = timed(lambda: build_full_kit(kit, configs=smoke_configs() if args.dry_run else FULL,
                                                      device="cpu" if args.dry_run else None, force=True,
                                                      progress=lambda m: print(f"  built {m}", flush=True)))
            marker = json.loads((kit / "kit.json").read_text())
            size = sum(f.stat().st_size for f in kit.rglob("*") if f.is_file() and ".tiny-source" not in f.parts)
            return {"seconds": round(seconds, 1), "parameters": marker["parameters"],
                    "disk_gib": round(size / 2**30, 2)}

        res.stage("build", build)
    else:
        res.doc["build"] = {"parameters": json.loads((kit / "kit.json").read_text()).get("parameters")}

    from agent.runner import Runner
    from imgrag.engine import build_manager

    settings = make_settings(kit, home, args.dry_run)
    manager = build_manager(settings)
    steps = settings.generation.steps

    def load_each() -> dict[str, Any]:
        out = {}
        for name in ("generator", "judge", "llm", "embedder"):
            t0 = time.perf_counter()
            with manager.use(name):
                pass
            _sync()
            out[name] = round(time.perf_counter() - t0, 2)
        with manager.use("generator") as generator:
            seconds, _ = timed(generator.load_ip_adapter)
        out["ip_adapter"] = round(seconds, 2)
        return {"load_seconds": out, "stats": manager.stats(), "gpu_gib": gpu_gib()}

    res.stage("load", load_each)
    from PIL import Image

    references = [Image.open(p).convert("RGB") for _, p, _ in ListStore(home / "refs", count=2).items]

    def generation() -> dict[str, Any]:
        with manager.use("generator") as generator:
            timed(lambda: generator.generate(PROMPT, seed=0, steps=2))  # warm-up: kernels, allocator
            plain = [timed(lambda i=i: generator.generate(PROMPT, seed=i))[0] for i in range(args.repeat)]
            timed(lambda: generator.generate(PROMPT, seed=0, steps=2, references=references, ip_scale=0.5))
            guided = [timed(lambda i=i: generator.generate(PROMPT, seed=i, references=references, ip_scale=0.5))[0]
                      for i in range(args.repeat)]
        return {"size": f"{settings.generation.width}x{settings.generation.height}", "steps": steps,
                "plain_seconds": [round(s, 3) for s in plain], "plain_median": round(statistics.median(plain), 3),
                "guided_seconds": [round(s, 3) for s in guided], "guided_median": round(statistics.median(guided), 3),
                "per_step_ms": round(1000 * statistics.median(plain) / steps, 1), "gpu_gib": gpu_gib()}

    if not args.focus:
        res.stage("generation", generation)
    else:
        res.stage("decode_focus", lambda: decode_focus(manager, references[0], settings))
        res.doc["done"] = True
        res.save()
        return res.doc

    def judge_calls() -> dict[str, Any]:
        image = references[0].resize((settings.generation.width, settings.generation.height))
        tokens: list[int] = []
        with manager.use("judge") as judge:
            undo = count_new_tokens(judge.model, tokens)
            try:
                timed(lambda: judge.judge(image, PROMPT))  # warm-up
                calls = [timed(lambda: judge.judge(image, PROMPT))[0] for _ in range(args.repeat)]
            finally:
                undo()
        median = statistics.median(calls)
        new = statistics.median(tokens[1:]) if len(tokens) > 1 else None
        return {"seconds": [round(s, 3) for s in calls], "median": round(median, 3), "new_tokens": tokens,
                "max_new_tokens": settings.judge.max_new_tokens,
                "ms_per_new_token": round(1000 * median / new, 1) if new else None,
                "max_pixels": settings.judge.max_pixels, "gpu_gib": gpu_gib()}

    res.stage("judge", judge_calls)

    def llm_call() -> dict[str, Any]:
        from langchain_core.messages import HumanMessage, SystemMessage

        import prompts as prompt_files

        system = SystemMessage(prompt_files.render("agent_system", prompt=PROMPT, max_rounds="3", status="none yet"))
        with manager.use("llm") as llm:
            full = llm.max_new_tokens
            llm.max_new_tokens = 4
            llm.invoke([system, HumanMessage(PROMPT)])  # warm-up (kernels, allocator), short
            llm.max_new_tokens = full
            seconds, reply = timed(lambda: llm.invoke([system, HumanMessage(PROMPT)]))
        usage = reply.usage_metadata or {}
        out_tokens = usage.get("output_tokens") or 0
        return {"seconds": round(seconds, 3), "input_tokens": usage.get("input_tokens"), "output_tokens": out_tokens,
                "ms_per_new_token": round(1000 * seconds / out_tokens, 1) if out_tokens else None,
                "gpu_gib": gpu_gib()}

    res.stage("llm", llm_call, deadline)

    def one_round(planner: str, mgr: Any, llm_tokens: int | None = None) -> dict[str, Any]:
        runner = Runner(settings, manager=mgr, reference_store=ListStore(home / f"store-{planner}"))
        if llm_tokens is not None:
            with mgr.use("llm") as llm:
                llm.max_new_tokens = llm_tokens
        seconds, result = timed(lambda: runner.run(PROMPT, seed=1, planner=planner, max_rounds=2))
        trace = RunRecord(result["run_dir"]).read_steps()
        llm_steps = [s["seconds"] for s in trace if s.get("planner") == "llm"]
        return {"planner": planner, "seconds": round(seconds, 2), "status": result["status"],
                "rounds": result["rounds"],
                "steps": [(s["tool"], s["seconds"], s["ok"]) for s in result["steps"]],
                "tool_seconds": round(sum(s["seconds"] for s in result["steps"]), 2),
                "llm_calls": len(llm_steps), "llm_seconds": round(sum(llm_steps), 2),
                "llm_max_new_tokens": llm_tokens, "model_stats": mgr.stats(), "gpu_gib": gpu_gib()}

    res.stage("round_fixed", lambda: one_round("fixed", manager))
    res.stage("round_agent", lambda: one_round("agent", manager, llm_tokens=args.agent_tokens), deadline)

    sequence = ["llm", "generator", "judge", "embedder", "llm", "generator", "judge", "llm", "generator", "embedder"]

    def use_sequence(mgr: Any) -> list[dict[str, Any]]:
        """How long each use() takes to hand over its model, along a round's order of model uses."""
        out = []
        for name in sequence:
            before = {k: v["evictions"] for k, v in mgr.stats().items()}
            _sync()
            t0 = time.perf_counter()
            with mgr.use(name):
                _sync()
                seconds = time.perf_counter() - t0
            evicted = [k for k, v in mgr.stats().items() if v["evictions"] > before.get(k, 0)]
            out.append({"model": name, "seconds": round(seconds, 3), "evicted": evicted})
        return out

    def resident_sequence() -> dict[str, Any]:
        steps_ = use_sequence(manager)
        return {"uses": steps_, "total_seconds": round(sum(s["seconds"] for s in steps_), 3), "gpu_gib": gpu_gib()}

    res.stage("swap_resident", resident_sequence)

    def budget_sequence() -> dict[str, Any]:
        nonlocal manager
        sizes = {k: v["size_gb"] for k, v in manager.stats().items()}
        budget = args.budget_gb if not args.dry_run else round(0.6 * sum(v or 0 for v in sizes.values()), 6)
        del manager  # free the resident models first: the budget run starts from an empty card
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        small = build_manager(make_settings(kit, home, args.dry_run, gpu_memory_gb=budget, offload="cpu"))
        for name in ("generator", "judge", "llm", "embedder"):  # load once (not part of a swap's cost)
            with small.use(name) as model:
                if name == "generator":
                    model.load_ip_adapter()
        steps_ = use_sequence(small)
        swaps = [s for s in steps_ if s["evicted"]]
        result = {"budget_gb": budget, "model_sizes_gb": sizes, "uses": steps_,
                  "total_seconds": round(sum(s["seconds"] for s in steps_), 3), "swaps": len(swaps),
                  "seconds_per_swap": round(statistics.mean(s["seconds"] for s in swaps), 3) if swaps else None,
                  "stats": small.stats(), "gpu_gib": gpu_gib()}
        del small
        return result

    res.stage("swap_budget", budget_sequence)
    res.doc["done"] = True
    res.save()
    return res.doc


def summary(doc: dict[str, Any]) -> str:
    """The figures as Markdown (what goes into BENCHMARKS.md)."""

    g, j, llm = doc.get("generation") or {}, doc.get("judge") or {}, doc.get("llm") or {}
    lines = [f"Machine: {machine_line(doc['machine'])}; commit {doc.get('commit')}.", "",
             "| what | seconds |", "|---|---|"]
    if g:
        lines.append(f"| generation {g['size']}, {g['steps']} steps (median of {len(g['plain_seconds'])}) | "
                     f"{g['plain_median']:.2f} ({g['per_step_ms']} ms/step) |")
        lines.append(f"| same, guided by 2 references (IP-Adapter) | {g['guided_median']:.2f} |")
    if j:
        lines.append(f"| judge call ({j['max_pixels']} max pixels, {j['new_tokens'][-1]} new tokens) | "
                     f"{j['median']:.2f} ({j['ms_per_new_token']} ms/token) |")
    if llm:
        lines.append(f"| agent LLM call ({llm['input_tokens']} prompt tokens, {llm['output_tokens']} new) | "
                     f"{llm['seconds']:.2f} ({llm['ms_per_new_token']} ms/token) |")
    rounds = (("round_fixed", "one full round, fixed policy"), ("round_agent", "one full round, LLM planning"))
    for key, title in rounds:
        r = doc.get(key)
        if r:
            extra = f"; {r['llm_calls']} LLM calls, {r['llm_seconds']} s" if r["llm_calls"] else ""
            lines.append(f"| {title} ({' → '.join(s[0] for s in r['steps'])}{extra}) | {r['seconds']:.2f} |")
    sr, sb = doc.get("swap_resident"), doc.get("swap_budget")
    if sr:
        lines.append(f"| {len(sr['uses'])} model hand-overs, all resident | {sr['total_seconds']:.3f} |")
    if sb:
        lines.append(f"| same under a {sb['budget_gb']} GB budget ({sb['swaps']} swaps) | {sb['total_seconds']:.2f} "
                     f"({sb['seconds_per_swap']} per swap) |")
    load = (doc.get("load") or {}).get("load_seconds")
    if load:
        lines.append(f"| first load from disk: {', '.join(f'{k} {v}' for k, v in load.items())} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kit", type=Path, default=None, help="a kit built with --scale full")
    parser.add_argument("--build", action="store_true", help="build the full kit into --kit first")
    parser.add_argument("--dry-run", action="store_true", help="small models on the CPU: checks the code only")
    parser.add_argument("--budget-gb", type=float, default=24.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--agent-tokens", type=int, default=64, help="max_new_tokens of the LLM in the agent round")
    parser.add_argument("--deadline", type=float, default=None, help="skip optional stages after this many seconds")
    parser.add_argument("--focus", action="store_true", help="after loading and generation, only time judge and "
                        "LLM calls in the main thread and in a worker thread (where a tool runs)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.dry_run:
        args.repeat = min(args.repeat, 2)
    doc = run(args)
    print(summary(doc))
    return doc


if __name__ == "__main__":
    main()

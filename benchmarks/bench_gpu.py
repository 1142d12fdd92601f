"""The GPU path, before and after the model thread (one long-lived worker per device), side by side: a round
against its pure model compute, the judge and generation alone and inside a run, swap seconds, and peak GPU
memory under 24 and 80 GB budgets.

    bash benchmarks/run_gpu.sh                                       # on a lent GPU: kit, then both passes
    python benchmarks/bench_gpu.py --kit /tmp/kit --json after.json                    # this tree's code
    python benchmarks/bench_gpu.py --kit /tmp/kit --code .before --json before.json    # another tree's code
    python benchmarks/bench_gpu.py --compare before.json after.json                    # the Markdown table
    python benchmarks/bench_gpu.py --dry-run [--code DIR]           # the same code, small models, CPU

``--code DIR`` imports imgrag, agent, tools and prompts from DIR (``git archive 5934158 imgrag agent tools
prompts | tar -x -C .before`` gives the code before the model thread), so one script measures both. Model calls go
through ``manager.run`` (the model thread) where the code has it, else ``with manager.use()`` in the calling
thread, as each version's tools do.

The models are the kit's shape-true random-weight copies of SDXL base (+ IP-Adapter ViT-H),
Qwen2.5-VL-3B, Qwen2.5-7B and CLIP ViT-B-32 (:mod:`imgrag.kits.full_scale`), loaded through imgrag's own
engine (:func:`imgrag.management.engine.build_manager`) and driven through its own wrappers and runner. What random
weights change: the pictures are noise; the judge never closes a JSON verdict, so every call generates its
full ``judge.max_new_tokens`` (256 before, 128 after) and the stopping criteria never fire; the kit's small
tokenizers split text into more tokens than Qwen's real one (longer prompts, same decode cost per token).

Stages, each timed and written to the JSON as soon as it ends (a run cut short keeps what it measured):
``load`` (all four models and the adapter, a manager with an 80 GB budget), ``alone`` (each model call of a
round on its own: plain and guided generation, the judge, retrieval, the CLIP score), ``round`` (fixed-policy
rounds: generate, critique, retrieve, regenerate, critique; their ratio to the sum of the calls alone; peak
memory under the 80 GB budget), ``budget`` (a fresh manager under ``--budget-gb``: the same round, then a
round's order of model hand-overs ``--passes`` times, swaps timed; peak memory).
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


def _code_dir(argv: list[str]) -> Path:
    """``--code DIR``, read before anything of imgrag is imported: it decides which imgrag that is."""
    for i, arg in enumerate(argv):
        if arg == "--code" and i + 1 < len(argv):
            return Path(argv[i + 1]).resolve()
        if arg.startswith("--code="):
            return Path(arg.split("=", 1)[1]).resolve()
    return Path(__file__).resolve().parent.parent


sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(_code_dir(sys.argv[1:])))

from _common import git_commit, isolated_environ, machine, machine_line  # noqa: E402  (sets the offline env)

from imgrag.records.runs import RunRecord  # noqa: E402

try:  # --code may name a tree from before imgrag.atomic_files, when imgrag.records.runs held the atomic writer
    from imgrag.atomic_files import write_json_atomic
except ImportError:
    from imgrag.records.runs import write_json_atomic  # type: ignore[attr-defined,no-redef]

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


def call(manager: Any, name: str, fn: Callable[[Any], Any]) -> Any:
    """``fn(model)`` as the code under test runs model calls: on its model thread (``manager.run``, since the
    model thread) or inside ``use()`` in this thread (before)."""
    if hasattr(manager, "run"):
        return manager.run(name, fn)
    with manager.use(name) as model:
        return fn(model)


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    home = Path(tempfile.mkdtemp(prefix="imgrag-bench-gpu-"))
    kit = args.kit or home / "kit"
    code = Path(args.code).resolve() if args.code else Path(__file__).resolve().parent.parent
    doc: dict[str, Any] = {"benchmark": "gpu-path", "machine": machine(), "commit": git_commit(),
                           "code": str(code), "label": args.label, "dry_run": args.dry_run, "kit": str(kit),
                           "budgets_gb": [args.big_budget_gb, args.budget_gb], "torch": torch.__version__}
    if torch.cuda.is_available():
        doc["gpu_total_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    res = Results(args.json, doc)

    if args.build or (args.dry_run and not (kit / "kit.json").exists()):
        def build() -> dict[str, Any]:
            from imgrag.kits.full_configs import FULL, smoke_configs
            from imgrag.kits.full_scale import build_full_kit

            seconds, _ = timed(lambda: build_full_kit(kit, configs=smoke_configs() if args.dry_run else FULL,
                                                      device="cpu" if args.dry_run else None, force=True,
                                                      progress=lambda m: print(f"  built {m}", flush=True)))
            parameters = json.loads((kit / "kit.json").read_text())["parameters"]
            return {"seconds": round(seconds, 1), "parameters": parameters}

        res.stage("build", build)

    from agent.runner import Runner
    from imgrag.management.engine import build_manager

    def settings_for(budget: float) -> Any:
        return make_settings(kit, home, args.dry_run, gpu_memory_gb=budget, offload="cpu")

    sizes: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    big = args.big_budget_gb if not args.dry_run else 0.0
    manager = build_manager(settings_for(big))
    settings = manager.settings
    doc["judge_max_new_tokens"] = settings.judge.max_new_tokens

    def load_all(mgr: Any) -> dict[str, Any]:
        out = {}
        for name in ("generator", "judge", "llm", "embedder"):
            seconds, _ = timed(lambda name=name: call(mgr, name, lambda model: None))
            out[name] = round(seconds, 2)
        seconds, _ = timed(lambda: call(mgr, "generator", lambda generator: generator.load_ip_adapter()))
        out["ip_adapter"] = round(seconds, 2)
        return out

    def load() -> dict[str, Any]:
        reset_peak()
        seconds = load_all(manager)
        sizes.update({k: v["size_gb"] for k, v in manager.stats().items()})
        stats.update(manager.stats())
        return {"load_seconds": seconds, "stats": manager.stats(), "gpu_gib": gpu_gib()}

    res.stage("load", load)
    from PIL import Image

    store = ListStore(home / "refs", count=4)
    references = [Image.open(p).convert("RGB") for _, p, _ in store.items[:2]]
    picture = references[0].resize((settings.generation.width, settings.generation.height))
    queries = ["a wooden cradle", "a red toy rocket"]

    def alone() -> dict[str, Any]:
        """Each model call of a round on its own, from this thread, the way the tools make it."""
        def draw(refs: list[Any] | None, seed: int) -> float:
            return timed(lambda: call(manager, "generator", lambda g: g.generate(
                PROMPT, seed=seed, references=refs, ip_scale=0.5 if refs else None)))[0]

        call(manager, "generator", lambda g: g.generate(PROMPT, seed=0, steps=2, references=references))  # warm-up
        plain = [draw(None, i) for i in range(args.repeat)]
        guided = [draw(references, i) for i in range(args.repeat)]
        tokens: list[int] = []

        def judge_once() -> float:
            def ask(judge: Any) -> Any:
                undo = count_new_tokens(judge.model, tokens)
                try:
                    return judge.judge(picture, PROMPT)
                finally:
                    undo()
            return timed(lambda: call(manager, "judge", ask))[0]

        judge_once()  # warm-up
        judge = [judge_once() for _ in range(args.repeat)]
        retrieve = [timed(lambda: call(manager, "embedder", lambda e: store.retrieve(e, queries, avoid=picture)))[0]
                    for _ in range(args.repeat)]
        clip = [timed(lambda: call(manager, "embedder", lambda e: float(
            (e.embed_images([picture]) @ e.embed_texts([PROMPT]).T)[0, 0])))[0] for _ in range(args.repeat)]
        out = {"size": f"{settings.generation.width}x{settings.generation.height}",
               "steps": settings.generation.steps, "generate": _median(plain), "regenerate": _median(guided),
               "critique": _median(judge), "retrieve": _median(retrieve), "clip_score": _median(clip),
               "judge_new_tokens": tokens[1:], "raw": {"generate": plain, "regenerate": guided, "critique": judge,
                                                     "retrieve": retrieve, "clip_score": clip}}
        # A fixed round: generate, critique, retrieve, regenerate, critique; each drawing also scores with CLIP.
        out["round_compute"] = round(out["generate"] + out["regenerate"] + 2 * out["critique"] + out["retrieve"]
                                     + 2 * out["clip_score"], 3)
        out["gpu_gib"] = gpu_gib()
        return out

    compute = res.stage("alone", alone) or {}

    def rounds(mgr: Any, label: str) -> dict[str, Any]:
        reset_peak()
        out = []
        for i in range(args.rounds):
            runner = Runner(mgr.settings, manager=mgr, reference_store=ListStore(home / f"store-{label}-{i}"))
            seconds, result = timed(lambda runner=runner, i=i: runner.run(PROMPT, seed=10 + i, planner="fixed",
                                                                          max_rounds=2))
            trace = RunRecord(result["run_dir"]).read_steps()
            steps = [(s["tool"], s["seconds"]) for s in result["steps"]]
            tokens = [s.get("tokens") for s in trace if s.get("tool") == "critique" and "message" in s]
            item = {"seconds": round(seconds, 2), "status": result["status"], "steps": steps, "judge_tokens": tokens}
            if compute.get("round_compute"):
                item["ratio_to_compute"] = round(seconds / compute["round_compute"], 2)
            out.append(item)
        return {"rounds": out, "budget_gb": mgr.budget_gb, "stats": mgr.stats(), "gpu_gib": gpu_gib()}

    res.stage("round", lambda: rounds(manager, "big"))

    sequence = ["llm", "generator", "judge", "embedder", "llm", "generator", "judge", "llm", "generator", "embedder"]

    def hand_overs(mgr: Any) -> list[dict[str, Any]]:
        """How long each model hand-over takes along a round's order of model uses (with the LLM planning)."""
        out = []
        for name in sequence:
            before = {k: v["evictions"] for k, v in mgr.stats().items()}
            seconds, _ = timed(lambda name=name: call(mgr, name, lambda model: None))
            evicted = [k for k, v in mgr.stats().items() if v["evictions"] > before.get(k, 0)]
            out.append({"model": name, "seconds": round(seconds, 3), "evicted": evicted})
        return out

    def budget() -> dict[str, Any]:
        nonlocal manager
        small_budget = args.budget_gb
        if args.dry_run:  # small enough to swap, large enough for the biggest model with its working memory
            need = max((v.get("size_gb") or 0) + v.get("reserve_gb", 0) for v in stats.values())
            small_budget = round(max(0.6 * sum(v or 0 for v in sizes.values()), 1.1 * need), 6)
        manager = None  # free the resident models first: the budget run starts from an empty card
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        reset_peak()
        small = build_manager(settings_for(small_budget))
        out: dict[str, Any] = {"budget_gb": small_budget, "load_seconds": load_all(small)}
        res.doc["budget"] = out
        out["round"] = rounds(small, "small")
        passes = []
        for _ in range(args.passes):
            uses = hand_overs(small)
            swaps = [u["seconds"] for u in uses if u["evicted"]]
            passes.append({"uses": uses, "total_seconds": round(sum(u["seconds"] for u in uses), 3),
                           "swaps": len(swaps), "seconds_per_swap": _median(swaps) if swaps else None,
                           "generator_swap_in": [u["seconds"] for u in uses if u["model"] == "generator"
                                                 and u["evicted"]]})
        out.update(passes=passes, stats=small.stats(), gpu_gib=gpu_gib())
        return out

    res.stage("budget", budget)
    res.doc["done"] = True
    res.save()
    return res.doc


def _figures(doc: dict[str, Any]) -> dict[str, str]:
    """One document's figures, by row title (what --compare lays side by side)."""
    a, r, b = doc.get("alone") or {}, doc.get("round") or {}, doc.get("budget") or {}
    rows: dict[str, str] = {}
    if a:
        rows["generation alone (plain / guided), s"] = f"{a['generate']:.2f} / {a['regenerate']:.2f}"
        new = a.get("judge_new_tokens") or ["?"]
        rows["judge call alone, s (new tokens)"] = f"{a['critique']:.2f} ({new[-1]})"
        rows["retrieve / CLIP score alone, s"] = f"{a['retrieve']:.3f} / {a['clip_score']:.3f}"
        rows["a round's model calls alone (sum), s"] = f"{a['round_compute']:.2f}"
    for key, title in ((r, "80 GB budget"), ((b or {}).get("round") or {}, f"{b.get('budget_gb')} GB budget")):
        for i, item in enumerate(key.get("rounds") or []):
            steps = dict.fromkeys(t for t, _ in item["steps"])
            inside = {t: [round(s, 2) for tool, s in item["steps"] if tool == t] for t in steps}
            rows[f"fixed round {i + 1}, {title}: s (× compute)"] = (f"{item['seconds']:.2f} "
                                                                    f"({item.get('ratio_to_compute', '?')}×)")
            rows[f"  inside it: generate / critique, s ({title}, round {i + 1})"] = (
                f"{inside.get('generate')} / {inside.get('critique')}")
        if key.get("gpu_gib"):
            rows[f"peak allocated, {title}, GiB"] = f"{key['gpu_gib']['peak']}"
    for i, p in enumerate(b.get("passes") or []):
        rows[f"hand-overs pass {i + 1} under {b['budget_gb']} GB: swaps, s per swap (SDXL swap-ins)"] = (
            f"{p['swaps']}, {p['seconds_per_swap']} ({', '.join(str(x) for x in p['generator_swap_in'])})")
    if b.get("gpu_gib"):
        rows[f"peak allocated under {b['budget_gb']} GB through round and hand-overs, GiB"] = f"{b['gpu_gib']['peak']}"
    return rows


def summary(doc: dict[str, Any], other: dict[str, Any] | None = None) -> str:
    """The figures as Markdown; with ``other`` (the "after" document) two columns, before and after."""
    docs = [doc] + ([other] if other else [])
    figures = [_figures(d) for d in docs]
    lines = [f"Machine: {machine_line(doc['machine'])}.", ""]
    header = "| what | " + " | ".join(d.get("label") or Path(d.get("code", "?")).name for d in docs) + " |"
    lines += [header, "|---" * (len(docs) + 1) + "|"]
    for title in dict.fromkeys(k for f in figures for k in f):
        lines.append(f"| {title} | " + " | ".join(f.get(title, "—") for f in figures) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kit", type=Path, default=None, help="a kit built with --scale full")
    parser.add_argument("--build", action="store_true", help="build the full kit into --kit first")
    parser.add_argument("--code", type=Path, default=None, help="import imgrag/agent/tools/prompts from this tree")
    parser.add_argument("--label", default=None, help="the column's name in --compare (default: the code's folder)")
    parser.add_argument("--dry-run", action="store_true", help="small models on the CPU: checks the code only")
    parser.add_argument("--budget-gb", type=float, default=24.0)
    parser.add_argument("--big-budget-gb", type=float, default=80.0)
    parser.add_argument("--repeat", type=int, default=2, help="calls per model in the 'alone' stage")
    parser.add_argument("--rounds", type=int, default=1, help="fixed rounds per budget")
    parser.add_argument("--passes", type=int, default=2, help="passes over the hand-over sequence under the budget")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--compare", type=Path, nargs=2, metavar=("BEFORE", "AFTER"),
                        help="print the Markdown table of two result files and exit")
    args = parser.parse_args(argv)
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        print(summary(before, after))
        return after
    doc = run(args)
    print(summary(doc))
    return doc


if __name__ == "__main__":
    main()

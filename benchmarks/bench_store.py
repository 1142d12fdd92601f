"""Benchmark of the reference store, on synthetic data, CPU only, offline.

1. Indexing throughput with a real-size open_clip ViT-B-32 at random weights (the real model's cost
   without its download): images per second, and where the time goes (embedder, decoding, store).
2. Re-indexing an unchanged folder of 10,000 small files (nothing is read), and the same folder after
   every file was touched (each file is hashed, none decoded or embedded).
3. Query latency (p50/p95, top-10, 512-d cosine) at 10,000 and 100,000 vectors: embedded Chroma, a
   Chroma server (``chroma run``, started and stopped here, serving the same data), and brute-force
   numpy as the baseline.

Usage:  .venv/bin/python benchmarks/bench_store.py [--quick] [--workdir DIR] [--json OUT.json]
``--quick`` shrinks every size for a smoke run; the figures in BENCHMARKS.md come from the full run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import free_port  # noqa: E402

from imgrag.models.embedder import Embedder  # noqa: E402
from imgrag.settings import load_settings  # noqa: E402
from imgrag.store import ReferenceStore  # noqa: E402

K = 10
QUERIES = 200
DIM = 512


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    import chromadb
    import open_clip
    import torch

    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gb": ram_gb, "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "open_clip": open_clip.__version__,
            "chromadb": chromadb.__version__, "numpy": np.__version__}


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth gradient with noise: compresses and decodes like a photograph, unlike pure noise."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * rng.uniform(0.1, 0.5)) % 256, (y * rng.uniform(0.1, 0.5)) % 256,
                     ((x + y) * rng.uniform(0.05, 0.3)) % 256], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def store_settings(path: Path | str):
    return load_settings("default", overrides={"store": str(path), "device": "cpu"}, environ={})


def percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.array(samples) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3)}


# ----------------------------------------------------------------------------------------------
# 1. indexing throughput with ViT-B-32
# ----------------------------------------------------------------------------------------------

def bench_index_throughput(work: Path, n_images: int) -> dict[str, Any]:
    import open_clip

    folder = work / "photos"
    rng = np.random.default_rng(0)
    for i in range(n_images):
        sub = folder / f"{i // 64:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        photo_like(rng, 800, 600).save(sub / f"photo{i:04d}.jpg", quality=90)
    t0 = time.perf_counter()
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    embedder = Embedder(model, preprocess, open_clip.get_tokenizer("ViT-B-32"), "bench:ViT-B-32-random")
    load_s = time.perf_counter() - t0
    store = ReferenceStore.open(store_settings(work / "store-vit"), embedder.model_id, embedder.dim, for_writing=True)
    log(f"indexing {n_images} 800x600 JPEGs with ViT-B-32 (random weights, {embedder.dim}-d) ...")
    summary = store.index([folder], embedder, batch_size=32)
    t = store.last_index_timings
    total = summary["seconds"]
    store_s = t["store_read"] + t["store_write"] + t["lock_wait"]
    result = {
        "images": n_images, "image_size": "800x600 JPEG", "batch_size": 32, "model_load_s": round(load_s, 2),
        "seconds": total, "images_per_s": round(n_images / total, 2),
        "share": {"embedder": round(t["embed"] / total, 4), "decode": round(t["decode"] / total, 4),
                  "read_hash_probe": round(t["read_hash"] / total, 4), "store": round(store_s / total, 4),
                  "walk": round(t["walk"] / total, 4)},
        "store_ms_per_image": round(store_s / n_images * 1000, 2),
        "timings_s": t,
    }
    lat = []
    for i in range(20):
        s = time.perf_counter()
        embedder.embed_texts([f"a photograph of thing number {i}"])
        lat.append(time.perf_counter() - s)
    result["text_embed_latency"] = percentiles(lat[2:])
    log(f"  {result['images_per_s']} images/s; embedder {result['share']['embedder']:.1%}, "
        f"store {result['share']['store']:.1%}")
    return result


# ----------------------------------------------------------------------------------------------
# 2. re-indexing 10,000 unchanged files
# ----------------------------------------------------------------------------------------------

def tiny_random_embedder() -> Embedder:
    """A 32-px random ViT: cheap enough to fill a 10,000-file store; the re-index never calls it."""
    import open_clip

    from imgrag.kits.tiny_configs import OPEN_CLIP_MODEL_CFG

    model = open_clip.CLIP(**OPEN_CLIP_MODEL_CFG)
    preprocess = open_clip.image_transform(OPEN_CLIP_MODEL_CFG["vision_cfg"]["image_size"], is_train=False)
    return Embedder(model, preprocess, open_clip.get_tokenizer("ViT-B-32"), "bench:tiny-random")


def bench_reindex(work: Path, n_files: int) -> dict[str, Any]:
    folder = work / "small"
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    for i in range(n_files):
        sub = folder / f"{i // 500:03d}"
        if i % 500 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(sub / f"f{i:05d}.png")
    log(f"wrote {n_files} small PNGs in {time.perf_counter() - t0:.1f} s; first index (tiny embedder) ...")
    embedder = tiny_random_embedder()
    settings = store_settings(work / "store-small")
    first = ReferenceStore.open(settings, embedder.model_id, embedder.dim, for_writing=True).index(
        [folder], embedder, batch_size=256)
    assert first["added"] == n_files, first
    runs = []
    for _ in range(3):  # a fresh process would reopen the store: include the open in the figure
        t0 = time.perf_counter()
        store = ReferenceStore.open(settings, embedder.model_id, embedder.dim, for_writing=True)
        summary = store.index([folder], embedder)
        runs.append((time.perf_counter() - t0, summary, store.last_index_timings))
        assert summary["unchanged"] == n_files, summary
    best = min(runs, key=lambda r: r[0])
    now = time.time()
    for path in folder.rglob("*.png"):
        os.utime(path, (now, now + 10))
    t0 = time.perf_counter()
    store = ReferenceStore.open(settings, embedder.model_id, embedder.dim, for_writing=True)
    touched = store.index([folder], embedder)
    touched_s = time.perf_counter() - t0
    assert touched["unchanged"] == n_files, touched
    result = {"files": n_files, "first_index_s": first["seconds"],
              "unchanged_reindex_s": round(best[0], 3), "unchanged_files_per_s": round(n_files / best[0]),
              "unchanged_runs_s": [round(r[0], 3) for r in runs], "unchanged_timings_s": best[2],
              "touched_reindex_s": round(touched_s, 3), "touched_timings_s": store.last_index_timings}
    log(f"  unchanged re-index of {n_files} files: {best[0]:.2f} s; after touching every file: {touched_s:.2f} s")
    return result


# ----------------------------------------------------------------------------------------------
# 3. query latency: embedded Chroma, Chroma server, numpy
# ----------------------------------------------------------------------------------------------

def _fill(store: ReferenceStore, vectors: np.ndarray) -> float:
    collection = store.ensure_collection()  # the store's own collection: same name, config, metadata
    t0 = time.perf_counter()
    for start in range(0, len(vectors), 1000):
        ids = [f"{i:032x}" for i in range(start, min(start + 1000, len(vectors)))]
        metas = [{"path": f"/photos/album{i // 1000:03d}/img{i:06d}.jpg", "caption": "",
                  "paths": json.dumps({f"/photos/album{i // 1000:03d}/img{i:06d}.jpg": [123456, 1, -1, -1]}),
                  "sha256": f"{i:064x}", "width": 640, "height": 480, "bytes": 123456, "indexed_at": 0.0}
                 for i in range(start, start + len(ids))]
        collection.add(ids=ids, embeddings=vectors[start:start + len(ids)], metadatas=metas)
    return time.perf_counter() - t0


def _time_queries(collection: Any, queries: np.ndarray) -> dict[str, float]:
    for q in queries[:10]:  # warm up
        collection.query(query_embeddings=[q], n_results=K, include=["metadatas", "distances"])
    samples = []
    for q in queries:
        t0 = time.perf_counter()
        collection.query(query_embeddings=[q], n_results=K, include=["metadatas", "distances"])
        samples.append(time.perf_counter() - t0)
    return percentiles(samples)


def _time_numpy(vectors: np.ndarray, queries: np.ndarray) -> dict[str, float]:
    samples = []
    for q in np.concatenate([queries[:10], queries]):
        t0 = time.perf_counter()
        sims = vectors @ q
        top = np.argpartition(-sims, K)[:K]
        top[np.argsort(-sims[top])]
        samples.append(time.perf_counter() - t0)
    return percentiles(samples[10:])


def _recall(collection: Any, vectors: np.ndarray, queries: np.ndarray, n: int = 50) -> float:
    hits = 0
    for q in queries[:n]:
        exact = {f"{i:032x}" for i in np.argsort(-(vectors @ q))[:K]}
        got = set(collection.query(query_embeddings=[q], n_results=K, include=[])["ids"][0])
        hits += len(exact & got)
    return round(hits / (n * K), 4)


def _chroma_server(path: Path, port: int) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "chroma"
    exe_s = str(exe) if exe.exists() else shutil.which("chroma")
    if not exe_s:
        raise SystemExit("the `chroma` executable is missing (pip install chromadb)")
    proc = subprocess.Popen([exe_s, "run", "--path", str(path), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("chroma run did not start") from None
            time.sleep(0.1)


def synthetic_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors in clusters of ~100 (photos of one subject), and queries near the clusters' centres.

    Uniformly random vectors would be the worst case for HNSW (in 512 dimensions every point is about
    equally far from every other; recall@10 falls to ~0.5 at 10k) and nothing like CLIP embeddings.
    """
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((max(n // 100, 1), DIM)))
    vectors = _unit(centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, DIM)) / np.sqrt(DIM))
    queries = _unit(centres[rng.integers(0, len(centres), QUERIES)]
                    + 0.7 * rng.standard_normal((QUERIES, DIM)) / np.sqrt(DIM))
    return vectors, queries


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _numpy_in_subprocess(n: int, seed: int, threads: str | None) -> dict[str, float]:
    """The numpy baseline in a fresh process, with a chosen BLAS thread count (set before numpy loads)."""
    env = dict(os.environ)
    if threads is not None:
        env.update(OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    done = subprocess.run([sys.executable, __file__, "--numpy-baseline", str(n), str(seed)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def bench_queries(work: Path, sizes: list[int]) -> dict[str, Any]:
    import chromadb

    data_dir = work / "store-vectors"
    results: dict[str, Any] = {"k": K, "queries": QUERIES, "dim": DIM, "data": "clustered unit vectors (see code)",
                               "sizes": {}}
    settings = store_settings(data_dir)
    queries_by_size: dict[int, np.ndarray] = {}
    for n in sizes:
        seed = 100 + n
        vectors, queries = synthetic_data(n, seed)
        queries_by_size[n] = queries
        numpy_1 = _numpy_in_subprocess(n, seed, "1")
        numpy_default = _numpy_in_subprocess(n, seed, None)
        store = ReferenceStore.open(settings, f"bench:synthetic-{n}", DIM, for_writing=True)
        log(f"adding {n} x {DIM} vectors to embedded Chroma ...")
        add_s = _fill(store, vectors)
        collection = store._collection
        embedded = _time_queries(collection, queries)
        results["sizes"][n] = {"add_s": round(add_s, 1), "add_vectors_per_s": round(n / add_s),
                               "embedded": embedded, "numpy_1_thread": numpy_1, "numpy_default_threads": numpy_default,
                               "recall_at_10_vs_exact": _recall(collection, vectors, queries)}
        log(f"  {n}: embedded {embedded}, numpy 1 thread {numpy_1}, numpy default {numpy_default}")
    on_disk = sum(f.stat().st_size for f in data_dir.rglob("*") if f.is_file())
    results["store_mb_on_disk"] = round(on_disk / 2**20, 1)
    # Let go of the embedded client before a server opens the same directory.
    chromadb.api.client.SharedSystemClient.clear_system_cache()
    port = free_port()
    log(f"starting `chroma run` on 127.0.0.1:{port} over the same data ...")
    t0 = time.perf_counter()
    server = _chroma_server(data_dir, port)
    results["server_start_s"] = round(time.perf_counter() - t0, 2)
    try:
        server_settings = store_settings(f"http://127.0.0.1:{port}")
        for n in sizes:
            store = ReferenceStore.open(server_settings, f"bench:synthetic-{n}", DIM)
            assert store.count() == n
            results["sizes"][n]["server"] = _time_queries(store._collection, queries_by_size[n])
            log(f"  {n}: server {results['sizes'][n]['server']}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not figures")
    parser.add_argument("--workdir", type=Path, default=None, help="where to put the synthetic data (temporary)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to this long for the 1-minute load average to drop below 0.5 "
                             "(other jobs on a shared machine skew every figure)")
    parser.add_argument("--numpy-baseline", nargs=2, type=int, metavar=("N", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.numpy_baseline:  # the child of _numpy_in_subprocess
        vectors, queries = synthetic_data(*args.numpy_baseline)
        print(json.dumps(_time_numpy(vectors, queries)))
        return
    deadline = time.monotonic() + args.wait_quiet
    while args.wait_quiet and os.getloadavg()[0] >= 0.5 and time.monotonic() < deadline:
        time.sleep(5)
    n_images, n_files, sizes = (8, 300, [1000, 3000]) if args.quick else (128, 10_000, [10_000, 100_000])
    work = args.workdir or Path(tempfile.mkdtemp(prefix="imgrag-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
                              "load_average": {"start": round(os.getloadavg()[0], 2)}}
    try:
        report["index_throughput"] = bench_index_throughput(work, n_images)
        report["load_average"]["after_index"] = round(os.getloadavg()[0], 2)
        report["reindex_unchanged"] = bench_reindex(work, n_files)
        report["load_average"]["after_reindex"] = round(os.getloadavg()[0], 2)
        report["query_latency"] = bench_queries(work, sizes)
        report["load_average"]["end"] = round(os.getloadavg()[0], 2)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    report["total_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

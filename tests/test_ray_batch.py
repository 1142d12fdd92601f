"""``imgrag batch --ray`` on a local Ray cluster (2 CPUs) with a Chroma server started by the test, on the
tiny kit: the prompts come back as one batch record, each worker loads its models once, a worker killed
mid-batch loses no prompt, and Ctrl-C on the driver is resumed with ``--resume``.

Every Ray test runs under a deadline (SIGALRM in the driver, ``timeout`` on subprocesses), so a hang fails
the test instead of blocking the suite."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agent.frontends.ray_batch import expand_ray_flag, write_run_files
from tests.cli import run_cli
from tests.test_store import chroma_server  # noqa: F401  (the fixture: a `chroma run` on a free port)

REPO = Path(__file__).resolve().parent.parent
FINISHED = {"matched", "budget_exhausted"}


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail with TimeoutError when the block runs longer than ``seconds`` (the driver loop wakes every second)."""

    def expire(signum, frame):
        raise TimeoutError(f"the Ray batch did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A local Ray cluster with 2 CPUs for the module; yields its address for other drivers."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture
def server_store(tiny_settings, chroma_server: str, tmp_path: Path,  # noqa: F811
                 capsys: pytest.CaptureFixture) -> str:
    """The Chroma server with a few tiny reference pictures indexed into it."""
    folder = tmp_path / "refs"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(folder / f"r{i}.png")
    code, _, err = run_cli(capsys, "index", str(folder), "--profile", "tiny", "--store", chroma_server, "--json")
    assert code == 0, err
    return chroma_server


# ----- without a cluster -----

def test_bare_ray_flag_means_a_local_cluster_and_an_address_is_kept() -> None:
    assert expand_ray_flag(["batch", "p.txt", "--ray"]) == ["batch", "p.txt", "--ray", "local"]
    assert expand_ray_flag(["batch", "p.txt", "--ray", "--json"]) == ["batch", "p.txt", "--ray", "local", "--json"]
    assert expand_ray_flag(["batch", "--ray", "p.txt"]) == ["batch", "--ray", "local", "p.txt"]
    for address in ("auto", "10.0.0.5:6379", "ray://head:10001", "local"):
        assert expand_ray_flag(["batch", "p.txt", "--ray", address]) == ["batch", "p.txt", "--ray", address]


def test_embedded_store_with_ray_is_one_line_naming_the_chroma_server(tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red kettle\n", encoding="utf-8")
    code, out, err = run_cli(capsys, "batch", str(prompts), "--profile", "tiny", "--store", str(tmp_path / "s"),
                             "--ray", "--json")
    assert code == 1 and out == ""
    assert "embedded store" in err and "chroma run" in err and "--store http://" in err
    assert "Traceback" not in err
    code, _, err = run_cli(capsys, "batch", str(prompts), "--workers", "2")
    assert code == 1 and "--workers goes with --ray" in err


def test_a_workers_run_is_written_under_the_drivers_folder_with_its_paths(tmp_path: Path) -> None:
    worker_dir = "/scratch/w0/runs/r1"
    trace = json.dumps({"tool": "generate", "path": f"{worker_dir}/candidates/c0.png"}) + "\n{torn"
    payload = {"result": {"run_dir": worker_dir, "final_image": f"{worker_dir}/candidates/c0.png",
                          "candidates": [{"path": f"{worker_dir}/candidates/c0.png"}],
                          "references": {"r": {"path": "/photos/r.png"}}},
               "files": {"candidates/c0.png": b"png", "trace.jsonl": trace.encode(), "result.json": b"{}"}}
    run_dir = tmp_path / "runs" / "r1"
    result = write_run_files(run_dir, payload)
    assert result["final_image"] == str(run_dir / "candidates" / "c0.png")
    assert result["candidates"][0]["path"] == result["final_image"]
    assert result["references"]["r"]["path"] == "/photos/r.png"  # not the worker's: left as the store has it
    assert (run_dir / "candidates" / "c0.png").read_bytes() == b"png"
    assert json.loads((run_dir / "result.json").read_text()) == result
    lines = (run_dir / "trace.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["path"] == result["final_image"] and lines[1] == "{torn"


# ----- on a local cluster -----

def test_two_workers_answer_every_prompt_load_once_and_survive_a_killed_worker(
        ray_cluster: str, server_store: str, tmp_path: Path) -> None:
    from agent.frontends.ray_batch import run_batch
    from imgrag.settings import load_settings

    settings = load_settings("tiny", overrides={"store": server_store, "output_dir": str(tmp_path / "out")})
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(6)), encoding="utf-8")
    pids: dict[str, int] = {}
    killed: list[int] = []
    events: list[dict] = []

    def on_progress(event: dict) -> None:
        events.append(event)
        if event["event"] == "workers":
            pids.update({w["name"]: w["pid"] for w in event["workers"]})
        elif event["event"] == "item" and not killed:
            # The driver has already handed this worker its next prompt: kill it while it draws.
            victim = pids[event["worker"]]
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    with deadline(420):
        summary = run_batch(settings, prompts, workers=2, planner="fixed", max_rounds=2, on_progress=on_progress)

    items = summary["items"]
    assert len(items) == 6 and all(item["status"] in FINISHED for item in items), items
    assert summary["worker_deaths"] == 1 and sum(item.get("worker_deaths", 0) for item in items) == 1
    assert [e["event"] for e in events].count("worker_died") == 1
    # One record on the driver, as the in-process batch writes it; the pictures came back through Ray.
    batch_dir = Path(summary["batch_dir"])
    assert json.loads((batch_dir / "batch.json").read_text())["items"] == items
    for item in items:
        run_dir = Path(settings.output_dir) / item["run_id"]
        result = json.loads((run_dir / "result.json").read_text())
        assert result["run_dir"] == str(run_dir) and Path(result["final_image"]).is_file()
        assert Path(item["final_image"]).parent == run_dir / "candidates"
        assert "imgrag-ray-" not in (run_dir / "trace.jsonl").read_text()  # no worker scratch path left
    # The workers retrieved from the shared Chroma server.
    results = [json.loads((Path(settings.output_dir) / i["run_id"] / "result.json").read_text()) for i in items]
    assert any(r["references"] for r in results)
    # Each worker (each incarnation) loaded each model once, however many prompts it drew.
    for worker in summary["workers"]:
        assert all(n <= 1 for n in worker["model_loads"].values()), summary["workers"]
    busiest = max(summary["workers"], key=lambda w: w["prompts"])
    assert busiest["prompts"] >= 2 and busiest["model_loads"]["generator"] == 1
    assert sum(w["prompts"] for w in summary["workers"]) == 6
    # Workers ran with exactly the driver's settings.
    assert summary["worker_settings_digests"] == [summary["settings_digest"]]


@pytest.mark.slow
def test_ctrl_c_on_the_driver_then_resume_finishes_the_batch(ray_cluster: str, server_store: str, tmp_path: Path,
                                                             tiny_settings, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red kettle\na heron on a post\na wooden cradle\n", encoding="utf-8")
    out_dir = tmp_path / "out"
    flags = ["--profile", "tiny", "--store", server_store, "--planner", "fixed", "--max-rounds", "1",
             "--out", str(out_dir)]
    env = {**os.environ, "IMGRAG_TINY_KIT_DIR": tiny_settings.tiny_kit_dir, "PYTHONPATH": str(REPO)}
    # A background process starts with SIGINT ignored: give the driver the default handler, as a terminal would.
    driver = subprocess.Popen(
        [sys.executable, "-m", "agent.frontends.cli", "batch", str(prompts), "--ray", ray_cluster, "--workers", "1",
                *flags],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        give_up = time.monotonic() + 300
        record = None
        while time.monotonic() < give_up and driver.poll() is None:
            found = list(out_dir.glob("batch-*/batch.json"))
            if found:
                items = json.loads(found[0].read_text())["items"]
                if any(item["status"] in FINISHED for item in items):
                    record = found[0]
                    break
            time.sleep(0.2)
        assert record is not None, "the first prompt never finished"
        driver.send_signal(signal.SIGINT)
        _, err = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 130, err
    assert "--ray --resume" in err
    before = json.loads(record.read_text())["items"]
    done = {item["run_id"] for item in before if item["status"] in FINISHED}
    assert done and len(done) < 3 and not any(item["status"] == "running" for item in before)

    with deadline(300):
        code, out, err = run_cli(capsys, "batch", str(prompts), "--ray", "--workers", "1", "--resume", "--json",
                                 *flags)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["batch_dir"] == str(record.parent)
    assert all(item["status"] in FINISHED for item in summary["items"])
    assert done <= {item["run_id"] for item in summary["items"]}  # finished prompts were kept, not redrawn
    assert summary["workers"][0]["prompts"] == 3 - len(done)

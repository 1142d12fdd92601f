"""The agent LLM behind an OpenAI-compatible server, for real: ``transformers serve`` serves the tiny kit's Qwen2.5
on CPU, and imgrag's ``llm_backend = "openai"`` runs against it. Plus the end-to-end misbehaving-LLM run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.runner import Runner, open_checkpointer
from imgrag.errors import UserError
from imgrag.settings import load_settings
from tests.fakes import FakeEmbedder, FakeGenerator, FakeVerdict, ScriptedJudge
from tests.ports import ServerDidNotStart, free_port, start_server, stop

REPO = Path(__file__).resolve().parent.parent
NO_KITE = FakeVerdict(False, ["a red kite"], "no kite")


@pytest.fixture(scope="module")
def served_llm(tiny_kit, tmp_path_factory: pytest.TempPathFactory):
    """``transformers serve`` on a free loopback port with the tiny kit's Qwen2.5; skipped, with the reason, when it
    cannot start here (no fastapi/uvicorn: the ``serving`` extra)."""
    import httpx

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"transformers serve needs the serving extra (fastapi + uvicorn): {exc}")
    cli = Path(sys.executable).parent / "transformers"
    if not cli.exists():
        pytest.skip(f"no transformers command beside {sys.executable}")
    model = str(tiny_kit["llm"])
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def lists_models(port: int) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    with open(log, "w") as out:
        try:
            server, port = start_server(lambda port: [str(cli), "serve", model, "--host", "127.0.0.1",
                                                      "--port", str(port)],
                                        timeout=90, ready=lists_models, poll=0.5, stdout=out,
                                        stderr=subprocess.STDOUT, env=env)
        except ServerDidNotStart as exc:
            pytest.skip(f"transformers serve did not start ({exc}): {log.read_text()[-500:]}")
    try:
        yield {"base_url": f"http://127.0.0.1:{port}/v1", "model": model}
    finally:
        stop(server)


def remote_settings(tmp_path: Path, base_url: str, model: str):
    return load_settings("default", environ={
        "IMGRAG_HOME": str(tmp_path / "home"), "IMGRAG_MODELS_LLM_BACKEND": "openai",
        "IMGRAG_MODELS_LLM_BASE_URL": base_url, "IMGRAG_MODELS_LLM": model, "IMGRAG_LLM_MAX_NEW_TOKENS": "16",
        "IMGRAG_DEVICE": "cpu"})


@pytest.mark.slow
def test_a_round_against_a_real_openai_compatible_server(served_llm, tmp_path: Path, monkeypatch) -> None:
    """The real ChatOpenAI client, the real model manager; generator, judge and embedder scripted. The random
    model's non-answers go back to it and then to the fixed policy; the remote calls hold no GPU lock."""
    from langchain_openai import ChatOpenAI

    from imgrag.management.engine import load_llm
    from imgrag.management.manager import ModelManager

    settings = remote_settings(tmp_path, served_llm["base_url"], served_llm["model"])
    manager = ModelManager(settings, device="cpu")
    manager.register("generator", FakeGenerator, size_gb=0.0)
    manager.register("judge", lambda: ScriptedJudge([NO_KITE]), size_gb=0.0)
    manager.register("embedder", FakeEmbedder, size_gb=0.0)
    # Registered as imgrag.management.engine.build_manager does for llm_backend = "openai": on the host, no GPU lock.
    manager.register("llm", lambda: load_llm(settings, "cpu"), size_gb=0.0,
                     on_host=settings.models.llm_backend == "openai")
    held: list[bool] = []
    real_generate = ChatOpenAI._generate

    def generate(self, *args, **kwargs):
        held.append(manager.lock._is_owned())
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(ChatOpenAI, "_generate", generate)
    runner = Runner(settings, manager=manager, checkpointer=open_checkpointer(tmp_path / "threads.sqlite"))
    result = runner.run("a red kite", planner="agent", max_rounds=1)
    assert json.loads((Path(result["run_dir"]) / "result.json").read_text())["status"] == "budget_exhausted"
    assert held and not any(held)  # every remote call was made outside the GPU lock
    trace = [json.loads(line) for line in (Path(result["run_dir"]) / "trace.jsonl").read_text().splitlines()]
    assert any(t.get("planner") == "llm" for t in trace)
    assert result["fallback_steps"] >= 1 and [s["tool"] for s in result["steps"]] == ["generate", "critique"]


def test_an_unreachable_server_is_one_line_before_the_run(tmp_path: Path) -> None:
    settings = remote_settings(tmp_path, f"http://127.0.0.1:{free_port()}/v1", "qwen")
    runner = Runner(settings, manager=object(), checkpointer=open_checkpointer(tmp_path / "threads.sqlite"))
    with pytest.raises(UserError, match="cannot reach the agent LLM server") as info:
        runner.run("a kite", planner="agent")
    assert "\n" not in str(info.value) and "--planner fixed" in str(info.value)
    assert not (tmp_path / "home" / "outputs").exists() or not any((tmp_path / "home" / "outputs").iterdir())


@pytest.mark.slow
def test_the_cli_says_one_line_for_an_unreachable_server(tiny_kit, tmp_path: Path) -> None:
    env = {**os.environ, "IMGRAG_HOME": str(tmp_path / "home"), "IMGRAG_TINY_KIT_DIR": str(tiny_kit["llm"].parent),
           "IMGRAG_MODELS_LLM_BACKEND": "openai", "IMGRAG_MODELS_LLM_BASE_URL": f"http://127.0.0.1:{free_port()}/v1",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "agent.frontends.cli", "run", "a kite", "--profile", "tiny"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot reach the agent LLM server" in errors[0], proc.stderr


@pytest.mark.slow
def test_imgrag_run_driven_by_a_misbehaving_llm(tiny_kit, tmp_path: Path) -> None:
    """Parallel calls past the budget, an out-of-range seed, a draft inside <think>: result.json, no traceback,
    no more pictures than --max-rounds. Real tiny generator, judge and embedder; the LLM is the real
    QwenChatModel over scripted token output."""
    replies = [
        '<think>Draw first. <tool_call>\n{"name": "critique", "arguments": {"candidate_id": "c9"}}\n</tool_call>'
        '</think>\n<tool_call>\n{"name": "generate", "arguments": {"prompt": "a kite", "seed": 1180591620717411303424}}'
        '\n</tool_call>',
        "".join("<tool_call>\n" + json.dumps({"name": "generate", "arguments": {"prompt": "a kite", "seed": s}})
                + "\n</tool_call>\n" for s in (1, 2, 3)),
        "I like kites.",
    ]
    (tmp_path / "replies.json").write_text(json.dumps(replies))
    env = {**os.environ, "IMGRAG_HOME": str(tmp_path / "home"), "IMGRAG_TINY_KIT_DIR": str(tiny_kit["llm"].parent),
           "RUN_TEST_REPLIES": str(tmp_path / "replies.json"), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "tests.run_launcher", "a red kite", "--profile", "tiny",
                           "--max-rounds", "2", "--json"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    result = json.loads(proc.stdout)
    assert json.loads((Path(result["run_dir"]) / "result.json").read_text())["run_id"] == result["run_id"]
    assert len(result["candidates"]) <= 2 and result["rounds"] <= 2
    assert len(list((Path(result["run_dir"]) / "candidates").glob("*.png"))) <= 2
    steps = result["steps"]
    assert steps[0]["tool"] == "generate" and not steps[0]["ok"]  # the seed, refused; the <think> draft never ran
    assert "critique" not in [s["tool"] for s in steps[:1]]

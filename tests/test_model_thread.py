"""One model thread per device: every model call of a tiny-profile run (the tools' and the LLM planner's)
runs on the device's one long-lived model thread, whatever thread LangGraph runs the step in; the trace
counts each call's tokens."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.cli import run_cli


def record_threads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Wrap the model-running methods of every wrapper class to note (call, thread id)."""
    from imgrag.models.chat_model import QwenChatModel
    from imgrag.models.embedder import Embedder
    from imgrag.models.generator import Generator
    from imgrag.models.judge import Judge

    calls: list[tuple[str, int]] = []
    for cls, method in ((Generator, "generate"), (Judge, "ask"), (Embedder, "embed_images"),
                        (Embedder, "embed_texts"), (QwenChatModel, "_generate")):
        original = getattr(cls, method)

        def wrapped(self: Any, *args: Any, __original: Any = original, __name: str = f"{cls.__name__}.{method}",
                    **kwargs: Any) -> Any:
            calls.append((__name, threading.get_ident()))
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(cls, method, wrapped)
    return calls


def test_every_model_call_of_a_run_runs_on_the_one_model_thread(tiny_settings, tmp_path: Path, capsys,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from imgrag.management.devices import model_thread

    folder = tmp_path / "refs"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(folder / f"r{i}.png")
    calls = record_threads(monkeypatch)
    code, _, err = run_cli(capsys, "index", str(folder), "--profile", "tiny", "--json")
    assert code == 0, err
    code, out, err = run_cli(capsys, "run", "a red kettle", "--profile", "tiny", "--planner", "agent",
                             "--max-rounds", "2", "--json")
    assert code == 0, err
    result = json.loads(out)

    names = {name for name, _ in calls}
    assert {"Generator.generate", "Judge.ask", "Embedder.embed_images", "Embedder.embed_texts",
            "QwenChatModel._generate"} <= names, names
    assert {"retrieve", "regenerate"} <= {s["tool"] for s in result["steps"]}  # tools in several graph threads
    worker = model_thread("cpu").ident
    assert {ident for _, ident in calls} == {worker}
    assert worker != threading.get_ident()

    trace = [json.loads(line) for line in (Path(result["run_dir"]) / "trace.jsonl").read_text().splitlines()]
    llm_steps = [s for s in trace if s.get("planner") == "llm"]
    critiques = [s for s in trace if s.get("tool") == "critique" and "message" in s and s["ok"]]  # tool steps
    assert llm_steps and all(s["tokens"]["output_tokens"] >= 1 and s["tokens"]["input_tokens"] > 0
                             for s in llm_steps)
    assert critiques and all(s["tokens"]["output"] >= 1 and s["tokens"]["stop"] in {"answer", "max_new_tokens", "eos"}
                             for s in critiques)


def test_dino_goes_through_the_manager(tiny_settings, tmp_path: Path) -> None:
    from dataclasses import replace

    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    from imgrag.management.engine import build_manager, register_dino

    dino = tmp_path / "dino"
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          image_size=28, patch_size=14)
    Dinov2Model(config).save_pretrained(dino)
    BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(dino)
    settings = replace(tiny_settings, models=replace(tiny_settings.models, dino=str(dino)))
    manager = build_manager(settings)
    assert "dino" not in manager.names()  # registered only when an evaluation scores with it
    register_dino(manager, settings)
    vectors = manager.run("dino", lambda scorer: (threading.get_ident(), scorer.embed([Image.new("RGB", (40, 40))])))
    assert vectors[0] == manager.thread.ident and vectors[1].shape == (1, 32)
    assert manager.stats()["dino"]["loads"] == 1 and manager.stats()["dino"]["size_gb"] > 0

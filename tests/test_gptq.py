"""The ``gptq`` extra end to end on a CPU: the tiny kit's Qwen2.5 quantised to GPTQ-Int4 by the kit, then loaded
and run through the same code as ``Qwen2.5-7B-Instruct-GPTQ-Int4`` (the engine's LLM loader, the model manager,
the chat model's tool-calling generate). What a CPU cannot check: gptqmodel's CUDA kernels (Marlin, ExLlama)
that a real GPTQ checkpoint runs with on a GPU, and its memory there (≈5.5 GB for the 7B)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest

from imgrag.settings import Settings

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gptqmodel") is None or importlib.util.find_spec("optimum") is None,
    reason="the gptq extra is not installed (pip install -e '.[gptq]': gptqmodel + optimum)")


def test_a_gptq_int4_qwen_quantised_by_the_kit_loads_and_answers(
        tiny_kit: dict[str, Path], tiny_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from langchain_core.messages import HumanMessage

    monkeypatch.chdir(tmp_path)  # gptqmodel writes a logs/ folder into the working directory

    from imgrag.kits.tiny_builders import quantise_gptq
    from imgrag.management.engine import build_manager

    folder = quantise_gptq(tiny_kit["llm"], tmp_path / "qwen2.5-gptq-int4")
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq" and config["quantization_config"]["bits"] == 4

    settings = replace(tiny_settings, models=replace(tiny_settings.models, llm=str(folder)))
    manager = build_manager(settings)
    reply = manager.run("llm", lambda llm: llm.invoke([HumanMessage("draw a cat")]))
    assert reply.usage_metadata["output_tokens"] >= 1
    # Quantised linear layers (gptqmodel's, with packed int4 weights), not dequantised or re-initialised ones.
    packed = manager.run("llm", lambda llm: [m for m in llm.model.modules() if hasattr(m, "qweight")])
    assert packed and all(m.qweight.dtype.is_floating_point is False for m in packed)
    assert manager.stats()["llm"]["loads"] == 1

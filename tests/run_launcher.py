"""Starts ``imgrag run`` with the agent LLM replaced by the real QwenChatModel over scripted token output.

    python -m tests.run_launcher [run options...]

The generator, judge and embedder are the real tiny models. ``RUN_TEST_REPLIES`` names a JSON file: the LLM's
raw replies (Qwen's text, ``<think>`` and ``<tool_call>`` blocks included) in order; the last one repeats.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from tests.fakes import scripted_qwen


def install_fakes() -> None:
    import imgrag.management.engine

    replies = json.loads(Path(os.environ["RUN_TEST_REPLIES"]).read_text(encoding="utf-8"))

    def load_llm(settings: Any, *_: Any) -> Any:
        return scripted_qwen(Path(settings.models.llm), replies)

    imgrag.management.engine.load_llm = load_llm


if __name__ == "__main__":
    install_fakes()
    from agent.frontends.cli.app import main

    main(["run", *sys.argv[1:]])

"""Starts ``imgrag chat`` for the pseudo-terminal tests, with the agent LLM replaced by a scripted fake.

    python -m tests.chat_launcher --profile tiny [chat options...]

The generator, judge and embedder are the real tiny models, loaded through the model manager as in real
use, and the reference store is the real one (the tests index a few pictures into ``IMGRAG_STORE`` first);
only the LLM (random weights in the tiny kit, so it never produces a tool call) is a stand-in. Environment:

    CHAT_TEST_LLM_SCRIPT  a JSON file: tool calls [{"name", "args"}] the LLM answers with, in order; after
                            them it only chats (no tool call), so the fixed policy takes each step
    CHAT_TEST_LLM_LOG     a file: every conversation the LLM is shown is appended as one JSON line

The first drawing whose prompt contains "slowly" reports denoising steps for a minute before it draws, so a
test can press Ctrl-C in the middle of it; later drawings are quick again.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage

from tests.fakes import ScriptedChatModel


class LoggingChatModel(ScriptedChatModel):
    """A scripted LLM that writes down what it was shown."""

    log_path: str = ""

    def _generate(self, messages: list, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> Any:
        if self.log_path:
            shown = [{"type": m.type, "content": str(m.content)} for m in messages]
            with open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(shown) + "\n")
        return super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)


def scripted_llm(settings: Any, *_: Any) -> LoggingChatModel:
    script = []
    path = os.environ.get("CHAT_TEST_LLM_SCRIPT")
    if path:
        for i, step in enumerate(json.loads(Path(path).read_text())):
            call = {"name": step["name"], "args": step.get("args", {}), "id": f"scripted-{i}", "type": "tool_call"}
            script.append(AIMessage(content="", tool_calls=[call]))
    chatter = AIMessage(content="I would rather talk about the weather.")
    return LoggingChatModel(messages=itertools.chain(script, itertools.repeat(chatter)),
                            log_path=os.environ.get("CHAT_TEST_LLM_LOG", ""))


def install_fakes() -> None:
    import imgrag.management.engine
    from imgrag.models.generator import Generator

    imgrag.management.engine.load_llm = scripted_llm  # build_manager's loader looks the name up when it loads

    real_generate = Generator.generate
    slow = {"left": 1}

    def generate(self: Any, prompt: str, *args: Any, on_step: Any = None, **kwargs: Any) -> Any:
        if "slowly" in prompt and slow["left"]:
            slow["left"] -= 1
            for step in range(600):
                time.sleep(0.1)
                if on_step is not None:
                    on_step(step + 1, 600)
        return real_generate(self, prompt, *args, on_step=on_step, **kwargs)

    Generator.generate = generate


if __name__ == "__main__":
    install_fakes()
    from agent.frontends.cli.app import main

    main(["chat", *sys.argv[1:]])

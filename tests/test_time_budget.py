"""The time budget holds inside long model calls: a drawing stops at a step boundary, a generation at a token,
and the run returns its best candidate."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from langchain_core.messages import HumanMessage
from PIL import Image

from agent.runner import Runner, open_checkpointer
from imgrag.errors import TimeBudgetSpent
from imgrag.settings import Settings, load_settings
from tests.fakes import FakeEmbedder, FakeGenerator, FakeManager, FakeVerdict, MemoryStore, ScriptedJudge

NO_KITE = FakeVerdict(False, ["a red kite"], "no kite")


def test_a_drawing_stops_at_the_first_step_past_the_deadline(tiny_settings: Settings) -> None:
    from imgrag.models.generator import Generator

    generator = Generator.from_pretrained(tiny_settings, "cpu")
    steps: list[int] = []
    with pytest.raises(TimeBudgetSpent, match="stopped after step 1 of 20"):
        generator.generate("a kite", seed=1, steps=20, on_step=lambda done, total: steps.append(done),
                           deadline=time.monotonic())
    assert steps == [1]  # the remaining 19 steps were skipped (the pipeline's interrupt flag)
    assert generator.generate("a kite", seed=1, steps=2, deadline=time.monotonic() + 600).size[0] > 0


def test_a_generation_stops_at_a_token_past_the_deadline(tiny_settings: Settings) -> None:
    from imgrag.models.chat_model import QwenChatModel
    from imgrag.models.judge import Judge

    chat = QwenChatModel.from_pretrained(tiny_settings, "cpu")
    chat.max_new_tokens = 64
    free = chat.invoke([HumanMessage("draw a kite")])
    stopped = chat.invoke([HumanMessage("draw a kite")], deadline=time.monotonic())
    assert stopped.usage_metadata["output_tokens"] < free.usage_metadata["output_tokens"]
    assert stopped.usage_metadata["output_tokens"] <= 2
    judge = Judge.from_pretrained(tiny_settings, "cpu")
    image = Image.new("RGB", (64, 64), "red")
    assert len(judge.ask(image, "Is it red?", deadline=time.monotonic())) <= len(judge.ask(image, "Is it red?"))


class SlowGenerator(FakeGenerator):
    """The second drawing outlasts the run's time budget: it stops at its deadline as the real one does."""

    def generate(self, prompt, *, seed, deadline=None, **kwargs):
        if self.calls:
            while deadline is not None and time.monotonic() < deadline:
                time.sleep(0.01)
            raise TimeBudgetSpent("the time budget ran out during the drawing (stopped after step 3 of 30)")
        return super().generate(prompt, seed=seed, **kwargs)


def test_a_run_whose_time_runs_out_mid_drawing_returns_its_best_candidate(tmp_path: Path) -> None:
    settings = load_settings("default", environ={"IMGRAG_HOME": str(tmp_path / "home")})
    settings.budget.max_seconds = 1.5
    refs = tmp_path / "refs"
    refs.mkdir()
    models = {"generator": SlowGenerator(), "judge": ScriptedJudge([NO_KITE]), "embedder": FakeEmbedder()}
    runner = Runner(settings, manager=FakeManager(models), reference_store=MemoryStore(refs),
                    checkpointer=open_checkpointer(tmp_path / "threads.sqlite"))
    start = time.monotonic()
    result = runner.run("a red kite", planner="fixed", max_rounds=3)
    assert time.monotonic() - start < 5
    assert result["status"] == "budget_exhausted" and result["final_candidate"] == "c0"
    assert result["stop_reason"] == "time budget spent"
    assert [s["ok"] for s in result["steps"] if s["tool"] == "regenerate"] == [False]

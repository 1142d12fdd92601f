"""Small scripted stand-ins for unit-testing the agent's decision logic (no model is loaded).

Integration tests use the tiny real models instead; these exist so that a test can say
"the judge matches in round 3" and check what the graph does about it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from PIL import Image

from imgrag.management.manager import ModelManager
from imgrag.models.judge import Verdict


class ScriptedChatModel(GenericFakeChatModel):
    """GenericFakeChatModel raises on bind_tools; a scripted LLM just ignores the tools."""

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedChatModel:
        return self


def call(name: str, **args: Any) -> AIMessage:
    """An AIMessage with one tool call, as a real LLM reply would parse to."""
    return AIMessage(content="", tool_calls=[{"name": name, "args": args, "id": f"call-{name}-{id(args)}"}])


# The judge's real Verdict: scripted judges return the same dataclass the agent reads.
FakeVerdict = Verdict


class ScriptedJudge:
    """Answers with the scripted verdicts in order, repeating the last one."""

    def __init__(self, verdicts: list[FakeVerdict]) -> None:
        self.verdicts = list(verdicts)
        self.calls = 0

    def judge(self, image: Image.Image, prompt: str, **_: Any) -> FakeVerdict:
        verdict = self.verdicts[min(self.calls, len(self.verdicts) - 1)]
        self.calls += 1
        return verdict


class FakeGenerator:
    """A flat-colour picture whose colour depends on seed and references, so calls are traceable."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def generate(self, prompt: str, *, seed: int, references: list | None = None, ip_scale: float | None = None,
                 on_step: Any = None, **_: Any) -> Image.Image:
        self.calls.append({"prompt": prompt, "seed": seed, "references": len(references or []), "ip_scale": ip_scale})
        return Image.new("RGB", (16, 16), (seed * 40 % 256, 10 * len(references or []), 99))

    def generate_batch(self, prompt: str, *, seeds: list[int], **kwargs: Any) -> list[Image.Image]:
        """A round of several drawings: one picture per seed (each call recorded, with the batch's size)."""
        pictures = [self.generate(prompt, seed=seed, **kwargs) for seed in seeds]
        for call in self.calls[-len(seeds):]:
            call["batch"] = len(seeds)
        return pictures


class FakeEmbedder:
    model_id = "fake"
    dim = 4

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        # Redder pictures score higher against any text: a controllable CLIP score.
        rows = [[im.getpixel((0, 0))[0] / 255.0, 1.0, 0.0, 0.0] for im in images]
        vectors = np.array(rows, dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return np.array([[0.6, 0.8, 0.0, 0.0]] * len(texts), dtype=np.float32)


@dataclass
class FakeReference:
    id: str
    path: str
    score: float
    caption: str
    query: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "path": self.path, "score": self.score, "caption": self.caption, "query": self.query}


class MemoryStore:
    """Returns one reference per query from a fixed list of image files."""

    def __init__(self, folder: Path, names: tuple[str, ...] = ("cradle", "retriever", "rocket")) -> None:
        self.refs = []
        for i, name in enumerate(names):
            path = folder / f"{name}.png"
            Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(path)
            self.refs.append((f"ref-{name}", str(path), name))
        self.queries: list[list[str]] = []

    def count(self) -> int:
        return len(self.refs)

    def retrieve(self, embedder: Any, queries: list[str], k: int = 2, avoid: Any = None, **_: Any) -> list:
        self.queries.append(list(queries))
        out = []
        for q in queries:
            rid, path, name = next((r for r in self.refs if r[2] in q), self.refs[0])
            out.append(FakeReference(rid, path, 0.9, f"a photo of a {name}", q))
        return out


class FakeManager(ModelManager):
    """The real model manager (model thread, device lock, load and eviction counts, budget) over fakes: each
    fake is "loaded" on first use by a loader that hands it over. ``budget_gb`` and ``sizes_gb`` let a test
    make the manager evict (default: no limit, fakes weigh nothing)."""

    def __init__(self, models: dict[str, Any], *, budget_gb: float = 0.0, offload: str = "cpu",
                 sizes_gb: dict[str, float] | None = None) -> None:
        from imgrag.settings import load_settings

        settings = load_settings("default", environ={}, overrides={"device": "cpu", "gpu_memory_gb": budget_gb,
                                                                   "offload": offload})
        super().__init__(settings, device="cpu", memory_probe=None)
        self.models = models
        self.sizes_gb = sizes_gb or {}

    def names(self) -> list[str]:
        return [*super().names(), *(name for name in self.models if name not in self._entries)]

    def _entry(self, name: str) -> Any:
        """The real lookup, for the fakes as ``models`` holds them now: a test may add a fake after the manager
        was built, or swap one (the LLM mid-session); a swapped fake replaces the loaded one."""
        if name not in self._entries and name in self.models:
            self.register(name, lambda: self.models[name], size_gb=self.sizes_gb.get(name, 0.0))
        entry = super()._entry(name)
        if entry.model is not None and name in self.models and self.models[name] is not entry.model:
            entry.model = self.models[name]
        return entry


class ScriptedTokens:
    """Stands in for the transformers model behind the real QwenChatModel: ``generate`` appends the next scripted
    reply, tokenized by the real tokenizer, so rendering, decoding and parsing are all the real code's.

    Records each prompt's length in tokens and the keyword arguments generate() got."""

    def __init__(self, tokenizer: Any, replies: list[str]) -> None:
        import torch

        self.tokenizer = tokenizer
        self.replies = list(replies)
        self.prompt_tokens: list[int] = []
        self.kwargs: list[dict[str, Any]] = []
        self.device = torch.device("cpu")

    def generate(self, input_ids: Any, attention_mask: Any = None, **kwargs: Any) -> Any:
        import torch

        self.prompt_tokens.append(int(input_ids.shape[1]))
        self.kwargs.append(kwargs)
        reply = self.replies[min(len(self.prompt_tokens) - 1, len(self.replies) - 1)]
        new = self.tokenizer(reply + "<|im_end|>", return_tensors="pt", add_special_tokens=False)["input_ids"]
        return torch.cat([input_ids, new], dim=1)

    def to(self, device: Any) -> ScriptedTokens:
        return self

    def eval(self) -> ScriptedTokens:
        return self


def scripted_qwen(llm_dir: Path, replies: list[str]) -> Any:
    """The real QwenChatModel over the tiny kit's tokenizer and chat template, answering ``replies`` in order."""
    from transformers import AutoTokenizer

    from imgrag.models.chat_model import QwenChatModel

    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    return QwenChatModel(model=ScriptedTokens(tokenizer, replies), tokenizer=tokenizer, max_new_tokens=256)

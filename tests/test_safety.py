"""The safety gate: constructed embeddings that do and do not cross the threshold, excluded folders,
flagged references dropped before any drawing, flagged outputs kept but never the answer, index-time skipping."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from agent.runner import Runner, open_checkpointer
from imgrag.models.safety import Flag, SafetyGate, excluded_by, flags, index_screen
from imgrag.settings import SafetySettings, load_settings
from tests.fakes import FakeManager, FakeReference, FakeVerdict, ScriptedChatModel, ScriptedJudge, call

MATCH = FakeVerdict(True, [], "all there")
NO_CRADLE = FakeVerdict(False, ["a wooden cradle"], "no cradle")
UNSAFE = "graphic violence and gore"
BLUE = (0, 0, 255)  # what the constructed embedder reads as the unsafe concept


# ----- the rule, on constructed vectors -----

def test_flags_at_and_above_the_threshold_only() -> None:
    concepts = ["nudity", UNSAFE]
    concept_vectors = np.eye(4, dtype=np.float32)[:2]
    # cosine with concept 1: 0.8 (above), 0.25 (just below 0.26), 0.26 exactly (at: flagged), 0 (orthogonal)
    below = np.array([0.0, 0.25, np.sqrt(1 - 0.25**2), 0.0])
    at = np.array([0.0, 0.26, np.sqrt(1 - 0.26**2), 0.0])
    images = np.stack([[0.0, 0.8, 0.6, 0.0], below, at, [0.0, 0.0, 0.0, 1.0]]).astype(np.float32) * 3  # norms vary
    got = flags(images, concept_vectors, concepts, 0.26)
    assert got[0] == Flag(UNSAFE, pytest.approx(0.8, abs=1e-6))
    assert got[1] is None and got[2] is not None and got[2].concept == UNSAFE and got[3] is None
    assert flags(images, concept_vectors[:0], [], 0.26) == [None] * 4  # no concept: nothing flagged


def test_the_gate_on_the_tiny_kits_real_clip(tiny_settings) -> None:
    """Concept text vectors from the real (random-weight) open_clip wrapper; image vectors built from them."""
    from imgrag.models.embedder import Embedder

    embedder = Embedder.from_pretrained(tiny_settings)
    safety = SafetySettings(enabled=True, concepts=["nudity", UNSAFE], threshold=0.5)
    gate = SafetyGate(safety, embedder)
    concept = gate.concept_vectors()
    assert concept.shape == (2, embedder.dim)
    unsafe = concept[1] + 0.3 * np.random.default_rng(0).standard_normal(embedder.dim).astype(np.float32) / np.sqrt(
        embedder.dim)  # close to the concept: crosses
    # orthogonal to both concepts: cosine 0, never crosses
    q, _ = np.linalg.qr(np.stack([concept[0], concept[1], np.random.default_rng(1).standard_normal(embedder.dim)]).T)
    safe = q[:, 2].astype(np.float32)
    got = gate.check(np.stack([unsafe, safe]))
    assert got[0] is not None and got[0].concept == UNSAFE and got[0].score >= 0.5
    assert got[1] is None
    off = SafetyGate(dataclasses.replace(safety, enabled=False), embedder)
    assert off.check(np.stack([unsafe])) == [None]


def test_excluded_folders_and_globs(tmp_path: Path) -> None:
    private = tmp_path / "private"
    assert excluded_by(private / "a.jpg", [str(private)]) == str(private)
    assert excluded_by(tmp_path / "private-not" / "a.jpg", [str(private)]) is None  # a folder, not a prefix
    assert excluded_by(tmp_path / "x" / "id-scan.png", ["glob:*/id-*"]) == "glob:*/id-*"
    assert excluded_by(tmp_path / "x" / "kettle.png", ["glob:*/id-*", str(private)]) is None


# ----- in runs (scripted verdicts; an embedder that reads blue as the unsafe concept) -----

class ConceptEmbedder:
    """Texts: the unsafe concept is axis 2, "nudity" axis 3, every other text axis 1. Pictures: blue is axis 2,
    the rest mostly axis 1 (so no other picture crosses the threshold)."""

    model_id = "concept-fake"
    dim = 4

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        axes = {UNSAFE: 2, "nudity": 3}
        return np.eye(4, dtype=np.float32)[[axes.get(t, 1) for t in texts]]

    def embed_images(self, images: list[Image.Image], **_: Any) -> np.ndarray:
        rows = [[0, 0, 1, 0] if im.getpixel((0, 0)) == BLUE else [0.3, 1, 0, 0] for im in images]
        vectors = np.array(rows, dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


class SeedGenerator:
    """Seed 1 draws a blue (unsafe) picture, every other seed a grey one."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def generate(self, prompt: str, *, seed: int, references: list | None = None, **_: Any) -> Image.Image:
        self.calls.append({"seed": seed, "references": len(references or [])})
        return Image.new("RGB", (16, 16), BLUE if seed == 1 else (120, 120, 120))


class GateStore:
    """One reference per query from fixed files; embeddings as indexed (``stored`` overrides one, as if the file
    changed after indexing)."""

    def __init__(self, folder: Path, colours: dict[str, tuple[int, int, int]]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.refs = []
        for name, colour in colours.items():
            path = folder / f"{name}.png"
            Image.new("RGB", (8, 8), colour).save(path)
            self.refs.append((f"ref-{name}", str(path), name))
        self.stored: dict[str, np.ndarray] = {}

    def count(self) -> int:
        return len(self.refs)

    def retrieve(self, embedder: Any, queries: list[str], k: int = 2, **_: Any) -> list[FakeReference]:
        return [FakeReference(rid, path, 0.9, name, q) for q in queries for rid, path, name in self.refs]

    def search_text(self, embedder: Any, text: str, k: int = 5) -> list[FakeReference]:
        return [FakeReference(rid, path, 0.9, name, text) for rid, path, name in self.refs[:k]]

    def embeddings(self, ids: list[str]) -> dict[str, np.ndarray]:
        paths = {rid: path for rid, path, _ in self.refs}
        return {i: self.stored.get(i, ConceptEmbedder().embed_images([Image.open(paths[i]).convert("RGB")])[0])
                for i in ids if i in paths}


def make_runner(tmp_path: Path, verdicts: list, colours: dict, *, allow_flagged: bool = False,
                exclude: list[str] | None = None, llm_script: list | None = None, folder: str = "refs"):
    base = load_settings("default", environ={"IMGRAG_HOME": str(tmp_path / "home")})
    safety = SafetySettings(enabled=True, concepts=["nudity", UNSAFE], threshold=0.26, exclude=exclude or [],
                            allow_flagged=allow_flagged)
    settings = dataclasses.replace(base, safety=safety)
    models: dict[str, Any] = {"generator": SeedGenerator(), "judge": ScriptedJudge(verdicts),
                              "embedder": ConceptEmbedder()}
    if llm_script is not None:
        models["llm"] = ScriptedChatModel(messages=iter(llm_script))
    store = GateStore(tmp_path / folder, colours)
    runner = Runner(settings, manager=FakeManager(models), reference_store=store,
                    checkpointer=open_checkpointer(tmp_path / "threads.sqlite"))
    return runner, models


def trace(result: dict) -> list[dict]:
    return [json.loads(line) for line in (Path(result["run_dir"]) / "trace.jsonl").read_text().splitlines()]


def test_a_flagged_reference_is_dropped_with_a_trace_line_and_never_guides(tmp_path: Path) -> None:
    runner, models = make_runner(tmp_path, [NO_CRADLE, NO_CRADLE, MATCH], {"gore": BLUE, "cradle": (200, 0, 0)})
    result = runner.run("a wooden cradle", planner="fixed", max_rounds=3, seed=2)
    dropped = [s for s in trace(result) if s.get("event") == "safety"]
    assert dropped and all(s["dropped"] == "ref-gore" and UNSAFE in s["reason"] for s in dropped)
    assert "ref-gore" not in result["references"] and "ref-cradle" in result["references"]
    assert all("ref-gore" not in c["reference_ids"] for c in result["candidates"])
    assert any(c["reference_ids"] == ["ref-cradle"] for c in result["candidates"])


def test_an_excluded_folder_is_never_retrieved_from(tmp_path: Path) -> None:
    private = tmp_path / "private"
    runner, _ = make_runner(tmp_path, [NO_CRADLE], {"cradle": (200, 0, 0)}, exclude=[str(private)],
                            folder="private")
    result = runner.run("a wooden cradle", planner="fixed", max_rounds=2, seed=2)
    assert result["references"] == {}
    assert any(s.get("event") == "safety" and "excluded" in s["reason"] for s in trace(result))
    assert all(not c["reference_ids"] for c in result["candidates"])


def test_a_reference_flagged_at_drawing_time_is_dropped_too(tmp_path: Path) -> None:
    """The store's vector says safe (indexed before the file changed); the drawing checks the picture itself."""
    script = [call("retrieve", queries=["a wooden cradle"]),
              call("regenerate", prompt="a wooden cradle", reference_ids=["ref-cradle"], seed=2)]
    runner, models = make_runner(tmp_path, [NO_CRADLE], {"cradle": BLUE}, llm_script=script)
    runner.reference_store.stored["ref-cradle"] = np.array([0, 1, 0, 0], dtype=np.float32)
    result = runner.run("a wooden cradle", planner="agent", max_rounds=1)
    assert "ref-cradle" in result["references"]  # passed the store-vector check
    assert models["generator"].calls == [{"seed": 2, "references": 0}]  # but never guided the drawing
    assert any(s.get("event") == "safety" and s.get("tool") == "draw" for s in trace(result))


def test_a_flagged_output_is_kept_but_never_the_answer(tmp_path: Path) -> None:
    runner, models = make_runner(tmp_path, [MATCH], {"cradle": (200, 0, 0)})
    result = runner.run("a wooden cradle", planner="fixed", max_rounds=3, seed=1)  # seed 1: a blue picture
    by_id = {c["id"]: c for c in result["candidates"]}
    assert by_id["c0"]["flagged"]["concept"] == UNSAFE and by_id["c0"]["answer_blocked"]
    assert Path(by_id["c0"]["path"]).is_file()  # kept on disk
    assert result["final_candidate"] != "c0" and result["status"] == "matched"
    assert not by_id[result["final_candidate"]]["flagged"]
    assert len(models["generator"].calls) == 2


def test_every_output_flagged_means_no_answer(tmp_path: Path) -> None:
    runner, _ = make_runner(tmp_path, [MATCH], {"cradle": (200, 0, 0)})
    runner.manager.models["generator"].generate = lambda prompt, **_: Image.new("RGB", (16, 16), BLUE)
    result = runner.run("a wooden cradle", planner="fixed", max_rounds=2, seed=1)
    assert result["final_image"] is None and result["status"] == "failed"
    assert len(result["candidates"]) == 2 and all(c["answer_blocked"] for c in result["candidates"])
    assert result["blocked"].startswith("every drawing (2) was flagged by the safety gate") and UNSAFE in result[
        "blocked"]


def test_retrieve_says_when_every_match_was_dropped_by_the_gate(tmp_path: Path) -> None:
    from langchain_core.messages import ToolMessage

    private = tmp_path / "private"
    runner, _ = make_runner(tmp_path, [NO_CRADLE], {"cradle": (200, 0, 0)}, exclude=[str(private)],
                            folder="private")
    result = runner.run("a wooden cradle", planner="fixed", max_rounds=2, seed=2)
    messages = runner.thread_state(result["run_id"]).values["messages"]
    said = [m.content for m in messages if isinstance(m, ToolMessage) and m.name == "retrieve"]
    assert said and all("matched but the safety gate dropped them all" in text for text in said)
    assert not any("No reference matched" in text for text in said)


def test_the_llm_cannot_finish_with_a_flagged_output(tmp_path: Path) -> None:
    script = [call("generate", prompt="a wooden cradle", seed=1), call("critique", candidate_id="c0"),
              call("finish", candidate_id="c0")]
    runner, _ = make_runner(tmp_path, [MATCH], {"cradle": (200, 0, 0)}, llm_script=script)
    result = runner.run("a wooden cradle", planner="agent", max_rounds=2)
    finish = next(s for s in trace(result) if s.get("tool") == "finish" and "args" in s)
    assert not finish["ok"] and "flagged" in finish["message"]
    assert result["final_candidate"] != "c0"


def test_allow_flagged_lets_a_flagged_output_be_the_answer(tmp_path: Path) -> None:
    runner, models = make_runner(tmp_path, [MATCH], {"cradle": (200, 0, 0)}, allow_flagged=True)
    result = runner.run("a wooden cradle", planner="fixed", max_rounds=3, seed=1)
    assert result["final_candidate"] == "c0" and result["candidates"][0]["flagged"]
    assert len(models["generator"].calls) == 1


def test_index_can_skip_flagged_pictures(tmp_path: Path) -> None:
    from imgrag.store import ReferenceStore

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (16, 16), BLUE).save(folder / "gore.png")
    Image.new("RGB", (16, 16), (200, 10, 10)).save(folder / "kettle.png")
    base = load_settings("default", environ={"IMGRAG_HOME": str(tmp_path / "home")})
    safety = SafetySettings(concepts=["nudity", UNSAFE], skip_flagged_at_index=True)  # check on for indexing
    settings = dataclasses.replace(base, safety=safety, store=str(tmp_path / "store"))
    embedder = ConceptEmbedder()
    store = ReferenceStore.open(settings, embedder.model_id, embedder.dim, for_writing=True)
    summary = store.index([folder], embedder, screen=index_screen(settings.safety, embedder))
    assert summary["total"] == 1 and summary["added"] == 1
    assert [s["path"] for s in summary["skipped"]] == [str(folder / "gore.png")]
    assert UNSAFE in summary["skipped"][0]["reason"]
    again = store.index([folder], embedder, screen=index_screen(settings.safety, embedder))
    assert again["total"] == 1 and again["skipped"][0]["path"].endswith("gore.png")  # skipped again, not stored
    assert index_screen(dataclasses.replace(safety, skip_flagged_at_index=False), embedder) is None


def test_a_flagged_photo_is_never_a_candidate_answer(tmp_path: Path) -> None:
    runner, models = make_runner(tmp_path, [MATCH], {"gore": BLUE, "kettle": (200, 0, 0)})
    runner.settings = dataclasses.replace(
        runner.settings, retrieval=dataclasses.replace(runner.settings.retrieval, allow_retrieved=True))
    result = runner.run("a wooden cradle", planner="fixed", max_rounds=1)
    photos = [c for c in result["candidates"] if c.get("source") == "retrieved"]
    assert [c["reference_id"] for c in photos] == ["ref-kettle"]
    assert any(s.get("event") == "safety" and s["tool"] == "consider_photos" for s in trace(result))
    assert result["final_source"] == "retrieved" and models["generator"].calls == []


def test_search_never_lists_an_excluded_folder(tiny_settings, tmp_path: Path, capsys) -> None:
    from tests.cli import run_cli

    for name in ("open", "private"):
        folder = tmp_path / name
        folder.mkdir()
        rng = np.random.default_rng(len(name))
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{name}{i}.png")
    code, _, err = run_cli(capsys, "index", str(tmp_path / "open"), str(tmp_path / "private"), "--profile", "tiny",
                           "--json")
    assert code == 0, err
    config = tmp_path / "safe.toml"
    config.write_text(f'[safety]\nexclude = ["{tmp_path / "private"}"]\n', encoding="utf-8")
    code, out, err = run_cli(capsys, "search", "anything", "-k", "4", "--profile", "tiny", "--config", str(config),
                             "--json")
    assert code == 0, err
    paths = [r["path"] for r in json.loads(out)["results"]]
    assert paths and all("/open/" in p for p in paths)


def test_a_real_run_with_everything_flagged(tiny_settings, tmp_path: Path, capsys) -> None:
    """The real store's embeddings and the real CLIP wrapper: at threshold -1 every picture crosses it."""
    from tests.cli import run_cli

    folder = tmp_path / "refs"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"r{i}.png")
    code, _, err = run_cli(capsys, "index", str(folder), "--profile", "tiny", "--json")
    assert code == 0, err
    config = tmp_path / "strict.toml"
    config.write_text("[safety]\nenabled = true\nthreshold = -1.0\n", encoding="utf-8")
    common = ("--profile", "tiny", "--config", str(config), "--planner", "fixed", "--max-rounds", "2", "--json")
    code, out, err = run_cli(capsys, "run", "a wooden cradle", *common)
    assert code == 1, err  # no answer: a failed run, said on screen with the gate that blocked it
    assert "warning: every drawing (2) was flagged by the safety gate" in " ".join(err.split())
    result = json.loads(out)
    assert result["final_image"] is None and result["status"] == "failed" and result["references"] == {}
    assert "safety gate" in result["blocked"]
    assert all(c["answer_blocked"] and Path(c["path"]).is_file() for c in result["candidates"])
    dropped = [s for s in trace(result) if s.get("event") == "safety"]
    assert dropped and all(Path(s["path"]).parent == folder for s in dropped)

    code, out, err = run_cli(capsys, "run", "a wooden cradle", *common, "--allow-flagged")
    assert code == 0, err
    result = json.loads(out)
    assert Path(result["final_image"]).is_file() and result["candidates"][0]["flagged"]


# ----- the gate's life: one run's, and none at all when the check is off -----

class CountingEmbedder(ConceptEmbedder):
    """ConceptEmbedder that records every text it embeds (the concepts are embedded only by a gate)."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        self.texts.extend(texts)
        return super().embed_texts(texts)


@pytest.fixture
def built_gates(monkeypatch: pytest.MonkeyPatch) -> list:
    """A weak reference to every SafetyGate the tools build (the real class, spied on)."""
    import weakref

    import tools.safety_gate as safety_gate

    built: list = []

    class Spied(SafetyGate):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            built.append(weakref.ref(self))

    monkeypatch.setattr(safety_gate, "SafetyGate", Spied)
    return built


@pytest.mark.parametrize("exclude", [False, True])
def test_with_the_check_off_no_gate_is_built_and_no_concept_embedded(tmp_path: Path, built_gates: list,
                                                                    exclude: bool) -> None:
    private = tmp_path / "private"
    runner, models = make_runner(tmp_path, [NO_CRADLE, NO_CRADLE, MATCH], {"gore": BLUE, "cradle": (200, 0, 0)},
                                 exclude=[str(private / "gore.png")] if exclude else None, folder="private")
    runner.settings = dataclasses.replace(runner.settings,
                                          safety=dataclasses.replace(runner.settings.safety, enabled=False))
    models["embedder"] = embedder = CountingEmbedder()
    result = runner.run("a wooden cradle", planner="fixed", max_rounds=3, seed=1)  # seed 1 draws a "gore" picture
    assert built_gates == []
    assert not set(embedder.texts) & {UNSAFE, "nudity"}
    assert models["generator"].calls[0]["seed"] == 1  # c0 is the blue picture: unchecked, so not flagged
    assert all(c["flagged"] is None and not c["answer_blocked"] for c in result["candidates"])
    assert any(c["reference_ids"] for c in result["candidates"]), "a guided redraw ran (its references screened)"
    # safety.exclude still applies with the concept check off; the blue reference passes when nothing excludes it.
    assert ("ref-gore" in result["references"]) is not exclude
    assert any(s.get("event") == "safety" and "excluded" in s["reason"] for s in trace(result)) is exclude


def test_the_gate_is_the_runs_and_goes_with_it(tmp_path: Path, built_gates: list) -> None:
    """Each run builds its own gate (concepts embedded once per run, not per check) and nothing keeps it after the
    run: not a process-wide cache, not the model thread's last call; the manager and its models go with the runner."""
    import gc
    import weakref

    runner, models = make_runner(tmp_path, [NO_CRADLE, NO_CRADLE, MATCH, NO_CRADLE, NO_CRADLE, MATCH],
                                 {"gore": BLUE, "cradle": (200, 0, 0)})
    models["embedder"] = embedder = CountingEmbedder()
    first = runner.run("a wooden cradle", planner="fixed", max_rounds=3, seed=2)
    assert len(first["candidates"]) == 3 and any(c["reference_ids"] for c in first["candidates"])
    per_run = len(built_gates)
    # One gate per embedder it checks with (the store's, the drawing's), not one per check.
    assert 1 <= per_run <= 2 and embedder.texts.count(UNSAFE) == per_run
    runner.run("a wooden cradle", planner="fixed", max_rounds=3, seed=2)
    assert len(built_gates) == 2 * per_run  # the second run built its own
    gc.collect()
    assert all(ref() is None for ref in built_gates), "no gate outlives its run (the runner lives on)"

    manager, model = weakref.ref(runner.manager), weakref.ref(embedder)
    del runner, models, embedder
    gc.collect()
    assert manager() is None and model() is None

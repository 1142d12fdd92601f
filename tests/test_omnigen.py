"""OmniGen as the in-context repair backbone: ImageRAG-O's concept-addressed prompt, the loader on the tiny kit's
saved OmniGen, the budget with both backbones, the download and doctor rows, the tools and a whole run."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from langchain_core.messages import AIMessage
from langgraph.graph import END, START, StateGraph
from langgraph.prebuilt import ToolNode
from PIL import Image

from agent.graph import initial_state
from agent.policy import concept_mapping, next_step
from agent.state import AgentState
from imgrag.drawing.concept_refs import (
    ConceptMapError,
    ConceptReferences,
    as_content,
    concept_prompt,
    concepts_from_references,
    parse_concepts,
)
from imgrag.errors import ModelLoadError, TimeBudgetSpent, UserError
from imgrag.records.runs import RunRecord
from imgrag.settings import load_settings
from tests.cli import run_cli
from tests.fakes import FakeEmbedder, FakeGenerator, FakeManager, FakeVerdict, MemoryStore, ScriptedJudge
from tools.context import ToolContext
from tools.image_tools import make_tools
from tools.records import from_state

GIB = 2**30


def _c(concept: str, *ids: str) -> ConceptReferences:
    return ConceptReferences(concept=concept, reference_ids=list(ids))


# ----- the prompt: ImageRAG-O's wording, concept order, the cap, concepts without references -----


def test_each_concept_names_its_own_references_in_order() -> None:
    planned = concept_prompt("a red fox curled up on a wooden cradle",
                             [_c("a red fox", "fox1"), _c("a wooden cradle", "cradle1")], max_images=3)
    assert planned.text == ("According to these images of a red fox: <img><|image_1|></img>, a wooden cradle: "
                            "<img><|image_2|></img>, generate a red fox curled up on a wooden cradle")
    assert planned.image_ids == ["fox1", "cradle1"]
    assert planned.mapping() == [{"concept": "a red fox", "reference_ids": ["fox1"], "images": [1]},
                                 {"concept": "a wooden cradle", "reference_ids": ["cradle1"], "images": [2]}]
    # Another order of concepts is another prompt: the order is the caller's, not sorted.
    swapped = concept_prompt("p", [_c("a wooden cradle", "cradle1"), _c("a red fox", "fox1")], max_images=3)
    assert swapped.image_ids == ["cradle1", "fox1"] and swapped.text.index("cradle") < swapped.text.index("fox")


def test_the_cap_is_filled_round_robin_and_what_is_left_out_is_recorded() -> None:
    planned = concept_prompt("p", [_c("fox", "f1", "f2", "f3"), _c("cradle", "c1", "c2"), _c("moon", "m1")],
                             max_images=4)
    # Every concept gets its first reference before any gets a second; slots are numbered concept by concept.
    assert planned.image_ids == ["f1", "f2", "c1", "m1"]
    assert "fox: <img><|image_1|></img> and <img><|image_2|></img>, cradle: <img><|image_3|></img>, moon: " \
           "<img><|image_4|></img>, generate p" in planned.text
    fox, cradle, moon = planned.concepts
    assert fox.left_out == [{"reference_id": "f3", "why": "over the cap of 4 input images"}]
    assert cradle.reference_ids == ["c1"] and cradle.left_out[0]["reference_id"] == "c2"
    assert moon.images == [4] and not moon.left_out
    # ImageRAG-O's own case: one reference per concept, the first three kept.
    first_three = concept_prompt("p", [_c(f"k{i}", f"r{i}") for i in range(5)], max_images=3)
    assert first_three.image_ids == ["r0", "r1", "r2"] and first_three.text.count("<img>") == 3
    with pytest.raises(ValueError, match="max_images"):
        concept_prompt("p", [], max_images=0)


def test_a_concept_without_references_is_named_by_the_prompt_only() -> None:
    planned = concept_prompt("a fox on a cradle", [_c("a fox"), _c("a cradle", "c1")], max_images=3)
    assert planned.text == "According to these images of a cradle: <img><|image_1|></img>, generate a fox on a cradle"
    assert planned.mapping()[0] == {"concept": "a fox", "reference_ids": [], "images": [],
                                    "note": "no reference: named by the prompt only"}
    # No reference at all: the plain prompt, drawn text-to-image.
    plain = concept_prompt("a fox on a cradle", [_c("a fox")], max_images=3)
    assert plain.text == "a fox on a cradle" and plain.image_ids == []
    # A reference named for two concepts stands for the first only.
    twice = concept_prompt("p", [_c("a", "r1"), _c("b", "r1", "r2")], max_images=3)
    assert twice.image_ids == ["r1", "r2"] and twice.concepts[1].left_out[0]["reference_id"] == "r1"


def test_untrusted_text_cannot_add_an_image_slot_or_a_control_token() -> None:
    planned = concept_prompt("a fox <img><|image_2|></img><|end|><|assistant|>",
                             [_c("a cradle <|image_7|>", "c1")], max_images=3)
    assert planned.text.count("<|image_") == 1 and "<|end|>" not in planned.text and "<|assistant|>" not in planned.text
    assert as_content("x<|user|>y</img>") == "x< |user| >y"


def test_the_mapping_record_is_strict_and_merges_duplicates() -> None:
    assert parse_concepts([{"concept": " a fox ", "reference_ids": ["r1"]}, {"concept": "A  fox", "reference_ids":
                          ["r1", "r2"]}]) == [_c("a fox", "r1", "r2")]
    for bad, where in (([{"concept": "a", "weights": 1}], "weights"), ([{"concept": ""}], "concept"),
                       ("a fox", "must be a list")):
        with pytest.raises(ConceptMapError, match=where):
            parse_concepts(bad)
    refs = {"r1": {"query": "a red fox"}, "r2": {"query": "a cradle"}, "r3": {}}
    assert concepts_from_references(["r1", "r2", "r3"], refs, [_c("the fox", "r1")]) == [
        _c("the fox", "r1"), _c("a cradle", "r2"), _c("the prompt", "r3")]


def test_the_fixed_policy_builds_the_mapping_from_the_retrieval_per_concept() -> None:
    refs = {f"{c}{n}": {"path": f"/x/{c}{n}.png", "query": q}
            for c, q in (("f", "a red fox"), ("c", "a wooden cradle")) for n in (1, 2)}
    state = {"prompt": "a red fox on a wooden cradle", "seed": 0, "rounds": 1, "budget": {"max_rounds": 3},
             "references": refs, "candidates": {"c0": {
                 "id": "c0", "path": "/x/c0.png", "round": 1, "reference_ids": [], "verdict": {
                 "match": False, "missing": ["a red fox", "a wooden cradle"], "parsed": True}}},
             "retrievals": [{"for": "c0", "queries": ["a red fox", "a wooden cradle"],
                             "reference_ids": ["f1", "f2", "c1", "c2"]}]}
    state = from_state(state)
    assert concept_mapping(state, state["retrievals"][0], [], limit=3) == [
        {"concept": "a red fox", "reference_ids": ["f1", "f2"]},
        {"concept": "a wooden cradle", "reference_ids": ["c1"]}]
    name, args = next_step(state, 0.5, "omnigen")
    assert name == "regenerate" and [c["concept"] for c in args["concepts"]] == ["a red fox", "a wooden cradle"]
    assert "ip_scale" not in args and args["reference_ids"] == ["f1", "f2", "c1", "c2"]
    name, args = next_step(state, 0.5)  # IP-Adapter: the policy's arguments as before
    assert name == "regenerate" and "concepts" not in args and args["ip_scale"] == 0.5


# ----- the loader: OmniGenPipeline.from_pretrained on the kit's saved OmniGen -----


@pytest.fixture
def omnigen_settings(tiny_settings):
    return load_settings("tiny", overrides={"generation": {"repair_with": "omnigen"}})


def test_the_kit_saves_omnigen_in_the_real_layout(tiny_kit) -> None:
    folder = tiny_kit["omnigen"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "OmniGenPipeline"
    assert {k: v[1] for k, v in index.items() if not k.startswith("_")} == {
        "transformer": "OmniGenTransformer2DModel", "vae": "AutoencoderKL", "tokenizer": "LlamaTokenizer",
        "scheduler": "FlowMatchEulerDiscreteScheduler"}
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert len(vae["down_block_types"]) == 4  # 8x downsampling, as the processor's token count assumes
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file()


def test_omnigen_loads_through_from_pretrained_and_draws_with_references(omnigen_settings) -> None:
    from imgrag.models.omnigen import OmniGenDrawer

    drawer = OmniGenDrawer.from_pretrained(omnigen_settings, "cpu")
    assert type(drawer.pipe).__name__ == "OmniGenPipeline"
    refs = [Image.new("RGB", (40, 56), (200, 30, 30)), Image.new("RGB", (64, 64), (30, 30, 200))]
    planned = concept_prompt("a red fox on a wooden cradle", [_c("a red fox", "a"), _c("a wooden cradle", "b")], 3)
    first = drawer.generate(planned.text, seed=3, input_images=refs)
    again = drawer.generate(planned.text, seed=3, input_images=refs)
    plain = drawer.generate("a red fox on a wooden cradle", seed=3)
    assert first.size == (64, 64) and np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(plain))
    with pytest.raises(UserError, match="2 image slot"):
        drawer.generate(planned.text, seed=3, input_images=refs[:1])
    with pytest.raises(UserError, match="multiple of 16"):
        drawer.generate("x", seed=3, width=72)
    steps: list[tuple[int, int]] = []
    with pytest.raises(TimeBudgetSpent, match="stopped after step 1 of 2"):
        drawer.generate("x", seed=3, on_step=lambda d, t: steps.append((d, t)), deadline=time.monotonic() - 1)
    assert steps == [(1, 2)]


def test_a_folder_holding_another_pipeline_is_one_line(tiny_settings, tiny_kit) -> None:
    from imgrag.models.omnigen import OmniGenDrawer

    settings = load_settings("tiny", overrides={"models": {"omnigen": str(tiny_kit["generator"])}})
    with pytest.raises(ModelLoadError, match="holds a StableDiffusionXLPipeline, not OmniGen.*models.omnigen"):
        OmniGenDrawer.from_pretrained(settings, "cpu")


# ----- the budget with both backbones -----


class _Sized:
    """A model of a stated size that records its moves (no real device here)."""

    def __init__(self, pipe=None) -> None:
        self.pipe = pipe
        self.moves: list[str] = []

    def to(self, device):
        self.moves.append(str(device))
        return self


def test_the_budget_holds_with_both_backbones(omnigen_settings) -> None:
    import torch
    from diffusers import OmniGenTransformer2DModel

    from imgrag.kits.full_configs import OMNIGEN_TRANSFORMER
    from imgrag.management.engine import build_manager, uses_omnigen, working_memory_gb
    from imgrag.management.manager import ModelManager

    assert uses_omnigen(omnigen_settings) and "omnigen" in build_manager(omnigen_settings).names()
    assert "omnigen" not in build_manager(load_settings("tiny")).names()

    # OmniGen-v1's real transformer (shapes only) at 1024x1024 with three references: the stated estimate.
    with torch.device("meta"):
        transformer = OmniGenTransformer2DModel(**OMNIGEN_TRANSFORMER)
    real = load_settings("default", environ={}, overrides={"device": "cpu", "dtype": "bfloat16"})
    estimate = working_memory_gb(real)["omnigen"](_Sized(SimpleNamespace(transformer=transformer)))
    assert 6 < estimate < 14, estimate
    fewer = load_settings("default", environ={}, overrides={"device": "cpu", "dtype": "bfloat16",
                                                            "omnigen": {"max_references": 1}})
    assert working_memory_gb(fewer)["omnigen"](_Sized(SimpleNamespace(transformer=transformer))) < estimate

    def manager(budget: float) -> ModelManager:
        settings = load_settings("default", environ={}, overrides={"device": "cpu", "gpu_memory_gb": budget})
        m = ModelManager(settings, device="gpu-fake", lock=threading.RLock())
        m.register("generator", _Sized, size_gb=8.3, reserve_gb=5.0)  # SDXL + IP-Adapter, measured on an H100
        m.register("judge", _Sized, size_gb=7.0, reserve_gb=1.0)
        m.register("omnigen", _Sized, size_gb=7.2, reserve_gb=estimate)
        return m

    big = manager(0)  # gpu-80gb: no limit, everything stays resident
    for name in ("generator", "judge", "omnigen", "generator"):
        big.run(name, lambda model: None)
    assert set(big.resident()) == {"generator", "judge", "omnigen"}
    small = manager(21)  # gpu-24gb with --repair-with omnigen: OmniGen's repair evicts SDXL and the judge
    for name in ("generator", "judge"):
        small.run(name, lambda model: None)
    assert set(small.resident()) == {"generator", "judge"}
    small.run("omnigen", lambda model: None)
    assert small.resident() == ["omnigen"]
    with pytest.raises(UserError, match="gpu_memory_gb"):  # loading past the budget is an error
        manager(12).run("omnigen", lambda model: None)


# ----- the download and doctor rows -----


def test_download_and_doctor_know_omnigens_files(capsys, monkeypatch, tmp_path: Path, tiny_kit) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    code, out, _ = run_cli(capsys, "models", "download", "--profile", "gpu-80gb", "--dry-run", "--json")
    row = next(r for r in json.loads(out)["roles"] if r["role"] == "omnigen")
    assert code == 0 and row["repo_id"] == "Shitao/OmniGen-v1-diffusers" and row["recorded_layout"]
    sizes = {f["path"]: f["size"] for f in row["files"]}
    assert sizes["transformer/diffusion_pytorch_model.safetensors"] == 7_750_000_000
    assert sizes["vae/diffusion_pytorch_model.safetensors"] == 335_000_000
    assert "README.md" not in sizes and {"model_index.json", "tokenizer/tokenizer.json"} <= set(sizes)
    assert all(f["size_approximate"] for f in row["files"])  # computed, not copied from the hub's listing
    code, out, _ = run_cli(capsys, "models", "download", "--profile", "gpu-24gb", "--dry-run", "--json")
    assert "omnigen" not in [r["role"] for r in json.loads(out)["roles"]]  # IP-Adapter there: nothing to fetch
    code, out, _ = run_cli(capsys, "models", "download", "--profile", "gpu-24gb", "--dry-run", "--repair-with",
                           "omnigen", "--role", "omnigen")
    assert code == 0 and "7.75 GB~  transformer/diffusion_pytorch_model.safetensors" in out

    monkeypatch.setenv("IMGRAG_TINY_KIT_DIR", str(tiny_kit["generator"].parent))
    code, out, _ = run_cli(capsys, "doctor", "--profile", "tiny", "--repair-with", "omnigen", "--json")
    omnigen = json.loads(out)["checkpoints"]["omnigen"]
    assert code == 0 and omnigen["status"] == "local directory" and omnigen["ok"] and omnigen["files"] == 7
    from imgrag.weights.model_files import check_role

    files = {f.path for f in check_role("omnigen", load_settings("tiny")).files}
    assert files == {"model_index.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer_config.json",
                     "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                     "vae/config.json", "vae/diffusion_pytorch_model.safetensors"}


# ----- the agent's regenerate takes the mapping -----


class FakeOmniGen:
    """Records what OmniGen would be asked: the in-context prompt and how many input images."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def generate(self, prompt: str, *, seed: int, input_images=None, **_) -> Image.Image:
        self.calls.append({"prompt": prompt, "images": len(input_images or [])})
        return Image.new("RGB", (16, 16), (seed * 40 % 256, 0, 0))


def test_the_agents_regenerate_takes_the_mapping(tmp_path: Path) -> None:
    settings = load_settings("default", environ={"IMGRAG_HOME": str(tmp_path)},
                             overrides={"generation": {"repair_with": "omnigen"}})
    omnigen = FakeOmniGen()
    manager = FakeManager({"generator": FakeGenerator(), "omnigen": omnigen, "embedder": FakeEmbedder(),
                           "judge": ScriptedJudge([FakeVerdict(False, ["x"])])})
    (tmp_path / "refs").mkdir()
    ctx = ToolContext(settings, manager, RunRecord(tmp_path / "run"), reference_store=MemoryStore(tmp_path / "refs"))
    state = initial_state("a retriever in a cradle", seed=0, run_id="r", run_dir=str(tmp_path / "run"),
                          planner="agent", budget={"max_rounds": 3, "max_tool_calls": 9, "max_seconds": 60})
    graph = StateGraph(AgentState, context_schema=ToolContext)
    graph.add_node("tools", ToolNode(make_tools()))
    graph.add_edge(START, "tools")
    graph.add_edge("tools", END)
    app = graph.compile()

    def call(state: dict, name: str, **args) -> tuple[str, str, dict]:
        message = AIMessage(content="", tool_calls=[{"name": name, "args": args, "id": f"t{len(state['messages'])}"}])
        new = app.invoke({**state, "messages": [*state["messages"], message]}, context=ctx)
        return new["messages"][-1].status, new["messages"][-1].content, new

    _, _, state = call(state, "retrieve", queries=["a retriever", "a cradle"])
    assert set(state["references"]) == {"ref-retriever", "ref-cradle"}
    # The LLM says which reference is which, in its own order: the cradle first.
    status, text, state = call(state, "regenerate", prompt="a retriever in a cradle", concepts=[
        {"concept": "the wooden cradle", "reference_ids": ["ref-cradle"]},
        {"concept": "the golden retriever", "reference_ids": ["ref-retriever"]}])
    assert status == "success", text
    candidate = state["candidates"]["c0"]
    assert candidate.backbone == "omnigen" and candidate.reference_ids == ["ref-cradle", "ref-retriever"]
    assert [(c["concept"], c["images"]) for c in candidate.concepts] == [("the wooden cradle", [1]),
                                                                           ("the golden retriever", [2])]
    assert omnigen.calls == [{"prompt": candidate.sent_prompt, "images": 2}]
    assert candidate.sent_prompt.startswith("According to these images of the wooden cradle: <img><|image_1|>")
    assert json.loads(text)["concepts"][0] == {"concept": "the wooden cradle", "reference_ids": ["ref-cradle"]}
    trace = [json.loads(line) for line in (tmp_path / "run" / "trace.jsonl").read_text().splitlines()]
    drawn = next(s for s in trace if s.get("tool") == "regenerate")
    assert drawn["backbone"] == "omnigen" and drawn["concepts"] == candidate.concepts
    # A wrong mapping comes back as a message the LLM can act on.
    for concepts, expected in (([{"concept": "x", "reference_ids": ["ref-nope"]}], "unknown reference ids"),
                               ([{"name": "x"}], "concepts entry 1")):
        status, text, _ = call(state, "regenerate", prompt="p", concepts=concepts)
        assert status == "error" and expected in text


# ----- a whole run on the tiny kit: two concepts, each with its own reference -----


def test_a_tiny_run_repairs_with_omnigen_from_two_concepts(tiny_settings, tmp_path: Path, capsys,
                                                            monkeypatch) -> None:
    import imgrag.management.engine

    folder = tmp_path / "refs"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for name in ("fox", "cradle", "moon"):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a photo of a {name}", encoding="utf-8")
    code, _, err = run_cli(capsys, "index", str(folder), "--profile", "tiny", "--json")
    assert code == 0, err
    # The tiny judge's verdicts are junk: a scripted one names the two missing concepts (decision logic only).
    verdict = FakeVerdict(False, ["a red fox", "a wooden cradle"], "scripted", parsed=True)
    monkeypatch.setattr(imgrag.management.engine, "_load_judge", lambda *_: ScriptedJudge([verdict]))
    monkeypatch.setenv("IMGRAG_RETRIEVAL_K", "1")
    code, out, err = run_cli(capsys, "run", "a red fox curled up on a wooden cradle", "--profile", "tiny",
                             "--planner", "fixed", "--repair-with", "omnigen", "--max-rounds", "2", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["model_loads"]["omnigen"] == 1 and result["model_loads"]["generator"] == 1
    first, repair = result["candidates"][0], result["candidates"][1]
    assert first["backbone"] == "sdxl" and repair["backbone"] == "omnigen"
    assert [c["concept"] for c in repair["concepts"]] == ["a red fox", "a wooden cradle"]
    own = [c["reference_ids"] for c in repair["concepts"]]
    assert all(len(ids) == 1 for ids in own) and own[0] != own[1]
    assert repair["sent_prompt"].count("<img><|image_") == 2

    run_dir = Path(result["run_dir"])
    trace = [json.loads(line) for line in (run_dir / "trace.jsonl").read_text().splitlines()]
    assert next(s for s in trace if s.get("tool") == "regenerate")["concepts"] == repair["concepts"]
    with Image.open(repair["path"]) as picture:
        doc = json.loads(picture.info["imgrag"])
    assert doc["backbone"] == "omnigen" and doc["concepts"] == repair["concepts"]
    assert doc["models"] == {"omnigen": str(Path(tiny_settings.tiny_kit_dir) / "omnigen")}
    assert [r["id"] for r in doc["references"]] == repair["reference_ids"] and doc["fast"] == "off"
    code, _, err = run_cli(capsys, "report", str(run_dir))
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert code == 0 and 'class="concepts"' in page and "a wooden cradle" in page and "(image 2)" in page


# ----- one drawing from the command line: generate --ref --repair-with omnigen, and its redraw -----


def test_generate_places_each_ref_beside_its_concept_and_redraws_from_the_recipe(tiny_settings, tmp_path: Path,
                                                                                 capsys) -> None:
    fox, cradle = tmp_path / "fox.png", tmp_path / "cradle.png"
    Image.new("RGB", (48, 48), (200, 90, 30)).save(fox)
    Image.new("RGB", (48, 48), (120, 80, 40)).save(cradle)
    out_png = tmp_path / "out.png"
    code, out, err = run_cli(capsys, "generate", "a red fox on a wooden cradle", "-o", str(out_png), "--profile",
                             "tiny", "--repair-with", "omnigen", "--ref", str(fox), "--concept", "a red fox",
                             "--ref", str(cradle), "--concept", "a wooden cradle", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["backbone"] == "omnigen" and result["model_loads"].get("generator", 0) == 0
    assert [c["concept"] for c in result["concepts"]] == ["a red fox", "a wooden cradle"]
    assert [c["images"] for c in result["concepts"]] == [[1], [2]]
    assert result["sent_prompt"].count("<img><|image_") == 2 and "warning" in result  # tiny: noise
    with Image.open(out_png) as picture:
        doc = json.loads(picture.info["imgrag"])
    assert doc["backbone"] == "omnigen" and doc["concepts"] == result["concepts"]

    again = tmp_path / "again.png"
    code, out, err = run_cli(capsys, "generate", "--from-image", str(out_png), "-o", str(again), "--json")
    assert code == 0, err
    redraw = json.loads(out)
    assert redraw["backbone"] == "omnigen" and redraw["concepts"] == result["concepts"]
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out_png)))


def test_generate_on_omnigen_refuses_what_does_not_apply(tiny_settings, tmp_path: Path, capsys) -> None:
    fox = tmp_path / "fox.png"
    Image.new("RGB", (48, 48), (200, 90, 30)).save(fox)
    base = ["generate", "a fox", "-o", str(tmp_path / "o.png"), "--profile", "tiny"]
    code, _, err = run_cli(capsys, *base, "--repair-with", "omnigen", "--ref", f"{fox}:0.5:style")
    assert code == 1 and "no per-reference weight or mode" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, *base, "--repair-with", "omnigen", "--ref", str(fox), "--concept", "a", "--concept",
                           "b")
    assert code == 1 and "one --concept per --ref" in err
    code, _, err = run_cli(capsys, *base, "--ref", str(fox), "--concept", "a fox")
    assert code == 1 and "needs --ref PATH and --repair-with omnigen" in err
    code, _, err = run_cli(capsys, *base, "--repair-with", "omnigen", "--concept", "a fox")
    assert code == 1 and "give one --ref per --concept" in err
    code, _, err = run_cli(capsys, *base, "--repair-with", "omnigen", "--ref", str(fox), "--steps", "100000")
    assert code == 1 and "generation.max_steps" in err and "OmniGen" in err  # the same bound as SDXL's
    code, _, err = run_cli(capsys, *base, "--repair-with", "omnigen")
    assert code == 0 and "without --ref the picture is drawn from the prompt alone (SDXL)" in err

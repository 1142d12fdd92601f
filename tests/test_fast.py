"""Few-step drawing on the tiny kit: the LCM-LoRA path, scheduler choice, IP-Adapter, switching back, no reload."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgrag.errors import ModelLoadError, UserError
from imgrag.management.manager import measure_gb
from imgrag.models.fast import METHODS, draw_plan
from imgrag.models.generator import Generator
from imgrag.settings import Settings, SettingsError, load_settings

RED = Image.new("RGB", (100, 80), (200, 30, 30))


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _settings(tiny_kit: dict[str, Path], home: Path, **env: str) -> Settings:
    environ = {"IMGRAG_TINY_KIT_DIR": str(tiny_kit["generator"].parent), "IMGRAG_HOME": str(home), **env}
    return load_settings("tiny", environ=environ)


@pytest.fixture(scope="module")
def settings(tiny_kit: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return _settings(tiny_kit, tmp_path_factory.mktemp("fast-home"))


# ----- settings and plans (no model) -----

def test_plan_uses_each_methods_documented_defaults_and_the_overrides(tmp_path: Path) -> None:
    s = load_settings("default", environ={"IMGRAG_HOME": str(tmp_path)})
    g = s.generation
    assert g.fast == "off" and draw_plan(g) == draw_plan(g, "off")
    assert (draw_plan(g).steps, draw_plan(g).guidance) == (g.steps, g.guidance) == (30, 5.0)
    lcm = draw_plan(g, "lcm-lora")
    assert (lcm.mode, lcm.steps, lcm.guidance) == ("lcm-lora", 4, 1.0)
    assert (draw_plan(g, "distilled").steps, draw_plan(g, "distilled").guidance) == (4, 0.0)

    s = load_settings("default", environ={"IMGRAG_HOME": str(tmp_path), "IMGRAG_GENERATION_FAST": "lcm-lora",
                                          "IMGRAG_GENERATION_FAST_STEPS": "6"},
                      overrides={"generation": {"fast_guidance": 1.5}})
    plan = draw_plan(s.generation)
    assert (plan.mode, plan.steps, plan.guidance) == ("lcm-lora", 6, 1.5)
    assert draw_plan(s.generation, "off").steps == 30  # the full-step values stay for switching back
    assert s.models.lcm_lora == "latent-consistency/lcm-lora-sdxl"
    assert set(METHODS) == {"lcm-lora", "distilled"}


@pytest.mark.parametrize("layer, message", [
    ({"generation": {"fast": "turbo"}}, "generation.fast: Input should be 'off', 'lcm-lora' or 'distilled'"),
    ({"generation": {"fast_steps": 0}}, "generation.fast_steps: Input should be greater than or equal to 1"),
    ({"generation": {"fast_guidance": -1}}, "generation.fast_guidance: Input should be greater than or equal to 0"),
])
def test_bad_fast_settings_are_one_line_errors(tmp_path: Path, layer: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings("default", overrides=layer, environ={"IMGRAG_HOME": str(tmp_path)})


def test_tiny_profile_points_at_the_kits_lcm_lora(tiny_kit: dict[str, Path], settings: Settings) -> None:
    assert Path(settings.models.lcm_lora) == tiny_kit["lcm_lora"]
    assert (tiny_kit["lcm_lora"] / "pytorch_lora_weights.safetensors").is_file()


def test_the_kits_lora_has_the_real_files_keys(tiny_kit: dict[str, Path]) -> None:
    from safetensors import safe_open

    with safe_open(str(tiny_kit["lcm_lora"] / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    for module in ("attn1.to_q", "attn2.to_out.0", "ff.net.2", "resnets.0.conv1", "time_emb_proj", "proj_in"):
        assert any(module in k for k in keys), module


# ----- the generator -----

def test_lcm_lora_loads_once_switches_scheduler_and_back_to_the_plain_picture(settings: Settings) -> None:
    gen = Generator.from_pretrained(settings)
    base_scheduler = gen.pipe.scheduler
    plain = gen.generate("a dog", seed=5)
    size_plain = measure_gb(gen)

    steps: list[int] = []
    fast = gen.generate("a dog", seed=5, fast="lcm-lora", on_step=lambda done, total: steps.append(total))
    assert type(gen.pipe.scheduler).__name__ == "LCMScheduler"
    assert gen.fast.lora_loaded and gen.fast.mode == "lcm-lora"
    assert steps[-1] == 4 and len(steps) == 4  # the method's default step count
    assert gen.pipe.get_active_adapters() == ["lcm-lora"]
    assert not np.array_equal(_pixels(plain), _pixels(fast))
    assert measure_gb(gen) > size_plain  # the LoRA lives in the UNet: the manager counts it with the generator

    # The LoRA's own effect, apart from the scheduler: the same LCM drawing with the LoRA switched off differs.
    gen.pipe.disable_lora()
    without = gen.pipe(prompt="a dog", num_inference_steps=4, guidance_scale=1.0, width=64, height=64,
                       generator=__import__("torch").Generator().manual_seed(5)).images[0]
    gen.pipe.enable_lora()
    assert not np.array_equal(_pixels(fast), _pixels(without))

    again = gen.generate("a dog", seed=5)  # settings say off: back to the checkpoint's scheduler, LoRA off
    assert gen.pipe.scheduler is base_scheduler
    assert np.array_equal(_pixels(plain), _pixels(again)), "off after lcm-lora must be bit for bit the plain picture"
    assert np.array_equal(_pixels(fast), _pixels(gen.generate("a dog", seed=5, fast="lcm-lora")))


def test_distilled_uses_trailing_timesteps_and_no_lora(settings: Settings) -> None:
    gen = Generator.from_pretrained(settings)
    base = gen.pipe.scheduler
    steps: list[int] = []
    gen.generate("a cat", seed=2, fast="distilled", on_step=lambda done, total: steps.append(total))
    assert type(gen.pipe.scheduler) is type(base) and gen.pipe.scheduler.config.timestep_spacing == "trailing"
    assert base.config.timestep_spacing == "leading"  # the original is kept untouched for "off"
    assert not gen.fast.lora_loaded and len(steps) == 4
    gen.generate("a cat", seed=2)
    assert gen.pipe.scheduler is base


def test_ip_adapter_guides_the_fast_drawings_in_either_loading_order(settings: Settings) -> None:
    # LoRA first, then the adapter
    gen = Generator.from_pretrained(settings)
    fast_plain = gen.generate("a cat", seed=1, fast="lcm-lora")
    guided = gen.generate("a cat", seed=1, fast="lcm-lora", references=[RED], ip_scale=1.0)
    assert gen.adapter_loaded and gen.fast.lora_loaded
    assert not np.array_equal(_pixels(fast_plain), _pixels(guided))
    # unguided after guided, still fast: the scale-0 zero-embedding path without classifier-free guidance
    assert np.array_equal(_pixels(fast_plain), _pixels(gen.generate("a cat", seed=1, fast="lcm-lora")))

    # adapter first, then the LoRA: the same pictures
    other = Generator.from_pretrained(settings)
    other.generate("a cat", seed=1, references=[RED], ip_scale=1.0)
    assert np.array_equal(_pixels(guided), _pixels(
        other.generate("a cat", seed=1, fast="lcm-lora", references=[RED], ip_scale=1.0)))
    distilled = other.generate("a cat", seed=1, fast="distilled", references=[RED], ip_scale=1.0)
    assert distilled.size == guided.size


def test_switching_fast_mode_is_not_a_reload_and_the_manager_counts_the_lora(tiny_settings: Settings) -> None:
    from imgrag.management.engine import build_manager

    manager = build_manager(tiny_settings)
    sizes = []
    for mode in ("off", "lcm-lora", "off", "distilled", "lcm-lora", "off"):
        with manager.use("generator") as gen:
            gen.generate("a boat", seed=0, fast=mode)
        sizes.append(manager.stats()["generator"]["size_gb"])
    assert manager.load_counts()["generator"] == 1
    assert sizes[1] > sizes[0] and sizes[1:] == [sizes[1]] * 5  # grows once, when the LoRA loads; never again


def test_a_missing_or_foreign_lora_is_a_model_load_error(settings: Settings, tiny_kit: dict[str, Path],
                                                       tmp_path: Path) -> None:
    from imgrag.kits.tiny_configs import SDXL_UNET
    from imgrag.kits.tiny_loras import build_lcm_lora

    gen = Generator.from_pretrained(settings)
    gen.settings = settings_copy = load_settings(
        "tiny", environ={"IMGRAG_TINY_KIT_DIR": str(tiny_kit["generator"].parent), "IMGRAG_HOME": str(tmp_path),
                         "IMGRAG_MODELS_LCM_LORA": str(tmp_path / "nowhere")})
    gen.fast.settings = settings_copy
    with pytest.raises(ModelLoadError, match="LCM-LoRA checkpoint not found"):
        gen.generate("a cat", seed=0, fast="lcm-lora")
    assert gen.fast.mode == "off" and not gen.fast.lora_loaded

    foreign = tmp_path / "foreign"  # a LoRA for a UNet of other widths
    build_lcm_lora(foreign, {**SDXL_UNET, "block_out_channels": (16, 32), "norm_num_groups": 4}, rank=2, seed=0)
    settings_copy.models.lcm_lora = str(foreign)
    with pytest.raises(ModelLoadError) as info:
        gen.generate("a cat", seed=0, fast="lcm-lora")
    assert "\n" not in str(info.value) and str(foreign) in str(info.value)

    import torch
    from safetensors.torch import save_file

    unrelated = tmp_path / "unrelated"  # keys for no module of the UNet: diffusers would only warn
    unrelated.mkdir()
    save_file({f"text_encoder_9.x.lora_{h}.weight": torch.zeros(2, 2) for h in "AB"},
              str(unrelated / "pytorch_lora_weights.safetensors"))
    settings_copy.models.lcm_lora = str(unrelated)
    with pytest.raises(ModelLoadError, match="holds no LoRA weights for this generator's UNet"):
        gen.generate("a cat", seed=0, fast="lcm-lora")
    with pytest.raises(UserError, match="fast must be one of"):
        gen.generate("a cat", seed=0, fast="turbo")


def test_the_full_size_lora_has_the_published_size() -> None:
    """latent-consistency/lcm-lora-sdxl's model card: 197 M parameters (rank 64 over the training script's modules)."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from imgrag.kits import full_configs
    from imgrag.kits.tiny_loras import LCM_LORA_RANK, LCM_LORA_TARGET_MODULES

    with torch.device("meta"):  # shapes only
        unet = UNet2DConditionModel.from_config(full_configs.SDXL_UNET)
        unet.add_adapter(LoraConfig(r=LCM_LORA_RANK, lora_alpha=LCM_LORA_RANK, target_modules=LCM_LORA_TARGET_MODULES))
    count = sum(p.numel() for name, p in unet.named_parameters() if "lora_" in name)
    assert round(count / 1e6) == 197
    assert full_configs.FULL.lcm_lora["rank"] == LCM_LORA_RANK


# ----- the command line and the preset -----

REPO = Path(__file__).resolve().parent.parent
PRESET = REPO / "imgrag" / "profiles" / "fast-draft.toml"


@pytest.fixture
def mode_spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every mode the generators were put in, and "load" for each LoRA load (the real methods still run)."""
    from imgrag.models import fast

    seen: list[str] = []
    apply, load = fast.FastSwitch.apply, fast.FastSwitch.load_lora

    def spy_apply(self, mode, *loras):
        seen.append(mode)
        return apply(self, mode, *loras)

    def spy_load(self):
        if not self.lora_loaded:
            seen.append("load")
        return load(self)

    monkeypatch.setattr(fast.FastSwitch, "apply", spy_apply)
    monkeypatch.setattr(fast.FastSwitch, "load_lora", spy_load)
    return seen


def test_generate_fast_with_references(tiny_settings: Settings, tmp_path: Path, capsys, mode_spy) -> None:
    import json

    from tests.cli import run_cli

    ref = tmp_path / "ref.png"
    RED.save(ref)
    target = tmp_path / "fast.png"
    code, out, err = run_cli(capsys, "generate", "a cat", "--profile", "tiny", "--fast", "lcm-lora", "--ref", str(ref),
                             "-o", str(target), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["fast"], doc["steps"], doc["guidance"]) == ("lcm-lora", 4, 1.0)
    assert mode_spy == ["lcm-lora", "load"] and Image.open(target).size == (64, 64)

    code, out, err = run_cli(capsys, "generate", "a cat", "--profile", "tiny", "--fast", "lcm-lora", "--steps", "2",
                             "-o", str(target), "--json")
    assert code == 0, err
    assert json.loads(out)["steps"] == 2  # --steps still wins over the method's default

    code, out, err = run_cli(capsys, "generate", "a cat", "--profile", "tiny", "--fast", "turbo", "-o", str(target))
    assert code == 1 and "Traceback" not in err
    assert "generation.fast: Input should be 'off', 'lcm-lora' or 'distilled'" in err


@pytest.fixture
def indexed_store(tiny_settings: Settings, tmp_path: Path, capsys) -> Path:
    from tests.cli import run_cli

    folder = tmp_path / "refs"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(folder / f"r{i}.png")
        (folder / f"r{i}.txt").write_text(f"reference photo number {i}", encoding="utf-8")
    code, _, err = run_cli(capsys, "index", str(folder), "--profile", "tiny", "--json")
    assert code == 0, err
    return folder


def test_run_fast_lcm_lora_goes_through_the_lora_path_with_references(indexed_store: Path, capsys,
                                                                      mode_spy) -> None:
    """The whole few-step path: `imgrag run ... --fast lcm-lora --profile tiny`, a full loop, references included."""
    import json

    from tests.cli import run_cli

    code, out, err = run_cli(capsys, "run", "a wooden cradle", "--profile", "tiny", "--fast", "lcm-lora",
                             "--planner", "fixed", "--max-rounds", "2", "--json")
    assert code == 0, err
    result = json.loads(out)
    tools = [s["tool"] for s in result["steps"]]
    assert {"generate", "critique", "retrieve", "regenerate"} <= set(tools), tools
    assert any(c["reference_ids"] for c in result["candidates"]), "the redraw must be guided by references"
    assert result["fast"] == "lcm-lora" and result["model_loads"]["generator"] == 1
    assert mode_spy == ["lcm-lora", "load", "lcm-lora"]  # two drawings, one LoRA load, never "off"


def test_batch_and_chat_take_fast(indexed_store: Path, tmp_path: Path, capsys, mode_spy,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from agent.frontends.cli import chat as cli_chat
    from tests.cli import run_cli

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red kettle\n", encoding="utf-8")
    code, out, err = run_cli(capsys, "batch", str(prompts), "--profile", "tiny", "--fast", "distilled",
                             "--planner", "fixed", "--max-rounds", "1", "--json")
    assert code == 0, err
    assert json.loads(out)["items"][0]["status"] in {"matched", "budget_exhausted"}
    assert mode_spy == ["distilled"]

    seen: list[Settings] = []

    class Repl:
        def __init__(self, settings, planner, rounds) -> None:
            seen.append(settings)

        def run(self, thread, new: bool = False, prepare=None) -> None:
            return None

    monkeypatch.setattr(cli_chat, "ChatRepl", Repl)
    code, _, err = run_cli(capsys, "chat", "--profile", "tiny", "--fast", "lcm-lora")
    assert code == 0, err
    assert seen[0].generation.fast == "lcm-lora"


def test_fast_draft_preset_layers_over_any_profile(tiny_kit: dict[str, Path], tmp_path: Path) -> None:
    environ = {"IMGRAG_TINY_KIT_DIR": str(tiny_kit["generator"].parent), "IMGRAG_HOME": str(tmp_path)}
    over_tiny = load_settings("tiny", config=PRESET, environ=environ)
    assert over_tiny.is_tiny and over_tiny.generation.fast == "lcm-lora" and over_tiny.budget.max_rounds == 6
    assert draw_plan(over_tiny.generation).steps == 4
    as_profile = load_settings(str(PRESET), environ=environ)
    assert as_profile.profile == "default" and as_profile.generation.fast == "lcm-lora"


# ----- the optional full-step redraw of a matched fast run -----

@pytest.mark.parametrize("fast, final_redraw, expected", [
    ("lcm-lora", True, ["lcm-lora", "load", "lcm-lora", "off"]),
    ("lcm-lora", False, ["lcm-lora", "load", "lcm-lora"]),
    ("off", True, ["off", "off"]),  # nothing to redraw: the run already drew at full steps
])
def test_a_matched_fast_run_is_redrawn_at_full_steps_when_asked(tiny_settings: Settings, tmp_path: Path, mode_spy,
                                                                 fast: str, final_redraw: bool,
                                                                 expected: list[str]) -> None:
    """Real tiny generator; the judge is scripted (the tiny one never matches): no match, then a match."""
    from agent.runner import Runner, open_checkpointer
    from imgrag.models.judge import Verdict
    from tests.fakes import FakeEmbedder, FakeManager, MemoryStore, ScriptedJudge

    tiny_settings.generation.fast = fast
    tiny_settings.generation.fast_final_redraw = final_redraw
    tiny_settings.output_dir = str(tmp_path / "runs")
    generator = Generator.from_pretrained(tiny_settings)
    judge = ScriptedJudge([Verdict(match=False, missing=["cradle"]), Verdict(match=True)])
    (tmp_path / "refs").mkdir()
    runner = Runner(tiny_settings, manager=FakeManager({"generator": generator, "judge": judge,
                                                        "embedder": FakeEmbedder()}),
                    reference_store=MemoryStore(tmp_path / "refs"),
                    checkpointer=open_checkpointer(tmp_path / "threads.sqlite"))
    result = runner.run("a wooden cradle", seed=4, planner="fixed", max_rounds=3)

    assert result["status"] == "matched" and result["rounds"] == 2
    assert mode_spy == expected
    if fast == "off" or not final_redraw:
        assert "final_full" not in result and result["steps"][-1]["tool"] != "final_redraw"
        return
    full = result["final_full"]
    assert result["steps"][-1]["tool"] == "final_redraw" and result["steps"][-1]["ok"]
    assert full["candidate_id"] == result["final_candidate"] and full["steps"] == tiny_settings.generation.steps
    matched = next(c for c in result["candidates"] if c["id"] == result["final_candidate"])
    assert matched["reference_ids"], "the matched candidate was the guided redraw"
    refs = [Image.open(result["references"][i]["path"]) for i in matched["reference_ids"]]
    again = generator.generate(matched["prompt"], seed=matched["seed"], references=refs, ip_scale=matched["ip_scale"],
                               fast="off")
    assert np.array_equal(_pixels(Image.open(full["path"])), _pixels(again)), "same seed, same references, full steps"
    assert not np.array_equal(_pixels(Image.open(full["path"])), _pixels(Image.open(matched["path"])))
    assert json.loads((Path(result["run_dir"]) / "result.json").read_text())["final_full"] == full


def test_doctor_lists_the_lora_when_fast_mode_needs_it(tiny_settings: Settings, capsys,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.cli import run_cli

    code, out, err = run_cli(capsys, "doctor", "--profile", "tiny", "--json")
    assert code == 0, err
    assert "lcm_lora" not in json.loads(out)["checkpoints"]
    monkeypatch.setenv("IMGRAG_GENERATION_FAST", "lcm-lora")
    code, out, err = run_cli(capsys, "doctor", "--profile", "tiny", "--json")
    assert code == 0, err
    assert json.loads(out)["checkpoints"]["lcm_lora"]["status"] == "local directory"


def test_switching_leaves_sdxls_weights_untouched_where_fusing_would_not(tiny_kit: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    """Why imgrag.models.fast enables/disables the LoRA instead of fusing it: in float16, fuse + unfuse changes SDXL."""
    import torch

    settings = _settings(tiny_kit, tmp_path, IMGRAG_DTYPE="float16", IMGRAG_DEVICE="cpu")
    gen = Generator.from_pretrained(settings)

    def base_weights() -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in gen.pipe.unet.state_dict().items() if "lora_" not in k}

    gen.fast.load_lora()
    before = base_weights()
    for mode in ("lcm-lora", "off", "distilled", "lcm-lora", "off"):
        gen.fast.apply(mode)
    after = base_weights()
    assert all(torch.equal(before[k], after[k].reshape(before[k].shape)) for k in before)

    gen.fast.apply("lcm-lora")
    gen.pipe.fuse_lora(adapter_names=["lcm-lora"])
    gen.pipe.unfuse_lora()
    fused_back = base_weights()
    changed = [k for k in before if not torch.equal(before[k], fused_back[k].reshape(before[k].shape))]
    assert changed, "fuse + unfuse in float16 should leave rounding error (else fusing would be safe)"

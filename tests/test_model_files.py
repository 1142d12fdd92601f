"""`imgrag models download`, the hardware presets and `doctor`'s file checks, all without the network.

The allow-patterns are matched against the repositories' layouts written down in imgrag.weights.hub_layouts with
the hub client's own matcher; a fake Hugging Face cache (the real on-disk structure, tiny files) stands in
for a finished download.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from imgrag.settings import builtin_presets, load_settings
from imgrag.weights import hub_layouts
from imgrag.weights.model_files import check_roles, generator_variant
from imgrag.weights.roles import OPTIONAL_PATTERNS, ROLES, hub_patterns, select_files
from tests.cli import run_cli
from tests.ports import free_port


def _doctor_code() -> int:
    """doctor reports everything, then exits 1 when the profile's device (cuda for the GPU presets) is not here."""
    import torch

    return 0 if torch.cuda.is_available() else 1

PRESETS = ("gpu-80gb", "gpu-24gb", "cpu")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache of our own, online mode (the download itself is faked per test)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _cache_files(cache: Path, repo: str, paths: list[str]) -> None:
    """Put files into the cache exactly where snapshot_download leaves them (refs/main -> snapshots/<commit>)."""
    commit = "0" * 40
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    for path in paths:
        target = root / "snapshots" / commit / path
        target.parent.mkdir(parents=True, exist_ok=True)
        # a weights file is a well-formed safetensors file with no tensors (doctor reads its header)
        target.write_bytes(b"\x02" + b"\0" * 7 + b"{}" if path.endswith(".safetensors") else b"x")


# ----- the recorded layouts and the patterns -----


@pytest.mark.parametrize("profile", ["default", *PRESETS, "fast-draft"])
def test_every_pattern_selects_recorded_files_and_nothing_unneeded(profile: str) -> None:
    settings = load_settings(profile, check_device=False)
    for role in ROLES:
        if role == "llm" and settings.models.llm_backend != "local":
            continue
        repo = settings.models.embedder.removeprefix("hf-hub:") if role == "embedder" else getattr(settings.models,
                                                                                                    role)
        layout = hub_layouts.LAYOUTS[repo]
        patterns = hub_patterns(role, settings)
        chosen = {f.path for f in select_files(layout, patterns)}
        for pattern in set(patterns) - set(OPTIONAL_PATTERNS):  # each pattern fetches something that exists
            assert select_files(layout, [pattern]), (repo, pattern)
        # Never the large files no loader reads: ONNX/OpenVINO exports, single-file checkpoints, .bin twins.
        assert not [p for p in chosen if p.endswith((".onnx", ".onnx_data", ".bin", ".md"))
                    or p.startswith("sd_xl_")], chosen
        if role in ("judge", "llm"):  # every shard of the checkpoint, and its index
            shards = [p for p in chosen if re.fullmatch(r"model-\d{5}-of-(\d{5})\.safetensors", p)]
            assert shards and len(shards) == int(shards[0][-17:-12])
            assert {"config.json", "model.safetensors.index.json", "tokenizer_config.json"} <= chosen


def test_the_generator_fetches_the_fp16_variant_of_every_component() -> None:
    chosen = {f.path for f in select_files(hub_layouts.LAYOUTS[hub_layouts.SDXL_BASE],
                                           hub_patterns("generator", load_settings("gpu-24gb", check_device=False)))}
    weights = sorted(p for p in chosen if p.endswith(".safetensors"))
    assert weights == ["text_encoder/model.fp16.safetensors", "text_encoder_2/model.fp16.safetensors",
                       "unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
                       "vae_1_0/diffusion_pytorch_model.fp16.safetensors"]  # diffusers checks for it (see below)
    assert {"model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer_2/merges.txt",
            "unet/config.json", "vae/config.json"} <= chosen


def test_the_adapter_role_takes_one_adapter_and_the_vit_h_encoder() -> None:
    settings = load_settings("gpu-24gb", check_device=False)
    chosen = [f.path for f in select_files(hub_layouts.LAYOUTS[hub_layouts.IP_ADAPTER],
                                           hub_patterns("ip_adapter", settings))]
    assert sorted(chosen) == ["models/image_encoder/config.json", "models/image_encoder/model.safetensors",
                              "sdxl_models/ip-adapter_sdxl_vit-h.safetensors"]
    total = sum(f.size for f in hub_layouts.LAYOUTS[hub_layouts.IP_ADAPTER])
    assert sum(f.size for f in select_files(hub_layouts.LAYOUTS[hub_layouts.IP_ADAPTER], chosen)) < total / 5


# ----- presets -----


def test_presets_are_shipped_documented_and_load() -> None:
    assert set(builtin_presets()) == {*PRESETS, "fast-draft"}  # fast-draft: few-step drawing (imgrag.models.fast)
    for name, path in builtin_presets().items():
        text = path.read_text(encoding="utf-8")
        assert text.startswith(f'# imgrag built-in profile "{name}"') and "What to expect" in text
        # Hardware presets start from the real checkpoints; an overlay preset (fast-draft) names no profile.
        assert tomllib.loads(text).get("profile", "default") == "default"
    big, small, cpu = (load_settings(name, check_device=False) for name in PRESETS)
    assert big.device == "cuda" and big.gpu_memory_gb == 0 and big.models.llm == "Qwen/Qwen2.5-7B-Instruct"
    assert small.device == "cuda" and small.gpu_memory_gb == 21
    assert small.models.llm == "Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4"
    assert cpu.device == "cpu" and cpu.resolved_dtype() == "float32" and cpu.generation.width == 512
    for settings in (big, small, cpu):
        assert settings.profile == "default" and settings.store.endswith("store")  # one store: same embedder
    # Layers still apply on top of a preset.
    assert load_settings("gpu-24gb", environ={"IMGRAG_GPU_MEMORY_GB": "16"}, check_device=False).gpu_memory_gb == 16


def test_an_unknown_profile_names_the_presets(capsys) -> None:
    code, _, err = run_cli(capsys, "doctor", "--profile", "gpu-12gb")
    assert code == 1 and "gpu-24gb" in err and "cpu" in err and "Traceback" not in err


def test_doctor_prints_a_preset(capsys) -> None:
    code, out, _ = run_cli(capsys, "doctor", "--profile", "gpu-24gb", "--show-profile")
    assert code == 0 and out == builtin_presets()["gpu-24gb"].read_text(encoding="utf-8")
    code, _, err = run_cli(capsys, "doctor", "--profile", "tiny", "--show-profile")
    assert code == 1 and "gpu-80gb" in err


# ----- the dry run, the download, the offline errors -----


def test_dry_run_lists_exact_files_and_sizes_without_network(capsys, no_network, hub_cache: Path) -> None:
    code, out, _ = run_cli(capsys, "models", "download", "--profile", "gpu-24gb", "--dry-run", "--json")
    assert code == 0
    plan = json.loads(out)
    unused = ("lcm_lora", "omnigen")  # no few-step drawing, and IP-Adapter repairs on this preset
    assert plan["dry_run"] and [r["role"] for r in plan["roles"]] == [r for r in ROLES if r not in unused]
    llm = next(r for r in plan["roles"] if r["role"] == "llm")
    assert llm["repo_id"] == "Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4" and llm["recorded_layout"]
    for row in plan["roles"]:
        assert row["files"] and all(f["size"] and not f["present"] for f in row["files"])
    assert plan["total_bytes"] == plan["to_download_bytes"] == sum(r["total_bytes"] for r in plan["roles"])
    assert 20e9 < plan["total_bytes"] < 28e9 and plan["sizes_approximate"]

    code, out, _ = run_cli(capsys, "models", "download", "--profile", "gpu-24gb", "--dry-run", "--role", "ip_adapter")
    assert code == 0
    assert "sdxl_models/ip-adapter_sdxl_vit-h.safetensors" in out and "698 MB" in out and "3.23 GB" in out
    assert "judge" not in out

    code, _, err = run_cli(capsys, "models", "download", "--role", "vae", "--dry-run")
    assert code == 1 and "unknown role 'vae'" in err


def test_an_open_clip_pretrained_tag_fetches_its_weights_file(capsys, no_network, hub_cache: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGRAG_MODELS_EMBEDDER", "ViT-B-32")
    monkeypatch.setenv("IMGRAG_MODELS_EMBEDDER_PRETRAINED", "laion2b_s34b_b79k")
    code, out, _ = run_cli(capsys, "models", "download", "--role", "embedder", "--dry-run", "--json")
    row = json.loads(out)["roles"][0]
    assert code == 0 and row["repo_id"] == hub_layouts.CLIP_B32_LAION
    assert [f["path"] for f in row["files"]] == ["open_clip_model.safetensors"]


def test_offline_download_is_one_line(capsys, monkeypatch: pytest.MonkeyPatch, hub_cache: Path) -> None:
    import huggingface_hub
    from huggingface_hub import constants, errors

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    code, out, err = run_cli(capsys, "models", "download", "--profile", "gpu-24gb", "--role", "embedder")
    assert code == 1 and "HF_HUB_OFFLINE=1" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 or "\n" not in err.split("error:")[1].strip()

    # Online mode, but no network: what the hub client raises then.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    import httpx

    for failure in (errors.LocalEntryNotFoundError("cannot find the requested files in the local cache"),
                    httpx.ConnectError("[Errno -3] Temporary failure in name resolution")):
        def fail(*args, _failure=failure, **kwargs):
            raise _failure

        monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
        code, _, err = run_cli(capsys, "models", "download", "--profile", "gpu-24gb", "--role", "embedder")
        assert code == 1 and "cannot reach the Hugging Face hub" in err and "Traceback" not in err


def test_download_fetches_the_patterns_and_doctor_then_sees_every_file(
        capsys, monkeypatch: pytest.MonkeyPatch, hub_cache: Path) -> None:
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls: list[tuple[str, list[str]]] = []

    def fake_snapshot_download(repo_id: str, allow_patterns=None, local_files_only: bool = False, **kwargs):
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        calls.append((repo_id, allow_patterns))
        chosen = [f.path for f in select_files(hub_layouts.LAYOUTS[repo_id], allow_patterns)]
        _cache_files(hub_cache, repo_id, chosen)
        return str(hub_cache)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    code, _, err = run_cli(capsys, "models", "download", "--profile", "gpu-24gb", "--role", "embedder",
                           "--role", "ip_adapter")
    assert code == 0 and "done" in err
    assert calls == [("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", ["open_clip_config.json",
                                                                "open_clip_model.safetensors"]),
                     ("h94/IP-Adapter", hub_patterns("ip_adapter", load_settings("gpu-24gb", check_device=False)))]
    # A second run finds everything and fetches nothing.
    code, _, err = run_cli(capsys, "models", "download", "--profile", "gpu-24gb", "--role", "embedder")
    assert code == 0 and "nothing to download" in err and len(calls) == 2

    code, out, _ = run_cli(capsys, "doctor", "--profile", "gpu-24gb", "--json")
    report = json.loads(out)
    assert report["checkpoints"]["embedder"]["status"] == "in the local hub cache"
    # The cached dummy adapter is not real safetensors: doctor says so instead of calling it fine.
    assert not report["checkpoints"]["ip_adapter"]["ok"]
    assert "not IP-Adapter weights" in report["checkpoints"]["ip_adapter"]["problems"][0]
    judge = report["checkpoints"]["judge"]
    assert judge["status"] == "not downloaded: `imgrag models download --profile gpu-24gb --role judge`"
    assert "model-00002-of-00002.safetensors" in judge["missing"]
    assert report["disk"]["still_needed_bytes"] > 20e9 and report["disk"]["free_bytes"] > 0


def test_doctor_names_each_missing_file_of_a_partial_download(capsys, no_network, hub_cache: Path) -> None:
    layout = [f.path for f in select_files(hub_layouts.LAYOUTS[hub_layouts.QWEN_VL_3B],
                                           hub_patterns("judge", load_settings("gpu-24gb", check_device=False)))]
    _cache_files(hub_cache, hub_layouts.QWEN_VL_3B, [p for p in layout if p != "model-00002-of-00002.safetensors"])
    code, out, _ = run_cli(capsys, "doctor", "--profile", "gpu-24gb", "--json")
    judge = json.loads(out)["checkpoints"]["judge"]
    assert code == _doctor_code() and judge["missing"] == ["model-00002-of-00002.safetensors"]
    assert judge["status"].startswith("MISSING 1 of 11 files")
    code, out, err = run_cli(capsys, "doctor", "--profile", "gpu-24gb")
    assert "missing: model-00002-of-00002.safetensors" in out and "still to download" in out
    if _doctor_code():
        assert err.startswith("error: device 'cuda' asked for, but CUDA is not available"), err


def test_a_partial_download_stops_the_loader_before_the_hub_client_fetches_the_rest(hub_cache: Path) -> None:
    from imgrag.errors import ModelLoadError
    from imgrag.weights.checkpoints import check_exists

    layout = [f.path for f in select_files(hub_layouts.LAYOUTS[hub_layouts.QWEN_VL_3B],
                                           hub_patterns("judge", load_settings("gpu-24gb", check_device=False)))]
    _cache_files(hub_cache, hub_layouts.QWEN_VL_3B, [p for p in layout if p != "model-00002-of-00002.safetensors"])
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors of Qwen/Qwen2.5-VL-3B-Instruct"):
        check_exists(hub_layouts.QWEN_VL_3B, "judge", "a Qwen2.5-VL folder")
    _cache_files(hub_cache, hub_layouts.QWEN_VL_3B, ["model-00002-of-00002.safetensors"])
    check_exists(hub_layouts.QWEN_VL_3B, "judge", "a Qwen2.5-VL folder")  # complete: no error


def test_doctor_checks_files_inside_local_folders(capsys, tiny_kit: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    kit = tmp_path / "kit"
    shutil.copytree(tiny_kit["generator"].parent, kit)
    (kit / "sdxl" / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (kit / "qwen2.5-instruct" / "tokenizer_config.json").unlink()
    monkeypatch.setenv("IMGRAG_TINY_KIT_DIR", str(kit))
    code, out, _ = run_cli(capsys, "doctor", "--profile", "tiny", "--json")
    report = json.loads(out)
    rows = report["checkpoints"]
    # a built kit (its marker current) is not rebuilt on first use: a file gone from it is a problem
    assert code == 1 and report["notes"] == []
    assert [p.split(":")[0] for p in report["problems"]] == ["generator", "llm"]
    assert rows["generator"]["missing"] == ["vae/diffusion_pytorch_model.safetensors or "
                                            "vae/diffusion_pytorch_model.fp16.safetensors or vae/model.safetensors "
                                            "or vae/model.fp16.safetensors"]
    assert rows["llm"]["missing"] == ["tokenizer_config.json"]
    assert rows["judge"]["ok"] and rows["embedder"]["ok"] and rows["ip_adapter"]["ok"]


def test_the_fp16_variant_folder_loads(tiny_kit: dict[str, Path], tmp_path: Path) -> None:
    """What `models download` leaves (fp16 weights only) is what the generator loads, in float32 on a CPU."""
    from dataclasses import replace

    from diffusers import StableDiffusionXLPipeline

    from imgrag.models.generator import Generator

    assert generator_variant(str(tiny_kit["generator"])) is None
    folder = tmp_path / "sdxl-fp16"
    StableDiffusionXLPipeline.from_pretrained(tiny_kit["generator"]).save_pretrained(folder, variant="fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert generator_variant(str(folder)) == "fp16"
    settings = load_settings("tiny", environ={"IMGRAG_TINY_KIT_DIR": str(tiny_kit["generator"].parent)})
    settings = replace(settings, models=replace(settings.models, generator=str(folder)))
    assert [r.ok for r in check_roles(settings, ["generator"])] == [True]
    image = Generator.from_pretrained(settings, device="cpu").generate("a cat", seed=0)
    assert image.size == (64, 64)


# ----- the LLM server and the Chroma server -----


class _FakeOpenAI(BaseHTTPRequestHandler):
    """An OpenAI-compatible server as vLLM answers without --enable-auto-tool-choice (or with it)."""

    tools_on = False

    def log_message(self, *args) -> None:
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._reply(200, {"object": "list", "data": [{"id": "Qwen/Qwen2.5-7B-Instruct", "object": "model"}]})
        else:
            self._reply(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if request.get("tools") and not type(self).tools_on:
            self._reply(400, {"object": "error", "message": '"auto" tool choice requires --enable-auto-tool-choice '
                              "and --tool-call-parser to be set", "type": "BadRequestError", "code": 400})
        else:
            self._reply(200, {"choices": [{"message": {"role": "assistant", "content": ""}}]})


def test_doctor_probes_the_llm_server_and_the_chroma_server(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}/v1"
        monkeypatch.setenv("IMGRAG_MODELS_LLM_BACKEND", "openai")
        monkeypatch.setenv("IMGRAG_MODELS_LLM_BASE_URL", base)
        monkeypatch.setenv("IMGRAG_MODELS_LLM", "Qwen/Qwen2.5-7B-Instruct")
        code, out, _ = run_cli(capsys, "doctor", "--profile", "tiny", "--json")
        probe = json.loads(out)["checkpoints"]["llm"]["server"]
        assert code == 1 and not probe["ok"] and "--enable-auto-tool-choice" in probe["problem"]  # a problem: exit 1

        monkeypatch.setenv("IMGRAG_MODELS_LLM", "qwen2.5:7b")
        code, out, _ = run_cli(capsys, "doctor", "--profile", "tiny", "--json")
        probe = json.loads(out)["checkpoints"]["llm"]["server"]
        assert "does not serve models.llm = 'qwen2.5:7b'" in probe["problem"]

        monkeypatch.setenv("IMGRAG_MODELS_LLM", "Qwen/Qwen2.5-7B-Instruct")
        monkeypatch.setattr(_FakeOpenAI, "tools_on", True)
        code, out, _ = run_cli(capsys, "doctor", "--profile", "tiny")
        assert code == 0 and "tool calling accepted" in out
    finally:
        server.shutdown()
        server.server_close()

    port = free_port()  # a port nobody listens on
    monkeypatch.setenv("IMGRAG_MODELS_LLM_BASE_URL", f"http://127.0.0.1:{port}/v1")
    code, out, _ = run_cli(capsys, "doctor", "--profile", "tiny", "--store", f"http://127.0.0.1:{port}", "--json")
    report = json.loads(out)
    assert code == 1 and "unreachable" in report["checkpoints"]["llm"]["server"]["problem"]
    assert not report["store"]["server"]["ok"] and "unreachable" in report["store"]["server"]["problem"]
    assert not report["ok"] and len(report["problems"]) == 2  # the LLM server and the store server


# ----------------------------------------------------------------------------------------------
# doctor reads headers: a weight file that is an LFS pointer, truncated, empty or not safetensors
# ----------------------------------------------------------------------------------------------

LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
               b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 12345\n")


def _broken_kit_copy(tiny_kit, tmp_path):
    """A copy of the tiny kit with one weight file each: an LFS pointer, truncated, empty, a bad header."""
    import shutil

    kit = tmp_path / "kit"
    shutil.copytree(tiny_kit["generator"].parent, kit, symlinks=True)
    (kit / "qwen2.5-vl" / "model.safetensors").write_bytes(LFS_POINTER)
    unet = kit / "sdxl" / "unet" / "diffusion_pytorch_model.safetensors"
    data = unet.read_bytes()
    unet.write_bytes(data[: len(data) - 100])
    (kit / "open-clip" / "open_clip_model.safetensors").write_bytes(b"")
    (kit / "qwen2.5-instruct" / "config.json").write_bytes(b"")
    return kit


def test_weight_file_problem_kinds(tmp_path) -> None:
    import json as _json

    import torch
    from safetensors.torch import save_file

    from imgrag.weight_files import weight_file_problem

    good = tmp_path / "good.safetensors"
    save_file({"w": torch.zeros(4, 4)}, str(good))
    assert weight_file_problem(good) is None
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-10])
    assert "truncated: its header needs" in weight_file_problem(cut)
    head = tmp_path / "head.safetensors"
    head.write_bytes(data[:20])
    assert "truncated or not safetensors" in weight_file_problem(head)
    longer = tmp_path / "longer.safetensors"
    longer.write_bytes(data + b"\0" * 3)
    assert "3 bytes past the end" in weight_file_problem(longer)
    pointer = tmp_path / "pointer.bin"
    pointer.write_bytes(LFS_POINTER)
    assert "Git LFS pointer" in weight_file_problem(pointer)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert "empty file" in weight_file_problem(empty)
    garbage = tmp_path / "garbage.safetensors"
    header = b"{not json"
    garbage.write_bytes(len(header).to_bytes(8, "little") + header)
    assert "header is not JSON" in weight_file_problem(garbage)
    offsets = tmp_path / "offsets.safetensors"
    header = _json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": ["0", 4]}}).encode()
    offsets.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    assert "no valid data_offsets" in weight_file_problem(offsets)
    assert "cannot read" in weight_file_problem(tmp_path / "missing.bin")


def test_doctor_lists_every_broken_weight_file_and_exits_1(capsys, tiny_kit, tmp_path, monkeypatch) -> None:
    import json as _json

    from tests.cli import run_cli

    kit = _broken_kit_copy(tiny_kit, tmp_path)
    monkeypatch.setenv("IMGRAG_TINY_KIT_DIR", str(kit))
    code, out, err = run_cli(capsys, "doctor", "--profile", "tiny", "--json")
    assert code == 1 and "Traceback" not in err
    report = _json.loads(out)
    problems = "\n".join(report["problems"])
    assert "judge: model.safetensors: a Git LFS pointer" in problems
    assert "generator: unet/diffusion_pytorch_model.safetensors: truncated: its header needs" in problems
    assert "embedder: open_clip_model.safetensors: empty file" in problems
    assert "llm: config.json: empty file" in problems
    assert report["ok"] is False and not report["checkpoints"]["judge"]["ok"]
    assert report["checkpoints"]["ip_adapter"]["ok"]  # the untouched roles stay ok
    code, out, err = run_cli(capsys, "doctor", "--profile", "tiny")
    assert code == 1 and "Git LFS pointer" in err.replace("\n", " ") + out.replace("\n", " ")

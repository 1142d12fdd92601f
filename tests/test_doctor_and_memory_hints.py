"""What a new user is told: doctor's one command for a whole profile's download, an unbuilt tiny kit as one note
(a built but broken one is still a problem), and the concept memory's hints, which reach the same store and start
over from a broken file. All offline; the tiny kit is copied, never loaded."""

from __future__ import annotations

import json
import shlex
import shutil
import socket
from pathlib import Path

import pytest

from imgrag.settings import load_settings
from imgrag.store.memory import FILE_NAME, ConceptMemory, memory_flags
from imgrag.weights import hub_layouts
from imgrag.weights.roles import hub_patterns, select_files
from tests.cli import run_cli

KIT_NOTE = "the tiny kit is not built yet: it is built on first use, or now with imgrag models build-tiny"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache of our own; any attempt to open a connection fails the test."""
    from huggingface_hub import constants

    def refuse(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _cache_files(cache: Path, repo: str, paths: list[str]) -> None:
    """Files in the cache where snapshot_download leaves them (a weights file: safetensors with no tensors)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text("0" * 40)
    for path in paths:
        target = root / "snapshots" / ("0" * 40) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"\x02" + b"\0" * 7 + b"{}" if path.endswith(".safetensors") else b"x")


def _followed(command_in_backticks: str) -> list[str]:
    """The argv of a command a message names in backticks (``imgrag`` left off, as run_cli takes it)."""
    words = shlex.split(command_in_backticks.strip("`"))
    assert words[0] == "imgrag"
    return words[1:]


def _backticked(text: str, start: str) -> str:
    """The first `...` in ``text`` that starts with ``start``."""
    parts = text.split("`")
    return next(f"`{p}`" for p in parts[1::2] if p.startswith(start))


# ----- 1. several roles not downloaded: one command for the whole profile, with its size -----


def test_doctor_names_one_download_for_the_whole_profile_and_its_size(capsys, hub_cache: Path,
                                                                      tmp_path: Path) -> None:
    code, out, err = run_cli(capsys, "doctor")
    assert code == 1 and "Traceback" not in err
    line = " ".join(err.split())
    assert line.count("error:") == 1
    assert ("5 models are not downloaded (generator, ip_adapter, judge, llm, embedder): `imgrag models download` "
            "fetches the whole profile at once (33.7 GB, size approximate); runs with this profile will fail here"
            ) in line, line
    assert "`imgrag models download` fetches it all" in " ".join(out.split())  # the disk line says it too
    assert "`imgrag models download --role generator`" in " ".join(out.split())  # role by role stays per role

    code, out, _ = run_cli(capsys, "doctor", "--json")
    report = json.loads(out)
    plan = report["download"]
    assert plan["command"] == "imgrag models download" and len(plan["roles"]) == 5
    assert plan["bytes"] == report["disk"]["still_needed_bytes"] > 30e9
    assert report["checkpoints"]["judge"]["status"] == "not downloaded: `imgrag models download --role judge`"

    # The dry run of that very command lists the same total to download.
    code, out, _ = run_cli(capsys, *_followed(f"`{plan['command']}`"), "--dry-run", "--json")
    assert code == 0 and json.loads(out)["to_download_bytes"] == plan["bytes"]

    # Another profile, a config file: the command carries them, so it fetches what doctor checked.
    config = tmp_path / "my config.toml"
    config.write_text("[generation]\nsteps = 20\n")
    code, _, err = run_cli(capsys, "doctor", "--profile", "cpu", "--config", str(config))
    command = _backticked(" ".join(err.split()), "imgrag models download")
    assert command == f"`imgrag models download --profile cpu --config '{config}'`"
    assert "fetches the whole profile at once (" in err


def test_one_role_not_downloaded_keeps_its_own_line(capsys, hub_cache: Path) -> None:
    settings = load_settings("gpu-24gb", check_device=False)
    for role in ("generator", "ip_adapter", "llm", "embedder"):  # all but the judge
        repo = {"generator": settings.models.generator, "ip_adapter": settings.models.ip_adapter,
                "llm": settings.models.llm, "embedder": "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"}[role]
        _cache_files(hub_cache, repo, [f.path for f in select_files(hub_layouts.LAYOUTS[repo],
                                                                    hub_patterns(role, settings))])
    code, out, _ = run_cli(capsys, "doctor", "--profile", "gpu-24gb", "--json")
    report = json.loads(out)
    assert report["download"]["roles"] == ["judge"]
    assert "judge: not downloaded: `imgrag models download --profile gpu-24gb --role judge`" in report["problems"]
    code, _, err = run_cli(capsys, "doctor", "--profile", "gpu-24gb")
    assert code == 1 and "fetches the whole profile" not in err


# ----- 2. the tiny kit: not built yet is one note; built but broken is a problem -----


def test_an_unbuilt_tiny_kit_is_one_note_not_five_problems(capsys) -> None:
    code, out, err = run_cli(capsys, "doctor", "--profile", "tiny", "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["problems"] == []
    assert report["notes"] == [KIT_NOTE]
    assert all(info["problems"] == [] and info["status"].startswith("not built yet")
               for info in report["checkpoints"].values())

    code, out, err = run_cli(capsys, "doctor", "--profile", "tiny")
    assert code == 0
    assert "problem:" not in out and "no such folder" not in out and "missing:" not in out
    assert " ".join(err.split()).count(f"note: {KIT_NOTE}") == 1


def _kit_copy(tiny_kit: dict[str, Path], tmp_path: Path) -> Path:
    kit = tmp_path / "kit"
    shutil.copytree(tiny_kit["generator"].parent, kit, symlinks=True)
    return kit


def test_a_built_tiny_kit_missing_a_file_is_a_problem(capsys, tiny_kit, tmp_path, monkeypatch) -> None:
    kit = _kit_copy(tiny_kit, tmp_path)
    (kit / "qwen2.5-vl" / "config.json").unlink()
    monkeypatch.setenv("IMGRAG_TINY_KIT_DIR", str(kit))
    code, out, err = run_cli(capsys, "doctor", "--profile", "tiny", "--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"] and report["notes"] == []
    assert report["checkpoints"]["judge"]["missing"] == ["config.json"]
    assert any(p.startswith("judge: MISSING 1 of ") and "imgrag models build-tiny --force" in p
               for p in report["problems"]), report["problems"]
    assert report["checkpoints"]["generator"]["ok"]
    code, _, err = run_cli(capsys, "doctor", "--profile", "tiny")
    assert code == 1 and err.count("error:") == 1 and "judge: MISSING 1 of" in err and "Traceback" not in err


def test_an_incomplete_tiny_kit_is_rebuilt_on_first_use_so_it_is_a_note(capsys, tiny_kit, tmp_path,
                                                                        monkeypatch) -> None:
    kit = _kit_copy(tiny_kit, tmp_path)
    shutil.rmtree(kit / "open-clip")  # a kit folder gone: ensure_tiny_kit rebuilds the kit on first use
    monkeypatch.setenv("IMGRAG_TINY_KIT_DIR", str(kit))
    code, out, _ = run_cli(capsys, "doctor", "--profile", "tiny", "--json")
    report = json.loads(out)
    assert code == 0 and report["problems"] == []
    assert report["notes"] == ["the tiny kit is incomplete or from an older imgrag: it is rebuilt on first use, "
                               "or now with imgrag models build-tiny"]


# ----- 3. a broken concept memory: forget --all sets it aside and starts an empty one -----


def test_forget_all_sets_a_broken_memory_aside_and_starts_empty(capsys, _isolated_home: Path) -> None:
    memory_file = _isolated_home / "store-tiny" / FILE_NAME
    memory_file.parent.mkdir(parents=True)
    memory_file.write_text("[1,2]")

    code, out, err = run_cli(capsys, "memory", "list", "--profile", "tiny")
    assert code == 1 and out == "" and err.count("error:") == 1 and "Traceback" not in err
    hint = _backticked(" ".join(err.split()), "imgrag memory forget")
    assert hint == "`imgrag memory forget --all --profile tiny`"

    code, out, err = run_cli(capsys, *_followed(hint))  # following the hint as it is
    assert code == 0 and "Traceback" not in err
    aside = list(memory_file.parent.glob(f"{FILE_NAME}.broken-*"))
    assert len(aside) == 1 and aside[0].read_text() == "[1,2]"  # nothing deleted
    assert len(out.strip().splitlines()) == 1
    assert f"set it aside as {aside[0]} (nothing deleted); the concept memory is empty now" in out

    code, out, _ = run_cli(capsys, "memory", "list", "--profile", "tiny", "--json")
    assert code == 0 and json.loads(out) == {"file": str(memory_file), "concepts": []}

    memory_file.write_text('{"schema": "imgrag.memory/1", "concepts": {"x": 1}}')  # broken again, same second
    code, out, _ = run_cli(capsys, "memory", "forget", "--all", "--profile", "tiny", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["forgotten"] == 0 and Path(doc["set_aside"]).is_file()
    assert len(list(memory_file.parent.glob(f"{FILE_NAME}.broken-*"))) == 2  # the first one kept


def test_forget_all_on_a_valid_memory_forgets_and_sets_nothing_aside(tmp_path: Path) -> None:
    memory = ConceptMemory(tmp_path)
    memory.remember("a wooden cradle", {"path": "/x.png", "sha256": "0" * 64}, run_id="r1")
    assert memory.start_over() == (1, None)
    assert memory.entries() == [] and list(tmp_path.glob("*.broken-*")) == []


# ----- 4. every hint of `imgrag memory` carries the flags that chose the store -----


@pytest.mark.parametrize("flags", [[], ["--profile", "tiny"], ["--profile", "tiny", "--store", "STORE"],
                                   ["--config", "CONFIG"]])
def test_every_memory_hint_reaches_the_same_store(capsys, tmp_path: Path, flags: list[str]) -> None:
    store = tmp_path / "my store"
    config = tmp_path / "store.toml"
    config.write_text(f'store = "{tmp_path / "store from config"}"\n')
    flags = [str(store) if f == "STORE" else str(config) if f == "CONFIG" else f for f in flags]

    code, out, _ = run_cli(capsys, "memory", "list", *flags, "--json")
    file = Path(json.loads(out)["file"])

    code, _, err = run_cli(capsys, "memory", "forget", "nosuch", *flags)
    assert code == 1 and err.count("error:") == 1
    hint = _backticked(" ".join(err.split()), "imgrag memory list")
    assert hint == "`" + shlex.join(["imgrag", "memory", "list", *flags]) + "`"
    code, out, _ = run_cli(capsys, *_followed(hint), "--json")
    assert code == 0 and json.loads(out)["file"] == str(file)  # the same memory

    file.write_text("not json")
    code, _, err = run_cli(capsys, "memory", "forget", "nosuch", *flags)
    assert code == 1 and err.count("error:") == 1 and str(file).replace(" ", "") in "".join(err.split())
    hint = _backticked(" ".join(err.split()), "imgrag memory forget")
    code, _, _ = run_cli(capsys, *_followed(hint))
    assert code == 0 and json.loads(file.read_text())["concepts"] == {}  # that very file started over
    assert len(list(file.parent.glob(f"{FILE_NAME}.broken-*"))) == 1


def test_a_runs_memory_error_names_the_flags_of_its_store(tmp_path: Path) -> None:
    """Outside `imgrag memory` (a run reading the memory) the hint's flags come from the settings."""
    assert memory_flags(load_settings()) == []
    assert memory_flags(load_settings("tiny")) == ["--profile", "tiny"]
    settings = load_settings("tiny", overrides={"store": str(tmp_path / "s")})
    assert memory_flags(settings) == ["--profile", "tiny", "--store", str(tmp_path / "s")]
    memory = ConceptMemory.for_settings(settings)
    memory.folder.mkdir(parents=True)
    memory.path.write_text("[1,2]")
    with pytest.raises(Exception, match=r"start an empty memory with `imgrag memory forget --all --profile tiny "
                                        r"--store "):
        memory.entries()

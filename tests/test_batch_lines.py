"""A .jsonl batch line read by its schema (agent/batch.py's BatchLine): every key that works keeps working, an
unknown key is refused (never silently ignored), each kind of bad value names its key, and every bad line of a file
is reported at once, one per line of the message, before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from agent.batch import BATCH_KEYS, MAX_LISTED_LINES, line_options, read_prompt_file
from imgrag.errors import UserError
from imgrag.settings import load_settings
from tests.cli import run_cli


def write_lines(path: Path, *lines: str | dict) -> Path:
    path.write_text("".join((json.dumps(line) if isinstance(line, dict) else line) + "\n" for line in lines),
                    encoding="utf-8")
    return path


def read_error(path: Path) -> str:
    with pytest.raises(UserError) as info:
        read_prompt_file(path)
    return str(info.value)


def test_every_key_that_works_keeps_working(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "kettle.png")
    prompts = write_lines(tmp_path / "p.jsonl",
                          "# a comment, then a blank line", "",
                          {"prompt": "  a red kettle  ", "seed": 7, "max_rounds": 2,
                           "references": [{"path": "kettle.png", "weight": 0.5, "mode": "style"}, "kettle.png"],
                           "negative_prompt": "blurry", "guidance": 6.5, "scheduler": "euler a", "per_round": 2},
                          {"prompt": "a fox", "negative": "text", "seed": None, "max_rounds": None, "references": None},
                          {"prompt": "a cat", "guidance": 7})
    first, second, third = read_prompt_file(prompts)
    assert first["prompt"] == "a red kettle" and first["seed"] == 7 and first["max_rounds"] == 2
    assert first["references"] == [{"path": str(tmp_path / "kettle.png"), "weight": 0.5, "mode": "style"},
                                   {"path": str(tmp_path / "kettle.png")}]
    assert first["drawing"] == {"negative_prompt": "blurry", "guidance": 6.5, "scheduler": "Euler a", "per_round": 2}
    assert first["line"] == 3 and second["line"] == 4
    assert second["drawing"] == {"negative_prompt": "text"} and "references" not in second  # the flag's name
    assert third["drawing"] == {"guidance": 7.0}
    settings = load_settings("default", environ={"IMGRAG_HOME": str(tmp_path / "home")})
    first = read_prompt_file(prompts, settings=settings)[0]
    assert [r["weight"] for r in first["references"]] == [0.5, 1.0] and first["references"][0]["sha256"]
    assert line_options(settings, first).per_round == 2
    assert set(BATCH_KEYS) == {"prompt", "seed", "max_rounds", "references", "negative_prompt", "negative",
                               "guidance", "scheduler", "per_round", "loras"}


def test_an_unknown_key_is_refused_naming_it_and_the_key_meant(tmp_path: Path) -> None:
    message = read_error(write_lines(tmp_path / "p.jsonl", {"prompt": "a fox"}, {"prompt": "a cat", "sed": 3}))
    assert message.startswith(f'{tmp_path / "p.jsonl"}:2: unknown key "sed" (did you mean "seed"? accepted: prompt, '
                              "seed, max_rounds, references, negative_prompt, negative, guidance, scheduler, "
                              "per_round, loras)")
    assert "\n" not in message


@pytest.mark.parametrize("line, says", [
    ({"prompt": "a", "seed": "seven"}, '"seed" must be an integer, got "seven"'),
    ({"prompt": "a", "seed": True}, '"seed" must be an integer, got true'),
    ({"prompt": "a", "seed": -1}, "seed out of range: -1"),
    ({"prompt": "a", "seed": 2**64}, "seed out of range"),
    ({"prompt": "a", "max_rounds": 0}, '"max_rounds" must be at least 1, got 0'),
    ({"prompt": "a", "max_rounds": "3"}, '"max_rounds" must be a whole number of at least 1'),
    ({"prompt": "a", "guidance": 99}, "guidance: Input should be less than or equal to"),
    ({"prompt": "a", "guidance": "high"}, "guidance: Input should be a valid number"),
    ({"prompt": "a", "scheduler": "Euler b"}, "scheduler: unknown scheduler"),
    ({"prompt": "a", "per_round": 0}, "per_round: Input should be greater than or equal to 1"),
    ({"prompt": "a", "negative_prompt": 5}, '"negative_prompt" must be a text'),
    ({"prompt": "a", "negative": ["x"]}, '"negative" must be a text'),
    ({"prompt": ""}, '"prompt" is empty'),
    ({"prompt": "   "}, '"prompt" is empty'),
    ({"seed": 3}, '"prompt" is missing'),
    ({"prompt": 5}, '"prompt" must be a non-empty text'),
    ({"prompt": "a", "references": "a.png"}, '"references" must be a list of {"path", "weight"?, "mode"?} objects'),
    ({"prompt": "a", "references": [{"file": "a.png"}]}, 'reference 1 must be an object {"path", "weight"?, '
                                                         '"mode"?}: unknown key "file"'),
    ({"prompt": "a", "references": ["a.png", {"path": 3}]}, "reference 2 must be an object"),
    ({"prompt": "a", "loras": "x.safetensors"}, '"loras" must be a list of {"path", "weight"?} objects'),
    ({"prompt": "a", "loras": [{"file": "x"}]}, 'LoRA 1 must be an object {"path", "weight"} (weight optional): '
                                                'unknown key "file"'),
    ({"prompt": "a", "loras": [{"path": "missing.safetensors"}]}, "missing.safetensors"),
    ('{"prompt": "a", "seed": 1, "seed": 2}', 'not valid JSON (the key "seed" is given twice)'),
    ('{"prompt": "a", "guidance": NaN}', "not valid JSON (NaN is not a number JSON allows)"),
    ('{"prompt": "a",}', "not valid JSON"),
    ('["a fox"]', 'each line needs an object with a non-empty "prompt"'),
    ('"a fox"', 'each line needs an object with a non-empty "prompt"'),
], ids=lambda v: None)
def test_each_kind_of_bad_value_is_named_with_its_line_and_key(tmp_path: Path, line, says: str) -> None:
    path = write_lines(tmp_path / "p.jsonl", {"prompt": "a fine line"}, line)
    message = read_error(path)
    assert message.startswith(f"{path}:2: ") and says in message and "\n" not in message


def test_every_bad_reason_of_one_line_is_named(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", {"prompt": "a", "seed": "x", "max_rounds": 0, "scheduler": "Euler b",
                                              "guidance": 99})
    message = read_error(path)
    for says in ('"seed" must be an integer', '"max_rounds" must be at least 1', "scheduler: unknown scheduler",
                 "guidance: Input should be less than or equal to"):
        assert says in message
    assert message.count(f"{path}:1: ") == 1 and "\n" not in message


def test_every_bad_line_is_reported_at_once_one_per_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", {"prompt": "good"}, {"prompt": "a", "sed": 1}, "{oops",
                       {"prompt": "good too"}, {"prompt": "b", "max_rounds": -2}, {"prompt": ""})
    lines = read_error(path).split("\n")
    assert lines[0] == f"{path}: 4 bad lines (nothing was run; fix them and run again):"
    assert [line.split(": ", 1)[0] for line in lines[1:]] == [f"{path}:{n}" for n in (2, 3, 5, 6)]
    assert 'unknown key "sed"' in lines[1] and "not valid JSON" in lines[2] and '"max_rounds"' in lines[3]


def test_a_file_of_many_bad_lines_lists_the_first_and_counts_the_rest(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", *({"prompt": f"p{n}", "colour": "red"} for n in range(MAX_LISTED_LINES
                                                                                                     + 5)))
    lines = read_error(path).split("\n")
    assert lines[0].startswith(f"{path}: {MAX_LISTED_LINES + 5} bad lines")
    assert len(lines) == 1 + MAX_LISTED_LINES + 1 and lines[-1] == "… and 5 more bad line(s)"
    assert lines[MAX_LISTED_LINES].startswith(f"{path}:{MAX_LISTED_LINES}: unknown key \"colour\"")


def test_every_missing_reference_file_is_reported_at_once_with_the_other_bad_lines(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", {"prompt": "a", "references": ["gone.png"]}, {"prompt": "b"},
                       {"prompt": "c", "references": [{"path": "also-gone.png"}]}, {"prompt": "d", "colour": "red"})
    settings = load_settings("default", environ={"IMGRAG_HOME": str(tmp_path / "home")})
    with pytest.raises(UserError) as info:
        read_prompt_file(path, settings=settings)
    lines = str(info.value).split("\n")
    assert lines[0].startswith(f"{path}: 3 bad lines")
    assert lines[1].startswith(f"{path}:1: ") and "gone.png" in lines[1]
    assert lines[2].startswith(f"{path}:3: ") and "also-gone.png" in lines[2]
    assert lines[3].startswith(f"{path}:4: unknown key \"colour\"")


def test_batch_names_a_missing_reference_beside_a_bad_key_before_any_model_loads(tmp_path: Path, capsys) -> None:
    path = write_lines(tmp_path / "p.jsonl", {"prompt": "a", "references": ["gone.png"]},
                       {"prompt": "b", "colour": "red"})
    code, _, err = run_cli(capsys, "batch", str(path), "--profile", "tiny")
    assert code == 1 and ":1: " in err and "gone.png" in err and ":2: unknown key" in err
    assert "tiny kit" not in err  # nothing was built or loaded


def test_the_batch_command_lists_every_bad_line_before_any_model_loads(tmp_path: Path, capsys) -> None:
    path = write_lines(tmp_path / "p.jsonl", {"prompt": "a", "sed": 1}, {"prompt": "b", "guidance": "x"})
    code, out, err = run_cli(capsys, "batch", str(path), "--profile", "tiny")
    assert code == 1 and out == "" and "Traceback" not in err
    assert err.startswith(f"error: {path}: 2 bad lines")
    assert f"{path}:1: unknown key \"sed\"" in err and f"{path}:2: guidance:" in err
    assert not any((tmp_path / "home").glob("runs/batch-*")) if (tmp_path / "home").exists() else True


def test_a_prompt_file_saved_as_utf16_is_told_to_be_saved_as_utf8(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes('{"prompt": "a caf\u00e9"}\n'.encode("utf-16"))  # Notepad's "Unicode"
    message = read_error(path)
    assert message.startswith(f"{path}:1: the prompt file is not UTF-8 text (byte 0xff)") and "re-save it as UTF-8" \
        in message

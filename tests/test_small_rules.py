"""The small rules that have one home each: text cutting and error lines (imgrag.text), the round budget check
(tools.budget.check_rounds), candidate ids (imgrag.candidate_ids) and the tests' own server ports (tests.ports).
Every expected value is worked out by hand."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from imgrag.candidate_ids import candidate_id, candidate_number, next_candidate_id, parse_candidate, sorted_ids
from imgrag.errors import UserError
from imgrag.text import describe_error, first_line, last_line, shorten
from tests.ports import ServerDidNotStart, accepts_connections, free_port, start_server, stop
from tools.budget import check_rounds

# ----- imgrag.text -----


@pytest.mark.parametrize(("text", "limit", "expected"), [
    ("a red fox", 20, "a red fox"),            # short enough: unchanged
    ("a red fox", 9, "a red fox"),             # exactly the limit: unchanged
    ("a red fox", 8, "a red f…"),              # its first 7 characters, then "…"
    ("a  red\nfox", 5, "a re…"),               # whitespace collapsed to "a red fox", then 4 characters and "…"
    ("abc def", 5, "abc…"),                    # "abc " loses its trailing space before the ellipsis
    (None, 5, ""),
    (12345678, 4, "123…"),                     # anything is str()-ed
])
def test_shorten(text: object, limit: int, expected: str) -> None:
    assert shorten(text, limit) == expected
    assert len(shorten(text, limit)) <= limit


def test_shorten_can_keep_the_spacing_and_never_goes_negative() -> None:
    assert shorten("a  b\nc", 10, collapse=False) == "a  b\nc"
    assert shorten("a  b\ncdef", 6, collapse=False) == "a  b…"  # "a  b\nc"[:5] is "a  b\n", stripped to "a  b"
    assert shorten("abc", 0) == "…"  # nothing fits: only the mark that something was cut


def test_first_and_last_lines_of_errors_and_texts() -> None:
    exc = ValueError("\n  first problem  \nsecond\n\n  the cause  \n")
    assert first_line(exc) == "first problem"
    assert last_line(exc) == "the cause"
    assert first_line(exc, 5) == "first"
    assert first_line(KeyError()) == "KeyError" and last_line(RuntimeError("")) == "RuntimeError"
    assert first_line("") == "" and first_line("   \n ") == ""  # a text has no type to fall back on
    assert first_line("HTTP body\nmore") == "HTTP body"


def test_describe_error_is_one_line_with_the_type() -> None:
    assert describe_error(OSError("disk\nfull")) == "OSError: disk"
    assert describe_error(ValueError("x" * 400)) == "ValueError: " + "x" * 300
    assert describe_error(ValueError("abcdef"), 3) == "ValueError: abc"
    assert describe_error(KeyError()) == "KeyError"  # no "KeyError: KeyError"


def test_no_module_keeps_its_own_first_line_helper() -> None:
    import imgrag.weights.checkpoints

    assert not hasattr(imgrag.weights.checkpoints, "first_line")  # one home: imgrag.text


# ----- the round budget -----


@pytest.mark.parametrize("value", [None, 1, 2, 50])
def test_check_rounds_accepts(value: int | None) -> None:
    assert check_rounds(value) == value


@pytest.mark.parametrize(("value", "what", "most", "message"), [
    (0, "--max-rounds", None, "--max-rounds must be at least 1, got 0"),
    (-3, "--max-rounds", None, "--max-rounds must be at least 1, got -3"),
    ("2", 'p.jsonl:4: "max_rounds"', None, 'p.jsonl:4: "max_rounds" must be a whole number of at least 1, got \'2\''),
    (True, "--max-rounds", None, "--max-rounds must be a whole number of at least 1, got True"),
    (2.0, "--max-rounds", None, "--max-rounds must be a whole number of at least 1, got 2.0"),
    (51, "rounds per request", 50, "rounds per request must be between 1 and 50, got 51"),
    (0, "rounds per request", 50, "rounds per request must be between 1 and 50, got 0"),
])
def test_check_rounds_refuses_in_one_line(value: object, what: str, most: int | None, message: str) -> None:
    with pytest.raises(UserError) as info:
        check_rounds(value, what, most)
    assert str(info.value) == message


def test_every_round_budget_goes_through_the_one_check(tmp_path) -> None:
    from agent.batch import read_prompt_file

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a fox", "max_rounds": 0}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r'p\.jsonl:1: "max_rounds" must be at least 1, got 0'):
        read_prompt_file(prompts)
    prompts.write_text('{"prompt": "a fox", "max_rounds": "3"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r'"max_rounds" must be a whole number of at least 1'):
        read_prompt_file(prompts)


# ----- candidate ids -----


def test_candidate_numbers_and_their_order() -> None:
    assert candidate_id(3) == "c3" and candidate_number("c12") == 12 and candidate_number("c0") == 0
    for malformed in ("x5", "c", "c-1", "c²", "cat", "c3.png", "C3", 7, None):
        assert candidate_number(malformed) == -1, malformed
    assert sorted_ids(["c10", "c2", "bogus", "c0"]) == ["bogus", "c0", "c2", "c10"]  # not "c10" < "c2"


@pytest.mark.parametrize(("typed", "expected"), [
    ("2", "c2"), (" c2 ", "c2"), ("C2", "c2"), ("02", "c2"), ("c02", "c2"), ("best", "best"), ("²", "²"),
])
def test_parse_candidate(typed: str, expected: str) -> None:
    assert parse_candidate(typed) == expected


def test_next_candidate_id_skips_taken_ids_and_files_on_disk() -> None:
    never = lambda cid: False  # noqa: E731
    assert next_candidate_id([], never) == "c0"
    assert next_candidate_id(["c0", "c3", "bogus"], never) == "c4"  # past the highest, gaps are not reused
    assert next_candidate_id(["c0"], never, at_least=5) == "c5"
    on_disk = {"c4", "c5"}
    assert next_candidate_id(["c3"], on_disk.__contains__) == "c6"  # an old picture is never overwritten


# ----- the tests' ports -----


def test_free_port_is_free_and_start_server_waits_for_the_port() -> None:
    port = free_port()
    assert 0 < port < 65536 and not accepts_connections(port)
    server = ("import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); "
              "s.listen(); time.sleep(60)")
    proc, port = start_server(lambda p: [sys.executable, "-c", server, str(p)], timeout=30, poll=0.05)
    try:
        assert proc.poll() is None and accepts_connections(port)
    finally:
        stop(proc)
    assert proc.returncode is not None


def test_start_server_tries_another_port_when_the_first_is_taken() -> None:
    """The race the helper exists for: the server finds its port taken and exits; the next attempt gets another."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports: list[int] = []

        def argv(port: int) -> list[str]:  # the first attempt is pointed at the busy port
            ports.append(port)
            target = busy if len(ports) == 1 else port
            return [sys.executable, "-c", "import socket, sys, time; s = socket.socket(); "
                    "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); time.sleep(60)", str(target)]

        def ready(port: int) -> bool:
            return port != ports[0] and accepts_connections(port)

        proc, port = start_server(argv, timeout=30, ready=ready, poll=0.05, stderr=subprocess.DEVNULL)
        try:
            assert len(ports) == 2 and port == ports[1] and accepts_connections(port)
        finally:
            stop(proc)


def test_start_server_gives_up_with_the_reason() -> None:
    with pytest.raises(ServerDidNotStart, match="did not start in 2 attempts: it exited with code 3"):
        start_server(lambda p: [sys.executable, "-c", "raise SystemExit(3)"], timeout=30, attempts=2, poll=0.05)


# ----- load counts -----


def test_add_loads_adds_per_model_and_keeps_models_that_never_loaded() -> None:
    from imgrag.management.manager import add_loads

    assert add_loads() == {}
    assert add_loads({"judge": 1, "llm": 2}, None, {"judge": 2, "embedder": 0}) == {"judge": 3, "llm": 2, "embedder": 0}
    assert add_loads({"judge": "2"}) == {"judge": 2}  # each count is made an int
    total = add_loads({"a": 1})
    assert type(total) is dict  # a plain dict in result.json, not a Counter

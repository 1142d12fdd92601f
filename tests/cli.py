"""Running the real ``imgrag`` entry point in process, as the tests of the command line do."""

from __future__ import annotations

import pytest

from agent.frontends.cli.app import main


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """``imgrag ARGV...``: its exit code, stdout and stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err

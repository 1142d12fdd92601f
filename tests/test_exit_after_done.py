"""A Ctrl-C that lands while the interpreter shuts down, after the command has finished and written everything:
one line saying so, and the command's own exit code (not 130 and silence)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The command finishes (imgrag --version); then, at shutdown, the process gets SIGINT as from the terminal.
SCRIPT = """
import atexit, os, signal, sys, time
def ctrl_c_at_shutdown():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
    print("not reached", file=sys.stderr)
atexit.register(ctrl_c_at_shutdown)
sys.argv = ["imgrag", "--version"]
from agent.frontends.cli.app import main
main()
"""


def test_ctrl_c_during_shutdown_after_the_command_finished() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert "imgrag" in done.stdout  # the command's output is complete
    assert "after the command had finished: everything it wrote is kept" in done.stderr
    assert "not reached" not in done.stderr and "Traceback" not in done.stderr

"""Loopback ports for tests that start servers (``chroma run``, ``transformers serve``, ``imgrag serve``).

Asking the kernel for a free port (bind to port 0) and then closing the socket leaves a window in which another
process can take the port before the server binds it: on a busy CI machine the server then dies at start-up with
"address already in use". :func:`start_server` closes that window by trying again on a fresh port when the server
exits before it answers; :func:`free_port` alone is for a port that must have no listener at all.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

__all__ = ["ServerDidNotStart", "accepts_connections", "free_port", "start_server", "stop"]


class ServerDidNotStart(RuntimeError):
    """No attempt of :func:`start_server` answered in time (the message says how the last one ended)."""


def free_port() -> int:
    """A loopback TCP port that nothing listens on at the moment of the call (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepts_connections(port: int) -> bool:
    """Whether something accepts a TCP connection on 127.0.0.1:``port`` now."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def start_server(argv: Callable[[int], list[str]], *, timeout: float, attempts: int = 3,
                 ready: Callable[[int], bool] = accepts_connections, poll: float = 0.2,
                 **popen: Any) -> tuple[subprocess.Popen, int]:
    """Start ``argv(port)`` on a free port and wait until ``ready(port)`` (default: the port accepts connections),
    polling every ``poll`` seconds, at most ``timeout`` seconds per attempt.

    When the process exits before it is ready (the port was taken in the meantime, among other reasons), it is tried
    again on another port, ``attempts`` times in all. Returns the running process and its port; raises
    :class:`ServerDidNotStart` (after stopping the process) otherwise. ``popen`` goes to :class:`subprocess.Popen`
    (``cwd``, ``env``, ``stdout``...)."""
    why = "no attempt"
    for _ in range(attempts):
        port = free_port()
        proc = subprocess.Popen(argv(port), **popen)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if ready(port):
                return proc, port
            time.sleep(poll)
        if proc.poll() is None:  # alive but never ready: waiting longer on another port would not help
            stop(proc)
            raise ServerDidNotStart(f"{argv(port)[0]} did not answer on port {port} within {timeout:g} s")
        why = f"it exited with code {proc.returncode} (port {port})"
    raise ServerDidNotStart(f"{argv(0)[0]} did not start in {attempts} attempts: {why}")


def stop(proc: subprocess.Popen, grace: float = 10) -> None:
    """Terminate ``proc``, and kill it when it has not ended after ``grace`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

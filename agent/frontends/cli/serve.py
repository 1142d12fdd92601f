"""``imgrag serve``: the chat as a web page (Gradio, the optional ``web`` extra); see ``agent/frontends/web.py``."""

from __future__ import annotations

import errno
import socket
from typing import Annotated

import typer

from agent.frontends.cli.common import (
    ConfigOpt,
    ProfileOpt,
    RepairWithOpt,
    StoreOpt,
    app,
    err,
    out,
    prepare_models,
    repair_flags,
    settings_from_flags,
)
from agent.frontends.cli.run import MaxRoundsOpt, OutOpt, PlannerOpt, check_planner
from imgrag.errors import UserError


@app.command()
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to bind. Anything but 127.0.0.1 lets other "
                                      "machines draw on this one, with no login: a warning is printed.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 7860,
    planner: PlannerOpt = "agent",
    max_rounds: MaxRoundsOpt = None,
    out_dir: OutOpt = None,
    repair_with: RepairWithOpt = None,
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """The chat as a web page: candidates with verdicts, references with scores, the best picture, threads.

    Threads are those of `imgrag chat` (the same database): a thread started in one continues in the other.
    Needs the web extra: pip install 'imgrag\\[web]'. Ctrl-C stops the server.
    """
    from agent.frontends.web import LOOPBACK

    check_planner(planner)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("imgrag serve needs Gradio: pip install 'imgrag[web]'") from None
    settings = settings_from_flags(profile, config, store=store, output_dir=str(out_dir) if out_dir else None,
                                   **repair_flags(repair_with))
    if host not in LOOPBACK:
        err.print(f"[yellow]warning:[/] serving on {host}: anyone who can reach this address can use the page, "
                  "draw on this machine and see its runs and store pictures; there is no login.")
    check_port(host, port)  # a busy port is one line naming --port, before any model loads or URL is shown
    prepare_models(settings)
    from agent.frontends.web import WebChat, launch

    web = WebChat(settings, planner=planner, rounds=max_rounds)
    shown = f"[{host}]" if ":" in host else host
    check_port(host, port)  # again: the models took a while, another server may have started meanwhile
    out.print(f"imgrag serve · profile {settings.profile} · http://{shown}:{port}/ (Ctrl-C stops)")
    launch(web, host=host, port=port, block=True)


def check_port(host: str, port: int) -> None:
    """Raise a one-line UserError naming ``--port`` when ``host:port`` cannot be listened on (taken, or not
    this machine's address). Checked by binding it, the one test that holds for every platform."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server sets it: TIME_WAIT is no owner
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                from agent.frontends.web import busy_port_message

                raise UserError(busy_port_message(host, port)) from None
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; check --host and --port") from None
    return None

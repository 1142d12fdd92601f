"""Commands of the terminal chat (issue #6) — not built yet; each says so and exits 2."""

import typer

from agent.cli_common import app, not_available

_STUB = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command(context_settings=_STUB)
def chat(ctx: typer.Context) -> None:
    """Not available yet: arrives with the terminal chat (issue #6)."""
    not_available("chat", "the terminal chat (issue #6)")

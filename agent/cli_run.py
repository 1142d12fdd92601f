"""Commands of the agent (issue #5) — not built yet; each says so and exits 2."""

import typer

from agent.cli_common import app, not_available

_STUB = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command(context_settings=_STUB)
def run(ctx: typer.Context) -> None:
    """Not available yet: arrives with the agent (issue #5)."""
    not_available("run", "the agent (issue #5)")


@app.command(context_settings=_STUB)
def batch(ctx: typer.Context) -> None:
    """Not available yet: arrives with the agent (issue #5)."""
    not_available("batch", "the agent (issue #5)")

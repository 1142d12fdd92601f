"""Commands of the reference store (issue #4) — not built yet; each says so and exits 2."""

import typer

from agent.cli_common import app, not_available

_STUB = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command(context_settings=_STUB)
def index(ctx: typer.Context) -> None:
    """Not available yet: arrives with the reference store (issue #4)."""
    not_available("index", "the reference store (issue #4)")


@app.command(context_settings=_STUB)
def search(ctx: typer.Context) -> None:
    """Not available yet: arrives with the reference store (issue #4)."""
    not_available("search", "the reference store (issue #4)")

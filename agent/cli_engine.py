"""Commands of the engine (issue #3) — not built yet; each says so and exits 2."""

import typer

from agent.cli_common import app, not_available

_STUB = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command(context_settings=_STUB)
def generate(ctx: typer.Context) -> None:
    """Not available yet: arrives with the engine (issue #3)."""
    not_available("generate", "the engine (issue #3)")


@app.command(context_settings=_STUB)
def critique(ctx: typer.Context) -> None:
    """Not available yet: arrives with the engine (issue #3)."""
    not_available("critique", "the engine (issue #3)")

"""Commands of the report and evaluation harness (issue #7) — not built yet; each says so and exits 2."""

import typer

from agent.cli_common import app, not_available

_STUB = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command(context_settings=_STUB)
def report(ctx: typer.Context) -> None:
    """Not available yet: arrives with the report and evaluation harness (issue #7)."""
    not_available("report", "the report and evaluation harness (issue #7)")


@app.command(context_settings=_STUB)
def eval(ctx: typer.Context) -> None:
    """Not available yet: arrives with the report and evaluation harness (issue #7)."""
    not_available("eval", "the report and evaluation harness (issue #7)")

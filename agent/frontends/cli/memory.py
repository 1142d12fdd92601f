"""``imgrag memory list`` and ``imgrag memory forget CONCEPT``: the concept memory of a store.

Which references fixed which concept in earlier matched runs (imgrag/store/memory.py); a later prompt naming a
concept starts guided by them (agent/memory_guide.py). Nothing here loads a model.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from agent.frontends.cli.common import (
    ConfigOpt,
    JsonOpt,
    ProfileOpt,
    StoreOpt,
    app,
    out,
    print_json,
    settings_from_flags,
    text_check,
)
from imgrag.errors import UserError
from imgrag.store.memory import ConceptMemory

memory_app = typer.Typer(help="The concept memory: which references fixed which concept in earlier matched runs "
                         "(kept in the store's folder; retrieval.memory, --no-memory).", no_args_is_help=True)
app.add_typer(memory_app, name="memory")


@memory_app.command("list")
def list_memory(profile: ProfileOpt = None, config: ConfigOpt = None, store: StoreOpt = None,
                as_json: JsonOpt = False) -> None:
    """Every remembered concept with its references, their matches and mismatches (demoted ones are not used)."""
    memory = ConceptMemory.for_settings(settings_from_flags(profile, config, store=store))
    entries = memory.entries()
    if as_json:
        print_json({"file": str(memory.path), "concepts": [
            {"concept": e.concept, "references": [{**r.model_dump(), "demoted": r.demoted} for r in e.references]}
            for e in entries]})
        return
    if not entries:
        out.print(f"the concept memory is empty ({escape(str(memory.path))})")
        return
    table = Table("concept", "reference", "weight:mode", "matches", "mismatches", "used", "last run")
    for entry in entries:
        for ref in entry.references:
            table.add_row(escape(entry.concept), escape(ref.path), f"{ref.weight:g}:{ref.mode}", str(ref.matches),
                          str(ref.mismatches), "no (demoted)" if ref.demoted else "yes",
                          escape(ref.run_ids[-1] if ref.run_ids else ""))
    out.print(table)
    out.print(f"file: {escape(str(memory.path))}")


@memory_app.command("forget")
def forget_memory(
    concept: Annotated[str | None, typer.Argument(help="The concept to forget, as `imgrag memory list` shows it.",
                                                  callback=text_check("the CONCEPT"))]
    = None,
    every: Annotated[bool, typer.Option("--all", help="Forget every concept.")] = False,
    profile: ProfileOpt = None, config: ConfigOpt = None, store: StoreOpt = None, as_json: JsonOpt = False,
) -> None:
    """Drop a remembered concept (or --all): later prompts naming it start from a plain drawing again."""
    if (concept is None) == (not every):
        raise UserError("give a CONCEPT to forget, or --all (not both)")
    memory = ConceptMemory.for_settings(settings_from_flags(profile, config, store=store))
    dropped = memory.forget(None if every else concept)
    if not every and not dropped:
        raise UserError(f"no remembered concept {concept!r}; `imgrag memory list` shows them")
    if as_json:
        print_json({"forgotten": dropped, "file": str(memory.path)})
        return
    out.print(f"forgot {dropped} concept(s)")

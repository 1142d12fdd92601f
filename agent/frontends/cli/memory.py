"""``imgrag memory list`` and ``imgrag memory forget CONCEPT``: the concept memory of a store.

Which references fixed which concept in earlier matched runs (imgrag/store/memory.py); a later prompt naming a
concept starts guided by them (agent/memory_guide.py). Nothing here loads a model.

Every command a message here names carries the flags that chose the store (``--profile``, ``--config``,
``--store``, as given: :func:`_store_flags`), so following it reaches the same memory.
"""

from __future__ import annotations

from pathlib import Path
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


def _store_flags(profile: str | None, config: Path | None, store: str | None) -> list[str]:
    """The flags of this command that chose its store, to repeat in every command a message names: ``--profile``
    (not for the default profile), ``--config`` (a file may set ``store``) and ``--store`` when given."""
    flags = ["--profile", profile] if profile and profile != "default" else []
    if config is not None:
        flags += ["--config", str(config)]
    return flags + (["--store", store] if store else [])


def _memory(profile: str | None, config: Path | None, store: str | None) -> ConceptMemory:
    """The concept memory these flags reach; the commands its messages name carry the same flags."""
    return ConceptMemory.for_settings(settings_from_flags(profile, config, store=store),
                                      flags=_store_flags(profile, config, store))


@memory_app.command("list")
def list_memory(profile: ProfileOpt = None, config: ConfigOpt = None, store: StoreOpt = None,
                as_json: JsonOpt = False) -> None:
    """Every remembered concept with its references, their matches and mismatches (demoted ones are not used)."""
    memory = _memory(profile, config, store)
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
    """Drop a remembered concept (or --all): later prompts naming it start from a plain drawing again.

    --all also starts over from a file that is not a valid memory: it is set aside (renamed
    concept_memory.json.broken-<time>, nothing deleted) and an empty memory is started."""
    if (concept is None) == (not every):
        raise UserError("give a CONCEPT to forget, or --all (not both)")
    memory = _memory(profile, config, store)
    aside = None
    if every:
        dropped, aside = memory.start_over()
    else:
        dropped = memory.forget(concept)
        if not dropped:
            raise UserError(f"no remembered concept {concept!r}; {memory.command('list')} shows them")
    if as_json:
        print_json({"forgotten": dropped, "file": str(memory.path), "set_aside": str(aside) if aside else None})
        return
    if aside is not None:
        out.print(f"{escape(str(memory.path))} was not a valid concept memory: set it aside as "
                  f"{escape(str(aside))} (nothing deleted); the concept memory is empty now", soft_wrap=True)
        return
    out.print(f"forgot {dropped} concept(s)")

"""``imgrag index`` and ``imgrag search``: the reference store from the command line.

The embedder comes from the engine's model manager, like everywhere else; results go to stdout (one
JSON document with ``--json``), progress and messages to stderr.
"""

from __future__ import annotations

import shutil
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import ProgressColumn
from rich.table import Table
from rich.text import Text

from agent.frontends.cli.common import (
    ConfigOpt,
    JsonOpt,
    ProfileOpt,
    StoreOpt,
    TerminalBar,
    app,
    err,
    on_interrupt,
    out,
    prepare_models,
    print_json,
    settings_from_flags,
    text_check,
)
from imgrag.errors import UserError
from imgrag.file_names import display_name
from imgrag.images import open_image
from imgrag.management.engine import ManagedEmbedder, build_manager
from imgrag.models.safety import excluded_by, index_screen
from imgrag.records.runs import disk_full_line, ensure_writable_dir, is_disk_full
from imgrag.settings import Settings
from imgrag.store import ReferenceStore, index_hint, is_server_uri
from imgrag.text import shorten

MAX_K = 1000
MAX_BATCH = 1024
CAPTION_CHARS = 120  # of a caption in the search table; the store and --json keep it whole


@contextmanager
def _embedder(settings: Settings) -> Iterator[Any]:
    """The embedder through the model manager: each embedding call on the model thread under the device lock;
    walking folders, decoding files and Chroma hold no lock (the same handling as a run)."""
    yield ManagedEmbedder(build_manager(settings))


class _RateColumn(ProgressColumn):
    """Images per second, over the whole task so far."""

    def render(self, task: Any) -> Text:
        elapsed = task.elapsed or 0.0
        rate = task.completed / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:7.1f} files/s", style="cyan")


class _IndexProgress:
    """A rich bar on a terminal; on a pipe (CI, scripts, logs) one plain line per batch instead."""

    def __init__(self) -> None:
        self.bar = TerminalBar("indexing", _RateColumn())
        self.start = 0.0

    def __call__(self, done: int, total: int) -> None:
        if total == 0:
            return
        if done == 0:
            self.start = time.perf_counter()  # the rate counts from the first file, not from model loading
        self.bar(done, total)  # draws only on a terminal
        if not err.is_terminal and done:
            rate = done / max(time.perf_counter() - self.start, 1e-9)
            err.print(f"read {done}/{total} files ({rate:.1f} files/s)", highlight=False)

    def close(self) -> None:
        self.bar.close()


@app.command()
def index(
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders (walked recursively).",
                                                show_default=False, metavar="PATH")],
    prune: Annotated[bool, typer.Option("--prune", help="Forget pictures under PATHs whose files are gone.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Pictures embedded and written per batch.")] = 32,
    skip_flagged: Annotated[bool | None, typer.Option(
        "--skip-flagged/--keep-flagged", help="Leave pictures the safety gate flags out of the store "
        "(default: safety.skip_flagged_at_index, off).")] = None,
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add your pictures to the reference store (incremental: unchanged files are not read again).

    Takes the common image types; a caption beside a picture (rocket.jpg + rocket.txt) is stored with
    it. Unusable files are skipped with a reason. Exits 0 when anything usable was indexed (or all of
    it was already there and unchanged), 1 when nothing usable was found.
    """
    if not 1 <= batch_size <= MAX_BATCH:
        raise UserError(f"--batch-size must be between 1 and {MAX_BATCH}, got {batch_size}")
    for path in paths:
        if not path.expanduser().exists() and not prune:
            raise UserError(f"{path}: no such file or folder")
    settings = settings_from_flags(profile, config, store=store, **{"safety.skip_flagged_at_index": skip_flagged})
    if not is_server_uri(settings.store):
        ensure_writable_dir(settings.store, "store")  # before the embedder loads
    prepare_models(settings)

    progress = _IndexProgress()
    on_interrupt("the pictures indexed so far are kept (each batch is written whole); run the same `imgrag index` "
                 "again to add the rest, it reads only what is missing")
    try:
        with _embedder(settings) as embedder:
            ref_store = ReferenceStore.open(settings, embedder.model_id, embedder.dim, for_writing=True)
            summary = ref_store.index(paths, embedder, prune=prune, progress=progress, batch_size=batch_size,
                                      on_wait=lambda msg: err.print(f"[yellow]{escape(msg)}[/]"),
                                      screen=index_screen(settings.safety, embedder))
    except Exception as exc:
        full = store_disk_full(exc, settings.store)
        if full is None:
            raise
        raise UserError(full) from None
    finally:
        progress.close()

    usable = summary["added"] + summary["duplicates"] + summary["updated"] + summary["unchanged"]
    if as_json:
        print_json(summary)
    else:
        _print_summary(summary, ref_store.location)
    if usable == 0 and not (prune and summary["removed"] and not summary["skipped"]):
        err.print(f"[red]error:[/] no usable image under {escape(', '.join(str(p) for p in paths))}")
        raise typer.Exit(1)


# Below this much free space, a Chroma compaction error is a full disk whatever its wording.
_LOW_SPACE_BYTES = 64 * 2**20


def store_disk_full(exc: BaseException, store: str) -> str | None:
    """The one line for a store write that failed for want of space (Chroma says "Error in compaction" and
    SQLite "database or disk is full", over dozens of lines), or None when ``exc`` is about something else."""
    local = not is_server_uri(store)
    low = False
    if local and "compaction" in str(exc).lower():
        try:
            low = shutil.disk_usage(Path(store).expanduser()).free < _LOW_SPACE_BYTES
        except OSError:
            low = False
    if not (is_disk_full(exc) or low):
        return None
    where = disk_full_line(exc, store) if local else f"the Chroma server at {store}: its disk is full"
    return (f"{where}; the pictures indexed before are kept; free some space, then run the same `imgrag index` "
            "again (it adds only what is missing)")


def _print_summary(summary: dict[str, Any], location: str) -> None:
    table = Table(title="indexed", show_header=False)
    table.add_column()
    table.add_column(overflow="fold")
    for key in ("added", "duplicates", "updated", "unchanged", "removed"):
        table.add_row(key, str(summary[key]))
    table.add_row("skipped", str(len(summary["skipped"])))
    table.add_row("pictures in store", str(summary["total"]))
    table.add_row("seconds", f"{summary['seconds']:.2f}")
    out.print(table)
    out.print(f"store: {escape(location)}")  # a path: on its own line, never cut
    for item in summary["skipped"][:50]:
        # markup off: a path may contain [brackets]
        err.print(f"skipped {display_name(item['path'])}: {item['reason']}", style="yellow",
                  markup=False)
    if len(summary["skipped"]) > 50:
        err.print(f"[yellow]... and {len(summary['skipped']) - 50} more skipped (--json lists them all)[/]")
    for item in summary.get("notes", [])[:50]:
        err.print(f"note: {display_name(item['path'])}: {item['note']}", markup=False)


@app.command()
def search(
    text: Annotated[str | None, typer.Argument(help="What to look for (leave out with --image).",
                                               callback=text_check("the search TEXT"))] = None,
    k: Annotated[int, typer.Option("-k", "--top-k", help="How many results.")] = 5,
    image: Annotated[Path | None, typer.Option("--image", help="Find pictures like this one instead.")] = None,
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Find pictures in the reference store by text, or by a picture with --image (score: cosine similarity)."""
    text = (text or "").strip() or None
    if text is None and image is None:
        raise UserError("give a TEXT to search for, or --image PATH")
    if text is not None and image is not None:
        raise UserError("give a TEXT or --image, not both")
    if not 1 <= k <= MAX_K:
        raise UserError(f"-k must be between 1 and {MAX_K}, got {k}")
    query_image = open_image(image) if image is not None else None  # a bad file fails before any model loads
    settings = settings_from_flags(profile, config, store=store)
    if not is_server_uri(settings.store) and not Path(settings.store).expanduser().exists():
        raise UserError(f"the store {settings.store} does not exist; check --store, or make it with "
                        f"{index_hint(settings.profile, store)}")  # before any model loads
    prepare_models(settings)

    with _embedder(settings) as embedder:
        ref_store = ReferenceStore.open(settings, embedder.model_id, embedder.dim)
        total = ref_store.count()
        if total == 0:
            raise UserError(f"the store at {ref_store.location} holds no pictures yet: add some with "
                            f"{index_hint(settings.profile, store)}")
        if query_image is not None:
            results = ref_store.search_image(embedder, query_image, k)
        else:
            results = ref_store.search_text(embedder, text or "", k)
        matched = len(results)
        results = [r for r in results if excluded_by(r.path, settings.safety.exclude) is None]
    if matched > len(results):  # said, not hidden: a folder safety.exclude leaves out is why
        err.print(f"[yellow]note:[/] {matched - len(results)} of the {matched} best matches are in folders "
                  "safety.exclude leaves out, so they are not listed")

    if as_json:  # captions whole, as the store keeps them
        print_json({"results": [{"id": r.id, "path": r.path, "score": round(r.score, 6), "caption": r.caption}
                                for r in results]})
        return
    table = Table(title=f"{len(results)} of {total} pictures for "
                        f"{escape(('image ' + display_name(image)) if image else repr(shorten(text, 80)))}")
    for column in ("#", "score", "path", "caption"):
        table.add_column(column, overflow="fold")
    for rank, ref in enumerate(results, 1):  # a long caption is cut at a word, and says so ("…")
        caption = textwrap.shorten(ref.caption, CAPTION_CHARS, placeholder=" …") if ref.caption.strip() else ""
        table.add_row(str(rank), f"{ref.score:.3f}", escape(display_name(ref.path)), escape(caption))
    out.print(table)

"""The ``imgrag`` command line. Each area's commands live in their own module (``doctor`` in
agent/frontends/cli/doctor.py); this file wires them together, holds ``models`` (download, build-tiny) and the
entry point: one line for every user mistake, the interrupt and disk-full lines, the library logs kept quiet."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from typer import rich_utils

# Importing a command group registers its commands on the app.
import agent.frontends.cli.chat  # noqa: F401
import agent.frontends.cli.doctor  # noqa: F401
import agent.frontends.cli.engine  # noqa: F401
import agent.frontends.cli.memory  # noqa: F401
import agent.frontends.cli.report  # noqa: F401
import agent.frontends.cli.run  # noqa: F401
import agent.frontends.cli.serve  # noqa: F401
import agent.frontends.cli.store  # noqa: F401
from agent.frontends.cli.common import (
    ConfigOpt,
    JsonOpt,
    ProfileOpt,
    RepairWithOpt,
    app,
    err,
    interrupted_line,
    out,
    print_json,
    repair_flags,
    settings_from_flags,
)
from agent.frontends.cli.common import click_exceptions as click_errors
from agent.frontends.ray_batch import expand_ray_flag
from imgrag.errors import UserError, check_seed
from imgrag.kits.full_scale import build_kit
from imgrag.records.runs import disk_full_line, ensure_writable_dir, is_disk_full
from imgrag.weight_files import human_size
from imgrag.weights.downloads import OFFLINE_HINT, download, free_disk_bytes, hub_cache_dir, hub_offline
from imgrag.weights.model_files import check_roles
from imgrag.weights.roles import ROLES

models_app = typer.Typer(help="Model checkpoints: download the real ones, or build the offline tiny kit.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("build-tiny")
def build_tiny(
    directory: Annotated[
        Path | None, typer.Argument(help="Where to write the kit (default: the tiny profile's).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for the random weights.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if a current kit is there.")] = False,
    scale: Annotated[str, typer.Option("--scale", help="tiny (seconds, MBs) or full: the real models' sizes "
                                       "(~40 GB; for GPU benchmarks).")] = "tiny",
    as_json: JsonOpt = False,
) -> None:
    """Build random-weight models of every real architecture, saved in the real on-disk formats.

    Their pictures are noise and their verdicts junk: they exist so that tests and the offline demo
    go through the same loading code as real checkpoints.
    """
    check_seed(seed, "--seed")
    if scale not in ("tiny", "full"):
        raise UserError(f"--scale must be tiny or full, got {scale!r}")
    if scale == "full" and directory is None:
        raise UserError("--scale full needs a DIRECTORY (about 40 GB); the tiny profile's kit is left alone")
    target = directory or Path(settings_from_flags("tiny").tiny_kit_dir)
    ensure_writable_dir(target, "tiny kit folder")
    start = time.perf_counter()
    paths = build_kit(target, scale=scale, seed=seed, force=force,
                      progress=lambda msg: err.print(f"[dim]built {escape(msg)}[/]"))
    seconds = round(time.perf_counter() - start, 2)
    if as_json:
        print_json({"directory": str(target), "models": {k: str(v) for k, v in paths.items()}, "seconds": seconds})
        return
    width = max(len(role) for role in paths)
    for role, path in paths.items():
        out.print(f"{role:{width}} {path}", markup=False)
    err.print(f"{scale} kit ready in {target} ({seconds} s). Random weights: outputs are noise.", markup=False)


RoleOpt = Annotated[list[str] | None, typer.Option(
    "--role", "-r", help="Only this role (generator, ip_adapter, judge, llm, embedder, lcm_lora, omnigen); repeat for "
    "several.")]


def _roles(role: list[str] | None) -> list[str] | None:
    for name in role or []:
        if name not in ROLES:
            raise UserError(f"unknown role {name!r} (roles: {', '.join(ROLES)})")
    return list(dict.fromkeys(role)) if role else None


@models_app.command("download")
def download_models(
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    role: RoleOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List repositories, files and sizes; no network.")] = False,
    repair_with: RepairWithOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fetch exactly the files each role of the profile needs into the Hugging Face cache.

    Resumable (run it again after an interruption); the hub client draws progress bars on stderr. Roles
    that point at local folders or at an LLM server need nothing. imgrag never downloads on its own:
    this command is the only one that does.
    """
    settings = settings_from_flags(profile, config, check_device=False,  # a GPU preset may be fetched anywhere
                                   **repair_flags(repair_with))
    roles = check_roles(settings, _roles(role))
    cache = hub_cache_dir()
    to_fetch = [r for r in roles if r.downloadable]
    summary = {"profile": profile or settings.profile, "dry_run": dry_run, "cache": str(cache),
               "free_bytes": free_disk_bytes(cache), "total_bytes": sum(r.total_bytes for r in roles),
               "to_download_bytes": sum(r.fetch_bytes for r in to_fetch),
               "sizes_approximate": any(r.approx_only for r in roles)}
    if not as_json:
        _print_plan(roles, summary)
    if not dry_run:
        if to_fetch and hub_offline():
            raise UserError("cannot download: HF_HUB_OFFLINE=1 is set, so the model hub is off limits; unset it, or "
                            + OFFLINE_HINT.format(cache=cache))
        for result in to_fetch:
            err.print(f"[bold]fetching {result.repo_id}[/] ({result.role}): {len(result.to_fetch) or '?'} files, "
                      f"{human_size(result.fetch_bytes) if result.recorded else 'size unknown'}")
            download(result)
        roles = check_roles(settings, _roles(role))
        left = [f"{r.role}: {', '.join(f.path for f in r.to_fetch)}" for r in roles if r.to_fetch]
        if left:
            raise UserError("still missing after the download: " + "; ".join(left))
    summary["roles"] = [r.as_dict() for r in roles]
    if as_json:
        print_json(summary)
    elif not dry_run:
        err.print("[green]done:[/] every file is in the Hugging Face cache" if to_fetch else
                  "nothing to download: every file is already here")


def _print_plan(roles: list, summary: dict) -> None:
    approx = " (size approximate)" if summary["sizes_approximate"] else ""
    for r in roles:
        if r.source in ("remote", "unset"):
            what = "served over HTTP" if r.source == "remote" else "not set"
            out.print(f"[bold]{r.role}[/]: {r.ref or '(not set)'} — {what}, nothing to download")
            continue
        known = r.recorded or r.source != "hub"
        count = f"{len(r.files)} files, {human_size(r.total_bytes) if known else 'size unknown'}"
        if r.source == "hub":
            out.print(f"[bold]{r.role}[/]: {r.repo_id} ({count})")
            out.print(f"  allow_patterns: {' '.join(r.patterns)}")
        elif r.repo_id:  # a single-file generator: the file is the user's, its configuration comes from the hub
            out.print(f"[bold]{r.role}[/]: {r.ref} (local file; its configuration from {r.repo_id}, {count})")
            out.print(f"  allow_patterns: {' '.join(r.patterns)}")
        else:
            out.print(f"[bold]{r.role}[/]: {r.ref} (local: nothing to download)")
        if r.source == "hub" and not r.recorded:
            out.print("  sizes unknown offline (this repository's layout is not recorded in imgrag)")
        for f in r.files:
            fetchable = r.source == "hub" or (r.repo_id and not f.local)
            mark = "[green]here[/]" if f.present else "[yellow]to fetch[/]" if fetchable else "[red]MISSING[/]"
            size = human_size(f.size) + ("~" if f.approx_only else "")
            out.print(f"  {size:>10}  {f.path}  {mark}")
        for problem in r.problems:
            out.print(f"  [red]problem:[/] {escape(problem)}")
        for note in r.notes:
            out.print(f"  [dim]{escape(note)}[/]")
    free = summary["free_bytes"]
    out.print(f"total {human_size(summary['total_bytes'])}, to download {human_size(summary['to_download_bytes'])}"
              f"{approx} into {summary['cache']}" + (f" ({human_size(free)} free)" if free is not None else ""))
    if free is not None and summary["to_download_bytes"] > free:
        out.print("[red]not enough free disk space[/] for the download: free some, or set HF_HUB_CACHE to another disk")


def _printable_streams() -> None:
    """A file name that is not UTF-8 (imgrag.file_names) reaching stdout or stderr is written with escapes, never
    a UnicodeEncodeError: the places that show a path use its display name; this catches the one that does not."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # a stream that cannot change its error handler keeps its own
                pass


def quiet_library_logs() -> None:
    """transformers' and diffusers' own warnings off unless the user asks for them (their *_VERBOSITY variables):
    the command line owns stderr, and those libraries warn about what imgrag already handles or says in its own
    words (a prompt past the tokenizer's length, with imgrag's one-line notice). Set before either is imported."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user mistakes (usage errors too) print one line and exit 1; Ctrl-C prints what was
    kept and how to go on, and exits 130."""
    _printable_streams()
    quiet_library_logs()
    try:
        command = typer.main.get_command(app)
        code = command.main(args=expand_ray_flag(sys.argv[1:] if argv is None else argv), prog_name="imgrag",
                            standalone_mode=False)
    except click_errors.NoArgsIsHelpError as exc:  # `imgrag` or `imgrag models` alone: the help, as before

        rich_utils.rich_format_error(exc)
        sys.exit(exc.exit_code)
    except click_errors.UsageError as exc:
        # Click's usage errors (an unknown flag, a missing argument, a bad value) are the user's mistake: one
        # line and exit 1 like every other, naming the --help to read.
        where = exc.ctx.command_path if exc.ctx is not None else "imgrag"
        message = " ".join(exc.format_message().split()).rstrip(".")
        err.print(f"[red]error:[/] {escape(message)} (see `{escape(where)} --help`)")
        sys.exit(1)
    except typer.Abort:  # EOF at a prompt
        err.print("[yellow]interrupted[/]")
        sys.exit(130)
    except UserError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")  # escaped: keeps 'imgrag[web]'
        sys.exit(1)
    except OSError as exc:
        # A path that cannot be read or written mid-work (a full disk, a folder removed meanwhile): one line
        # naming it, never a traceback. Checks before the work catch most of these earlier.
        if is_disk_full(exc):
            line = disk_full_line(exc)
        else:
            line = (f"{exc.filename}: " if exc.filename else "") + (exc.strerror or str(exc))
        err.print(f"[red]error:[/] {escape(line)}")
        sys.exit(1)
    except KeyboardInterrupt:
        err.print(interrupted_line())
        _exit_interrupted(argv is None)
    except Exception as exc:
        if not is_disk_full(exc):  # a library's wrapped error of a full disk (SQLite, Chroma): one line too
            raise
        err.print(f"[red]error:[/] {escape(disk_full_line(exc))}")
        sys.exit(1)
    if code == 130:  # Typer turns Ctrl-C into Exit(130), silently: say what was kept and how to go on
        err.print(interrupted_line())
        _exit_interrupted(argv is None)
    code = code if isinstance(code, int) else 0
    if argv is None:  # the process is this command (not a caller's, such as a test's): its shutdown is ours
        _exit_when_done(code)
    sys.exit(code)


def _exit_interrupted(own_process: bool) -> None:
    """Exit 130 after a Ctrl-C, everything worth keeping already written and said. The process's own exit is
    ``os._exit``: a model thread may still be inside torch's C++ thread pool, and the interpreter's normal shutdown
    around it ends in "terminate called without an active exception" (exit 134). A caller's process (a test's)
    gets SystemExit instead."""
    if not own_process:
        sys.exit(130)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def _exit_when_done(code: int) -> None:
    """Exit with ``code`` once the command has finished. A Ctrl-C while the interpreter shuts down (model threads,
    the store's clients closing) would otherwise end the process with 130 and nothing said although everything was
    written: from here on it says so and exits with the command's own code."""
    sys.stdout.flush()

    def finished(signum: int, frame: object) -> None:
        err.print("[yellow]interrupted[/] after the command had finished: everything it wrote is kept")
        sys.stderr.flush()
        os._exit(code)

    signal.signal(signal.SIGINT, finished)
    sys.exit(code)


if __name__ == "__main__":
    main()


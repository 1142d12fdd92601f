"""The ``imgrag`` command line. Each area's commands live in their own module; this file wires them
together and holds the commands about imgrag itself (``doctor``, ``models``).

About 500 lines: ``doctor`` and ``models`` share the checkpoint checks (imgrag.weights.model_files) and the
services' probes, and each command is a few dozen lines; splitting them would scatter that one subject over two
files."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table
from typer import rich_utils

# Importing a command group registers its commands on the app.
import agent.frontends.cli.chat  # noqa: F401
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
    StoreOpt,
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
from imgrag.settings import builtin_presets, check_device
from imgrag.text import first_line
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


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


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


def _probe_llm(settings) -> dict:
    """Ask the OpenAI-compatible server for its models, then for one token with a tool offered.

    The second request is what catches a vLLM started without ``--enable-auto-tool-choice`` or an Ollama
    model without tool support: both answer 400 with a message saying so.
    """
    m = settings.models
    base = m.llm_base_url.rstrip("/")
    if not base:
        return {"ok": False, "problem": "models.llm_base_url is empty (llm_backend = 'openai' needs the server's URL)"}
    headers = {"Authorization": f"Bearer {m.llm_api_key}"}
    status, body = _http("GET", f"{base}/models", headers)
    if status != 200:
        return {"ok": False, "problem": f"{base}/models: {body}"}
    served = [item.get("id") for item in (body.get("data") or []) if isinstance(item, dict)]
    if m.llm not in served:
        names = ", ".join(served) or "none"
        return {"ok": False, "served": served,
                "problem": f"the server does not serve models.llm = {m.llm!r} (it serves: {names})"}
    request = {"model": m.llm, "max_tokens": 1, "tool_choice": "auto",
               "messages": [{"role": "user", "content": "Call the ping tool."}],
               "tools": [{"type": "function", "function": {"name": "ping", "description": "Answers pong.",
                                                           "parameters": {"type": "object", "properties": {}}}}]}
    status, body = _http("POST", f"{base}/chat/completions", headers, request)
    if status != 200:
        return {"ok": False, "served": served, "problem": f"tool calling refused: {body}"}
    return {"ok": True, "served": served, "tool_calling": "accepted"}


def _probe_chroma(url: str) -> dict:
    status, body = _http("GET", f"{url.rstrip('/')}/api/v2/heartbeat", {})
    return {"ok": True} if status == 200 else {"ok": False, "problem": f"{url}: {body}"}


def _http(method: str, url: str, headers: dict, payload: dict | None = None, timeout: float = 10.0) -> tuple:
    """One JSON request: (HTTP status, parsed body) or (None, a one-line reason)."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={**headers, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        try:
            detail = json.loads(text)
            detail = detail.get("error", detail) if isinstance(detail, dict) else detail
            detail = detail.get("message", detail) if isinstance(detail, dict) else detail
        except ValueError:
            detail = text
        return exc.code, f"HTTP {exc.code}: {first_line(str(detail))}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return None, f"unreachable ({reason})"


def _checkpoint_status(result, is_tiny: bool, profile: str | None = None) -> str:
    """One line for a role: where its checkpoint is and whether every file it needs is there."""
    if result.source == "remote":
        return "remote endpoint"
    if result.source == "unset":
        return "not set"
    if result.ok:
        if result.source == "local" and any(f.local for f in result.files):
            return "single-file checkpoint, its configuration here"
        if result.source == "local":
            folder = Path(result.ref.removeprefix("local-dir:")).expanduser()
            return "local directory" if folder.is_dir() else "local file"
        return "in the local hub cache"
    if is_tiny and result.missing and not any(f.local for f in result.files):  # a user's single file: not the kit's
        return "not built yet: `imgrag models build-tiny` (or any --profile tiny command) builds it"
    if result.source == "hub" or result.to_fetch:
        # The same --profile as doctor's: without it the download would fetch the default profile's checkpoint.
        fetch = f"`imgrag models download{f' --profile {profile}' if profile else ''} --role {result.role}`"
        if result.source != "hub":  # a single-file generator whose configuration is not in the cache
            return f"its configuration ({result.repo_id}) is not downloaded: {fetch}"
        if len(result.missing) == len(result.files):
            return f"not downloaded: {fetch}"
        return f"MISSING {len(result.missing)} of {len(result.files)} files: {fetch}"
    if result.missing:
        return f"MISSING {len(result.missing)} of {len(result.files)} files"
    more = f" (and {len(result.problems) - 1} more)" if len(result.problems) > 1 else ""
    return f"PROBLEM: {result.problems[0]}{more}" if result.problems else "PROBLEM"


def _cuda_status() -> str:
    """Whether torch sees CUDA here, and if not the likely reason (a CPU-only torch, or no driver or GPU)."""
    import torch

    if torch.cuda.is_available():
        return f"available: {torch.cuda.device_count()} device(s), CUDA {torch.version.cuda}"
    if not torch.version.cuda:
        return f"absent: torch {torch.__version__} is a CPU-only build"
    return f"absent: torch {torch.__version__} is built for CUDA {torch.version.cuda}, but no GPU or driver is visible"


@app.command()
def doctor(
    profile: ProfileOpt = None, config: ConfigOpt = None, store: StoreOpt = None, as_json: JsonOpt = False,
    repair_with: RepairWithOpt = None,
    show_profile: Annotated[bool, typer.Option("--show-profile", help="Print the built-in preset's TOML file "
                                               "(documented; copy it to start your own) and stop.")] = False,
) -> None:
    """Show the resolved settings, device and memory; check every file each model needs, the disk space still
    needed, the LLM server and the Chroma server when they are set."""
    if show_profile:
        presets = builtin_presets()
        if profile not in presets:
            raise UserError(f"--show-profile prints a built-in preset: --profile {' | '.join(presets)}")
        sys.stdout.write(presets[profile].read_text(encoding="utf-8"))
        return
    import torch

    settings = settings_from_flags(profile, config, store=store, check_device=False, **repair_flags(repair_with))
    device = settings.resolved_device()
    report: dict = {"profile": settings.profile, "preset": profile if profile in builtin_presets() else None,
                    "device": device, "dtype": settings.resolved_dtype(),
                    "torch": torch.__version__, "gpu_memory_budget_gb": settings.gpu_memory_gb or None}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        report["gpu"] = {"name": torch.cuda.get_device_name(), "total_gb": round(total / 2**30, 1),
                         "free_gb": round(free / 2**30, 1)}
    else:
        report["gpu"] = None
    report["device_problem"] = None
    try:  # the whole report is still shown for a GPU preset checked on a machine without that GPU
        check_device(settings.device)
    except ValueError as exc:
        report["device_problem"] = str(exc)
    report["cuda"] = _cuda_status()
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        report["ram_gb"] = round(int(meminfo["MemTotal"].split()[0]) / 2**20, 1)
    except (OSError, KeyError, ValueError):
        report["ram_gb"] = None
    roles = check_roles(settings)
    report["checkpoints"] = {
        r.role: {"ref": r.ref, "status": _checkpoint_status(r, settings.is_tiny, profile), "ok": r.ok,
                 "missing": [f.path for f in r.missing], "to_fetch_bytes": r.fetch_bytes, "files": len(r.files),
                 "problems": r.problems,
                 "notes": r.notes}
        for r in roles
    }
    if settings.models.llm_backend == "openai":
        report["checkpoints"]["llm"]["server"] = _probe_llm(settings)
    cache = hub_cache_dir()
    needed = sum(r.fetch_bytes for r in roles)
    report["disk"] = {"hub_cache": str(cache), "still_needed_bytes": needed, "free_bytes": free_disk_bytes(cache),
                      "sizes_approximate": any(r.approx_only for r in roles if r.source == "hub" and r.missing)}
    store_info: dict = {"location": settings.store}
    if settings.store.startswith(("http://", "https://")):
        store_info["kind"] = "chroma server"
        store_info["server"] = _probe_chroma(settings.store)
    else:
        path = Path(settings.store)
        store_info["kind"] = "embedded chroma"
        store_info["exists"] = path.exists()
        store_info["size_mb"] = round(_dir_size(path) / 2**20, 2) if path.exists() else 0
    report["store"] = store_info
    report["output_dir"] = settings.output_dir
    report["problems"] = _problems(report, settings.is_tiny)
    report["ok"] = not report["problems"]
    if as_json:
        print_json(report)
        _fail_on_problems(report)
        return
    title = f"imgrag doctor — profile {report['preset'] or settings.profile}"
    table = Table(title=title, show_header=False)
    table.add_column()
    table.add_column(overflow="fold")  # paths and hub ids: folded onto more lines, never cut
    table.add_row("device", f"{device} ({report['dtype']}), torch {report['torch']}")
    if report["device_problem"]:
        table.add_row("", f"[red]{escape(report['device_problem'])}[/]")
    table.add_row("cuda", escape(report["cuda"]))
    if report["gpu"]:
        g = report["gpu"]
        table.add_row("gpu", f"{g['name']}: {g['free_gb']} of {g['total_gb']} GiB free")
    table.add_row("ram", f"{report['ram_gb']} GiB")
    table.add_row("gpu budget", f"{settings.gpu_memory_gb} GiB" if settings.gpu_memory_gb else "no limit")
    for r in roles:
        info = report["checkpoints"][r.role]
        colour = "green" if r.ok else "red"
        lines = [info["ref"], f"[{colour}]{info['status']}[/]"]
        if r.missing and len(r.missing) == len(r.files) and r.source == "hub":  # the dry run lists them
            lines.append(f"[red]all {len(r.files)} files missing[/] ({human_size(r.missing_bytes)})")
        elif r.to_fetch and len(r.to_fetch) == len([f for f in r.files if not f.local]):  # a single file's config
            lines.append(f"[red]all {len(r.to_fetch)} configuration files missing[/] ({human_size(r.fetch_bytes)})")
        else:
            lines += [f"[red]missing:[/] {path}" for path in info["missing"][:12]]
            if len(info["missing"]) > 12:
                lines.append(f"[red]... and {len(info['missing']) - 12} more[/]")
        lines += [f"[red]problem:[/] {escape(p)}" for p in r.problems] + [f"[dim]{escape(n)}[/]" for n in r.notes]
        if "server" in info:
            s = info["server"]
            lines.append("[green]server answers; tool calling accepted[/]" if s["ok"]
                         else f"[red]server:[/] {escape(s['problem'])}")
        table.add_row(r.role, "\n".join(lines))
    d = report["disk"]
    if needed:
        free = f", {human_size(d['free_bytes'])} free" if d["free_bytes"] is not None else ""
        approx = " (size approximate)" if d["sizes_approximate"] else ""
        table.add_row("disk", f"{human_size(needed)} still to download{approx} into {cache}{free}")
    extra = f", {store_info['size_mb']} MB" if "size_mb" in store_info else ""
    server = store_info.get("server")
    state = "" if server is None else (", answers" if server["ok"] else f"\n[red]{escape(server['problem'])}[/]")
    table.add_row("store", f"{escape(settings.store)} ({store_info['kind']}{extra}){state}")
    table.add_row("outputs", escape(settings.output_dir))
    out.print(table)
    _fail_on_problems(report)


def _problems(report: dict, is_tiny: bool) -> list[str]:
    """What would stop a run with this profile here, one short line each: the device, a checkpoint (the tiny
    kit builds itself, so its absence is none), the LLM server, the Chroma server."""
    problems = [report["device_problem"]] if report["device_problem"] else []
    for role, info in report["checkpoints"].items():
        if not info["ok"] and not (is_tiny and info["status"].startswith("not built yet")):
            # each finding on its own line (a file an LFS pointer, another truncated), else the status
            findings = info["problems"] + ([info["status"]] if info["missing"] or not info["problems"] else [])
            problems.extend(f"{role}: {p}" for p in findings)
        server = info.get("server")
        if server and not server["ok"]:
            problems.append(f"{role} server: {server['problem']}")
    server = report["store"].get("server")
    if server and not server["ok"]:
        problems.append(f"store server: {server['problem']}")
    return problems


def _fail_on_problems(report: dict) -> None:
    """Doctor exits 1 (after its whole report) when a run with this profile would fail here."""
    problems = report["problems"]
    if problems:
        more = f" (and {len(problems) - 1} more above)" if len(problems) > 1 else ""
        raise UserError(f"{problems[0]}{more}; runs with this profile will fail here")


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
        sys.exit(130)
    except Exception as exc:
        if not is_disk_full(exc):  # a library's wrapped error of a full disk (SQLite, Chroma): one line too
            raise
        err.print(f"[red]error:[/] {escape(disk_full_line(exc))}")
        sys.exit(1)
    if code == 130:  # Typer turns Ctrl-C into Exit(130), silently: say what was kept and how to go on
        err.print(interrupted_line())
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()


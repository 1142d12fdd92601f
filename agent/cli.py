"""The ``imgrag`` command line. Each area's commands live in their own module; this file wires them
together and holds the commands about imgrag itself (``doctor``, ``models``)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from agent import cli_chat, cli_engine, cli_report, cli_run, cli_serve, cli_store  # noqa: F401  (they register commands)
from agent.cli_common import (
    ConfigOpt,
    JsonOpt,
    ProfileOpt,
    StoreOpt,
    app,
    err,
    out,
    print_json,
    settings_from_flags,
)
from imgrag.errors import UserError

models_app = typer.Typer(help="Manage model checkpoints (the offline tiny kit).", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("build-tiny")
def build_tiny(
    directory: Annotated[
        Path | None, typer.Argument(help="Where to write the kit (default: the tiny profile's).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for the random weights.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if a current kit is there.")] = False,
    scale: Annotated[str, typer.Option("--scale", help="tiny (seconds, MBs) or full: the real models' sizes "
                                       "(~32 GB; for GPU benchmarks).")] = "tiny",
    as_json: JsonOpt = False,
) -> None:
    """Build random-weight models of every real architecture, saved in the real on-disk formats.

    Their pictures are noise and their verdicts junk: they exist so that tests and the offline demo
    go through the same loading code as real checkpoints.
    """
    from imgrag.tiny_kit import build_tiny_kit

    if scale not in ("tiny", "full"):
        raise UserError(f"--scale must be tiny or full, got {scale!r}")
    if scale == "full" and directory is None:
        raise UserError("--scale full needs a DIRECTORY (about 32 GB); the tiny profile's kit is left alone")
    target = directory or Path(settings_from_flags("tiny").tiny_kit_dir)
    start = time.perf_counter()
    paths = build_tiny_kit(target, seed=seed, force=force, scale=scale,
                           progress=lambda msg: err.print(f"[dim]built {msg}[/]"))
    seconds = round(time.perf_counter() - start, 2)
    if as_json:
        print_json({"directory": str(target), "models": {k: str(v) for k, v in paths.items()}, "seconds": seconds})
        return
    for role, path in paths.items():
        out.print(f"{role:10} {path}")
    err.print(f"{scale} kit ready in {target} ({seconds} s). Random weights: outputs are noise.")


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _checkpoint_status(ref: str) -> str:
    """Whether a checkpoint (a local directory or a hub id) can be loaded without the network."""
    if ref.startswith("local-dir:"):
        ref = ref[len("local-dir:"):]
    if ref.startswith("hf-hub:"):
        ref = ref[len("hf-hub:"):]
    path = Path(ref).expanduser()
    if path.exists():
        return "local directory"
    if ref.startswith(("/", ".", "~")):
        return "MISSING (no such directory)"
    from imgrag.checkpoints import hub_cached

    if hub_cached(ref):
        return "in the local hub cache"
    return f"not downloaded (`hf download {ref}`, or point the profile at a local copy)"


@app.command()
def doctor(
    profile: ProfileOpt = None, config: ConfigOpt = None, store: StoreOpt = None, as_json: JsonOpt = False
) -> None:
    """Show the resolved settings: device and memory, each checkpoint and whether it is here, the store."""
    import torch

    settings = settings_from_flags(profile, config, store=store)
    device = settings.resolved_device()
    report: dict = {"profile": settings.profile, "device": device, "dtype": settings.resolved_dtype(),
                    "torch": torch.__version__, "gpu_memory_budget_gb": settings.gpu_memory_gb or None}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        report["gpu"] = {"name": torch.cuda.get_device_name(), "total_gb": round(total / 2**30, 1),
                         "free_gb": round(free / 2**30, 1)}
    else:
        report["gpu"] = None
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        report["ram_gb"] = round(int(meminfo["MemTotal"].split()[0]) / 2**20, 1)
    except (OSError, KeyError, ValueError):
        report["ram_gb"] = None
    m = settings.models
    checkpoints = {"generator": m.generator, "ip_adapter": m.ip_adapter, "judge": m.judge,
                   "llm": m.llm if m.llm_backend == "local" else f"{m.llm} @ {m.llm_base_url}", "embedder": m.embedder}
    report["checkpoints"] = {
        role: {"ref": ref, "status": "remote endpoint" if "@" in ref else _checkpoint_status(ref)}
        for role, ref in checkpoints.items()
    }
    if settings.is_tiny:
        for info in report["checkpoints"].values():
            if info["status"].startswith("MISSING"):
                info["status"] = "not built yet: `imgrag models build-tiny` (or any --profile tiny command) builds it"
    store_info: dict = {"location": settings.store}
    if settings.store.startswith(("http://", "https://")):
        store_info["kind"] = "chroma server"
    else:
        path = Path(settings.store)
        store_info["kind"] = "embedded chroma"
        store_info["exists"] = path.exists()
        store_info["size_mb"] = round(_dir_size(path) / 2**20, 2) if path.exists() else 0
    report["store"] = store_info
    report["output_dir"] = settings.output_dir
    if as_json:
        print_json(report)
        return
    table = Table(title=f"imgrag doctor — profile {settings.profile}", show_header=False)
    table.add_row("device", f"{device} ({report['dtype']}), torch {report['torch']}")
    if report["gpu"]:
        g = report["gpu"]
        table.add_row("gpu", f"{g['name']}: {g['free_gb']} of {g['total_gb']} GiB free")
    table.add_row("ram", f"{report['ram_gb']} GiB")
    table.add_row("gpu budget", f"{settings.gpu_memory_gb} GiB" if settings.gpu_memory_gb else "no limit")
    for role, info in report["checkpoints"].items():
        table.add_row(role, f"{info['ref']}\n[dim]{info['status']}[/]")
    extra = f", {store_info['size_mb']} MB" if "size_mb" in store_info else ""
    table.add_row("store", f"{settings.store} ({store_info['kind']}{extra})")
    table.add_row("outputs", settings.output_dir)
    out.print(table)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user mistakes print one line and exit 1; Ctrl-C exits 130."""
    try:
        app(args=argv, prog_name="imgrag")
    except UserError as exc:  # escaped: a message quoting a path or an extra ('imgrag[web]') keeps its brackets
        err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()


"""``imgrag doctor``: whether this machine can run the profile (device, every model file a loader will open, the
services a profile names), and the one command that fetches what is missing."""

from __future__ import annotations

import json
import shlex
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from agent.frontends.cli.common import (
    ConfigOpt,
    JsonOpt,
    ProfileOpt,
    RepairWithOpt,
    StoreOpt,
    app,
    err,
    out,
    print_json,
    repair_flags,
    settings_from_flags,
)
from imgrag.errors import UserError
from imgrag.kits.tiny_configs import MARKER_NAME
from imgrag.kits.tiny_kit import read_kit_marker
from imgrag.settings import builtin_presets, check_device
from imgrag.text import first_line
from imgrag.weight_files import human_size
from imgrag.weights.downloads import free_disk_bytes, hub_cache_dir
from imgrag.weights.model_files import check_roles


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


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


def _download_command(flags: list[str], role: str | None = None) -> str:
    """The ``imgrag models download`` that fetches what doctor found missing, in backticks: doctor's own flags that
    choose the models (``--profile``, ``--config``, ``--repair-with``), so it never fetches another profile's
    checkpoints; one ``--role``, or every role of the profile at once."""
    return "`" + shlex.join(["imgrag", "models", "download", *flags, *(["--role", role] if role else [])]) + "`"


def _model_flags(profile: str | None, config: Path | None, repair_with: str | None) -> list[str]:
    """Doctor's flags that choose the models, to repeat in the commands it names (not --profile default)."""
    flags = ["--profile", profile] if profile and profile != "default" else []
    if config is not None:
        flags += ["--config", str(config)]
    return flags + (["--repair-with", repair_with] if repair_with else [])


def _in_folder(ref: str, folder: Path) -> bool:
    return Path(ref.removeprefix("local-dir:")).expanduser().is_relative_to(folder)


def _tiny_kit_roles(settings, roles: list) -> tuple[dict[str, str], str | None]:
    """The roles whose checkpoint is in the tiny profile's kit, each "built" or "unbuilt", and the one note for the
    unbuilt ones. "unbuilt": not all there because the kit is not built, or is incomplete or from an older imgrag;
    it is then built on first use (ensure_tiny_kit), so that is no problem. A built kit that is broken is a
    problem like any checkpoint. ({}, None) when the profile is not tiny."""
    kit = Path(settings.tiny_kit_dir).expanduser()
    if not settings.is_tiny:
        return {}, None
    built = read_kit_marker(kit) is not None
    states = {r.role: "built" if built or r.ok else "unbuilt"
              for r in roles if r.source == "local" and _in_folder(r.ref, kit)}
    if "unbuilt" not in states.values():
        return states, None
    # build-tiny writes the tiny profile's kit; one set elsewhere by a config file is named
    target = "" if kit == Path(settings_from_flags("tiny").tiny_kit_dir).expanduser() else f" {kit}"
    state = ("is incomplete or from an older imgrag: it is rebuilt" if (kit / MARKER_NAME).exists()
             else "is not built yet: it is built")
    return states, f"the tiny kit {state} on first use, or now with imgrag models build-tiny{target}"


def _checkpoint_status(result, flags: list[str], kit: str | None = None) -> str:
    """One line for a role: where its checkpoint is and whether every file it needs is there. ``flags`` are
    doctor's model flags (:func:`_model_flags`); ``kit`` is "unbuilt" or "built" for a role of the tiny kit."""
    if result.source == "remote":
        return "remote endpoint"
    if result.source == "unset":
        return "not set"
    if kit == "unbuilt":
        return "not built yet (see the note)"
    if result.ok:
        if result.source == "local" and any(f.local for f in result.files):
            return "single-file checkpoint, its configuration here"
        if result.source == "local":
            folder = Path(result.ref.removeprefix("local-dir:")).expanduser()
            return "local directory" if folder.is_dir() else "local file"
        return "in the local hub cache"
    if result.source == "hub" or result.to_fetch:
        # The same --profile as doctor's: without it the download would fetch the default profile's checkpoint.
        fetch = _download_command(flags, result.role)
        if result.source != "hub":  # a single-file generator whose configuration is not in the cache
            return f"its configuration ({result.repo_id}) is not downloaded: {fetch}"
        if len(result.missing) == len(result.files):
            return f"not downloaded: {fetch}"
        return f"MISSING {len(result.missing)} of {len(result.files)} files: {fetch}"
    if result.missing:
        rebuild = ": `imgrag models build-tiny --force` rebuilds the kit" if kit == "built" else ""
        return f"MISSING {len(result.missing)} of {len(result.files)} files{rebuild}"
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
    flags = _model_flags(profile, config, repair_with)
    kit_roles, kit_note = _tiny_kit_roles(settings, roles)
    unbuilt = {role for role, state in kit_roles.items() if state == "unbuilt"}
    report["checkpoints"] = {
        r.role: {"ref": r.ref, "status": _checkpoint_status(r, flags, kit_roles.get(r.role)), "ok": r.ok,
                 "missing": [f.path for f in r.missing], "to_fetch_bytes": r.fetch_bytes, "files": len(r.files),
                 # an unbuilt kit's folders are not there yet: the note says so once, not a problem per role
                 "problems": [] if r.role in unbuilt else r.problems,
                 "notes": r.notes}
        for r in roles
    }
    if settings.models.llm_backend == "openai":
        report["checkpoints"]["llm"]["server"] = _probe_llm(settings)
    cache = hub_cache_dir()
    needed = sum(r.fetch_bytes for r in roles)
    report["disk"] = {"hub_cache": str(cache), "still_needed_bytes": needed, "free_bytes": free_disk_bytes(cache),
                      "sizes_approximate": any(r.approx_only for r in roles if r.source == "hub" and r.missing)}
    report["download"] = _download_plan(roles, flags)
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
    report["problems"] = _problems(report, unbuilt)
    report["notes"] = [kit_note] if kit_note else []
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
        if r.role in unbuilt:  # nothing to list: the note below says it once
            table.add_row(r.role, f"{escape(info['ref'])}\n[yellow]{escape(info['status'])}[/]")
            continue
        colour = "green" if r.ok else "red"
        lines = [info["ref"], f"[{colour}]{escape(info['status'])}[/]"]
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
        plan = report["download"]
        whole = f": `{escape(plan['command'])}` fetches it all" if plan and len(plan["roles"]) > 1 else ""
        table.add_row("disk", f"{human_size(needed)} still to download{approx} into {cache}{free}{whole}")
    extra = f", {store_info['size_mb']} MB" if "size_mb" in store_info else ""
    server = store_info.get("server")
    state = "" if server is None else (", answers" if server["ok"] else f"\n[red]{escape(server['problem'])}[/]")
    table.add_row("store", f"{escape(settings.store)} ({store_info['kind']}{extra}){state}")
    table.add_row("outputs", escape(settings.output_dir))
    out.print(table)
    for note in report["notes"]:
        err.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    _fail_on_problems(report)


def _download_plan(roles: list, flags: list[str]) -> dict | None:
    """What ``imgrag models download`` (the whole profile at once) would fetch for the roles doctor found not
    downloaded: the command, those roles, their size; None when nothing is to fetch."""
    missing = [r for r in roles if r.to_fetch]
    if not missing:
        return None
    return {"command": _download_command(flags).strip("`"), "roles": [r.role for r in missing],
            "bytes": sum(r.fetch_bytes for r in missing),
            "sizes_approximate": any(r.approx_only for r in missing),
            "sizes_unknown": any(not r.recorded for r in missing)}


def _plan_size(plan: dict) -> str:
    """The download's size as doctor knows it offline: exact, approximate, or partly unknown."""
    if plan["sizes_unknown"]:
        return (f"{human_size(plan['bytes'])} and more: some sizes are unknown offline" if plan["bytes"]
                else "size unknown offline")
    return human_size(plan["bytes"]) + (", size approximate" if plan["sizes_approximate"] else "")


def _problems(report: dict, unbuilt: set[str]) -> list[str]:
    """What would stop a run with this profile here, one short line each: the device, a checkpoint (the tiny
    kit builds itself, so the roles of an unbuilt kit are none), the LLM server, the Chroma server."""
    problems = [report["device_problem"]] if report["device_problem"] else []
    for role, info in report["checkpoints"].items():
        if not info["ok"] and role not in unbuilt:
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
    """Doctor exits 1 (after its whole report) when a run with this profile would fail here, with one line: the
    first problem; when several roles are not downloaded, the one command that fetches the whole profile and its
    size instead of their role-by-role lines (which stay in the report above)."""
    problems = report["problems"]
    if not problems:
        return
    plan = report.get("download")
    if not plan or len(plan["roles"]) < 2:
        more = f" (and {len(problems) - 1} more above)" if len(problems) > 1 else ""
        raise UserError(f"{problems[0]}{more}; runs with this profile will fail here")
    status_lines = {f"{role}: {report['checkpoints'][role]['status']}" for role in plan["roles"]}
    rest = [p for p in problems if p not in status_lines]
    whole = (f"{len(plan['roles'])} models are not downloaded ({', '.join(plan['roles'])}): `{plan['command']}` "
             f"fetches the whole profile at once ({_plan_size(plan)})")
    if rest:
        more = f" (and {len(rest) - 1} more above)" if len(rest) > 1 else ""
        whole = f"{rest[0]}{more}; {whole}"
    raise UserError(f"{whole}; runs with this profile will fail here")

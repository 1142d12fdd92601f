"""What every command shares: the Typer app, the consoles, settings from flags, and JSON output.

Contract (DESIGN.md): with ``--json`` a command prints exactly one JSON document on stdout and
nothing else there; progress and logs go to stderr. A user mistake prints one line and exits 1.
"""

from __future__ import annotations

import json
import sys
from contextvars import ContextVar
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

# Typer 0.29 carries its own copy of Click: its usage errors are that copy's classes (the entry point reformats them).
from typer._click import exceptions as click_exceptions  # noqa: F401  (agent/frontends/cli/app.py imports it from here)

from imgrag.drawing.draw_options import DrawOptions, check_guidance
from imgrag.drawing.loras import parse_lora_arg
from imgrag.drawing.schedulers import check_scheduler
from imgrag.errors import UserError, check_text
from imgrag.file_names import with_name_bytes
from imgrag.kits.tiny_kit import ensure_tiny_kit
from imgrag.presets import builtin_presets
from imgrag.settings import TINY_WARNING, Settings, SettingsError, load_settings


def _flag_aware_type(display_type_rich: Any) -> Any:
    """Typer 0.29's rich help gives every option a type column, so a flag (--json, --help) reads ``<bool>`` as if
    it took a value. A flag takes none: its column stays empty, as in Click's plain help."""

    def display(self: Any, ctx: Any) -> str | None:
        return None if self.is_flag or self.count else display_type_rich(self, ctx)

    return display


if not getattr(typer.core.TyperOption.display_type_rich, "_imgrag_flags", False):
    typer.core.TyperOption.display_type_rich = _flag_aware_type(typer.core.TyperOption.display_type_rich)
    typer.core.TyperOption.display_type_rich._imgrag_flags = True  # type: ignore[attr-defined]

app = typer.Typer(
    name="imgrag",
    help=(
        "Retrieval-augmented image generation on local models: SDXL draws, Qwen2.5-VL judges what is "
        "missing, your own image collection (CLIP + Chroma) supplies references, IP-Adapter redraws."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="markdown",
)

def _version(value: bool) -> None:
    """``imgrag --version``: the installed package's version (from its metadata), then exit."""
    if value:
        try:
            sys.stdout.write(f"imgrag {package_version('imgrag')}\n")
        except PackageNotFoundError:  # run from a checkout that was never installed
            sys.stdout.write("imgrag (not installed: run `pip install -e .`)\n")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print imgrag's version and exit.")] = False,
) -> None:
    """Retrieval-augmented image generation on local models."""


# stdout is reserved for results (and for the single JSON document with --json). soft_wrap: a message is one
# line that the terminal wraps, never cut into lines at Rich's guess of the width (80 columns off a terminal).
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ProfileOpt = Annotated[
    str | None,
    typer.Option("--profile", "-p", help="default (real checkpoints), tiny (offline kit), a preset "
                 f"({', '.join(builtin_presets())}; imgrag/profiles/) or a .toml file.",
                 envvar="IMGRAG_PROFILE", show_envvar=False),
]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="A TOML file layered over the profile.")]
StoreOpt = Annotated[
    str | None, typer.Option("--store", help="Store directory, or http://host:port for a Chroma server.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else.")]
FastOpt = Annotated[str | None, typer.Option(
    "--fast", help="Few-step drawing for drafts: off, lcm-lora or distilled (default: generation.fast).")]

RepairWithOpt = Annotated[str | None, typer.Option(
    "--repair-with", metavar="ip-adapter|omnigen",
    help="What draws a repair: ip-adapter (SDXL + IP-Adapter, the references blended) or omnigen (each missing "
         "concept's references placed in OmniGen's prompt; ImageRAG-O). Default: generation.repair_with.")]


def text_check(what: str) -> Any:
    """A Typer callback for a free-text argument or option (one string or a repeated option's list): each value
    goes through :func:`imgrag.errors.check_text` as ``what``, so text in another encoding is one line before any
    model loads. Paths are never checked so: a file name that is not UTF-8 names a real file."""

    def check(value: Any) -> Any:  # one parameter: Typer hands the value to it
        for text in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(text, str):
                check_text(text, what)
        return value

    return check


NegativeOpt = Annotated[str | None, typer.Option(
    "--negative", metavar="TEXT", callback=text_check("--negative"),
    help="What the drawing should leave out (a negative prompt: \"blurry, text, watermark\"); the judge never sees it. "
         "Default: generation.negative_prompt.")]
GuidanceOpt = Annotated[float | None, typer.Option(
    "--guidance", metavar="FLOAT",
    help="Classifier-free guidance scale, 0..30: how closely SDXL follows the prompt (default: generation.guidance, "
         "or the --fast method's; 1 or less switches guidance and the negative prompt off).")]
SchedulerOpt = Annotated[str | None, typer.Option(
    "--scheduler", metavar="NAME",
    help="The sampler, by its A1111 name: \"Euler a\", \"DPM++ 2M Karras\", UniPC, DDIM, ... (imgrag generate --help "
         "and README list them all); default: generation.scheduler, else the checkpoint's own.")]
PerRoundOpt = Annotated[int | None, typer.Option(
    "--per-round", metavar="N",
    help="Drawings per round, 1..8: N seeds drawn in one batched call, each judged; the run goes on from the best "
         "(default: generation.per_round, 1).")]


LoraOpt = Annotated[list[str] | None, typer.Option(
    "--lora", metavar="PATH[:WEIGHT]",
    help="A LoRA to draw with (an SDXL LoRA's .safetensors file, kohya or diffusers layout); repeat for several. "
         "WEIGHT (-4..4, default 1; 0 switches it off) is its strength. Added to the settings' [[models.loras]]; "
         "naming one of those (its file or name) sets its weight instead; --lora none drops them.")]


def lora_args(texts: list[str] | None, where: str = "--lora") -> list[tuple[str, float | None]]:
    """Each ``--lora PATH[:WEIGHT]`` read (:func:`imgrag.drawing.loras.parse_lora_arg`); a bad weight is one line."""
    return [parse_lora_arg(text, where) for text in texts or []]


def drawing_flags(negative: str | None = None, scheduler: str | None = None,
                  per_round: int | None = None) -> dict[str, Any]:
    """The settings overrides of ``--negative``, ``--scheduler`` and ``--per-round`` (None: not given); the settings
    check them; a scheduler name outside the list is one line listing the choices."""
    if scheduler is not None:
        check_scheduler(scheduler, "--scheduler")  # named as the flag, not as the setting it sets
    return {"generation.negative_prompt": negative, "generation.scheduler": scheduler,
            "generation.per_round": per_round}


def drawing_options(settings: Settings, guidance: float | None = None, loras: list[str] | None = None) -> Any:
    """A run's :class:`imgrag.drawing.draw_options.DrawOptions`: the settings' (flags included) plus ``--guidance`` and
    the ``--lora`` flags over ``[[models.loras]]``. Every LoRA file is checked here, before any model loads."""
    options = DrawOptions.from_settings(settings).changed(guidance=check_guidance(guidance, "--guidance"))
    return options.with_loras(lora_args(loras))


def repair_flags(repair_with: str | None) -> dict[str, Any]:
    """The settings override of ``--repair-with`` (None: not given); the settings check the choice."""
    return {"generation.repair_with": repair_with.strip().lower() if repair_with else None}


def settings_from_flags(
    profile: str | None, config: Path | None = None, *, check_device: bool = True, **overrides: Any
) -> Settings:
    """Resolve settings with the command's flags as the top layer (None means 'not given').

    ``check_device=False`` is for commands that run no model here (``models download``)."""
    try:
        return load_settings(profile=profile, config=config, overrides=_nest(overrides), check_device=check_device)
    except SettingsError as exc:
        raise UserError(_name_the_flag(str(exc), overrides)) from None


# The flags that set a setting: an error in the command line's layer names the flag the user typed, not only the
# setting behind it.
FLAG_OF = {"generation.width": "--size", "generation.height": "--size", "generation.steps": "--steps",
           "omnigen.steps": "--steps", "generation.seed": "--seed", "generation.ip_scale": "--ip-scale",
           "generation.fast": "--fast", "generation.negative_prompt": "--negative",
           "generation.scheduler": "--scheduler", "generation.per_round": "--per-round",
           "generation.repair_with": "--repair-with", "budget.max_rounds": "--max-rounds", "store": "--store",
           "output_dir": "--out"}
_FIELD_WORDS = {"generation.width": "width", "generation.height": "height", "generation.steps": "steps",
                "omnigen.steps": "steps"}


def _name_the_flag(message: str, overrides: dict[str, Any]) -> str:
    """``message`` (a settings error) with its "command line:" source named by the flag(s) whose setting it is
    about, e.g. ``--size: generation: width 16384 is above generation.max_side …``."""
    source = "command line: "
    if not message.startswith(source):
        return message
    body = message[len(source):]
    flags = {FLAG_OF[key] for key, value in overrides.items() if value is not None and key in FLAG_OF
             and (key in body or f" {_FIELD_WORDS.get(key, key)} " in f" {body} ")}
    return f"{' / '.join(sorted(flags))}: {body}" if flags else message


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"generation.steps": 4}`` -> ``{"generation": {"steps": 4}}``."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        target = nested
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    return nested


def prepare_models(settings: Settings) -> None:
    """Make sure the profile's models exist; the tiny profile builds its kit on first use."""
    if settings.is_tiny:
        err.print(f"[yellow]{TINY_WARNING}[/]")
        ensure_tiny_kit(Path(settings.tiny_kit_dir), progress=lambda msg: err.print(f"[dim]tiny kit: {msg}[/]"))


# What Ctrl-C keeps at this point of the command and how to go on: set by each command as it starts work, read
# by the entry point (agent/frontends/cli/app.py) when the command stops on Ctrl-C. Run and batch print their own
# resume line.
_INTERRUPT_NOTE: ContextVar[str] = ContextVar(
    "imgrag_interrupt_note", default="nothing was written yet; run the same command again")


def on_interrupt(note: str) -> None:
    """Say what a Ctrl-C from here on keeps and how to go on (one clause, e.g. "the pictures indexed so far are
    kept; run the same imgrag index again to add the rest")."""
    _INTERRUPT_NOTE.set(note)


def interrupted_line() -> str:
    """The one line printed on Ctrl-C (rich markup): ``interrupted: <what was kept and how to go on>``."""
    return f"[yellow]interrupted:[/] {escape(_INTERRUPT_NOTE.get())}"


def print_json(document: Any) -> None:
    """The one JSON document of a ``--json`` command.

    A file name that is not UTF-8 (imgrag.file_names) is a ``str`` with lone surrogates: JSON keeps it as
    ``\\udcNN`` escapes, which Python reads back whole but most readers (jq, JavaScript) turn into U+FFFD. So
    beside every such value ``KEY`` the object also gets ``KEY_bytes`` (:func:`imgrag.file_names.with_name_bytes`),
    as in result.json."""
    sys.stdout.write(json.dumps(with_name_bytes(document), indent=2, default=str) + "\n")
    sys.stdout.flush()


class TerminalBar:
    """A transient rich progress bar on stderr, shown only when stderr is a terminal.

    Call it with (done, total); ``close()`` removes it. On a pipe it draws nothing: the caller decides
    what, if anything, a log should get instead.
    """

    def __init__(self, label: str, *extra_columns: Any) -> None:
        self.label = label
        self.extra_columns = extra_columns
        self.bar: Any = None
        self.task: Any = None

    def __call__(self, done: int, total: int) -> None:
        if not err.is_terminal:
            return
        if self.bar is None:
            self.bar = Progress(TextColumn(self.label), BarColumn(), MofNCompleteColumn(), *self.extra_columns,
                                TimeElapsedColumn(), console=err, transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=total)
        self.bar.update(self.task, completed=done, total=total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

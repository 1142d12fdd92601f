"""``imgrag generate`` and ``imgrag critique``: one model each, straight from the command line.

Both check every input (prompt, size, reference files, image) before loading any model, so a typo
costs nothing; models come from the engine's model manager like everywhere else. Results go to
stdout (one JSON document with ``--json``), the denoising bar and messages to stderr.
"""

from __future__ import annotations

import re
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer

from agent.cli_common import (
    TINY_WARNING,
    ConfigOpt,
    FastOpt,
    JsonOpt,
    ProfileOpt,
    TerminalBar,
    app,
    err,
    out,
    prepare_models,
    print_json,
    settings_from_flags,
)
from imgrag.errors import UserError, check_seed
from imgrag.images import open_image
from imgrag.runs import atomic_path, ensure_writable_file

# Formats Pillow writes from the file name alone.
OUTPUT_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def parse_size(text: str | None) -> tuple[int | None, int | None]:
    """``"1024x768"`` -> (1024, 768); None -> the profile's size. Multiples of 8 are checked by the generator."""
    if text is None:
        return None, None
    m = re.fullmatch(r"\s*(\d+)\s*[xX\u00d7]\s*(\d+)\s*", text)
    if m is None:
        raise UserError(f"--size must look like WIDTHxHEIGHT (e.g. 1024x1024), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _save_atomically(image: Any, path: Path) -> None:
    """Write next to the target and rename, so a crash never leaves half a picture under the name."""
    with atomic_path(path) as tmp:
        image.save(tmp)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the picture (.png, .jpg, .webp).")],
    ref: Annotated[list[Path] | None, typer.Option(
        "--ref", metavar="PATH",
        help="A reference image to guide the drawing through IP-Adapter; repeat for several.")] = None,
    ip_scale: Annotated[float | None, typer.Option(
        "--ip-scale", help="How strongly the references steer, 0..1 (default: generation.ip_scale).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Same seed, same picture (default: generation.seed).")]
    = None,
    steps: Annotated[int | None, typer.Option(
        "--steps", help="Denoising steps (default: generation.steps, or the --fast method's).")] = None,
    size: Annotated[str | None, typer.Option("--size", help="WIDTHxHEIGHT, multiples of 8 (default: the profile's).")]
    = None,
    fast: FastOpt = None,
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Draw one picture with SDXL; with --ref, guided by reference images (IP-Adapter)."""
    from imgrag.fast import draw_plan
    from imgrag.generator import validate_request

    width, height = parse_size(size)
    if seed is not None:
        check_seed(seed, "--seed")
    settings = settings_from_flags(profile, config, **{
        "generation.seed": seed, "generation.steps": steps, "generation.ip_scale": ip_scale,
        "generation.width": width, "generation.height": height, "generation.fast": fast})
    g = settings.generation
    plan = draw_plan(g)  # a fast method brings its own steps and guidance; --steps still wins
    n_steps = plan.steps if steps is None else steps
    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UserError(f"{output}: the output must end in one of {', '.join(sorted(OUTPUT_SUFFIXES))}")
    ensure_writable_file(output, "output")  # before any model loads, not after the drawing
    references = [open_image(path) for path in ref or []]
    validate_request(prompt, g.width, g.height, n_steps, g.ip_scale, references)

    prepare_models(settings)
    from imgrag.engine import build_manager

    manager = build_manager(settings)
    start = time.perf_counter()
    bar = TerminalBar("drawing")  # on a pipe, nothing per step: logs stay short
    try:
        image = manager.run("generator", lambda generator: generator.generate(
            prompt, seed=g.seed, references=references or None, ip_scale=g.ip_scale, width=g.width,
            height=g.height, steps=n_steps, guidance=plan.guidance, on_step=bar, fast=plan.mode))
    finally:
        bar.close()
    _save_atomically(image, output)
    seconds = round(time.perf_counter() - start, 3)
    result: dict[str, Any] = {
        "output": str(output), "prompt": prompt, "seed": g.seed, "steps": n_steps, "width": g.width,
        "height": g.height, "guidance": plan.guidance, "fast": plan.mode, "references": [str(p) for p in ref or []],
        "ip_scale": g.ip_scale if references else None, "seconds": seconds, "model_loads": manager.load_counts(),
        "profile": settings.profile,
    }
    if settings.is_tiny:
        result["warning"] = TINY_WARNING
    if as_json:
        print_json(result)
        return
    guided = f", guided by {len(references)} reference(s) at scale {g.ip_scale:g}" if references else ""
    fast_note = f", {plan.mode}" if plan.mode != "off" else ""
    out.print(f"wrote {output} ({g.width}x{g.height}, {n_steps} steps{fast_note}, seed {g.seed}{guided}) "
              f"in {seconds} s", markup=False)


@app.command()
def critique(
    image: Annotated[Path, typer.Argument(help="The picture to judge.")],
    prompt: Annotated[str, typer.Argument(help="The prompt it was drawn for.")],
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask the vision judge whether IMAGE shows everything PROMPT asks for, and what is missing."""
    if not prompt.strip():
        raise UserError("the prompt is empty: say what the picture should show")
    settings = settings_from_flags(profile, config)
    picture = open_image(image)

    prepare_models(settings)
    from imgrag.engine import build_manager

    manager = build_manager(settings)
    with err.status("judging …", spinner="dots") if err.is_terminal else nullcontext():
        verdict = manager.run("judge", lambda judge: judge.judge(picture, prompt))
    if as_json:
        document: dict[str, Any] = {"match": verdict.match, "missing": verdict.missing, "reason": verdict.reason,
                                    "parsed": verdict.parsed, "raw": verdict.raw}
        if settings.is_tiny:
            document["warning"] = TINY_WARNING
        print_json(document)
        return
    if not verdict.parsed:
        out.print("verdict: unknown — the judge's answer could not be parsed")
        out.print(f"raw answer: {verdict.raw!r}", soft_wrap=True, markup=False)
    else:
        out.print(f"verdict: {'MATCH' if verdict.match else 'NO MATCH'}")
        missing = ", ".join(verdict.missing) if verdict.missing else "(nothing)"
        out.print(f"missing: {missing}", soft_wrap=True, markup=False)
        if verdict.reason:
            out.print(f"reason:  {verdict.reason}", soft_wrap=True, markup=False)



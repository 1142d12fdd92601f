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
from rich.markup import escape

from agent.frontends.cli.common import (
    ConfigOpt,
    FastOpt,
    GuidanceOpt,
    JsonOpt,
    LoraOpt,
    NegativeOpt,
    ProfileOpt,
    RepairWithOpt,
    SchedulerOpt,
    TerminalBar,
    app,
    drawing_flags,
    err,
    lora_args,
    out,
    prepare_models,
    print_json,
    repair_flags,
    settings_from_flags,
    text_check,
)
from agent.frontends.cli.from_image import (
    from_provenance,
    recipe_backbone,
    recipe_concepts,
    recipe_drawing,
    recipe_generator,
    recipe_loras,
    screen_recipe_references,
)
from imgrag.drawing.concept_refs import ConceptReferences, concept_prompt, merge_concepts
from imgrag.drawing.draw_options import check_guidance
from imgrag.drawing.loras import check_loras, merge_loras, settings_loras
from imgrag.drawing.schedulers import check_with_fast
from imgrag.drawing.steering import ReferenceSteer, parse_ref_arg
from imgrag.errors import UserError, check_seed
from imgrag.images import open_image
from imgrag.management.engine import build_manager
from imgrag.models.draw_checks import validate_request
from imgrag.models.embedder import prompt_length_notice
from imgrag.models.fast import draw_plan
from imgrag.models.omnigen import validate_omnigen_request
from imgrag.records.provenance import (
    check_picture_suffix,
    file_sha256,
    for_drawing,
    for_omnigen_drawing,
    recipe_profile,
    save_image,
)
from imgrag.records.runs import ensure_writable_file
from imgrag.settings import TINY_WARNING

# Formats Pillow writes from the file name alone.


def parse_size(text: str | None) -> tuple[int | None, int | None]:
    """``"1024x768"`` -> (1024, 768); None -> the profile's size. Multiples of 8 are checked by the generator."""
    if text is None:
        return None, None
    m = re.fullmatch(r"\s*(\d+)\s*[xX\u00d7]\s*(\d+)\s*", text)
    if m is None:
        raise UserError(f"--size must look like WIDTHxHEIGHT (e.g. 1024x1024), got {text!r}")
    return int(m.group(1)), int(m.group(2))


@app.command()
def generate(
    prompt: Annotated[str | None, typer.Argument(help="What to draw (omit with --from-image).",
                                                 callback=text_check("the PROMPT"))] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Where to write the picture (.png, .jpg, .webp).")] = None,
    from_image: Annotated[Path | None, typer.Option(
        "--from-image", metavar="PICTURE",
        help="Redraw from the provenance a picture imgrag wrote carries (prompt, seed, steps, size, references); "
             "flags given beside it override those values.")] = None,
    ref: Annotated[list[str] | None, typer.Option(
        "--ref", metavar="PATH[:WEIGHT][:MODE]",
        help="A reference image to guide the drawing through IP-Adapter; repeat for several. WEIGHT (0..2, default "
             "1) multiplies --ip-scale for this one; MODE is both (default), style (its look only) or content (its "
             "subject and layout only): photo.jpg:0.6:style.")] = None,
    ip_scale: Annotated[float | None, typer.Option(
        "--ip-scale", help="How strongly the references steer, 0..1 (default: generation.ip_scale).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Same seed, same picture (default: generation.seed).")]
    = None,
    steps: Annotated[int | None, typer.Option(
        "--steps", help="Denoising steps (default: generation.steps, or the --fast method's).")] = None,
    size: Annotated[str | None, typer.Option("--size", help="WIDTHxHEIGHT, multiples of 8 (default: the profile's).")]
    = None,
    negative: NegativeOpt = None,
    guidance: GuidanceOpt = None,
    scheduler: SchedulerOpt = None,
    lora: LoraOpt = None,
    fast: FastOpt = None,
    repair_with: RepairWithOpt = None,
    concept: Annotated[list[str] | None, typer.Option(
        "--concept", metavar="TEXT", callback=text_check("--concept"),
        help="With --repair-with omnigen: the concept the matching --ref shows (first --concept for the first "
             "--ref; repeat once per --ref). Without it every reference stands for the whole prompt.")] = None,
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Draw one picture with SDXL; with --ref, guided by reference images (IP-Adapter, or OmniGen in context).

    With --repair-with omnigen the references go into OmniGen's prompt, each beside the concept it shows
    (--concept), ImageRAG-O's way; per-reference weights and modes are IP-Adapter's and do not apply there.

    --scheduler takes these names (A1111's, mapped to diffusers' schedulers as diffusers' docs map them):
    "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE", "DPM++ 2M SDE Karras", "DPM++ SDE", "DPM++ SDE Karras", DPM2,
    "DPM2 Karras", "DPM2 a", "DPM2 a Karras", Euler, "Euler a", Heun, LMS, "LMS Karras", DDIM, PLMS, UniPC, DEIS;
    default keeps the checkpoint's own.
    """
    if output is None:
        raise UserError("give the output picture: -o OUT.png")
    width, height = parse_size(size)
    guidance_flag = check_guidance(guidance, "--guidance")
    lora_given = lora_args(lora)
    negative_flag, scheduler_flag = negative, scheduler  # as given, before a recipe fills them
    model_flags: dict[str, str] = {}
    if from_image is not None and profile is None:  # the recipe's profile: its models drew the picture
        profile = recipe_profile(from_image)
        if profile is not None:
            err.print(f"[dim]profile {escape(profile)}, from the picture's recipe (--profile chooses another)[/]")
    refs = None if ref is None else [parse_ref_arg(text) for text in ref]  # [(path, ReferenceSteer)]
    given_refs = refs
    if from_image is not None:  # the picture's own provenance fills every value no flag gives
        # The bounds a recipe is held to are the settings this drawing will use (profile, --config).
        bounds = settings_from_flags(profile, config, **repair_flags(repair_with))
        prompt, refs, seed, steps, guidance, fast, ip_scale, width, height = from_provenance(
            from_image, prompt, refs, seed, steps, fast, ip_scale, width, height, settings=bounds,
            guidance=guidance_flag)
        recipe_negative, recipe_scheduler = recipe_drawing(from_image)
        if config is None:  # drawn by a single-file checkpoint: redrawn by the same file (a --config chooses)
            model_flags = recipe_generator(from_image)
        negative = recipe_negative if negative is None else negative
        scheduler = recipe_scheduler if scheduler is None else scheduler
        if repair_with is None and recipe_backbone(from_image) == "omnigen":  # drawn by OmniGen: redrawn by it
            repair_with = "omnigen"
            if concept is None and given_refs is None:
                concept = recipe_concepts(from_image)
    if prompt is None:
        raise UserError("say what to draw: imgrag generate PROMPT -o OUT.png (or --from-image PICTURE)")
    if seed is not None:
        check_seed(seed, "--seed")
    omnigen_asked = (repair_with or "").strip().lower() == "omnigen"
    settings = settings_from_flags(profile, config, **{
        "generation.seed": seed, "generation.steps": None if omnigen_asked and refs else steps,
        "generation.ip_scale": ip_scale, "generation.width": width, "generation.height": height,
        "generation.fast": fast, "omnigen.steps": steps if omnigen_asked and refs else None,
        **repair_flags(repair_with), **drawing_flags(negative, scheduler), **model_flags})
    g = settings.generation
    # The LoRAs: the recipe's with --from-image (what drew the picture), else [[models.loras]]; --lora adds to them.
    base_loras = (recipe_loras(from_image) if from_image is not None
                  else check_loras(settings_loras(settings), "[[models.loras]]: LoRA"))
    loras = merge_loras(base_loras, lora_given, "--lora")
    if from_image is not None and given_refs is None and refs and settings.safety.enabled:
        screen_recipe_references(settings, from_image, [path for path, _ in refs])
    if refs and g.repair_with == "omnigen" or not refs and g.draw_with == "omnigen":
        _generate_omnigen(settings, prompt, refs or [], concept, output=output, from_image=from_image,
                          flags_without_effect={"--ip-scale": ip_scale, "--fast": fast, "--negative": negative_flag,
                                                "--guidance": guidance_flag, "--scheduler": scheduler_flag,
                                                "--lora": lora},
                          as_json=as_json)
        return
    if concept:
        raise UserError("--concept says what a --ref shows in OmniGen's prompt: it needs --ref PATH and "
                        "--repair-with omnigen" if refs else "--concept says what a --ref shows: give one --ref per "
                        "--concept (and --repair-with omnigen)")
    if repair_with is not None and not refs:  # a flag that would change nothing is said, not ignored
        err.print("[yellow]warning:[/] --repair-with picks what draws a guided drawing; without --ref the picture is "
                  f"drawn from the prompt alone ({'OmniGen' if g.draw_with == 'omnigen' else 'SDXL'})")
    plan = draw_plan(g)  # a fast method brings its own steps and guidance; --steps and --guidance still win
    check_with_fast(g.scheduler, plan.mode)
    n_steps = plan.steps if steps is None else steps
    guidance = guidance_flag if guidance_flag is not None else plan.guidance if guidance is None else guidance
    check_picture_suffix(output)
    ensure_writable_file(output, "output")  # before any model loads, not after the drawing
    references = [open_image(path) for path, _ in refs or []]
    validate_request(prompt, g.width, g.height, n_steps, g.ip_scale, references, generation=g)
    if ip_scale is not None and not references:  # a flag that would change nothing is said, not ignored
        err.print("[yellow]warning:[/] --ip-scale does nothing without --ref (it sets how strongly references "
                  "steer); drawing from the prompt alone")
    if g.negative_prompt and guidance <= 1:
        err.print(f"[yellow]warning:[/] the negative prompt does nothing at guidance {guidance:g} (it steers the "
                  "unconditional branch of classifier-free guidance, which is off at 1 or less)")
    too_long = prompt_length_notice(prompt)
    if too_long:
        err.print(f"[yellow]note:[/] {escape(too_long)}")
    steering = {"weights": [s.weight for _, s in refs], "modes": [s.mode for _, s in refs],
                "reference_keys": [file_sha256(path) for path, _ in refs]} if refs else {}
    entries = [{"path": path, "weight": s.weight, "mode": s.mode} for path, s in refs or []]

    prepare_models(settings)
    manager = build_manager(settings)
    start = time.perf_counter()
    bar = TerminalBar("drawing")  # on a pipe, nothing per step: logs stay short
    encoder: dict[str, int] = {}
    drew: dict[str, str] = {}

    def draw(generator: Any) -> Any:
        calls = generator.encoder_calls
        picture = generator.generate(
            prompt, seed=g.seed, references=references or None, ip_scale=g.ip_scale, width=g.width,
            height=g.height, steps=n_steps, guidance=guidance, on_step=bar, fast=plan.mode,
            negative_prompt=g.negative_prompt, scheduler=g.scheduler, loras=loras, **steering)
        drew["sampler"] = generator.last_scheduler
        if references:  # a reference whose embedding is cached runs no image encoder (imgrag.models.embed_cache)
            encoder.update(calls=generator.encoder_calls - calls, cached=generator.last_guidance.get("cached", 0))
        return picture

    try:
        image = manager.run("generator", draw)
    finally:
        bar.close()
    save_image(image, output, for_drawing(  # provenance in the picture, in the same atomic write
        settings, prompt=prompt, seed=g.seed, references=entries, ip_scale=g.ip_scale,
        steps=n_steps, guidance=guidance, fast=plan.mode, negative_prompt=g.negative_prompt, scheduler=g.scheduler,
        sampler=drew.get("sampler"), loras=loras))
    seconds = round(time.perf_counter() - start, 3)
    result: dict[str, Any] = {
        "output": str(output), "prompt": prompt, "negative_prompt": g.negative_prompt, "seed": g.seed,
        "steps": n_steps, "width": g.width, "height": g.height, "guidance": guidance, "fast": plan.mode,
        "scheduler": g.scheduler, "sampler": drew.get("sampler"),
        "references": [str(e["path"]) for e in entries],
        "reference_steering": [{"weight": e["weight"], "mode": e["mode"]} for e in entries],
        "loras": [{"path": c.path, "weight": c.weight, "name": c.label} for c in loras],
        "ip_scale": g.ip_scale if references else None, "image_encoder": encoder or None, "seconds": seconds,
        "model_loads": manager.load_counts(),
        "profile": settings.profile, "from_image": str(from_image) if from_image else None,
    }
    if settings.is_tiny:
        result["warning"] = TINY_WARNING
    if as_json:
        print_json(result)
        return
    guided = f", guided by {len(references)} reference(s) at scale {g.ip_scale:g}" if references else ""
    fast_note = f", {plan.mode}" if plan.mode != "off" else ""
    lora_note = (", LoRA " + ", ".join(f"{c.label}:{c.weight:g}" for c in loras)) if loras else ""
    out.print(f"wrote {output} ({g.width}x{g.height}, {n_steps} steps{fast_note}, {drew.get('sampler')}, CFG "
              f"{guidance:g}, seed {g.seed}{guided}{lora_note}) in {seconds} s", markup=False)


def _generate_omnigen(settings: Any, prompt: str, refs: list[tuple[Path, ReferenceSteer]],
                      concepts: list[str] | None, *, output: Path, from_image: Path | None,
                      flags_without_effect: dict[str, Any], as_json: bool) -> None:
    """``imgrag generate`` on OmniGen: ``refs`` placed in the prompt beside the concept each shows (``concepts``,
    one per reference, or the whole prompt for all), at most ``omnigen.max_references`` of them
    (:func:`imgrag.drawing.concept_refs.concept_prompt`). Raises UserError for a weight or mode other than the default
    (IP-Adapter's, not OmniGen's) and a --concept count that does not match the --ref count."""
    steered = [str(path) for path, s in refs if (s.weight, s.mode) != (1.0, "both")]
    if steered:
        raise UserError(f"--ref {steered[0]}: OmniGen has no per-reference weight or mode (IP-Adapter's); drop "
                        ":WEIGHT/:MODE, or draw with --repair-with ip-adapter")
    if not refs and settings.generation.draw_with == "omnigen" and concepts:
        raise UserError("--concept says what a --ref shows: give one --ref per --concept")
    if concepts and len(concepts) != len(refs):
        raise UserError(f"give one --concept per --ref: {len(concepts)} --concept for {len(refs)} --ref")
    for flag, value in flags_without_effect.items():
        if value is not None:
            err.print(f"[yellow]warning:[/] {flag} does nothing on OmniGen (it is SDXL's); ignored")
    check_picture_suffix(output)
    ensure_writable_file(output, "output")
    g, o = settings.generation, settings.omnigen
    ids = [f"ref{n}" for n in range(1, len(refs) + 1)]
    mapping = merge_concepts([ConceptReferences(concept=(concepts[n] if concepts else prompt), reference_ids=[i])
                              for n, i in enumerate(ids)])
    planned = concept_prompt(prompt, mapping, o.max_references)
    by_id = {i: path for i, (path, _) in zip(ids, refs, strict=True)}
    images = [open_image(by_id[i]) for i in planned.image_ids]
    validate_omnigen_request(planned.text, g.width, g.height, o.steps, images, generation=g)
    for placed in planned.concepts:
        for left in placed.left_out:
            err.print(f"[yellow]note:[/] {escape(str(by_id[left['reference_id']]))} left out: {escape(left['why'])}")

    prepare_models(settings)
    manager = build_manager(settings)
    start = time.perf_counter()
    bar = TerminalBar("drawing (OmniGen)")
    try:
        image = manager.run("omnigen", lambda omnigen: omnigen.generate(
            planned.text, seed=g.seed, input_images=images or None, on_step=bar))
    finally:
        bar.close()
    used = [{"path": by_id[i], "id": i} for i in planned.image_ids]
    placed_map = planned.mapping() if refs else []
    save_image(image, output, for_omnigen_drawing(settings, prompt=prompt, sent_prompt=planned.text, seed=g.seed,
                                                  references=used, concepts=placed_map))
    seconds = round(time.perf_counter() - start, 3)
    result: dict[str, Any] = {
        "output": str(output), "backbone": "omnigen", "prompt": prompt, "sent_prompt": planned.text,
        "seed": g.seed, "steps": o.steps, "width": g.width, "height": g.height, "guidance": o.guidance_scale,
        "img_guidance": o.img_guidance_scale, "fast": "off", "references": [str(by_id[i]) for i in planned.image_ids],
        "concepts": placed_map, "seconds": seconds, "model_loads": manager.load_counts(), "profile": settings.profile,
        "from_image": str(from_image) if from_image else None,
    }
    if settings.is_tiny:
        result["warning"] = TINY_WARNING
    if as_json:
        print_json(result)
        return
    guided = f", {len(images)} reference(s) in context" if images else ""
    out.print(f"wrote {output} (OmniGen, {g.width}x{g.height}, {o.steps} steps, seed {g.seed}{guided}) in {seconds} s",
              markup=False)


@app.command()
def critique(
    image: Annotated[Path, typer.Argument(help="The picture to judge.")],
    prompt: Annotated[str, typer.Argument(help="The prompt it was drawn for.", callback=text_check("the PROMPT"))],
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
        out.print(f"raw answer: {verdict.raw!r}", markup=False)
    else:
        out.print(f"verdict: {'MATCH' if verdict.match else 'NO MATCH'}")
        missing = ", ".join(verdict.missing) if verdict.missing else "(nothing)"
        out.print(f"missing: {missing}", markup=False)
        if verdict.reason:
            out.print(f"reason:  {verdict.reason}", markup=False)



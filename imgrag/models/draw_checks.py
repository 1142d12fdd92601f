"""The checks of a drawing request that need no model: what SDXL can draw and what the settings allow (the command
line runs them before loading anything), and one steer per reference from the aligned weight and mode lists.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from imgrag.drawing.steering import ReferenceSteer, check_mode, check_weight
from imgrag.errors import UserError, check_text
from imgrag.settings import MAX_IP_SCALE, check_drawing_bounds


def reference_steers(count: int, weights: list[float] | None, modes: list[str] | None) -> list[ReferenceSteer]:
    """One :class:`~imgrag.drawing.steering.ReferenceSteer` per reference from the aligned lists (None: 1.0, "both");
    a UserError when a list's length or a value is wrong."""
    for name, values in (("weights", weights), ("modes", modes)):
        if values is not None and len(values) != count:
            raise UserError(f"{len(values)} {name} for {count} references: give one per reference")
    return [ReferenceSteer(check_weight(1.0 if weights is None else weights[i], "a reference's weight"),
                           check_mode("both" if modes is None else modes[i], "a reference's mode"))
            for i in range(count)]

def validate_request(prompt: str, width: int, height: int, steps: int, ip_scale: float,
                     references: list[Image.Image] | None = None, generation: Any = None) -> None:
    """Raise a UserError for a request SDXL cannot draw (the command line checks before loading anything), or one
    past the bounds of ``generation`` (its ``max_side``/``max_steps``; the defaults when None)."""
    try:
        check_drawing_bounds(width, height, steps, generation)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError("the prompt is empty: say what to draw")
    check_text(prompt)
    for name, value in (("width", width), ("height", height)):
        if value < 8 or value % 8:
            raise UserError(f"{name} must be a positive multiple of 8 (SDXL's latents are 1/8 size), got {value}")
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    if not 0.0 <= ip_scale <= MAX_IP_SCALE:
        raise UserError(f"ip_scale must be within 0..{MAX_IP_SCALE:g}, got {ip_scale}")
    for ref in references or []:
        if not isinstance(ref, Image.Image):
            raise UserError(f"a reference must be a picture (PIL image), got {type(ref).__name__}")

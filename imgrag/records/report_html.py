"""What every HTML report page shares: pictures inlined as ``data:`` URIs (thumbnails, each encoded once), the
autoescaped Jinja2 templates of ``imgrag/templates/report/``, and which of a run, a batch or an evaluation a folder
is. :mod:`imgrag.records.report` writes the pages; :mod:`imgrag.records.run_report` and
:mod:`imgrag.records.eval_report` shape a run's and an evaluation's values for them.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import time
from pathlib import Path
from typing import Any

import jinja2

from imgrag.errors import UserError
from imgrag.images import UnreadableImage, open_image
from imgrag.settings import TINY_WARNING

# Largest side of an inlined thumbnail, in pixels. Candidates are shown at up to this size.
THUMB_PX = 384
REFERENCE_THUMB_PX = 160
# Pictures at most this large are inlined as PNG, unscaled (the tiny profile's 64x64 noise); larger
# ones as JPEG thumbnails, which are a tenth of the size of a PNG for photographs and noise alike.
SMALL_IMAGE_PX = 256
JPEG_QUALITY = 85

# Badge colour per run status; any other status (unfinished, unknown) is grey.
STATUS_KINDS = {"matched": "ok", "budget_exhausted": "warn", "interrupted": "warn", "failed": "bad"}


def image_data_uri(path: str | Path | None, max_px: int = THUMB_PX) -> str | None:
    """The picture at ``path`` as a ``data:`` URI (a thumbnail no larger than ``max_px``), or None
    when the file is missing or unreadable. Never raises: a report of a broken run must still render.

    A page shows the same picture several times (the final picture is also a round's card; a reference
    appears in its table and in every card that used it): each is encoded once per file version."""
    if not path:
        return None
    try:
        version = Path(path).stat().st_mtime_ns
    except OSError:
        return None
    return _encoded_thumbnail(str(path), version, max_px)


@functools.lru_cache(maxsize=512)
def _encoded_thumbnail(path: str, version: int, max_px: int) -> str | None:  # version: the cache key only
    try:
        image = open_image(path)
    except UnreadableImage:
        return None
    buffer = io.BytesIO()
    if max(image.size) <= SMALL_IMAGE_PX:
        image.save(buffer, format="PNG")
        mime = "image/png"
    else:
        image.thumbnail((max_px, max_px))
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        mime = "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def read_json(path: Path) -> Any:
    """The JSON document at ``path``; a one-line UserError naming the file when it cannot be read or parsed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read as JSON ({exc})") from None


def folder_kind(path: str | Path) -> str:
    """"run", "batch" or "eval"; a UserError for anything else."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such folder")
    if not path.is_dir():
        raise UserError(f"{path}: not a folder (give a run, batch or eval folder)")
    if (path / "eval.json").is_file():
        return "eval"
    if (path / "batch.json").is_file() or (path / "summary.json").is_file():
        return "batch"
    if (path / "result.json").is_file() or (path / "trace.jsonl").is_file():
        return "run"
    raise UserError(f"{path}: neither a run folder (result.json, trace.jsonl), a batch folder (batch.json) "
                    "nor an eval folder (eval.json)")


def cell_number(value: Any, digits: int = 3) -> Any:
    """A float rounded for a table cell; anything else as it is (None renders as an empty cell)."""
    if isinstance(value, float) and not isinstance(value, bool):
        return f"{value:.{digits}f}"
    return value


@functools.cache
def report_environment() -> jinja2.Environment:
    """The report templates (package data), autoescaped; None renders as an empty string."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("imgrag", "templates/report"),
        autoescape=True,  # every file here is HTML (or CSS included into it): escape all of them
        # A report of a broken or older run must still render: a key its records lack is an empty cell.
        undefined=jinja2.Undefined,
        finalize=lambda value: "" if value is None else value,
        trim_blocks=True, lstrip_blocks=True,
    )
    env.filters["num"] = cell_number
    env.globals.update(data_uri=image_data_uri, THUMB_PX=THUMB_PX, REFERENCE_THUMB_PX=REFERENCE_THUMB_PX,
                       STATUS_KINDS=STATUS_KINDS, TINY_BANNER=TINY_WARNING)
    return env


def render_page(template: str, **context: Any) -> str:
    """The whole page ``template`` renders with ``context`` (and the time it was generated)."""
    return report_environment().get_template(template).render(generated=time.strftime("%Y-%m-%d %H:%M:%S"), **context)


def status_badge(status: str | None) -> Any:
    """A run status as the templates' badge (its colour from :data:`STATUS_KINDS`), as markup."""
    return report_environment().get_template("macros.html").module.status_badge(status)


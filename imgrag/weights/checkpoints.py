"""Turning every way a checkpoint can be wrong into one ``ModelLoadError`` that names it.

Loaders of transformers and diffusers fail with many exception types and multi-line messages
(``OSError``, ``ValueError``, hub errors, ``KeyError`` for a foreign ``model_type``...). The command
line promises one line naming the path and what was expected there, so every wrapper loads inside
:func:`loading`, which also keeps the libraries' progress bars and warnings off stderr while it runs.
:func:`qwen_dtype` picks the dtype the Qwen models are loaded in.
"""

from __future__ import annotations

import glob
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from imgrag.errors import ModelLoadError, UserError
from imgrag.hub_cache import hub_cached, is_local_ref
from imgrag.settings import Settings
from imgrag.text import describe_error
from imgrag.weights.model_files import missing_hub_files


def download_hint(repo_id: str) -> str:
    return (f"{repo_id} is not in the local Hugging Face cache; imgrag never downloads on its own: fetch exactly the "
            "files it needs once with `imgrag models download` (see `imgrag doctor`), or set the profile's checkpoint "
            "to a local folder")


def check_exists(ref: str, role: str, expected: str) -> None:
    """Fail early, with a clear message, on a local path that is not there or a hub id that is not cached.

    Without the cache check, an offline machine spends about a minute in the hub client's retries and then
    reports a misleading "no model_index.json"; and imgrag runs on local models, so it never fetches gigabytes
    behind the user's back.
    """
    if not ref.strip():
        raise ModelLoadError(f"no checkpoint configured for the {role} (expected {expected})")
    if is_local_ref(ref):
        if not Path(ref).expanduser().exists():
            raise ModelLoadError(f"{role} checkpoint not found: {ref} (expected {expected})")
        return
    if not hub_cached(ref):
        raise ModelLoadError(f"{role}: {download_hint(ref)}")
    missing = missing_hub_files(ref, role)
    if missing:  # a partial download: the hub client would otherwise fetch the rest during the run
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelLoadError(f"{role}: {', '.join(missing[:3])}{more} of {ref} are not in the local Hugging Face "
                             "cache; imgrag never downloads on its own: `imgrag models download` fetches them")


@contextmanager
def loading(role: str, ref: str, expected: str) -> Iterator[None]:
    """Run a loader quietly; anything it raises (but a UserError) becomes a one-line ``ModelLoadError``."""
    check_exists(ref, role, expected)
    try:
        with quiet_libraries():
            yield
    except UserError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load the {role} from {ref} (expected {expected}): "
                             f"{describe_error(exc)}") from exc


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """While loading: no "Loading weights" bars and no library warnings on stderr, then restore them.

    The command line owns stderr (its own progress, the tiny-kit warning); diffusers also warns
    spuriously on every IP-Adapter load ("modules ... should be kept in float32: []").
    """
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = (dlog.get_verbosity(), tlog.get_verbosity(), dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(saved[0])
        tlog.set_verbosity(saved[1])
        if saved[2]:
            dlog.enable_progress_bar()
        if saved[3]:
            tlog.enable_progress_bar()


def check_model_type(ref: str, role: str, expected: str, allowed: set[str]) -> str:
    """Read the checkpoint's ``config.json`` and refuse another architecture before loading weights.

    transformers would otherwise load a foreign checkpoint with a warning and random weights. Call it inside
    the loader's :func:`loading` block, which names the checkpoint if the config cannot be read.
    """
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(ref, trust_remote_code=False).model_type
    if model_type not in allowed:
        raise ModelLoadError(f"{ref} holds a {model_type!r} model, not the {role} (expected {expected})")
    return model_type


def qwen_dtype(settings: Settings, device: str) -> Any:
    """The dtype for a Qwen model: the settings', except that "auto" on a GPU means bfloat16 where supported.

    Qwen2.5 is trained in bf16 and can overflow in float16 (inf/NaN logits, then garbage text);
    "auto" gives float16 for SDXL, which is what SDXL wants.
    """
    import torch

    if settings.dtype == "auto" and device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return settings.torch_dtype() if device.startswith("cuda") or settings.dtype != "auto" else torch.float32


def safetensors_parameters(ref: str, patterns: list[str]) -> int:
    """How many parameters the ``.safetensors`` files matching ``patterns`` (globs relative to the checkpoint
    ``ref``, a local folder or a cached hub repository) hold, read from their headers without loading them.
    0 when no file is found (a hub repository not in the cache; nothing is downloaded)."""
    from safetensors import safe_open

    root = Path(ref).expanduser()
    if not is_local_ref(ref):
        try:
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(ref, local_files_only=True))
        except Exception:  # not cached: the caller falls back to a published size
            return 0
    total = 0
    for pattern in patterns:
        for path in sorted(glob.glob(str(root / pattern))):
            with safe_open(path, "pt") as handle:
                total += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
    return total

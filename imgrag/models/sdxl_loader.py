"""Loading the generator's SDXL pipeline, in either form a user has it: a diffusers folder or hub id, or one
single-file checkpoint (A1111/ComfyUI layout); and whether the IP-Adapter checkpoint is there at all.

diffusers is imported inside the functions that use it: it takes seconds to import, and ``imgrag --help`` imports
the model wrappers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imgrag.errors import ModelLoadError
from imgrag.hub_cache import hub_cached, is_local_ref
from imgrag.settings import Settings
from imgrag.weight_files import weight_file_problem
from imgrag.weights.checkpoints import loading
from imgrag.weights.model_files import generator_variant
from imgrag.weights.single_file import EXPECTED, checkpoint_problem, find_single_file, resolve_config

SDXL_EXPECTED = "an SDXL diffusers pipeline folder (model_index.json of StableDiffusionXLPipeline)"


def load_sdxl_pipeline(settings: Settings) -> Any:
    """The SDXL pipeline ``settings.models.generator`` names, in ``settings.torch_dtype()`` on the CPU: the one loader
    of both forms, so everything drawn afterwards (IP-Adapter, LoRAs, fast modes, schedulers, batches, previews)
    sees the same ``StableDiffusionXLPipeline`` either way.

    - A diffusers folder or hub id: ``AutoPipelineForText2Image.from_pretrained`` (the fp16 variant when that is
      what the folder holds, as ``imgrag models download`` fetches it).
    - A single-file checkpoint (a ``.safetensors`` file in the original A1111/ComfyUI layout, or a folder holding
      exactly one; :func:`imgrag.weights.single_file.find_single_file`): the file's integrity and its keys are checked
      from its header first (a truncated download, a LoRA, an SD 1.5 model are one line each), then
      ``StableDiffusionXLPipeline.from_single_file`` with ``config=`` the local folder ``models.generator_config``
      resolves to and ``local_files_only=True``, so diffusers never reaches for the hub.

    Every failure is one :class:`~imgrag.errors.ModelLoadError` line naming the checkpoint."""
    from diffusers import AutoPipelineForText2Image, StableDiffusionXLPipeline

    ref = settings.models.generator
    single = find_single_file(ref)
    if single is not None:
        return _load_single_file(single, settings)
    with loading("generator", ref, SDXL_EXPECTED):
        # The fp16 variant is what `imgrag models download` fetches; diffusers casts it to the dtype asked for.
        pipe = AutoPipelineForText2Image.from_pretrained(ref, dtype=settings.torch_dtype(), use_safetensors=True,
                                                         variant=generator_variant(ref))
    if not isinstance(pipe, StableDiffusionXLPipeline):
        raise ModelLoadError(f"{ref} holds a {type(pipe).__name__}, not the generator (expected {SDXL_EXPECTED})")
    return pipe


def _load_single_file(path: Path, settings: Settings) -> Any:
    """:func:`load_sdxl_pipeline` for a single-file checkpoint at ``path`` (see there)."""
    from diffusers import StableDiffusionXLPipeline

    if not path.is_file():
        raise ModelLoadError(f"generator checkpoint not found: {path} (expected {EXPECTED})")
    problem = weight_file_problem(path) or checkpoint_problem(path)
    if problem:
        raise ModelLoadError(f"generator {path}: {problem}")
    config = resolve_config(settings.models.generator_config)
    with loading("generator", str(path), f"{EXPECTED}, configured by {config}"):
        return StableDiffusionXLPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                          dtype=settings.torch_dtype())

def adapter_present(settings: Settings) -> bool:
    """Whether the IP-Adapter checkpoint is there at all (a folder, or a hub id with a cached snapshot).

    Plain drawing needs no adapter, so an absent one is reported only at the first guided drawing; one
    that is there but wrong (another file name, an encoder of the wrong width) is reported at once.
    """
    ref = settings.models.ip_adapter.strip()
    if not ref:
        return False
    return Path(ref).expanduser().is_dir() if is_local_ref(ref) else hub_cached(ref)

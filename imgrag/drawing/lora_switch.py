"""The pipeline's side of the user's LoRAs: each file loaded once into the SDXL pipeline as a PEFT adapter, and every
drawing switching the adapters it uses on by name (:class:`LoraSwitch`); :class:`lora_load_quiet` keeps the
libraries quiet while one loads. Which LoRAs a drawing uses, and the checks of their files before any model
loads, are :mod:`imgrag.drawing.loras`.

safetensors, diffusers and transformers are imported inside the methods that use them: they take seconds to
import, and ``imgrag --help`` imports this module.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from imgrag.drawing.loras import LoraChoice, check_lora_file, lora_parameters
from imgrag.errors import ModelLoadError
from imgrag.file_names import display_name
from imgrag.text import first_line


@dataclass(frozen=True)
class LoadedLora:
    """A LoRA file loaded into the pipeline as the PEFT adapter ``adapter``; ``parts`` the components it adapts."""

    path: str
    adapter: str
    parts: tuple[str, ...]


class LoraSwitch:
    """The PEFT adapters of one diffusers SDXL pipeline: the user's LoRAs (loaded on first use, by file) and the
    named adapters other parts of imgrag load themselves (the LCM-LoRA: :meth:`adopt`), and which are active.

    :meth:`activate` before each drawing makes exactly the wanted adapters active at their weights; it does nothing
    when they already are. ``load_calls`` counts files read into the pipeline (a test holds it at one per file)."""

    def __init__(self, pipe: Any, before_load: Callable[[float], None] | None = None) -> None:
        self.pipe = pipe
        self.before_load = before_load  # asked for the LoRA's GiB before it loads (the model manager makes room)
        self.loaded: dict[tuple[str, int, int], LoadedLora] = {}  # by file identity (path, size, mtime)
        self.adopted: set[str] = set()  # adapters loaded by others (the LCM-LoRA)
        self.active: tuple[tuple[str, float], ...] | None = ()  # what the pipeline draws with now; None: unknown
        self.load_calls = 0

    def adopt(self, adapter: str) -> None:
        """Record an adapter another loader put into the pipeline (its load made it the only active one)."""
        self.adopted.add(adapter)
        self.active = None

    def adapter_for(self, choice: LoraChoice) -> str:
        """The adapter name of ``choice``'s file, loading it first if this pipeline has not read it (or the file
        changed since). A file that does not fit is a one-line ModelLoadError naming it; nothing of it stays."""
        key = _file_key(choice.path)
        if key in self.loaded:
            return self.loaded[key].adapter
        path = check_lora_file(choice.path)  # it may have changed since the run checked it
        adapter = self._new_adapter_name(choice.label)
        if self.before_load is not None:
            self.before_load(lora_parameters(path) * self.pipe.unet.dtype.itemsize / 2**30)
        from safetensors.torch import load_file

        shown = display_name(path)
        try:
            state = load_file(path)
        except Exception as exc:
            raise ModelLoadError(f"LoRA {shown}: cannot read it: {type(exc).__name__}: {_first(exc)}") from exc
        self.load_calls += 1
        self.active = None  # a load makes the new adapter the active one
        try:
            with lora_load_quiet() as quiet:
                self.pipe.load_lora_weights(state, adapter_name=adapter)
        except Exception as exc:
            self._forget(adapter)
            raise ModelLoadError(f"LoRA {shown} does not fit this generator ({_why(exc)}): it was made for "
                                 "another base model (SD 1.5, SD 2, Flux, ...); use an SDXL LoRA") from None
        if quiet.unexpected:  # some of its layers matched no module: diffusers only warns, and draws with the rest
            self._forget(adapter)
            raise ModelLoadError(f"LoRA {shown} does not fit this generator (it adapts {quiet.unexpected[0]}, which "
                                 "this generator has not): it was made for another base model (SD 1.5, SD 2, "
                                 "Flux, ...); use an SDXL LoRA")
        parts = tuple(part for part, names in self.pipe.get_list_adapters().items() if adapter in names)
        if "unet" not in parts:
            self._forget(adapter)
            raise ModelLoadError(f"LoRA {shown} holds nothing for this generator's UNet (its keys name no module "
                                 "of it): it was made for another base model; use an SDXL LoRA")
        self.loaded[key] = LoadedLora(path, adapter, parts)
        return adapter

    def activate(self, wanted: Sequence[tuple[str, float]]) -> None:
        """Make exactly ``wanted`` (``(adapter name, weight)``, weight 0 ones left out) the active adapters, in that
        order; none: the LoRA layers off. Cheap when nothing changes."""
        wanted = tuple((name, float(weight)) for name, weight in wanted if weight != 0)
        if wanted == self.active:
            return
        if not wanted:
            if self.loaded or self.adopted:
                self.pipe.disable_lora()
        else:
            self.pipe.enable_lora()  # after a disable_lora, set_adapters alone leaves the layers off
            self.pipe.set_adapters([name for name, _ in wanted], [weight for _, weight in wanted])
        self.active = wanted

    def use(self, loras: Sequence[LoraChoice], extra: Sequence[tuple[str, float]] = ()) -> None:
        """Activate ``extra`` (the LCM-LoRA when fast mode wants it) and ``loras`` at their weights, loading any
        not yet read (even at weight 0: a file that does not fit is said at once, not when its weight changes)."""
        self.activate([*extra, *((self.adapter_for(c), c.weight) for c in loras)])

    def _new_adapter_name(self, label: str) -> str:
        """A PEFT adapter name for a new LoRA: ``lora-`` and its label in letters, digits, ``_`` and ``-`` (PEFT keys
        modules by it, so no '.'), made unique; never an adopted name such as the LCM-LoRA's."""
        base = "lora-" + re.sub(r"[^A-Za-z0-9_-]", "_", label)
        taken = {loaded.adapter for loaded in self.loaded.values()} | self.adopted
        name, n = base, 2
        while name in taken:
            name, n = f"{base}-{n}", n + 1
        return name

    def _forget(self, adapter: str) -> None:
        """Remove whatever a failed load left of ``adapter`` (diffusers may have loaded the text encoders' part)."""
        try:
            present = {name for names in self.pipe.get_list_adapters().values() for name in names}
            if adapter in present:
                self.pipe.delete_adapters(adapter)
        except Exception:  # nothing was left to remove
            pass
        self.active = None


def _file_key(path: str) -> tuple[str, int, int]:
    try:
        stat = os.stat(path)
    except OSError:
        return (path, -1, -1)
    return (path, stat.st_size, stat.st_mtime_ns)


def _first(exc: BaseException) -> str:
    return first_line(exc, 200)


def _why(exc: BaseException) -> str:
    """What a failed LoRA load says, in a few words: the first mismatched shape, or the modules it names that this
    UNet has not."""
    text = str(exc)
    mismatch = re.search(r"size mismatch for ([\w.-]+): copying a param with shape (torch\.Size\(\[[\d, ]*\]\)) "
                         r"from checkpoint, the shape in current model is (torch\.Size\(\[[\d, ]*\]\))", text)
    if mismatch:
        module = re.sub(r"\.lora_[AB]\.[\w-]+\.weight$", "", mismatch.group(1))
        return (f"{module}: its shape {mismatch.group(2).removeprefix('torch.Size(').removesuffix(')')}, this "
                f"generator's {mismatch.group(3).removeprefix('torch.Size(').removesuffix(')')}")
    if "Reinit due to size mismatch" in text or "ignore_mismatched_sizes" in text:
        return "its text-encoder layers have other widths"
    missing = re.search(r"Target modules \{?'?([^'}]+)", text)
    if missing:
        return f"it adapts {missing.group(1)}, which this generator has not"
    return f"{type(exc).__name__}: {_first(exc)}"


class lora_load_quiet(logging.Handler):
    """Quiet while a LoRA loads (no library logs, warnings or progress bars on stderr, which the command line owns):
    transformers prints a load report table for a text encoder whose LoRA shapes do not
    match (besides raising; the error is reported in one line), and PEFT warns "Already found a peft_config" for every
    adapter after the first, which is what several LoRAs in one pipeline are meant to be.

    What diffusers' PEFT loader logs about a LoRA's keys that matched no module of the UNet (its only report of a
    LoRA that fits in part: it loads the rest) is kept, as module names, in :attr:`unexpected`."""

    # Where load_lora_adapter warns of unexpected keys (diffusers' _maybe_warn_for_unhandled_keys logs there).
    _LOGGER = "diffusers.utils.peft_utils"

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.unexpected: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        found = re.search(r"led to unexpected keys found in the model: ([^ ]+?)[,.]? ", message + " ")
        if found:
            self.unexpected.append(re.sub(r"\.lora_[AB]\.[\w-]+\.weight$|\.lora_[AB]\.weight$", "", found.group(1)))

    def __enter__(self) -> lora_load_quiet:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        self._saved = (dlog.get_verbosity(), tlog.get_verbosity(), dlog.is_progress_bar_enabled(),
                       tlog.is_progress_bar_enabled())
        dlog.set_verbosity(dlog.CRITICAL)
        tlog.set_verbosity(tlog.CRITICAL)
        dlog.disable_progress_bar()  # transformers' "Loading weights" bar of a text encoder's adapter
        tlog.disable_progress_bar()
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        peft_log = logging.getLogger(self._LOGGER)
        self._peft = (peft_log.level, peft_log.propagate)
        peft_log.setLevel(logging.WARNING)  # heard here, past the CRITICAL above, and printed nowhere
        peft_log.propagate = False
        peft_log.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        peft_log = logging.getLogger(self._LOGGER)
        peft_log.removeHandler(self)
        peft_log.setLevel(self._peft[0])
        peft_log.propagate = self._peft[1]
        self._warnings.__exit__(*exc)
        dlog.set_verbosity(self._saved[0])
        tlog.set_verbosity(self._saved[1])
        if self._saved[2]:
            dlog.enable_progress_bar()
        if self._saved[3]:
            tlog.enable_progress_bar()

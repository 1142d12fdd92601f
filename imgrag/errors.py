"""Errors a user can cause. The command line prints their message on one line and exits 1."""

import os
from pathlib import Path


class UserError(Exception):
    """A mistake in the user's input (a path, a prompt, a setting); the message says which and why."""


class ModelLoadError(UserError):
    """A checkpoint that does not exist, cannot be read, or holds another architecture."""


# torch.Generator.manual_seed takes any integer in [-2**63, 2**64); imgrag's seeds are the non-negative part, so
# the same number means the same picture everywhere (a seed is also written into run records as JSON).
SEED_MAX = 2**64 - 1


def check_seed(seed: object, where: str = "seed") -> int:
    """Return ``seed`` as an int, or raise UserError naming ``where`` when it is not an integer in 0..2**64-1.

    The one range check for every way a seed arrives: CLI options, prompt files (``where`` = "file:line: seed"),
    settings, tool arguments and the generator itself."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        try:
            if isinstance(seed, bool) or isinstance(seed, float) and not seed.is_integer():
                raise ValueError
            seed = int(seed)  # type: ignore[call-overload]
        except (TypeError, ValueError, OverflowError):
            raise UserError(f"{where} must be a whole number, got {seed!r}") from None
    if not 0 <= seed <= SEED_MAX:
        raise UserError(f"{where} out of range: {seed} (a seed is a whole number from 0 to 2**64-1, "
                        "torch's seed range)")
    return seed


class TimeBudgetSpent(UserError):
    """A long model call (a drawing, a generation) stopped because the run's time budget ran out."""


def read_user_text(path: "str | os.PathLike[str]", what: str = "file") -> str:
    """The text of a file the user wrote (a prompt list, a caption), read as UTF-8.

    A file in another encoding (Windows-1252, UTF-16 from Notepad) is one UserError naming the line and byte
    that are not UTF-8 and saying to re-save it as UTF-8; a file that cannot be read names the reason."""
    data_path = Path(path)
    try:
        data = data_path.read_bytes()
    except OSError as exc:
        raise UserError(f"{data_path}: cannot read the {what}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{data_path}:{line}: the {what} is not UTF-8 text (byte 0x{data[exc.start]:02x}); re-save "
                        "it as UTF-8 (in most editors: Save As, encoding UTF-8)") from None


def check_text(text: str, what: str = "the prompt") -> str:
    """Return ``text`` when it is valid Unicode text, or raise UserError naming ``what`` and the first bad byte.

    A command-line argument in another encoding than the terminal's (``$(printf 'a caf\\xe9 table')`` in a UTF-8
    locale) reaches Python as a ``str`` holding lone surrogates (PEP 383's ``surrogateescape``); no tokenizer can
    encode one, so the one check is here, before any model loads: for every prompt, negative prompt and concept
    typed on the command line, and every prompt a run starts with. File names are not checked here: a name that is
    not UTF-8 is a valid file (imgrag.file_names)."""
    for index, char in enumerate(text):
        if "\udc80" <= char <= "\udcff":  # surrogateescape's range: one undecodable byte each
            raise UserError(f"{what} is not UTF-8 text (byte 0x{ord(char) - 0xdc00:02x} at character {index + 1}); "
                            "pass it as UTF-8 (the terminal or script that passed it uses another encoding)")
        if "\ud800" <= char <= "\udfff":
            raise UserError(f"{what} holds a lone surrogate (U+{ord(char):04X} at character {index + 1}), which is "
                            "not text; give it as UTF-8")
    return text

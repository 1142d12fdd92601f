"""Errors a user can cause. The command line prints their message on one line and exits 1."""


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

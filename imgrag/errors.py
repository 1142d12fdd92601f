"""Errors a user can cause. The command line prints their message on one line and exits 1."""


class UserError(Exception):
    """A mistake in the user's input (a path, a prompt, a setting); the message says which and why."""


class ModelLoadError(UserError):
    """A checkpoint that does not exist, cannot be read, or holds another architecture."""


class TimeBudgetSpent(UserError):
    """A long model call (a drawing, a generation) stopped because the run's time budget ran out."""

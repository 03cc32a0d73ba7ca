"""Exceptions that the CLI turns into a one-line message and a non-zero exit code."""


class RaserecError(Exception):
    """Base class for user-facing errors (bad input, stale caches, wrong checkpoints)."""


class DataError(RaserecError):
    """Malformed, missing or inconsistent data. The message names the file (and line)."""


class CheckpointError(RaserecError):
    """A checkpoint or memory bank that does not match what it is used with."""

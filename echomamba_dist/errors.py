"""Errors a user can act on. Their message is one line that names the file, the line or column,
and what was expected; the CLI prints it and exits with status 2."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data: a missing/unreadable file, a malformed row, a filter that leaves nothing."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or belongs to a different model or dataset."""


class WorkerError(RuntimeError):
    """Training failed on a Ray worker; the message holds the worker's exception and traceback."""

"""Errors a user can act on. Their message is one line that names the file, the line or column,
and what was expected; the CLI prints it and exits with status 2."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration key is unknown, or its value has the wrong type or range (the dotted key
    and, when read from a file, the file are named)."""


class DataError(ValueError):
    """Bad input data: a missing/unreadable file, a malformed row, a filter that leaves nothing."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or belongs to a different model or dataset."""


class WorkerError(RuntimeError):
    """Training failed on a Ray worker; the message holds the worker's exception and traceback."""


class OutputError(DataError):
    """An output path that cannot be written as asked: it exists (without --overwrite), it is
    not something this project wrote (with --overwrite), it is a directory where a file is
    expected or the reverse, or its directory cannot be created or written."""


class NonFiniteScores(CheckpointError):
    """A model scored items with NaN or infinity (diverged weights): no metric or recommendation
    is made from such scores."""


class TrainingDiverged(RuntimeError):
    """Training produced a non-finite loss or non-finite validation scores; the message names the
    epoch and step and what to change. No checkpoint of the diverged state is written."""

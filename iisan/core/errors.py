"""Named exceptions. Every message carries the bad input and the fix.

The command line turns any ``IisanError`` into a one-paragraph message and exit
code 2 instead of a traceback.
"""

from __future__ import annotations


class IisanError(Exception):
    """Base class: raised for anything a user can get wrong."""


class DataError(IisanError):
    """Raised when a raw or prepared data file is malformed.

    ``path`` and ``line`` (1-based) locate the problem; ``fix`` says what to do.
    """

    def __init__(self, path, problem: str, fix: str, line: int | None = None):
        self.path, self.line, self.problem, self.fix = str(path), line, problem, fix
        where = f"{self.path}, line {line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}\n  fix: {fix}")


class ConfigError(IisanError):
    """Raised when a setting is invalid; names the dotted key and the fix."""


class ConfigValidationError(ConfigError):
    """Raised when config.yaml or command-line settings fail the schema
    (iisan/config.schema.yaml): an unknown key, a wrong type, a value out of range."""


class CacheMismatchError(IisanError):
    """Raised when an existing cache was made by a different model, layer
    selection or input set than the one asked for."""


class ModelLoadError(IisanError):
    """Raised when a backbone cannot be found or loaded (offline, no hub)."""


class OutputError(IisanError):
    """Raised when an output path holds something iisan did not make and
    would have to replace; iisan never deletes what it did not create."""


class TrainingError(IisanError):
    """Raised when training cannot go on: the loss diverged (NaN or infinite),
    or a checkpoint to resume from does not belong to this run."""


class CheckpointError(IisanError):
    """Raised when a run folder has no usable checkpoint, or its checkpoint does not
    belong to the dataset or inputs it is asked to work with."""


class ExtractionError(IisanError):
    """Raised when stage one cannot go on: a forward pass does not fit in memory."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem}\n  fix: {fix}")

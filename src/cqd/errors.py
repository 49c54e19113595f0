"""One exception type for every mistake a user can make.

The CLI prints a `CQDError` as one paragraph and exits non-zero; anything else is a bug and
keeps its traceback.
"""


class CQDError(Exception):
    """Bad input from the user: a name, value, file or config key, and what would be right."""


class ConfigError(CQDError):
    """A config key, type or value is wrong."""


class DataError(CQDError):
    """A dataset folder, annotation file or image is missing or malformed."""


class CheckpointError(CQDError):
    """A checkpoint is missing, corrupt, or belongs to another model."""


class TrainingDiverged(CQDError):
    """A loss became NaN or infinite."""

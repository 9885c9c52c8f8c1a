"""Errors that the CLI reports as one line (no traceback)."""


class BgptError(Exception):
    """Base of every error that means "fix the input or the options", not "bgpt has a bug"."""


class DataError(BgptError):
    """Bad input data or options: the message names the file, row or shard and says what to do."""


class ShardError(DataError):
    """A shard or manifest is missing, truncated or corrupt."""

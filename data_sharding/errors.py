"""Errors that the CLI reports as one line (no traceback)."""


class DataError(Exception):
    """Bad input data or options: the message names the file, row or shard and says what to do."""


class ShardError(DataError):
    """A shard or manifest is missing, truncated or corrupt."""

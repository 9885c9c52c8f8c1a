"""Trainer errors reported by the CLI as one line."""

from data_sharding.errors import BgptError


class ConfigError(BgptError):
    """A run configuration, backbone or checkpoint that cannot be used; the message says what to do."""

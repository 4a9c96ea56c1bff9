"""The engine's configuration error, in a module of its own so that every engine module can raise it."""

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration problem, found before any model loads. The message names the key or file."""

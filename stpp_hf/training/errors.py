"""The error a bad option raises, shared by the configuration and the recipe arithmetic."""


class ConfigError(ValueError):
    """A bad option; the message names it and says what to do."""

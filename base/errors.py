"""The root of every error meterflow raises on purpose."""


class MeterError(Exception):
    """Base class: catch this to handle any meterflow failure."""


class ConfigError(MeterError):
    """The configuration file or environment is invalid; the message names the key and the file."""

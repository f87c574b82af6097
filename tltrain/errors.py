"""Error types shared by every stage, so the CLI can print them without a traceback."""


class TltrainError(Exception):
    """Base class: an error the user can act on (bad input, bad config), printed as a plain message."""


class ConfigError(TltrainError):
    """A config value is unknown or inconsistent; the message names the key and the valid choices."""


class DataError(TltrainError):
    """Input data is missing or malformed; the message names the file and the problem."""

    def __init__(self, message: str, problems: list | None = None):
        super().__init__(message)
        self.problems = problems or []


def choices_error(key: str, value, valid) -> ConfigError:
    """Build the standard 'unknown X; valid choices are ...' error."""
    valid = sorted(valid)
    return ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, valid))}")

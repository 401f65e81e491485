"""Errors a user can fix. The CLI prints them as one line, never as a traceback."""


class EchoicError(Exception):
    """Base class: the message alone tells the user what is wrong and where."""


class ConfigError(EchoicError):
    """A config key or value that is unknown, mistyped or conflicting."""


class ManifestError(EchoicError):
    """A manifest or corpus file that is missing or malformed (names file and line)."""


class AudioError(EchoicError):
    """Audio that cannot be used. `reason` is a short, countable category."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

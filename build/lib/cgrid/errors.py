"""One root exception for the project, with a few meaningful subclasses."""


class CgridError(Exception):
    """Root of every error cgrid-s2s raises on purpose."""


class InvalidEvent(CgridError, ValueError):
    """An event is refused; ``field`` names the offending field, ``reason`` says why."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class ConfigError(CgridError, ValueError):
    """A setting is missing, malformed, or would break a delivery guarantee."""


class RedisUnavailable(CgridError, ConnectionError):
    """Redis (broker and ledger) cannot be reached; nothing was accepted."""


class ForbiddenDestination(CgridError):
    """The buyer URL's host is, or resolves to, an address the guard refuses (SPEC §8)."""


class ArchiveError(CgridError):
    """The archive directory cannot be used (unwritable, full, or taken by another archiver)."""

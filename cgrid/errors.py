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


class PublishFailed(CgridError):
    """Events taken by ``publish()`` could not be sent for a reason other than Redis being
    away (an event Redis cannot be given, or a bug): they are dropped, and this reports
    them, once. ``event_ids`` lists them; ``errors`` says what each met."""

    def __init__(self, failures: list[tuple[str, BaseException]]) -> None:
        self.event_ids = [event_id for event_id, _ in failures]
        self.errors = [error for _, error in failures]
        shown = "; ".join(f"{event_id} ({type(error).__name__}: {error})" for event_id, error in failures[:5])
        more = f"; and {len(failures) - 5} more" if len(failures) > 5 else ""
        super().__init__(f"{len(failures)} published events were NOT accepted and are dropped: {shown}{more}")


class ForbiddenDestination(CgridError):
    """The buyer URL's host is, or resolves to, an address the guard refuses (SPEC §8)."""


class ArchiveError(CgridError):
    """The archive directory cannot be used (unwritable, full, or taken by another archiver)."""

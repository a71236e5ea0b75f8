"""Redis's error replies that say "not now", and a log line that names each kind once per
interval.

A full Redis (``OOM``), a replica (``READONLY``, ``UNBLOCKED``, ``MASTERDOWN``), one loading
its data (``LOADING``), running a long script (``BUSY``) or unable to persist (``MISCONF``)
answers a command with an error reply. None of them is the fault of the command, the event
or the broker message that met it, and all of them end: workers and the archiver log the
kind, back off and try again; they never exit over one, and never take one for a poisoned
message (issue 15). Such a reply comes on every command until it ends, so the line is
written once per kind and :data:`REDIS_ERROR_LOG_EVERY_S` in each process, with how many
were left out since.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import redis
from redis import exceptions as rex

from cgrid.logs import get_logger

REDIS_ERROR_LOG_EVERY_S = 30.0

# redis-py's classes for some codes; the others (UNBLOCKED, BUSY, MISCONF, NOREPLICAS,
# WRONGTYPE, ...) arrive as a plain ResponseError whose text starts with the code.
_KINDS: tuple[tuple[type[Exception], str], ...] = (
    (rex.OutOfMemoryError, "OOM"),
    (rex.ReadOnlyError, "READONLY"),
    (rex.MasterDownError, "MASTERDOWN"),
    (rex.BusyLoadingError, "LOADING"),  # a ConnectionError subclass: before the next line
    (rex.NoPermissionError, "NOPERM"),
    (rex.NoScriptError, "NOSCRIPT"),
    (rex.ExecAbortError, "EXECABORT"),
    (rex.TimeoutError, "timeout"),
    (rex.ConnectionError, "unreachable"),
)


def redis_cause(exc: BaseException) -> BaseException:
    """The Redis error behind ``exc`` (kombu wraps a broker's in its ``OperationalError``)."""
    seen = exc
    for _ in range(5):
        if isinstance(seen, redis.RedisError) or seen.__cause__ is None:
            break
        seen = seen.__cause__
    return seen if isinstance(seen, redis.RedisError) else exc


def error_kind(exc: BaseException) -> str:
    """What an error from Redis is: the reply's code (``OOM``, ``READONLY``, ``UNBLOCKED``,
    ``BUSY``, ``MISCONF``, ``MASTERDOWN``, ``LOADING``, ``ERR`` ...), ``unreachable`` or
    ``timeout`` when there was no reply; else the exception's class name."""
    cause = redis_cause(exc)
    for cls, kind in _KINDS:
        if isinstance(cause, cls):
            return kind
    if isinstance(cause, rex.ResponseError):
        first = str(cause).split(" ", 1)[0]
        return first if first.isalpha() and first.isupper() else "ERR"
    if isinstance(cause, OSError):
        return "unreachable"
    return type(cause).__name__


def is_full(exc: BaseException) -> bool:
    """Redis refused a write because it is at its ``maxmemory`` (or our publishing headroom)."""
    return error_kind(exc) == "OOM"


class Throttle:
    """Says whether a line of a kind may be written now: at most once per ``every_s`` per
    (line, kind); ``allow`` returns None while quiet, else how many it left out before."""

    def __init__(self, every_s: float = REDIS_ERROR_LOG_EVERY_S) -> None:
        self.every_s = every_s
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str], tuple[float, int]] = {}  # -> (logged at, left out since)

    def allow(self, line: str, kind: str) -> int | None:
        now = time.monotonic()
        with self._lock:
            logged_at, left_out = self._last.get((line, kind), (float("-inf"), 0))
            if now - logged_at < self.every_s:
                self._last[(line, kind)] = (logged_at, left_out + 1)
                return None
            self._last[(line, kind)] = (now, 0)
            return left_out


_throttle = Throttle()


def log_redis_error(line: str, exc: BaseException, *, level: str = "warning", **fields: Any) -> bool:
    """Write ``line`` with the error's ``kind`` and text, at most once per kind and
    :data:`REDIS_ERROR_LOG_EVERY_S` in this process (``repeats``: how many were left out
    since the last one). Returns whether it was written."""
    kind = error_kind(exc)
    left_out = _throttle.allow(line, kind)
    if left_out is None:
        return False
    getattr(get_logger(), level)(line, kind=kind, error=str(redis_cause(exc))[:200], repeats=left_out, **fields)
    return True

"""Redis's error replies: their kind, and a log line per kind and interval (issue 15)."""

from __future__ import annotations

import json

import pytest
import redis
from kombu.exceptions import OperationalError
from redis import exceptions as rex

from cgrid import logs as cgrid_logs
from cgrid.redis_replies import Throttle, error_kind, is_full, log_redis_error


@pytest.mark.parametrize(("error", "kind"), [
    (rex.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), "OOM"),
    (rex.ReadOnlyError("You can't write against a read only replica."), "READONLY"),
    (rex.MasterDownError("Link with MASTER is down and replica-serve-stale-data is set to 'no'."), "MASTERDOWN"),
    (rex.BusyLoadingError("Redis is loading the dataset in memory"), "LOADING"),
    (rex.ResponseError("UNBLOCKED force unblock from blocking operation, instance state changed"), "UNBLOCKED"),
    (rex.ResponseError("BUSY Redis is busy running a script."), "BUSY"),
    (rex.ResponseError("MISCONF Errors writing to the AOF file: No space left on device"), "MISCONF"),
    (rex.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), "WRONGTYPE"),
    (rex.ResponseError("wrong number of arguments for 'get' command"), "ERR"),
    (rex.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."), "unreachable"),
    (rex.TimeoutError("Timeout reading from socket"), "timeout"),
    (ConnectionRefusedError(111, "Connection refused"), "unreachable"),
])
def test_the_kind_of_an_error_reply_is_its_code(error: Exception, kind: str) -> None:
    assert error_kind(error) == kind


def test_a_broker_error_wrapped_by_kombu_is_read_through() -> None:
    try:
        try:
            raise rex.OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")
        except redis.RedisError as e:
            raise OperationalError(str(e)) from e
    except OperationalError as wrapped:
        assert error_kind(wrapped) == "OOM" and is_full(wrapped)
    assert not is_full(rex.ReadOnlyError("replica"))


def test_the_throttle_lets_one_line_per_kind_and_interval_through() -> None:
    throttle = Throttle(every_s=60)
    assert throttle.allow("sweep_failed", "OOM") == 0
    assert throttle.allow("sweep_failed", "OOM") is None
    assert throttle.allow("sweep_failed", "OOM") is None
    assert throttle.allow("sweep_failed", "READONLY") == 0  # another kind is its own line
    assert throttle.allow("ledger_write_failed", "OOM") == 0  # and another line
    throttle.every_s = 0  # the interval has passed: the next one says how many were left out
    assert throttle.allow("sweep_failed", "OOM") == 2


def test_the_log_line_names_the_kind_and_is_written_once_per_interval(capsys: pytest.CaptureFixture[str]) -> None:
    cgrid_logs.configure("INFO")
    error = rex.ResponseError("UNBLOCKED force unblock from blocking operation, instance state changed")
    written = [log_redis_error("test_line_unblocked", error, where="consume") for _ in range(50)]
    assert written == [True] + [False] * 49
    [line] = capsys.readouterr().out.strip().splitlines()
    record = json.loads(line)
    assert (record["event"], record["kind"], record["where"], record["repeats"]) == (
        "test_line_unblocked", "UNBLOCKED", "consume", 0)
    assert record["error"].startswith("UNBLOCKED force unblock")


@pytest.mark.parametrize("raw", ["0", "0.05", "1.5", "full", "-1"])
def test_a_bad_publishing_share_is_refused_naming_the_setting(raw: str) -> None:
    from cgrid.errors import ConfigError
    from cgrid.settings import Settings

    with pytest.raises(ConfigError, match="CGRID_PUBLISH_MAX_MEMORY_SHARE"):
        Settings.from_env({"CGRID_PUBLISH_MAX_MEMORY_SHARE": raw})
    assert Settings.from_env({}).publish_max_memory_share == 0.9
    assert Settings.from_env({"CGRID_PUBLISH_MAX_MEMORY_SHARE": "1"}).publish_max_memory_share == 1.0

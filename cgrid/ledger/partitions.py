"""The ledger over a Redis Cluster: events fall into a fixed number of partitions, each a
keyspace of its own (``P {tag}:ev:<id>``, ``P {tag}:due``, ...). Every key of a partition
shares the hash tag ``{tag}``, so each ledger script still touches one hash slot; the
partitions' tags are chosen so that their slots are spread evenly over the 16,384, and a
cluster whose primaries hold even slot ranges (as ``redis-cli --cluster create`` makes
them) holds an even share of the partitions.

An event's partition is a hash of its id, so every part of the fleet finds it without a
lookup; the number of partitions must therefore never change while events are open.
:class:`PartitionedLedger` has the :class:`~cgrid.ledger.ledger.Ledger` interface and routes
each call to the partitions it concerns.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, TypeVar

import redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from cgrid.errors import CgridError
from cgrid.event import Event
from cgrid.ledger.ledger import (
    PREFIX,
    Confirmation,
    Counter,
    Finish,
    Ledger,
    NotReplicated,
    Park,
    bucket_percentile,
    new_claim_token,
)
from cgrid.routing import DELIVER_QUEUE, Routing
from cgrid.settings import Settings

# Fixed: events are mapped to partitions by their id. 12 divides evenly over 1, 2, 3, 4, 6
# or 12 primaries.
CLUSTER_PARTITIONS = 12
PULL_TOKENS_KEPT = 1000  # recent pulls whose partition is remembered, for a pull sent again
T = TypeVar("T")


def partition_tags(n: int) -> list[str]:
    """For each of ``n`` partitions, the shortest tag whose hash slot falls in its own
    ``1/n`` of the slot range (so the partitions spread evenly over a cluster)."""
    tags: list[str] = []
    for index in range(n):
        low, high = index * REDIS_CLUSTER_HASH_SLOTS // n, (index + 1) * REDIS_CLUSTER_HASH_SLOTS // n
        for candidate in itertools.count():
            tag = f"p{candidate}"
            if low <= key_slot(tag.encode()) < high:
                tags.append(tag)
                break
    return tags


def partition_of(event_id: str, n: int) -> int:
    return zlib.crc32(event_id.encode("utf-8", "surrogatepass")) % n


class Partition(Ledger):
    """One partition's keyspace: a ledger whose keys all carry the hash tag ``{tag}``."""

    def __init__(self, client: redis.Redis, tag: str, **options: Any) -> None:
        super().__init__(client, **options)
        self.tag = tag


class PartitionedLedger(Ledger):
    """The ledger spread over ``partitions`` keyspaces (one Ledger each), on one client."""

    def __init__(self, client: redis.Redis, *, partitions: int = CLUSTER_PARTITIONS, prefix: str = PREFIX,
                 wait_replicas: int = 0, wait_timeout_ms: int = 1000) -> None:
        super().__init__(client, prefix=prefix, wait_replicas=wait_replicas, wait_timeout_ms=wait_timeout_ms)
        self.parts = [Partition(client, tag, prefix=f"{prefix}{{{tag}}}:", wait_replicas=wait_replicas,
                                wait_timeout_ms=wait_timeout_ms) for tag in partition_tags(partitions)]
        self._next_pull: dict[str, int] = {}  # buyer -> the partition its next pull starts at
        self._pulled_from: dict[str, int] = {}  # a recent pull's token -> its partition

    @property
    def replica_shortfalls(self) -> int:  # type: ignore[override]
        return sum(part.replica_shortfalls for part in getattr(self, "parts", []))

    @replica_shortfalls.setter
    def replica_shortfalls(self, value: int) -> None:
        pass  # counted per partition

    @property
    def keyspaces(self) -> list[tuple[str, str]]:
        return [(part.prefix, part.tag) for part in self.parts]

    def partition_of(self, event_id: str) -> int:
        return partition_of(event_id, len(self.parts))

    def _split(self, items: Iterable[T], id_of: Any) -> dict[int, list[tuple[int, T]]]:
        """Items by partition, each with its position in the input."""
        groups: dict[int, list[tuple[int, T]]] = {}
        for position, item in enumerate(items):
            groups.setdefault(self.partition_of(id_of(item)), []).append((position, item))
        return groups

    def accept(self, events: list[Event], *, ledger_ttl_s: int, report_ttl_s: int,
               redeliver_after_s: float, max_memory_share: float = 1.0, shared_queue: str = "",
               trigger: list[bool] | None = None) -> tuple[float, list[bool]]:
        """As :meth:`Ledger.accept`; the time is the latest of the partitions' (a publisher
        batches per partition, so there is one, and a shared trigger names it). ``trigger``
        receives True if any partition asks for a shared trigger."""
        flags = [False] * len(events)
        now_s = 0.0
        sends: list[bool] = []
        for index, group in self._split(events, lambda e: e.id).items():
            part_now, part_flags = self.parts[index].accept(
                [e for _, e in group], ledger_ttl_s=ledger_ttl_s, report_ttl_s=report_ttl_s,
                redeliver_after_s=redeliver_after_s, max_memory_share=max_memory_share,
                shared_queue=shared_queue, trigger=sends)
            now_s = max(now_s, part_now)
            for (position, _), flag in zip(group, part_flags, strict=True):
                flags[position] = flag
        if trigger is not None:
            trigger.append(any(sends))
        return now_s, flags

    def claim(self, ids: list[str], attempt: int, *, lease_s: float, sent_at_s: float,
              parked_buyers: list[str] | None = None, queue: str = DELIVER_QUEUE,
              stamp: list[str] | None = None, token: str = "") -> list[tuple[str, str]]:
        """As :meth:`Ledger.claim`: one claim script per partition the ids fall in (a
        trigger carries the ids of one: publisher and sweeper batch so), all with one token."""
        token = token or new_claim_token()
        claimed: list[tuple[str, str]] = []
        stamps: list[str] = []
        found: list[str] = []
        for index, group in self._split(ids, lambda i: i).items():
            claimed += self.parts[index].claim([i for _, i in group], attempt, lease_s=lease_s, sent_at_s=sent_at_s,
                                               parked_buyers=found, queue=queue, stamp=stamps, token=token)
        if parked_buyers is not None:
            parked_buyers += [b for b in dict.fromkeys(found) if b not in parked_buyers]
        if stamp is not None and stamps:
            stamp.append(stamps[0])
        return claimed

    def claim_shared(self, queue: str, partition: int, take: int, *, lease_s: float, sent_at_s: float,
                     parked_buyers: list[str] | None = None, stamp: list[str] | None = None, token: str = "",
                     left: list[int] | None = None, again: bool = False) -> list[tuple[str, str]]:
        """As :meth:`Ledger.claim_shared`, from the pending list of ``partition``."""
        if not 0 <= partition < len(self.parts):
            raise CgridError(f"partition: this ledger has {len(self.parts)}, not {partition + 1}")
        return self.parts[partition].claim_shared(queue, 0, take, lease_s=lease_s, sent_at_s=sent_at_s,
                                                  parked_buyers=parked_buyers, stamp=stamp, token=token, left=left,
                                                  again=again)

    def finish(self, results: list[Finish], attempt: int, *, ledger_ttl_s: int, report_ttl_s: int,
               retry_delay_s: float) -> list[str]:
        """As :meth:`Ledger.finish`, per partition; if any partition's replica did not hold
        its outcomes, raises :class:`NotReplicated` with all the states (and no one node:
        :meth:`confirm` writes them again wherever they belong, which changes nothing where
        they are)."""
        states = [""] * len(results)
        unreplicated: NotReplicated | None = None
        for index, group in self._split(results, lambda r: r.event_id).items():
            try:
                part_states = self.parts[index].finish([r for _, r in group], attempt, ledger_ttl_s=ledger_ttl_s,
                                                       report_ttl_s=report_ttl_s, retry_delay_s=retry_delay_s)
            except NotReplicated as e:
                part_states, unreplicated = e.result, e
            for (position, _), state in zip(group, part_states, strict=True):
                states[position] = state
        if unreplicated is not None:
            raise NotReplicated(str(unreplicated), states)
        return states

    def park(self, parks: list[Park]) -> list[bool]:
        """As :meth:`Ledger.park`, per partition; raises as :meth:`finish` does."""
        done = [False] * len(parks)
        unreplicated: NotReplicated | None = None
        for index, group in self._split(parks, lambda p: p.event_id).items():
            try:
                flags = self.parts[index].park([p for _, p in group])
            except NotReplicated as e:
                flags, unreplicated = e.result, e
            for (position, _), flag in zip(group, flags, strict=True):
                done[position] = flag
        if unreplicated is not None:
            raise NotReplicated(str(unreplicated), done)
        return done

    def confirm(self, outcomes: list[tuple[int, Finish | Park, str]], *, ledger_ttl_s: int, report_ttl_s: int,
                retry_delay_s: float) -> Confirmation:
        """As :meth:`Ledger.confirm`, each partition's outcomes on its own node; held when
        every partition's are."""
        found = [self.parts[index].confirm([o for _, o in group], ledger_ttl_s=ledger_ttl_s,
                                           report_ttl_s=report_ttl_s, retry_delay_s=retry_delay_s)
                 for index, group in self._split(outcomes, lambda o: o[1].event_id).items()]
        return Confirmation(all(c.held for c in found), sum(c.rewritten for c in found), "",
                            soon=any(c.soon for c in found))

    def parked_counts(self, buyer: str) -> list[int]:
        """How many of the buyer's events each partition holds parked."""
        pipe = self.client.pipeline(transaction=False)
        for part in self.parts:
            pipe.zcard(f"{part.prefix}parked:{buyer}")
        return [int(count) for count in pipe.execute()]

    def pull(self, buyer: str, k: int, *, lease_s: float, stamp: list[str] | None = None,
             token: str = "") -> tuple[int, list[tuple[int, str, str]]]:
        """As :meth:`Ledger.pull`, from one partition per call: the next, in turn, that holds
        the buyer's parked events (oldest first within it). Returns how many stay parked in
        all partitions. A pull sent again with its token goes to the same partition."""
        counts = self.parked_counts(buyer)
        index = self._pulled_from.get(token) if token else None
        if index is None:
            start = self._next_pull.get(buyer, 0)
            holding = [i for i in ((start + step) % len(self.parts) for step in range(len(self.parts)))
                       if counts[i] > 0]
            if not holding:
                return 0, []
            index = holding[0]
            self._next_pull[buyer] = (index + 1) % len(self.parts)
            if token:
                self._pulled_from[token] = index
                while len(self._pulled_from) > PULL_TOKENS_KEPT:
                    del self._pulled_from[next(iter(self._pulled_from))]
        counts[index], items = self.parts[index].pull(buyer, k, lease_s=lease_s, stamp=stamp, token=token)
        return sum(counts), items

    def sweep(self, *, limit: int, redeliver_after_s: float, retry_delay_s: float, report_ttl_s: int,
              routing: Routing, revive_after_s: float = 10.0, revive_batch: int = 10, ledger_ttl_s: int = 2700,
              paused: Mapping[str, float] | None = None, retry_delays: Mapping[str, float] | None = None,
              empty_queues: Collection[str] = ()) -> tuple[float, dict[str, list[str]], dict[str, list[str]]]:
        """Every partition's sweep; the ids to send, per queue, keep their partitions apart
        in order (the sweeper batches them per partition)."""
        now_s = 0.0
        first: dict[str, list[str]] = {}
        second: dict[str, list[str]] = {}
        for part in self.parts:
            part_now, part_first, part_second = part.sweep(
                limit=limit, redeliver_after_s=redeliver_after_s, retry_delay_s=retry_delay_s,
                report_ttl_s=report_ttl_s, routing=routing, revive_after_s=revive_after_s,
                revive_batch=revive_batch, ledger_ttl_s=ledger_ttl_s, paused=paused, retry_delays=retry_delays,
                empty_queues=empty_queues)
            now_s = max(now_s, part_now)
            for out, sends in ((first, part_first), (second, part_second)):
                for queue, ids in sends.items():
                    out.setdefault(queue, []).extend(ids)
        return now_s, first, second

    def record(self, event_id: str) -> dict[str, Any] | None:
        return self.parts[self.partition_of(event_id)].record(event_id)

    def failed_ids(self, day: str, buyer: str) -> list[str]:
        return sorted(i for part in self.parts for i in part.failed_ids(day, buyer))

    def note_replay(self, event_id: str, replay_id: str) -> None:
        self.parts[self.partition_of(event_id)].note_replay(event_id, replay_id)

    def open_events(self) -> dict[str, int]:
        total = {"nurl": 0, "burl": 0}
        for part in self.parts:
            for kind, count in part.open_events().items():
                total[kind] += count
        return total

    def backlog(self) -> tuple[int, dict[str, int]]:
        due_total = 0
        parked_total: dict[str, int] = {}
        for part in self.parts:
            due, parked = part.backlog()
            due_total += due
            for buyer, count in parked.items():
                parked_total[buyer] = parked_total.get(buyer, 0) + count
        return due_total, parked_total

    def archive_backlog(self) -> tuple[int, float] | None:
        """Summed over the partitions' streams; the oldest is the oldest of any."""
        found = [b for b in (part.archive_backlog() for part in self.parts) if b is not None]
        if not found:
            return None
        return sum(length for length, _ in found), max(oldest for _, oldest in found)

    def memory(self) -> tuple[int, int]:
        """Of the primary nearest its ``maxmemory`` (it refuses new events first): its used
        memory and its ``maxmemory``."""
        nodes = {id(client): client for client in (part._node_client() for part in self.parts)}
        figures = [(int(info["used_memory"]), int(info.get("maxmemory", 0)))
                   for info in (client.info("memory") for client in nodes.values())]
        return max(figures, key=lambda f: f[0] / f[1] if f[1] else 0.0)

    def report(self, days: int | None = None, *, day: str | None = None,
               buyer: str | None = None, with_buckets: bool = False) -> list[dict[str, Any]]:
        """The partitions' counters summed per day and buyer (latency percentiles from the
        summed buckets)."""
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        buckets: dict[tuple[str, str], dict[str, int]] = {}
        for part in self.parts:
            for row in part.report(days, day=day, buyer=buyer, with_buckets=True):
                key = (row["day"], row["buyer"])
                zero = {"day": row["day"], "buyer": row["buyer"], **{c.value: 0 for c in Counter}}
                total = rows.setdefault(key, zero)
                for counter in Counter:
                    total[counter.value] += row[counter.value]
                for bound, count in row.pop("buckets", {}).items():
                    buckets.setdefault(key, {})[bound] = buckets.get(key, {}).get(bound, 0) + count
        newest = sorted({d for d, _ in rows}, reverse=True)[:days] if days is not None else None
        out: list[dict[str, Any]] = []
        for key in sorted(rows, key=lambda k: (-_day_number(k[0]), k[1])):
            if newest is not None and key[0] not in newest:
                continue
            row = rows[key]
            row["calls_timed"] = sum(buckets.get(key, {}).values())
            row["p50_ms"] = bucket_percentile(buckets.get(key, {}), 0.50)
            row["p99_ms"] = bucket_percentile(buckets.get(key, {}), 0.99)
            if with_buckets:
                row["buckets"] = buckets.get(key, {})
            out.append(row)
        return out


def _day_number(day: str) -> int:
    digits = day.replace("-", "")
    return int(digits) if digits.isdigit() else 0


def ledger_for(settings: Settings, client: redis.Redis,
               primary_check: Callable[[], tuple[str, bool]] | None = None) -> Ledger:
    """The ledger these settings name, on ``client``: one keyspace, or with
    ``CGRID_REDIS_CLUSTER`` the partitions spread over the cluster's primaries.
    ``primary_check``: with Sentinel, what the sentinels say of the primary (Ledger)."""
    if settings.redis_cluster:
        return PartitionedLedger(client, wait_replicas=settings.redis_wait_replicas,
                                 wait_timeout_ms=settings.redis_wait_timeout_ms)
    return Ledger(client, wait_replicas=settings.redis_wait_replicas, wait_timeout_ms=settings.redis_wait_timeout_ms,
                  primary_check=primary_check)

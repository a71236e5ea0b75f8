"""Which broker queue a trigger goes to (docs/hosts.md).

First attempts go to the deliver queue (``cgrid.deliver``), retries to the retry queue
(``CGRID_RETRY_QUEUE``, ``cgrid.retry``). A buyer named in ``CGRID_BUYER_QUEUES`` belongs to a
group with a queue of its own: its first attempts go to that queue, its retries to that
queue's name plus ``.retry``, so a group's calls — retries included — are made only by the
workers that consume the group's queues. Workers dedicate themselves with Celery's ``-Q``;
a worker without ``-Q`` consumes every queue named here (cgrid.broker.make_celery).

The queue decides nothing about attempts: the ledger's claim does, so a trigger taken by any
worker from any queue can only start the attempt that is due.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cgrid.errors import ConfigError

DELIVER_QUEUE = "cgrid.deliver"
RETRY_QUEUE = "cgrid.retry"
RETRY_SUFFIX = ".retry"
# Letters, digits, '.', '_' and '-': safe as a Redis key, in -Q lists (comma-separated), in
# Prometheus labels and in shells; never the ledger's ``cgrid:`` prefix (no ':').
QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_queue_name(name: str, setting: str) -> str:
    if not QUEUE_NAME.fullmatch(name):
        raise ConfigError(
            f"{setting}: {name!r} is not a queue name (1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit)"
        )
    return name


@dataclass(frozen=True)
class Routing:
    """The queues of the fleet and which one each trigger goes to."""

    deliver_queue: str = DELIVER_QUEUE
    retry_queue: str = RETRY_QUEUE
    # (group queue, its buyers), in the order given.
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    _first: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)
    _retry: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for queue, buyers in self.groups:
            for buyer in buyers:
                self._first[buyer] = queue
                self._retry[buyer] = queue + RETRY_SUFFIX

    def queue_for(self, buyer: str | None, attempt_n: int) -> str:
        """The queue of a trigger for attempt ``attempt_n`` of an event of ``buyer``."""
        if attempt_n == 1:
            return self._first.get(buyer, self.deliver_queue) if buyer else self.deliver_queue
        return self._retry.get(buyer, self.retry_queue) if buyer else self.retry_queue

    @property
    def grouped(self) -> bool:
        return bool(self.groups)

    @property
    def buyer_queues(self) -> dict[str, tuple[str, str]]:
        """Per grouped buyer: its first-attempt queue and its retry queue."""
        return {buyer: (queue, self._retry[buyer]) for buyer, queue in self._first.items()}

    @property
    def queues(self) -> tuple[str, ...]:
        """Every queue, deliver and retry first: what a worker without ``-Q`` consumes."""
        names = [self.deliver_queue, self.retry_queue]
        for queue, _ in self.groups:
            names += [queue, queue + RETRY_SUFFIX]
        return tuple(dict.fromkeys(names))


def parse_buyer_queues(raw: str, name: str = "CGRID_BUYER_QUEUES") -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``cgrid.big=dsp-a,dsp-b;cgrid.slow=dsp-c`` into ((queue, (buyers...)), ...)."""
    groups: list[tuple[str, tuple[str, ...]]] = []
    owner: dict[str, str] = {}
    for part in raw.split(";"):
        part = part.strip()
        if not part:
            continue
        queue, sep, listed = part.partition("=")
        queue = queue.strip()
        if not sep:
            raise ConfigError(f"{name}: {part!r} is not QUEUE=BUYER,BUYER (groups are separated by ';')")
        check_queue_name(queue, name)
        if any(queue == other for other, _ in groups):
            raise ConfigError(f"{name}: queue {queue!r} is named twice")
        buyers = tuple(b.strip() for b in listed.split(",") if b.strip())
        if not buyers:
            raise ConfigError(f"{name}: queue {queue!r} has no buyers")
        for buyer in buyers:
            if buyer == "-":
                raise ConfigError(f"{name}: '-' is not a buyer (the ledger's name for events without one)")
            if buyer in owner:
                where = "twice in" if owner[buyer] == queue else f"in both {owner[buyer]!r} and"
                raise ConfigError(f"{name}: buyer {buyer!r} is {where} {queue!r}: a buyer belongs to one queue")
            owner[buyer] = queue
        groups.append((queue, buyers))
    return tuple(groups)


def check_routing(routing: Routing) -> None:
    """Refuse queue names that collide: every queue must carry one kind of trigger."""
    check_queue_name(routing.deliver_queue, "deliver queue")
    check_queue_name(routing.retry_queue, "CGRID_RETRY_QUEUE")
    if routing.retry_queue == routing.deliver_queue:
        raise ConfigError(f"CGRID_RETRY_QUEUE: {routing.retry_queue!r} is the deliver queue; name another one")
    taken = {routing.deliver_queue: "the deliver queue", routing.retry_queue: "CGRID_RETRY_QUEUE"}
    for queue, _ in routing.groups:
        for own, what in ((queue, f"the queue of group {queue!r}"),
                          (queue + RETRY_SUFFIX, f"the retry queue of group {queue!r}")):
            if own in taken:
                raise ConfigError(f"CGRID_BUYER_QUEUES: {own!r} would be both {taken[own]} and {what}")
            taken[own] = what
        if len(queue + RETRY_SUFFIX) > 100:
            raise ConfigError(f"CGRID_BUYER_QUEUES: {queue!r} is too long for its retry queue "
                              f"{queue + RETRY_SUFFIX!r} (at most 100 characters)")

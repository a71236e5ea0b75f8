"""Replay: after a buyer's outage, send its ``failed`` events again, with its consent, and
its ``expired`` ones (never called: the buyer was down or paused past their maximum age).

Each such event is published as a new event ``<id>:replay<n>`` (n = 1 the first time),
with the original's fields and ``created_at`` now: it has its own call and its own one
retry, and the original keeps its record (``status`` lists its replays). The new id is
derived, and publishing an id the ledger holds is a no-op, so running the same replay twice
sends nothing the second time; ``again=True`` makes a further replay (n = 2, 3, ...).
That guard lasts as long as the replay's record is in the ledger (``CGRID_LEDGER_TTL_S``).

Events past the ledger's window are replayed from their archive lines
(``cgrid-s2s replay --archive FILE``): a failed or expired event's line keeps its URL and macros.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from cgrid.errors import InvalidEvent
from cgrid.event import ID_MAX_CHARS, Event, parse_event
from cgrid.ledger import State
from producer.publisher import Publisher

MAX_REPLAYS = 100


@dataclass(frozen=True)
class Replayed:
    original: str
    replay_id: str | None  # None: not replayed, see ``note``
    note: str = ""


def replay_id_for(publisher: Publisher, event_id: str, again: bool) -> tuple[str | None, str]:
    """The id the replay gets: ``<id>:replay1``, or the next free one with ``again``."""
    ledger = publisher.ledger
    for n in range(1, MAX_REPLAYS + 1):
        candidate = f"{event_id}:replay{n}"
        if len(candidate) > ID_MAX_CHARS:
            return None, f"{candidate!r} would be longer than {ID_MAX_CHARS} characters"
        if ledger.record(candidate) is None:
            return candidate, ""
        if not again:
            return None, f"already replayed as {candidate} (use --again for another replay)"
    return None, f"replayed {MAX_REPLAYS} times already"


def replay(publisher: Publisher, event_ids: list[str], *, again: bool = False,
           archived: Mapping[str, dict[str, Any]] | None = None) -> list[Replayed]:
    """Publish a replay of each failed or expired event; returns what happened to each id. Every replay
    is accepted (flushed) before this returns. ``archived``: archive lines by event id, for
    events no longer in the ledger (a failed or expired event's line keeps its URL and macros)."""
    ledger = publisher.ledger
    done: list[Replayed] = []
    in_ledger: set[str] = set()
    for event_id in event_ids:
        record = ledger.record(event_id)
        if record is not None:
            in_ledger.add(event_id)
        elif archived is not None and event_id in archived:
            record = archived[event_id]
        else:
            done.append(Replayed(event_id, None, "unknown id (or past CGRID_LEDGER_TTL_S: replay it from the "
                                                 "archive with --archive FILE)"))
            continue
        if record["state"] not in (State.FAILED, State.EXPIRED):
            done.append(Replayed(event_id, None, f"not failed or expired: {record['state']}"))
            continue
        new_id, note = replay_id_for(publisher, event_id, again)
        if new_id is None:
            done.append(Replayed(event_id, None, note))
            continue
        try:
            # Validated without its id (which may itself be a replay's), then given the
            # replay id: upstream may not publish ids of that form (cgrid/event.py).
            original = {key: value for key, value in record["event"].items() if key != "id"}
            event: Event = replace(parse_event({**original, "created_at": time.time()}), id=new_id)
        except (InvalidEvent, TypeError, AttributeError) as e:
            done.append(Replayed(event_id, None, f"its record cannot be replayed: {e}"))
            continue
        publisher.publish(event)
        done.append(Replayed(event_id, new_id))
    publisher.flush()
    for item in done:
        if item.replay_id is not None and item.original in in_ledger:
            ledger.note_replay(item.original, item.replay_id)
    return done

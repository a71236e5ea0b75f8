"""Delivering one event: macros, headers, the guarded call, classification.

Plain functions, free of Celery and Redis, so the rules are testable on their own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from cgrid.errors import InvalidEvent
from cgrid.event import Event
from cgrid.ledger import NO_BUYER, Finish, Outcome, day_of, delivered_line_parts
from delivery.classify import ErrorClass, classify_status
from delivery.headers import build_headers
from delivery.http_client import CallResult, ClientConfig, call_result


# Not frozen: one is made per call, and a frozen dataclass's __init__ costs three times as much
# (object.__setattr__ per field). Nothing changes one once made.
@dataclass(slots=True)
class Attempt:
    """One attempt at calling the buyer, or the decision not to call (``rejected``)."""

    n: int
    outcome: Outcome
    started_at_s: float
    duration_ms: float
    status: int | None = None
    error: ErrorClass | None = None
    reason: str = ""

    @property
    def called(self) -> bool:
        return self.outcome not in (Outcome.REJECTED, Outcome.EXPIRED)

    def to_json(self) -> str:
        """The attempt as the ledger keeps it. Written by hand: every value is a number, null
        or an error-class name, and json.dumps cost a twentieth of a worker's CPU here."""
        status = "null" if self.status is None else str(int(self.status))
        error = "null" if self.error is None else f'"{self.error.value}"'
        flag = ',"unexpected_status":true' if self.outcome is Outcome.UNEXPECTED else ""
        return (f'{{"n":{self.n},"started_at":{self.started_at_s:.6f},"ms":{self.duration_ms:.3f},'
                f'"status":{status},"error":{error}{flag}}}')

    def to_finish(self, event_id: str, retry_delay_s: float | None = None, event: Event | None = None,
                  claim_token: str = "") -> Finish:
        # A failed first attempt is not final (its retry is scheduled); anything else is,
        # and the final record is made here, off Redis's CPU.
        final = line_parts = ""
        attempt_json = self.to_json() if self.called else ""
        if event is not None and not (self.outcome is Outcome.FAIL and self.n == 1):
            final = event.to_final_json(keep_call=self.outcome in (Outcome.FAIL, Outcome.EXPIRED))
            if self.n == 1 and self.outcome in (Outcome.OK, Outcome.UNEXPECTED):
                # Its archive line too: the script adds it to the archive as it is.
                line_parts = delivered_line_parts(event_id, day_of(event.created_at_s), event.buyer or NO_BUYER,
                                                  event.kind.value, attempt_json, final)
        return Finish(
            event_id=event_id,
            outcome=self.outcome,
            attempt_json=attempt_json,
            reason=self.reason,
            retry_delay_s=retry_delay_s,
            duration_ms=self.duration_ms if self.called else None,
            final_event=final,
            line_parts=line_parts,
            claim_token=claim_token,
        )


def attempt_from(result: CallResult, attempt_n: int, started_at_s: float, duration_ms: float) -> Attempt:
    """The attempt a finished call makes: an answer classified, a failure, or a refusal."""
    if result.status is not None:
        return Attempt(attempt_n, classify_status(result.status), started_at_s, duration_ms, status=result.status)
    if result.refused or result.invalid:
        return Attempt(attempt_n, Outcome.REJECTED, started_at_s, duration_ms,
                       reason=result.refused or result.invalid)
    return Attempt(attempt_n, Outcome.FAIL, started_at_s, duration_ms, error=result.error)


def deliver(event: Event, client: ClientConfig, *, attempt_n: int, timeout_s: float) -> Attempt:
    """Make attempt ``attempt_n`` of the event's s2s call, blocking, and classify the answer
    (the engine makes the same call on its multi loop)."""
    started_at_s = time.time()
    started = time.perf_counter()
    try:
        url, headers = event.target_url(), build_headers(event)
    except InvalidEvent as e:
        return Attempt(attempt_n, Outcome.REJECTED, started_at_s, 0.0, reason=str(e))
    result = call_result(client, url, headers, timeout_s)
    return attempt_from(result, attempt_n, started_at_s, (time.perf_counter() - started) * 1000)


def expired(event: Event, attempt_n: int, max_age_s: float, now_s: float | None = None) -> Attempt | None:
    """An ``expired`` decision when the event is too old to be worth calling."""
    now_s = time.time() if now_s is None else now_s
    age_s = now_s - event.created_at_s
    if age_s <= max_age_s:
        return None
    return Attempt(
        attempt_n, Outcome.EXPIRED, now_s, 0.0,
        reason=f"created {age_s:.0f}s ago, past its maximum age of {max_age_s:g}s "
               "(CGRID_EVENT_MAX_AGE_S, or the buyer's max_age_s)",
    )

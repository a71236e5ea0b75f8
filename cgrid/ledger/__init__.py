"""The ledger: every accepted event's state and attempts in Redis (``ledger.py`` holds the
key layout and the typed API; ``scripts/`` one Lua file per operation)."""

from cgrid.ledger.ledger import (
    ARCHIVE_FORMAT_KEY,
    ARCHIVE_LINES_FORMAT,
    CLAIM_WAIT_BACKOFF_S,
    LATENCY_BUCKETS_MS,
    NO_BUYER,
    POISON_COUNT_KEY,
    POISON_LIST_KEY,
    PREFIX,
    SHARED_LEASES,
    TERMINAL_STATES,
    WAIT_DETAILS,
    Counter,
    Finish,
    Ledger,
    NotReplicated,
    Outcome,
    Park,
    State,
    WaitReason,
    bucket_percentile,
    day_of,
    delivered_line_parts,
    json_or_raw,
    latency_bucket,
    leased_ids,
    new_claim_token,
)

__all__ = [
    "ARCHIVE_FORMAT_KEY", "ARCHIVE_LINES_FORMAT", "CLAIM_WAIT_BACKOFF_S", "LATENCY_BUCKETS_MS", "NO_BUYER",
    "POISON_COUNT_KEY", "POISON_LIST_KEY", "PREFIX", "SHARED_LEASES", "TERMINAL_STATES", "WAIT_DETAILS", "Counter",
    "Finish", "Ledger", "NotReplicated", "Outcome", "Park", "State", "WaitReason", "bucket_percentile", "day_of",
    "delivered_line_parts", "json_or_raw", "latency_bucket", "leased_ids", "new_claim_token",
]

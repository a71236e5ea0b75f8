"""Buyer isolation (issue 8, bench/isolation.py): a buyer that hangs on every call does not
slow the other buyers down, leaves none of their events uncalled, and none of its own
events is called more than twice.

Short phases and loose bounds, so a slow two-core machine cannot flake: the issue's bound is
tighter (a raise of the healthy p99 publish→call of at most 250 ms, or of their p99 alone if
larger); ``python -m bench.isolation`` measures it with 15 s phases and prints the figure.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.isolation import run_isolation

pytestmark = pytest.mark.integration

LOOSE_RAISE_MS = 1000.0  # the issue says 250 ms (or p99 alone, if larger); see the docstring


def test_a_dead_buyer_does_not_hold_up_the_others(redis_url: str, tmp_path: Path) -> None:
    # A 1 s retry delay puts the dead buyer's retries (its second calls) inside the phase,
    # so "never more than two calls" is tested, not only "one call so far".
    r = run_isolation(redis_url, tmp_path, rate=300, dead_share=0.3, phase_s=6.0, processes=2,
                      extra_env={"CGRID_RETRY_DELAY_S": "1"})
    alone, beside, dead = r["alone"], r["beside_dead"], r["dead"]
    summary = (f"alone p50/p99 {alone['p50_ms']}/{alone['p99_ms']} ms, beside the dead buyer "
               f"{beside['p50_ms']}/{beside['p99_ms']} ms; dead buyer {dead}; log {r['worker_log_trouble']}")

    assert alone["uncalled"] == 0, summary
    assert beside["uncalled"] == 0, summary  # none of the healthy buyers' events left uncalled
    assert beside["p99_ms"] <= alone["p99_ms"] + LOOSE_RAISE_MS, summary

    # The scenario did happen: the dead buyer was called, ran its calls into the deadline,
    # and its lane narrowed, so the rest of its events waited parked in Redis.
    assert dead["events_called"] > 0, summary
    assert dead["at_end_of_phase"]["by_state"].get("pending/parked_lane_full", 0) > 0, summary
    assert set(dead["after_stop"]["first_attempt_outcomes"]) == {"timeout"}, summary

    # At most two calls per event, and every call the buyer received is an attempt in the ledger.
    assert dead["max_calls_per_event"] <= 2, summary
    assert dead["calls_beyond_ledger"] == 0, summary
    assert dead["unknown_calls"] == 0, summary

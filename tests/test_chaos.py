"""The fault-injection suite in its short form (the long one is ``make chaos``)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.chaos import print_result, run_chaos

pytestmark = pytest.mark.integration


def test_short_chaos_run_loses_nothing_and_calls_nothing_three_times(tmp_path: Path) -> None:
    seed = random.randrange(1_000_000)
    result = run_chaos(events=800, seconds=16, workers=3, seed=seed, workdir=tmp_path)
    print_result(result)
    assert result["events"] == 800
    assert result["worker_group_kills"] + result["worker_child_kills"] >= 3
    assert (result["redis_restarts"], result["buyer_outages"], result["warm_shutdowns"]) == (1, 1, 1)
    assert result["redis_full_phases"] == 1
    assert result["lost"] == 0, result["examples"]
    assert result["over_called"] == 0, result["examples"]
    assert result["success_retried"] == 0 and result["violations"] == 0, result["examples"]
    assert result["workers_exited"] == 0 and result["unrecoverable_errors"] == 0, result["examples"]
    assert result["poisoned_messages"] == 0

"""Status classes (SPEC §4)."""

from __future__ import annotations

import pytest

from cgrid.ledger import Outcome
from delivery.classify import classify_status


@pytest.mark.parametrize("status", [200, 204, 301, 302, 303, 304, 307, 308])
def test_success(status: int) -> None:
    assert classify_status(status) is Outcome.OK


@pytest.mark.parametrize("status", [201, 202, 203, 205, 206, 299])
def test_unexpected_but_not_failed(status: int) -> None:
    assert classify_status(status) is Outcome.UNEXPECTED


@pytest.mark.parametrize("status", [400, 401, 403, 404, 408, 429, 500, 502, 503, 504, 599,
                                    0, 100, 101, 103, 199])  # below 200: interim, not an answer
def test_failed(status: int) -> None:
    assert classify_status(status) is Outcome.FAIL

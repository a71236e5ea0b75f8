"""Per-process resources: settings, the ledger's Redis client and the delivery engine.
Built lazily in each process, after fork (libcurl's multi handle must never cross a fork)."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from cgrid.ledger import Ledger
from cgrid.ledger.partitions import ledger_for
from cgrid.redis_conn import long_lived_client, sentinel_primary
from cgrid.settings import Settings
from delivery.engine import DeliveryEngine
from worker.follow import ClaimRuns


@dataclass
class Runtime:
    settings: Settings
    ledger: Ledger
    pid: int
    _engine: DeliveryEngine | None = field(default=None, repr=False)
    claim_runs: ClaimRuns | None = field(default=None, repr=False)  # made at the first run (worker/batch.py)

    @property
    def engine(self) -> DeliveryEngine:
        if self._engine is None:
            with _lock:
                if self._engine is None:
                    self._engine = DeliveryEngine(self.settings, self.ledger)
        return self._engine

    def drain(self) -> bool:
        """Wait until the attempts this process claimed are made and recorded, at most their
        lease (which covers the longest deadline of any buyer, a buyer's own ``timeout_s``
        included); a process that never delivered has nothing to wait for. Its claim runs
        end first, their marks let go (the next publish sends a trigger another worker takes)."""
        if self.claim_runs is not None:
            self.claim_runs.stop()
        return self._engine is None or self._engine.drain(self._engine.lease_s)


_runtime: Runtime | None = None
_lock = threading.Lock()


def get_runtime(settings: Settings) -> Runtime:
    global _runtime
    if _runtime is None or _runtime.pid != os.getpid():
        with _lock:
            if _runtime is None or _runtime.pid != os.getpid():
                client = long_lived_client(settings)
                _runtime = Runtime(
                    settings=settings,
                    ledger=ledger_for(settings, client, primary_check=sentinel_primary(client)
                                      if settings.redis_url.startswith("sentinel://") else None),
                    pid=os.getpid(),
                )
    return _runtime


def current_runtime() -> Runtime | None:
    """This process's runtime, if it has made one (for shutdown)."""
    return _runtime if _runtime is not None and _runtime.pid == os.getpid() else None

"""Background threads whose operating-system name is their Python name, so that
``top -H``, ``ps -L`` and ``/proc/<pid>/task/<tid>/comm`` tell a worker's call loop, ledger
writer and sweeper apart (CPython 3.11 leaves every thread named after the process), and
``python -m bench.latency_parts`` can split a worker's CPU by thread."""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Callable

_PR_SET_NAME = 15
OS_NAME_MAX_BYTES = 15  # the kernel's limit (16 with the terminating NUL)


def _set_os_name(name: str) -> None:
    """Name the calling thread for the kernel (Linux); elsewhere, or if it fails, nothing.
    ``CDLL(None)`` is the process's own symbols, libc's ``prctl`` among them: no library
    search (``ctypes.util.find_library`` runs ``ldconfig`` in a subprocess)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).prctl(_PR_SET_NAME, name.encode("ascii", "replace")[:OS_NAME_MAX_BYTES], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def daemon_thread(target: Callable[[], object], name: str) -> threading.Thread:
    """A daemon thread (not started) running ``target``, named ``name`` in Python and, cut
    to 15 bytes, for the kernel."""
    def run() -> None:
        _set_os_name(name)
        target()

    return threading.Thread(target=run, name=name, daemon=True)

"""Background threads whose operating-system name is their Python name, so that
``top -H``, ``ps -L`` and ``/proc/<pid>/task/<tid>/comm`` tell a worker's call loop, ledger
writer and sweeper apart (CPython 3.11 leaves every thread named after the process), and
``python -m bench.latency_parts`` can split a worker's CPU by thread."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from collections.abc import Callable

_PR_SET_NAME = 15
OS_NAME_MAX_BYTES = 15  # the kernel's limit (16 with the terminating NUL)


def _set_os_name(name: str) -> None:
    """Name the calling thread for the kernel (Linux); elsewhere, or if it fails, nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode("ascii", "replace")[:OS_NAME_MAX_BYTES]), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def os_named(target: Callable[[], object], name: str) -> Callable[[], None]:
    """``target``, run by a thread that first gives itself ``name`` (cut to 15 bytes)."""
    def run() -> None:
        _set_os_name(name)
        target()

    return run


def daemon_thread(target: Callable[[], object], name: str) -> threading.Thread:
    """A daemon thread (not started) running ``target``, named ``name`` in Python and for
    the kernel."""
    return threading.Thread(target=os_named(target, name), name=name, daemon=True)

"""Background threads carry their name to the kernel (cgrid/threads.py)."""

from __future__ import annotations

import threading
from pathlib import Path

from cgrid.threads import daemon_thread


def test_a_daemon_thread_is_named_for_the_kernel_too() -> None:
    seen: list[str] = []
    done = threading.Event()

    def body() -> None:
        seen.append(Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip())
        done.set()

    thread = daemon_thread(body, "cgrid-a-long-thread-name")
    assert thread.daemon and thread.name == "cgrid-a-long-thread-name"
    thread.start()
    assert done.wait(5)
    assert seen == ["cgrid-a-long-th"]  # the kernel keeps 15 bytes

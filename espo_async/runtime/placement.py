"""Where a process runs and at what priority, thread by thread (Linux).

CPU affinity and niceness are per thread on Linux: ``sched_setaffinity(0)`` or ``setpriority``
on a pid changes that one thread, and threads already running (ZeroMQ's I/O threads, executor
threads, vLLM's workers) keep what they had. These helpers change every thread of a process;
threads started later inherit from the thread that starts them.
"""

from __future__ import annotations

import contextlib
import os


def thread_ids(pid: int | str = "self") -> list[int]:
    """Every thread of a process (``[pid]`` where /proc cannot tell)."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return [0 if pid == "self" else int(pid)]


def pin_process(cpus: set[int]) -> None:
    """Pin every thread of this process to ``cpus``."""
    for tid in thread_ids():
        with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
            os.sched_setaffinity(tid, cpus)


def renice(pids: list[int], increment: int) -> None:
    """Lower the priority of every thread of these processes by ``increment`` (at most to 19)."""
    for pid in pids:
        for tid in thread_ids(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))

"""Recycling (``recycle_after_messages``, ``recycle_above_memory_mb``): replacing a
process whose consumer code leaks, before it is a problem.

``watch`` runs in a greenlet of the process (runtime/generations.py starts it once
the first generation consumes) and reads what is counted anyway: the messages the
process's generations have settled, and its resident memory, read from /proc every
MEMORY_INTERVAL. It never touches the consume path. When a threshold is reached it
puts one ``("recycle", reason)`` event on the process's queue, and again every
RECYCLE_REPEAT seconds while the process still runs (a worker whose replacement
failed to start asks again). What a recycle is, is the process's: a single process
drains and exits EXIT_RECYCLE; a worker of ``--processes`` asks the arbiter, which
starts its replacement first (supervision/arbiter.py).

The message threshold has a jitter, +-JITTER of it, drawn once per process: workers
started together are not all recycled together (as gunicorn's max_requests_jitter).
The thresholds are read from the current config every round: a SIGHUP reload may
change them.
"""

from __future__ import annotations

import os
import random
import resource
from collections.abc import Callable
from typing import Any

import gevent
import gevent.queue

from ..config import Config

JITTER = 0.1
COUNT_INTERVAL = 0.1  # seconds between two looks at the message count
MEMORY_INTERVAL = 2.0  # ... at the resident memory
RECYCLE_REPEAT = 60.0  # a recycle not acted on is asked for again this often

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_mb() -> float:
    """This process's resident memory now, in MiB (its peak where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE / 2**20
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def jittered(messages: int, factor: float) -> int:
    return max(1, round(messages * factor))


def watch(config: Callable[[], Config], handled: Callable[[], int],
          events: gevent.queue.Queue[tuple[str, Any]]) -> None:
    """The recycling greenlet's body (see the module docstring)."""
    factor = random.uniform(1 - JITTER, 1 + JITTER)
    since_memory = MEMORY_INTERVAL
    while True:
        gevent.sleep(COUNT_INTERVAL)
        since_memory += COUNT_INTERVAL
        current = config()
        reason = None
        if current.recycle_after_messages is not None:
            threshold = jittered(current.recycle_after_messages, factor)
            count = handled()
            if count >= threshold:
                reason = (f"{count} messages handled (recycle_after_messages "
                          f"{current.recycle_after_messages}, {threshold} for this process "
                          "with its jitter)")
        if reason is None and current.recycle_above_memory_mb is not None \
                and since_memory >= MEMORY_INTERVAL:
            since_memory = 0.0
            resident = resident_mb()
            if resident > current.recycle_above_memory_mb:
                reason = (f"resident memory {resident:.0f} MiB above recycle_above_memory_mb "
                          f"({current.recycle_above_memory_mb:g})")
        if reason is not None:
            events.put(("recycle", reason))
            gevent.sleep(RECYCLE_REPEAT)

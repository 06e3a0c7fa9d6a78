"""An entry's ``rate_limit``: at most that many consume calls started per second.

Under ``--processes N`` each worker takes its share, ``rate_limit / N``
(runtime/generation.py). Starts are spaced evenly, 1/rate apart, whichever slot
takes the next delivery: no burst after an idle spell. A delivery waits for its
start in the slot that took it from the pool's queue; the deliveries behind it
wait in the prefetch window (the broker sends no more than ``prefetch_count``
unacked), so a prefetch of about one second's worth (``rate_limit / N``, at
least ``consumer_count``) keeps the slots fed without holding more than needed.

Only a pool with a rate limit runs the loop that asks the limiter
(pool.ConsumerPool._work_limited): the others pay nothing for it. A stop does not
wait for the limiter: the waiting delivery goes back to the queue.
"""

from __future__ import annotations

import time

import gevent.event


class RateLimiter:
    """Start times 1/rate apart, shared by the slots of one entry (one greenlet at a
    time asks: no lock)."""

    __slots__ = ("interval", "next", "stopping")

    def __init__(self, rate: float, stopping: gevent.event.Event) -> None:
        self.interval = 1.0 / rate
        self.next = 0.0  # time.monotonic() of the next start allowed
        self.stopping = stopping

    def wait(self) -> bool:
        """Wait for this call's start time; False if the pool started stopping first."""
        now = time.monotonic()
        start = max(now, self.next)
        self.next = start + self.interval
        if start > now and self.stopping.wait(start - now):
            return False
        return not self.stopping.is_set()

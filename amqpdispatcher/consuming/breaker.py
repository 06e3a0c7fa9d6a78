"""The circuit breaker of a consumer entry (its ``circuit_breaker:`` key): whether
too many of its calls failed lately, decided from what the entry counts anyway.

The decision reads the entry's EntryMetrics (outcomes.py): deliveries settled
(``handled()``) and consume calls failed (``failures``), sampled every
SAMPLE_INTERVAL by the generation's breaker greenlet (runtime/generation.py),
never on the consume path: an entry pays nothing per message for its breaker,
and an entry without one nothing at all. A sample keeps what was counted since
the previous one; the window is the samples of the last ``window`` seconds. The
breaker trips when at least ``min_calls`` deliveries were settled in the window
and at least ``failure_ratio`` of them failed.

Acting on a trip (cancelling the entry's consume, giving back what it had not
started, consuming again after ``open_for``) is the generation's: it owns the
channels. While open nothing is counted; when it closes again the window starts
empty: the same rule applies afresh.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import MutableSequence
from datetime import datetime, timezone

from ..config import CircuitBreakerConfig
from .outcomes import EntryMetrics

# Seconds between two samples of an entry's counts (at most; less for a short window,
# but never under MIN_SAMPLE_INTERVAL: a window of a millisecond must not spin the hub).
SAMPLE_INTERVAL = 1.0
MIN_SAMPLE_INTERVAL = 0.05


def sample_interval(window: float) -> float:
    return max(MIN_SAMPLE_INTERVAL, min(SAMPLE_INTERVAL, window / 10))


class CircuitBreaker:
    """One entry's breaker: its window of samples, whether it is open, its trips."""

    def __init__(self, config: CircuitBreakerConfig, metrics: EntryMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.samples: deque[tuple[float, int, int]] = deque()  # (when, settled, failed)
        self.last = (metrics.handled(), metrics.failures)
        self.open_until: float | None = None  # time.time() it closes, while open
        # Its trips: a list, or a view of the worker's count file (runtime/counts.py).
        self.trip_count: MutableSequence[int] = [0]

    @property
    def trips(self) -> int:
        return self.trip_count[0]

    @property
    def is_open(self) -> bool:
        return self.open_until is not None

    def sample(self, now: float) -> tuple[int, int] | None:
        """Record what was counted since the last sample (``now``: time.monotonic());
        if the breaker should trip, the (settled, failed) of the window, else None."""
        handled, failures = self.metrics.handled(), self.metrics.failures
        settled, failed = handled - self.last[0], failures - self.last[1]
        self.last = (handled, failures)
        if self.open_until is not None:
            return None
        samples = self.samples
        samples.append((now, settled, failed))
        while samples[0][0] <= now - self.config.window:
            samples.popleft()
        failed = sum(f for _, _, f in samples)
        # A failure is counted as its consume ends, its outcome once it is settled.
        settled = max(sum(s for _, s, _ in samples), failed)
        if settled >= self.config.min_calls and failed > 0 \
                and failed >= self.config.failure_ratio * settled:
            return settled, failed
        return None

    def trip(self) -> float:
        """Open it for ``open_for`` seconds; the time.time() it closes."""
        self.trip_count[0] += 1
        self.samples.clear()
        self.open_until = time.time() + self.config.open_for
        return self.open_until

    def close(self) -> None:
        """Consuming again: the window starts empty."""
        self.open_until = None
        self.samples.clear()
        self.last = (self.metrics.handled(), self.metrics.failures)

    def until_text(self) -> str:
        """When it closes, for the log and the stats line: a UTC time."""
        if self.open_until is None:
            return ""
        return datetime.fromtimestamp(self.open_until, timezone.utc).strftime(
            "%H:%M:%S UTC")

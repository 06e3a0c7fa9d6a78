"""What becomes of each delivery, decided where it is decided, and counted there.

The outcome names are the ``outcome`` label of ``amqp_dispatcher_messages_total`` and
the ``outcome`` field of JSON log lines. Each consumer entry has an EntryMetrics, fed
with a plain integer increment, no lock, no allocation, by the points of the flow
that decide:

- acks.Acknowledger counts every delivery's outcome (OUTCOMES) as the frame
  that settles it is sent, or DROPPED when it cannot be sent (the channel is
  gone: the broker redelivers). Plain acks are coalesced there and counted
  once per flush; the failure policy's retry and dead-letter acks carry their
  own outcome. Every delivery thus ends in exactly one outcome, also those
  given back unstarted when stopping (``requeue``) and those discarded with a
  closed channel (``dropped``, counted by pool.discard_waiting).
- pool.ConsumerPool counts failed consume calls and replaced instances, and,
  only when the ``http`` endpoint is on, each consume call's duration.

observability/metrics.py reads them at scrape time, and the stats line every
``stats_interval``.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import MutableSequence, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import ConsumerConfig

# The outcome label of amqp_dispatcher_messages_total; indexes into EntryMetrics.outcomes.
OUTCOMES = ("ack", "requeue", "reject", "retry", "dead_letter", "dropped")
ACK, REQUEUE, REJECT, RETRY, DEAD_LETTER, DROPPED = range(len(OUTCOMES))

# Upper bounds (seconds) of the consume duration histogram's buckets; +Inf follows.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 300.0)


class Durations:
    """A histogram of consume durations: a count per bucket, and the sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts: MutableSequence[int] = [0] * (len(DURATION_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # The first bucket whose upper bound is >= seconds (Prometheus' "le").
        self.counts[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.sum += seconds

    @staticmethod
    def total(many: Sequence[Durations]) -> Durations:
        """One histogram adding up several (entries sharing a series)."""
        result = Durations()
        for one in many:
            result.counts = [a + b for a, b in zip(result.counts, one.counts)]
            result.sum += one.sum
        return result


class SharedDurations(Durations):
    """Durations kept in a worker's count file (contracts/counts.py): ``counts`` and
    ``sums`` (one float) are views of its slots, holding what ``was`` holds."""

    __slots__ = ("sums",)

    def __init__(self, counts: MutableSequence[int], sums: MutableSequence[float],
                 was: Durations) -> None:
        counts[:] = array("q", was.counts) if isinstance(counts, memoryview) else was.counts
        sums[0] = was.sum
        self.counts = counts
        self.sums = sums

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.sums[0] += seconds

    @property
    def sum(self) -> float:  # type: ignore[override]
        return self.sums[0]


class EntryMetrics:
    """One consumer entry's counts; see the module docstring for who feeds what.
    Under --processes with http, the worker moves them into its count file
    (runtime/generations.py, ``share_counts``): ``outcomes`` and ``others`` become views
    of its slots, and ``durations`` a SharedDurations."""

    __slots__ = ("outcomes", "others", "durations")

    def __init__(self, timed: bool) -> None:
        self.outcomes: MutableSequence[int] = [0] * len(OUTCOMES)
        self.others: MutableSequence[int] = [0, 0]  # failures, replacements
        # Measured only when someone can read it (the http endpoint is on).
        self.durations = Durations() if timed else None

    @property
    def failures(self) -> int:
        """consume calls that raised or ran past time_limit"""
        return self.others[0]

    @failures.setter
    def failures(self, value: int) -> None:
        self.others[0] = value

    @property
    def replacements(self) -> int:
        """failed instances replaced by a fresh one"""
        return self.others[1]

    @replacements.setter
    def replacements(self, value: int) -> None:
        self.others[1] = value

    def handled(self) -> int:
        """Deliveries settled so far (or dropped), whatever the outcome."""
        return sum(self.outcomes)


# Attributes a line about one delivery carries (delivery_fields); JSON logs show them.
DELIVERY_FIELDS = ("queue", "consumer", "delivery_tag", "outcome", "attempt")


def delivery_fields(entry: ConsumerConfig, delivery_tag: int, outcome: str | None,
                    attempt: int) -> dict[str, Any]:
    """The ``extra=`` of a log line about one delivery. ``outcome`` as in the metrics
    (OUTCOMES); None when the consumer settled the delivery itself."""
    fields = {"queue": entry.queue, "consumer": entry.consumer, "delivery_tag": delivery_tag,
              "attempt": attempt}
    if outcome is not None:
        fields["outcome"] = outcome
    return fields

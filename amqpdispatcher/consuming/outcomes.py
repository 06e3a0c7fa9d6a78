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
from collections.abc import Sequence
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
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
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


class EntryMetrics:
    """One consumer entry's counts; see the module docstring for who feeds what."""

    __slots__ = ("outcomes", "failures", "replacements", "durations")

    def __init__(self, timed: bool) -> None:
        self.outcomes = [0] * len(OUTCOMES)
        self.failures = 0  # consume calls that raised or ran past time_limit
        self.replacements = 0  # failed instances replaced by a fresh one
        # Measured only when someone can read it (the http endpoint is on).
        self.durations = Durations() if timed else None

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

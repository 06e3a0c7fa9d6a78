"""The readers of what consuming counts (consuming/outcomes.py): the Prometheus
collector behind ``GET /metrics`` and the periodic INFO stats line
(``stats_interval``).

Counting in plain integers and exposing them through a collector at scrape
time is measured cheaper than prometheus_client's own metric objects (on the
benchmark machine: a list increment ~16 ns and a bucket lookup ~60 ns, against
~230 ns for a labelled Counter child's ``inc()`` and ~500 ns for a Histogram's
``observe()``, which take a lock each).

The registry (``registry``) is the process's own, never prometheus_client's
process-wide default, and reads whichever generation is current: a SIGHUP reload
replaces the generation, and its counters start over (Prometheus' ``rate()`` and
``increase()`` take a counter reset in their stride).

What is read is described by the protocols below (Observed, ObservedPool), which
runtime/generation.py's Generation and consuming/pool.py's ConsumerPool satisfy:
observability reads the runtime without importing it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import gevent
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from ..consuming.outcomes import DURATION_BUCKETS, OUTCOMES, Durations, EntryMetrics
from ..contracts.metrics import ENTRY, help_text

if TYPE_CHECKING:
    from ..config import ConsumerConfig
    from ..consuming.breaker import CircuitBreaker

log = logging.getLogger("amqp-dispatcher")


class ObservedPool(Protocol):
    """One consumer entry, as observed (consuming.pool.ConsumerPool)."""

    @property
    def entry(self) -> ConsumerConfig: ...
    @property
    def metrics(self) -> EntryMetrics: ...
    @property
    def busy(self) -> int: ...
    @property
    def breaker(self) -> CircuitBreaker | None: ...
    def live_instances(self) -> int: ...


class Observed(Protocol):
    """One generation of consumers, as observed (runtime.generation.Generation)."""

    @property
    def pools(self) -> Sequence[ObservedPool]: ...
    @property
    def channels(self) -> Collection[int]: ...  # the indexes of the entries consuming
    @property
    def stopping(self) -> bool: ...
    @property
    def reconnects(self) -> int: ...
    @property
    def queue_depth(self) -> Mapping[str, tuple[int, int]]: ...  # queue: (ready, consumers)
    def is_connected(self) -> bool: ...


def cumulative(durations: Durations) -> list[tuple[str, float]]:
    """(le, count) pairs as Prometheus wants them: cumulative, ending with +Inf."""
    total = 0
    buckets = []
    for bound, count in zip((*DURATION_BUCKETS, float("inf")), durations.counts):
        total += count
        buckets.append((floatToGoString(bound), float(total)))
    return buckets


class GenerationCollector(Collector):
    """Reads a generation's state at scrape time. Entries with the same queue and
    consumer share one series (their numbers are added up)."""

    def __init__(self, current: Callable[[], Observed]) -> None:
        self.current = current  # the process's current generation (a reload replaces it)

    def collect(self) -> Iterator[Metric]:
        d = self.current()
        labels = list(ENTRY)
        messages = _family(CounterMetricFamily, "amqp_dispatcher_messages_total",
                           labels=[*labels, "outcome"])
        durations = _family(HistogramMetricFamily, "amqp_dispatcher_consume_seconds",
                            labels=labels)
        failures = _family(CounterMetricFamily, "amqp_dispatcher_consume_failures_total",
                           labels=labels)
        in_flight = _family(GaugeMetricFamily, "amqp_dispatcher_in_flight", labels=labels)
        instances = _family(GaugeMetricFamily, "amqp_dispatcher_instances", labels=labels)
        replacements = _family(CounterMetricFamily,
                               "amqp_dispatcher_instance_replacements_total", labels=labels)
        consuming = _family(GaugeMetricFamily, "amqp_dispatcher_consuming", labels=labels)
        circuit_open = _family(GaugeMetricFamily, "amqp_dispatcher_circuit_open",
                               labels=labels)
        circuit_trips = _family(CounterMetricFamily, "amqp_dispatcher_circuit_trips_total",
                                labels=labels)
        groups: dict[tuple[str, str], list[int]] = {}
        for index, pool in enumerate(d.pools):
            groups.setdefault((pool.entry.queue, pool.entry.consumer), []).append(index)
        for key, indexes in groups.items():
            pools = [d.pools[i] for i in indexes]
            for outcome, name in enumerate(OUTCOMES):
                messages.add_metric([*key, name],
                                    sum(p.metrics.outcomes[outcome] for p in pools))
            timed = [p.metrics.durations for p in pools if p.metrics.durations is not None]
            if timed:
                total = Durations.total(timed)
                durations.add_metric(list(key), cumulative(total), total.sum)
            failures.add_metric(list(key), sum(p.metrics.failures for p in pools))
            in_flight.add_metric(list(key), sum(p.busy for p in pools))
            instances.add_metric(list(key), sum(p.live_instances() for p in pools))
            replacements.add_metric(list(key), sum(p.metrics.replacements for p in pools))
            consuming.add_metric(list(key), sum(1 for i in indexes if i in d.channels))
            breakers = [p.breaker for p in pools if p.breaker is not None]
            if breakers:
                circuit_open.add_metric(list(key), sum(1 for b in breakers if b.is_open))
                circuit_trips.add_metric(list(key), sum(b.trips for b in breakers))
        yield from (messages, durations, failures, in_flight, instances, replacements,
                    consuming, circuit_open, circuit_trips)
        yield _family(GaugeMetricFamily, "amqp_dispatcher_connected",
                      value=1 if d.is_connected() else 0)
        yield _family(CounterMetricFamily, "amqp_dispatcher_reconnects_total",
                      value=d.reconnects)
        ready = _family(GaugeMetricFamily, "amqp_dispatcher_queue_messages_ready",
                        labels=["queue"])
        consumers = _family(GaugeMetricFamily, "amqp_dispatcher_queue_consumers",
                            labels=["queue"])
        for queue, (ready_count, consumer_count) in d.queue_depth.items():
            ready.add_metric([queue], ready_count)
            consumers.add_metric([queue], consumer_count)
        yield ready
        yield consumers


_Family = TypeVar("_Family", bound=Metric)


def _family(kind: type[_Family], name: str, **kwargs: Any) -> _Family:
    """A metric family of METRICS (contracts/metrics.py), with its help text."""
    return kind(name, help_text(name), **kwargs)


class HubCollector(Collector):
    """What belongs to the process rather than to a generation: the seconds its hub
    was blocked (observability/blocking.py)."""

    def __init__(self, blocked_seconds: Callable[[], float]) -> None:
        self.blocked_seconds = blocked_seconds

    def collect(self) -> Iterator[Metric]:
        yield _family(CounterMetricFamily, "amqp_dispatcher_hub_blocked_seconds_total",
                      value=self.blocked_seconds())


def registry(current: Callable[[], Observed],
             blocked_seconds: Callable[[], float] = lambda: 0.0) -> CollectorRegistry:
    """A registry of the process's own: the current dispatcher's metrics, the process's
    (``blocked_seconds``: the hub's), and the process, platform and garbage collector
    metrics of prometheus_client's default collectors."""
    result = CollectorRegistry()
    result.register(GenerationCollector(current))
    result.register(HubCollector(blocked_seconds))
    ProcessCollector(registry=result)
    PlatformCollector(registry=result)
    GCCollector(registry=result)
    return result


def stats_line(pools: Sequence[ObservedPool], before: list[tuple[int, int]]) -> str:
    """One line: per entry, messages handled and failures since ``before`` (updated in
    place), and deliveries in flight now."""
    parts = []
    for i, pool in enumerate(pools):
        handled, failures = pool.metrics.handled(), pool.metrics.failures
        part = (f"{pool.entry.path} {pool.entry.queue}: {handled - before[i][0]} "
                f"handled, {failures - before[i][1]} failed, {pool.busy} in flight")
        if pool.breaker is not None and pool.breaker.is_open:
            part += f", circuit open until {pool.breaker.until_text()}"
        parts.append(part)
        before[i] = (handled, failures)
    return "; ".join(parts)


class StatsLog:
    """Logs stats_line at INFO every ``interval`` seconds (0: never)."""

    def __init__(self, pools: Sequence[ObservedPool], interval: float) -> None:
        self.pools = pools
        self.interval = interval
        self.greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        if self.interval > 0:
            self.greenlet = gevent.spawn(self._run)
            self.greenlet.name = "stats line"

    def stop(self) -> None:
        if self.greenlet is not None:
            self.greenlet.kill(block=False)

    def _run(self) -> None:
        before = [(p.metrics.handled(), p.metrics.failures) for p in self.pools]
        while True:
            gevent.sleep(self.interval)
            log.info("stats (last %gs): %s", self.interval, stats_line(self.pools, before))

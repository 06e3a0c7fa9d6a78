"""The metrics the ``http`` endpoint serves, each with its type, labels and meaning.

The collectors (observability/metrics.py for a process, supervision/endpoint.py for
the arbiter of ``--processes``) take their help text from here, the reference page
docs/reference/metrics.md is generated from METRICS (``python scripts/docs.py``), and
tests/test_docs.py fails when a real ``/metrics`` serves an ``amqp_dispatcher_``
family that is not here.
"""

from __future__ import annotations

from typing import NamedTuple

ENTRY = ("queue", "consumer")  # a consumer entry's labels: its queue and consumer strings


class Metric(NamedTuple):
    name: str  # as served (a counter's without _total in prometheus_client's families)
    type: str  # counter, gauge or histogram
    labels: tuple[str, ...]
    doc: str  # the HELP text, and the reference page's description (Markdown)
    processes_only: bool = False  # served by the arbiter of --processes only


METRICS = (
    Metric("amqp_dispatcher_messages_total", "counter", (*ENTRY, "outcome"),
           "Deliveries settled, by `outcome`: `ack`; `requeue` (rejected or nacked with "
           "requeue, by the consumer or by the failure policy); `reject` (without "
           "requeue); `retry` (moved to a delay queue); `dead_letter` (moved to "
           "`dead_letter_queue`); `dropped` (the settle could not be sent: the channel or "
           "connection was gone, the broker redelivers)"),
    Metric("amqp_dispatcher_consume_seconds", "histogram", ENTRY,
           "Duration of each `consume` call (buckets 1 ms to 300 s), failed ones included; "
           "with `middleware`, its `before_consume` hooks included"),
    Metric("amqp_dispatcher_consume_failures_total", "counter", ENTRY,
           "`consume` calls that raised or ran past `time_limit`, and deliveries a "
           "middleware's `before_consume` failed"),
    Metric("amqp_dispatcher_in_flight", "gauge", ENTRY,
           "Deliveries in `consume` now (or being settled by the failure policy)"),
    Metric("amqp_dispatcher_instances", "gauge", ENTRY,
           "Live consumer slots with an instance: `consumer_count` when healthy, less "
           "while a failed instance's replacement cannot be built"),
    Metric("amqp_dispatcher_instance_replacements_total", "counter", ENTRY,
           "Failed consumer instances replaced by a fresh one"),
    Metric("amqp_dispatcher_consuming", "gauge", ENTRY,
           "1 while the entry is subscribed to its queue, 0 while its channel is being "
           "reopened or the connection is down (with `--processes`: the number of workers "
           "subscribed)"),
    Metric("amqp_dispatcher_circuit_open", "gauge", ENTRY,
           "1 while the entry's `circuit_breaker` is open (not consuming until `open_for` "
           "is over); entries with a `circuit_breaker` only (with `--processes`: the "
           "number of workers whose circuit is open)"),
    Metric("amqp_dispatcher_circuit_trips_total", "counter", ENTRY,
           "Times the entry's `circuit_breaker` tripped; entries with a `circuit_breaker` "
           "only"),
    Metric("amqp_dispatcher_connected", "gauge", (),
           "1 while the connection to the broker is open (with `--processes`: the number "
           "of workers connected)"),
    Metric("amqp_dispatcher_reconnects_total", "counter", (),
           "Sessions opened again after the connection was lost"),
    Metric("amqp_dispatcher_hub_blocked_seconds_total", "counter", (),
           "Seconds the gevent hub was blocked by code that did not yield, in blocks of "
           "`blocking_warning` seconds or more (0 while `blocking_warning` is 0)"),
    Metric("amqp_dispatcher_queue_messages_ready", "gauge", ("queue",),
           "Messages ready in the consumed queue (not those delivered and not yet "
           "acked), as the broker said at its last read (`http.queue_depth_interval`); "
           "absent while it cannot be read. With `--processes`: read by worker 1 alone, "
           "not added up"),
    Metric("amqp_dispatcher_queue_consumers", "gauge", ("queue",),
           "Consumers the broker has on the consumed queue (every service's), as it said "
           "at its last read; as `amqp_dispatcher_queue_messages_ready`"),
    Metric("amqp_dispatcher_workers", "gauge", (),
           "Worker processes running: `--processes`, more during a reload's handover, "
           "fewer while one is being replaced", processes_only=True),
    Metric("amqp_dispatcher_workers_cpu_seconds_total", "counter", (),
           "CPU seconds (user and system) of the worker processes, added up",
           processes_only=True),
    Metric("amqp_dispatcher_workers_resident_memory_bytes", "gauge", (),
           "Resident memory of the worker processes, added up", processes_only=True),
)

BY_NAME = {metric.name: metric for metric in METRICS}


def help_text(name: str) -> str:
    """The HELP line of metric ``name`` (its doc without Markdown's backquotes)."""
    return BY_NAME[name].doc.replace("`", "")

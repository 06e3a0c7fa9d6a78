"""A worker's counters, moved into its count file (contracts/counts.py) so that they
outlive it: ``--processes`` with ``http``.

``share_counts`` runs once, as the worker's generation is made (a worker has one
generation: SIGHUP is the arbiter's), before anything is counted. It describes every
counter the worker's ``/metrics`` has, under the same names and labels
(observability/metrics.py), creates the file, and points the counting code at its
slots: each entry's outcomes, failures and replacements, its consume durations and
circuit breaker trips, the generation's reconnects and the process's blocked hub
seconds. From then on each increment lands in the file, as cheaply as in a list (a
memoryview item); after the worker's death, SIGKILL included, the arbiter reads it
(supervision/endpoint.py).
"""

from __future__ import annotations

import math
from typing import Any, cast

from prometheus_client.utils import floatToGoString

from ..consuming.outcomes import DURATION_BUCKETS, OUTCOMES, SharedDurations
from ..contracts.counts import CountFile
from ..observability.blocking import BlockedHub
from .generation import Generation


def share_counts(path: str, generation: Generation, blocked: BlockedHub) -> CountFile:
    header: list[dict[str, Any]] = []
    ints = doubles = 0

    def counter(family: str, labels: list[list[str]], double: bool = False) -> int:
        nonlocal ints, doubles
        item: dict[str, Any] = {"family": family, "type": "counter",
                                "sample": family + "_total", "labels": labels}
        if double:
            item["double"], doubles = doubles, doubles + 1
        else:
            item["int"], ints = ints, ints + 1
        header.append(item)
        return int(item["double" if double else "int"])

    plan = []
    trips = []
    le = [floatToGoString(bound) for bound in (*DURATION_BUCKETS, math.inf)]
    for pool in generation.pools:
        labels = [["queue", pool.entry.queue], ["consumer", pool.entry.consumer]]
        outcomes = [counter("amqp_dispatcher_messages", [*labels, ["outcome", name]])
                    for name in OUTCOMES]
        others = [counter("amqp_dispatcher_consume_failures", labels),
                  counter("amqp_dispatcher_instance_replacements", labels)]
        buckets = total = -1
        if pool.metrics.durations is not None:
            buckets, total = ints, doubles
            ints, doubles = ints + len(le), doubles + 1
            header.append({"family": "amqp_dispatcher_consume_seconds", "labels": labels,
                           "le": le, "buckets": buckets, "sum": total})
        plan.append((pool.metrics, outcomes[0], others[0], buckets, total))
        if pool.breaker is not None:
            trips.append((pool.breaker, counter("amqp_dispatcher_circuit_trips", labels)))
    reconnects = counter("amqp_dispatcher_reconnects", [])
    hub = counter("amqp_dispatcher_hub_blocked_seconds", [], double=True)

    shared = CountFile(path, header, ints, doubles)
    for metrics, outcomes_at, others_at, buckets, total in plan:
        metrics.outcomes = _moved(shared.ints[outcomes_at:outcomes_at + len(OUTCOMES)],
                                  metrics.outcomes)
        metrics.others = _moved(shared.ints[others_at:others_at + 2], metrics.others)
        if metrics.durations is not None:
            metrics.durations = SharedDurations(cast(Any, shared.ints[buckets:buckets + len(le)]),
                                                cast(Any, shared.doubles[total:total + 1]),
                                                metrics.durations)
    for breaker, at in trips:
        breaker.trip_count = _moved(shared.ints[at:at + 1], breaker.trip_count)
    generation.reconnect_count = _moved(shared.ints[reconnects:reconnects + 1],
                                        generation.reconnect_count)
    shared.doubles[hub] = blocked.blocked_seconds[0]
    blocked.blocked_seconds = cast(Any, shared.doubles[hub:hub + 1])
    return shared


def _moved(view: memoryview, was: Any) -> Any:
    """``view``, holding what the list ``was`` holds."""
    for index, value in enumerate(was):
        view[index] = value
    return view

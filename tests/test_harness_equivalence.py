"""The harness is faithful: one config and one set of published messages, run by the
daemon (the console script, against the real broker) and by
amqpdispatcher.testing.Harness, end with the same outcome counts per queue (the
daemon's from /metrics, amqp_dispatcher_messages_total) and the same messages left
in every queue.

The scenario: topic routing (``*``, ``#``), a headers exchange bound to the topic one
(exchange-to-exchange) with x-match all (an ``x-`` argument ignored) and any, a fanout
exchange, consumers publishing downstream (mandatory, with a fallback when returned),
a flaky message retried once, a poison message, an uncaught PublishReturned
and a consume running past its time_limit dead-lettered after three attempts (the
dead-lettered copies carry the same headers, but times), a reject going to the queue's dead-letter
exchange, a nack redelivered, and unroutable publishes dropped."""

from __future__ import annotations

import re
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pika
import yaml
from helpers import TESTS, BrokerHandle, DispatcherProcess, wait_until
from prometheus_client.parser import text_string_to_metric_families
from rabbitnode import free_port

from amqpdispatcher.consuming.failure import EXCEPTION_HEADER
from amqpdispatcher.testing import Harness
from amqpdispatcher.testing.harness import OUTCOME_NAMES as OUTCOMES

sys.path.insert(0, str(TESTS / "consumers"))  # harnessed.py, as the daemon finds it
import harnessed  # noqa: E402


def config(port: int) -> dict[str, Any]:
    def bound(exchange: str, key: str = "", **arguments: Any) -> dict[str, Any]:
        binding: dict[str, Any] = {"exchange": exchange, "routing_key": key}
        if arguments:
            binding["arguments"] = arguments
        return binding

    return {
        "exchanges": [
            {"exchange": "events", "type": "topic"},
            {"exchange": "documents", "type": "headers",
             "bindings": [bound("events", "order.*")]},
            {"exchange": "billing", "type": "topic"},
            {"exchange": "audit", "type": "fanout"},
            {"exchange": "rejects", "type": "fanout"},
        ],
        "queues": [
            {"queue": "orders", "x_dead_letter_exchange": "rejects",
             "bindings": [bound("events", "order.*")]},
            {"queue": "orders.rejected", "bindings": [bound("rejects")]},
            {"queue": "renders", "bindings": [bound("documents", **{
                "x-match": "all", "format": "pdf", "x-note": "ignored by the match"})]},
            {"queue": "french", "bindings": [bound("documents", **{
                "x-match": "any", "lang": "fr", "country": "fr"})]},
            {"queue": "everything", "bindings": [bound("events", "#")]},
            {"queue": "deep", "bindings": [bound("events", "*.*.deep")]},
            {"queue": "invoices.eu", "bindings": [bound("billing", "invoice.eu")]},
            {"queue": "invoices.us", "bindings": [bound("billing", "invoice.us")]},
            {"queue": "invoices.unknown", "bindings": [bound("billing", "invoice.unknown")]},
            {"queue": "audit.a", "bindings": [bound("audit")]},
            {"queue": "audit.b", "bindings": [bound("audit")]},
        ],
        "consumers": [
            {"consumer": "harnessed:Orders", "queue": "orders", "consumer_count": 2,
             "prefetch_count": 2, "time_limit": 4,  # a first publish opens a connection
             "retry": {"max_attempts": 3, "delay": 0.1, "backoff": 2,
                       "dead_letter_queue": "orders.failed"}},
            {"consumer": "harnessed:Renderer", "queue": "renders", "time_limit": 30},
        ],
        "http": {"address": "127.0.0.1", "port": port},
        "stats_interval": 0,
    }


# (exchange, routing key, headers, body)
PUBLISHED: list[tuple[str, str, dict[str, Any] | None, bytes]] = [
    ("events", "order.eu", {"format": "pdf", "lang": "de"}, b"order:eu:1"),
    ("events", "order.us", {"lang": "fr"}, b"order:us:2"),
    ("events", "order.xx", None, b"order:xx:3"),
    ("events", "order.eu", {"format": "pdf", "x-note": "other"}, b"flaky:eu:4"),
    ("events", "order.eu", None, b"poison:eu:5"),
    ("events", "order.eu", {"country": "fr"}, b"reject:eu:6"),
    ("events", "order.us", None, b"nack:us:7"),
    ("events", "order.zz", None, b"strict:zz:8"),
    ("events", "a.b.deep", None, b"deep:9"),
    ("events", "order.eu.more", {"format": "pdf"}, b"not-an-order:10"),
    ("billing", "nothing.here", None, b"unroutable:11"),
    ("audit", "", None, b"audit:12"),
    ("events", "order.eu", None, b"slow:eu:13"),
]


def scrape(port: int) -> dict[str, dict[str, int]]:
    """amqp_dispatcher_messages_total by queue and outcome (dropped left out)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    counts: dict[str, dict[str, int]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name != "amqp_dispatcher_messages_total":
                continue
            outcome = sample.labels["outcome"]
            if outcome == "dropped":
                assert sample.value == 0, "a settle could not be sent: not comparable"
                continue
            by_outcome = counts.setdefault(sample.labels["queue"], dict.fromkeys(OUTCOMES, 0))
            by_outcome[outcome] += int(sample.value)
    return counts


# Where a PublishReturned was raised: the daemon's confirm channel, or the harness's
# publisher. An exception raised in the consumer's own code names the same line in both.
RAISED_BY_THE_LIBRARY = re.compile(r" \(at (confirms|harness)\.py:\d+\)$")


def comparable(headers: dict[str, Any] | None) -> dict[str, Any]:
    """What the daemon's and the harness's copies of a message must agree on: the
    headers but the times (failures, x-death's) and where in the library an exception
    was raised; x-death as (queue, reason, count)."""
    result = {name: value for name, value in (headers or {}).items()
              if not name.endswith("-failure") and name != "x-death"}
    if EXCEPTION_HEADER in result:
        result[EXCEPTION_HEADER] = RAISED_BY_THE_LIBRARY.sub(" (at the library)",
                                                             result[EXCEPTION_HEADER])
    if headers and "x-death" in headers:
        result["x-death"] = [(death["queue"], death["reason"], death["count"])
                             for death in headers["x-death"]]
    return result


def take_all(broker: BrokerHandle, queue: str) -> list[tuple[bytes, dict[str, Any]]]:
    taken = []
    while True:
        method, properties, body = broker.channel.basic_get(queue, auto_ack=True)
        if method is None:
            return sorted(taken, key=lambda message: message[0])
        taken.append((body, comparable(properties.headers)))


def test_the_daemon_and_the_harness_end_alike(broker: BrokerHandle, tmp_path: Path) -> None:
    port = free_port()
    the_config = config(port)

    with Harness(the_config) as h:
        for exchange, key, headers, body in PUBLISHED:
            h.publish(exchange, key, body, headers)
        h.run()
        expected_outcomes = {entry["queue"]: h.outcomes(entry["queue"])
                             for entry in the_config["consumers"]}
        queues = sorted(h.broker.queues)
        expected_left = {queue: sorted(h.messages(queue)) for queue in queues}
        expected_dead = {queue: sorted(((m.body, comparable(m.properties.headers))
                                        for m in h.stored(queue)), key=lambda m: m[0])
                         for queue in ("orders.failed", "orders.rejected")}

    # What the scenario means, so that a harness wrong in the same way as a broken
    # comparison cannot pass unseen.
    assert expected_outcomes == {
        "orders": {"ack": 5, "requeue": 1, "reject": 1, "retry": 7, "dead_letter": 3},
        "renders": {"ack": 2, "requeue": 0, "reject": 0, "retry": 0, "dead_letter": 0},
    }
    assert expected_left["orders.failed"] == [b"poison:eu:5", b"slow:eu:13", b"strict:zz:8"]
    assert expected_left["orders.rejected"] == [b"reject:eu:6"]
    assert expected_left["invoices.unknown"] == [b"order:xx:3"]
    assert expected_left["french"] == [b"order:us:2", b"reject:eu:6"]
    assert expected_left["deep"] == [b"deep:9"]
    assert expected_left["audit.a"] == expected_left["audit.b"] == [
        b"audit:12", b"rendered:flaky:eu:4", b"rendered:order:eu:1"]

    daemon = DispatcherProcess(tmp_path, yaml.safe_dump(the_config), url=broker.url)
    try:
        daemon.wait_for_log(r"consuming from renders")
        daemon.wait_for_log(r"consuming from orders")
        for exchange, key, headers, body in PUBLISHED:
            broker.channel.basic_publish(exchange, key, body,
                                         pika.BasicProperties(headers=headers))

        def settled() -> bool:
            return scrape(port) == expected_outcomes

        try:
            wait_until(settled, timeout=60, what="the daemon's outcomes to be the harness's")
        except AssertionError:
            assert scrape(port) == expected_outcomes, daemon.output
        # Nothing more moves: no delivery in flight, nothing waiting for a retry.
        waiting = ["orders", "renders", *(q for q in queues if ".retry.quorum." in q)]
        wait_until(lambda: all(broker.drained(queue) for queue in waiting), timeout=30,
                   what="the consumed and delay queues to be empty")
        assert scrape(port) == expected_outcomes
    finally:
        assert daemon.stop() == 0, daemon.output
    assert {queue: take_all(broker, queue) for queue in expected_dead} == expected_dead
    left = {queue: sorted(broker.get_all(queue)) for queue in queues}
    assert left == {queue: bodies for queue, bodies in expected_left.items()
                    if queue not in expected_dead} | dict.fromkeys(expected_dead, [])


REFUSALS = {
    "exchanges": [{"exchange": "sealed", "type": "fanout", "internal": True},
                  {"exchange": "sealed-off", "type": "direct"}],
    "queues": [{"queue": "in"}, {"queue": "report"}],
    "consumers": [{"consumer": "harnessed:Misbehaves", "queue": "in", "time_limit": 120}],
}


def test_publishes_the_daemon_or_the_broker_refuse_fail_alike(
        broker: BrokerHandle, tmp_path: Path) -> None:
    """What amqp.publish raises for a header AMQP cannot carry, headers over a frame, a
    CC header that is not a list, an internal, missing or missing amq.* exchange, and
    an unroutable mandatory publish: the same exception with the same text (but the
    vhost's name) in the daemon and in the harness."""
    kinds = list(harnessed.Misbehaves.PUBLISHES)
    with Harness(REFUSALS) as h:
        for kind in kinds:
            h.publish("", "in", kind.encode())
        h.run()
        expected = sorted(h.messages("report"))
    assert len(expected) == len(kinds)
    assert not any(line.endswith(b": published") for line in expected), expected

    daemon = DispatcherProcess(tmp_path, yaml.safe_dump(REFUSALS), url=broker.url)
    try:
        daemon.wait_for_log(r"consuming from in")
        for kind in kinds:
            broker.publish("in", kind)
        # Each refusal closes the entry's publishing channel: reopened with backoff.
        wait_until(lambda: broker.ready("report") == len(kinds), timeout=90,
                   what="a report per refused publish")
    finally:
        assert daemon.stop() == 0, daemon.output
    vhost = f"in vhost '{broker.vhost}'".encode()
    assert sorted(line.replace(vhost, b"in vhost '/'")
                  for line in broker.get_all("report")) == expected

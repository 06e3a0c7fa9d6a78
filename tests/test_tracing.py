"""OpenTelemetry tracing (amqpdispatcher/consuming/tracing.py, docs/guides/tracing.md),
through the console script on a real broker: with the SDK's in-memory exporter set up
by a startup handler, and under OpenTelemetry's own launcher with the console exporter."""

from __future__ import annotations

import json
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

import pika
import pytest
from faultproxy import FaultProxy
from helpers import BrokerHandle, DispatcherProcess, wait_until

CONFIG = """
startup_handler: tracedconsumers:setup_tracing
stats_interval: 0
queues:
  - queue: traced.in
  - queue: traced.out
  - queue: traced.flaky
  - queue: traced.poison
  - queue: traced.plain
consumers:
  - {consumer: tracedconsumers:Forwarder, queue: traced.in}
  - {consumer: tracedconsumers:Sink, queue: traced.out}
  - {consumer: tracedconsumers:Flaky, queue: traced.flaky,
     retry: {max_attempts: 3, delay: 0.2}}
  - {consumer: tracedconsumers:Poison, queue: traced.poison,
     retry: {max_attempts: 2, delay: 0.2, dead_letter_queue: traced.dead}}
  - {consumer: tracedconsumers:Sink, queue: traced.plain}
"""


def traceparent() -> tuple[str, str, str]:
    """A W3C traceparent of a sampled span of the test's: (header, trace id, span id)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def publish(broker: BrokerHandle, queue: str, body: bytes, header: str | None) -> None:
    headers = {"traceparent": header} if header else None
    broker.channel.basic_publish("", queue, body, pika.BasicProperties(headers=headers))


def spans_of(path: Path, trace_id: str) -> list[dict[str, Any]]:
    spans = [json.loads(line) for line in path.read_text().splitlines()]
    return [span for span in spans if span["trace_id"] == trace_id]


def test_spans_follow_a_message_through_consume_publish_retry_and_dead_letter(
        broker: BrokerHandle, tmp_path: Path) -> None:
    spans_file = tmp_path / "spans.jsonl"
    dispatcher = DispatcherProcess(tmp_path, CONFIG, url=broker.url,
                                   env={"SPANS_FILE": str(spans_file)})
    forwarded, t1, p1 = traceparent()
    flaky, t2, p2 = traceparent()
    poison, t3, p3 = traceparent()
    try:
        dispatcher.wait_consuming()
        publish(broker, "traced.in", b"a", forwarded)
        publish(broker, "traced.flaky", b"f", flaky)
        publish(broker, "traced.poison", b"p", poison)
        publish(broker, "traced.plain", b"n", None)
        wait_until(lambda: len(dispatcher.records()) == 3, 30, "three messages handled")
        wait_until(lambda: broker.ready("traced.dead") == 1, 30, "the dead letter")
        dead = broker.channel.basic_get("traced.dead", auto_ack=True)
        dispatcher.signal(signal.SIGTERM)
        assert dispatcher.wait() == 0
    finally:
        dispatcher.stop()
    records = sorted(dispatcher.records())

    # consume -> publish -> the next consume: one trace, each span the parent of the next.
    named = {span["name"]: span for span in spans_of(spans_file, t1)}
    assert sorted(named) == ["process traced.in", "process traced.out", "send amq.default"]
    consume, send = named["process traced.in"], named["send amq.default"]
    sink = named["process traced.out"]
    assert (consume["name"], consume["kind"], consume["parent_id"]) == (
        "process traced.in", "CONSUMER", p1)
    assert consume["status"] == "UNSET"
    assert consume["attributes"] == {
        "messaging.system": "rabbitmq", "messaging.operation.type": "process",
        "messaging.operation.name": "process", "messaging.destination.name": "",
        "messaging.destination.subscription.name": "traced.in",
        "messaging.rabbitmq.destination.routing_key": "traced.in",
        "messaging.rabbitmq.message.delivery_tag": 1,
        "messaging.consumer.group.name": "tracedconsumers:Forwarder",
        "amqp_dispatcher.attempt": 1, "amqp_dispatcher.outcome": "ack"}
    assert (send["name"], send["kind"], send["parent_id"]) == (
        "send amq.default", "PRODUCER", consume["span_id"])
    assert send["attributes"]["messaging.rabbitmq.destination.routing_key"] == "traced.out"
    assert (sink["name"], sink["kind"], sink["parent_id"]) == (
        "process traced.out", "CONSUMER", send["span_id"])
    sink_record = next(r for r in records if r.startswith("sink:a:"))
    assert sink_record == f"sink:a:v:00-{t1}-{send['span_id']}-01"  # headers kept

    # A retry: the failed attempt's span is ERROR with the exception, and the parent of
    # the next attempt's.
    first, second = sorted(spans_of(spans_file, t2), key=lambda s: s["parent_id"] != p2)
    assert (first["parent_id"], first["status"], first["events"]) == (p2, "ERROR", ["exception"])
    assert first["attributes"]["amqp_dispatcher.outcome"] == "retry"
    assert first["attributes"]["error.type"] == "ValueError"
    assert (second["parent_id"], second["status"]) == (first["span_id"], "UNSET")
    assert second["attributes"]["amqp_dispatcher.attempt"] == 2
    assert second["attributes"]["amqp_dispatcher.outcome"] == "ack"
    assert "flaky:f:2" in records

    # A dead letter: both attempts in the trace, and the dead-lettered copy carries the
    # last one's context for whoever reads the dead-letter queue.
    tried, gave_up = sorted(spans_of(spans_file, t3), key=lambda s: s["parent_id"] != p3)
    assert tried["attributes"]["amqp_dispatcher.outcome"] == "retry"
    assert gave_up["parent_id"] == tried["span_id"]
    assert gave_up["attributes"]["amqp_dispatcher.outcome"] == "dead_letter"
    assert gave_up["status"] == "ERROR"
    assert dead[2] == b"p"
    assert dead[1].headers["traceparent"] == f"00-{t3}-{gave_up['span_id']}-01"

    # No traceparent: a trace of its own, rooted at the consume span.
    plain = [json.loads(line) for line in spans_file.read_text().splitlines()
             if '"process traced.plain"' in line]
    assert len(plain) == 1 and plain[0]["parent_id"] is None
    assert plain[0]["trace_id"] not in (t1, t2, t3)


@pytest.mark.parametrize("processes", [1, 2])
def test_the_launcher_with_the_console_exporter(broker: BrokerHandle, tmp_path: Path,
                                                processes: int) -> None:
    """opentelemetry-instrument -- amqp-dispatcher ...: the OTEL_* variables configure
    the SDK, and each consume is exported as a span of the service named there; under
    --processes, by the worker that consumed it."""
    launcher = str(Path(sys.executable).parent / "opentelemetry-instrument")
    config = ("stats_interval: 0\nqueues:\n  - queue: q\n"
              "consumers:\n  - {consumer: testconsumers:Recorder, queue: q}\n")
    env = {"OTEL_SERVICE_NAME": "orders-service", "OTEL_TRACES_EXPORTER": "console",
           "OTEL_METRICS_EXPORTER": "none", "OTEL_LOGS_EXPORTER": "none"}
    dispatcher = DispatcherProcess(tmp_path, config, url=broker.url, launcher=(launcher, "--"),
                                   env=env, args=("--processes", str(processes)))
    header, trace_id, parent = traceparent()
    try:
        dispatcher.wait_consuming(count=processes)
        publish(broker, "q", b"traced", header)
        wait_until(lambda: dispatcher.records() == ["traced"], 30, "the message handled")
        dispatcher.signal(signal.SIGTERM)
        assert dispatcher.wait() == 0
    finally:
        dispatcher.stop()
    output = dispatcher.output
    start = output.index('"name": "process q"')
    span = json.loads(output[output.rindex("{\n", 0, start):output.index("\n}", start) + 2])
    assert span["kind"] == "SpanKind.CONSUMER"
    assert span["context"]["trace_id"] == f"0x{trace_id}"
    assert span["parent_id"] == f"0x{parent}"
    assert span["attributes"]["amqp_dispatcher.outcome"] == "ack"
    assert span["resource"]["attributes"]["service.name"] == "orders-service"


def test_an_exception_whose_str_raises_is_recorded_and_consuming_goes_on(
        broker: BrokerHandle, tmp_path: Path) -> None:
    """The SDK's record_exception takes str() of the exception: one whose __str__ raises
    must not take the slot's greenlet down with it (one slot: nothing would be consumed
    any more)."""
    spans_file = tmp_path / "spans.jsonl"
    config = ("startup_handler: tracedconsumers:setup_tracing\nstats_interval: 0\n"
              "queues:\n  - queue: traced.badstr\nconsumers:\n"
              "  - {consumer: tracedconsumers:BadStr, queue: traced.badstr,\n"
              "     consumer_count: 1, retry: {max_attempts: 1, delay: 0.2}}\n")
    dispatcher = DispatcherProcess(tmp_path, config, url=broker.url,
                                   env={"SPANS_FILE": str(spans_file)})
    header, trace_id, _ = traceparent()
    try:
        dispatcher.wait_consuming()
        publish(broker, "traced.badstr", b"bad-str", header)
        publish(broker, "traced.badstr", b"after", None)
        wait_until(lambda: dispatcher.records() == ["badstr:after"], 30,
                   "the next message handled")
        dispatcher.signal(signal.SIGTERM)
        assert dispatcher.wait() == 0
    finally:
        dispatcher.stop()
    assert "Traceback" not in dispatcher.output, dispatcher.output
    [span] = spans_of(spans_file, trace_id)
    assert (span["status"], span["events"]) == ("ERROR", ["exception"])
    assert span["attributes"]["error.type"] == "_BadStr"
    assert span["attributes"]["amqp_dispatcher.outcome"] == "reject"


def test_a_consume_whose_connection_was_lost_meanwhile_says_dropped(
        broker: BrokerHandle, tmp_path: Path) -> None:
    """A consume that returns once its channel is gone cannot be acked: the broker
    redelivers it. Its span's outcome says ``dropped``, as the metrics count it, not
    ``ack``; the redelivery's says ``ack``."""
    spans_file, release = tmp_path / "spans.jsonl", tmp_path / "release"
    config = ("startup_handler: tracedconsumers:setup_tracing\nstats_interval: 0\n"
              "queues:\n  - queue: traced.held\nconsumers:\n"
              "  - {consumer: tracedconsumers:Held, queue: traced.held, consumer_count: 1}\n")
    with FaultProxy("127.0.0.1", broker.node.port) as proxy:
        dispatcher = DispatcherProcess(tmp_path, config, url=proxy.rewrite_url(broker.url),
                                       env={"SPANS_FILE": str(spans_file),
                                            "RELEASE_FILE": str(release)})
        try:
            dispatcher.wait_consuming()
            publish(broker, "traced.held", b"h", None)
            wait_until(lambda: dispatcher.records() == ["held:h:False"], 30, "h held")
            proxy.drop_all()
            dispatcher.wait_for_log("reconnected after")
            release.touch()
            wait_until(lambda: dispatcher.records() == ["held:h:False", "held:h:True"], 30,
                       "h redelivered and handled")
            wait_until(lambda: broker.drained("traced.held"), 30, "h acked")
            dispatcher.signal(signal.SIGTERM)
            assert dispatcher.wait() == 0
        finally:
            dispatcher.stop()
    spans = [json.loads(line) for line in spans_file.read_text().splitlines()]
    outcomes = [span["attributes"]["amqp_dispatcher.outcome"] for span in spans
                if span["name"] == "process traced.held"]
    assert outcomes == ["dropped", "ack"], dispatcher.output

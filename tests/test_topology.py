"""Each exchange, queue and consume key has an effect the broker shows."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultproxy import FaultProxy
from helpers import BrokerHandle, DispatcherProcess, run_cli, wait_until
from rabbitnode import Broker


@pytest.fixture
def proxy(broker: BrokerHandle) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", broker.node.port) as fault_proxy:
        yield fault_proxy


def listing(broker: BrokerHandle, what: str, *columns: str) -> list[list[str]]:
    """rabbitmqctl list_<what> of the test's vhost, one list of columns per row."""
    out = broker.node.ctl(f"list_{what}", "-p", broker.vhost, "-q", "--no-table-headers",
                          *columns)
    return [line.split("\t") for line in out.splitlines()]


def start_refused(broker: BrokerHandle, tmp_path: Path, config: str) -> str:
    """Run the daemon on a config the broker refuses: exit 4; its first error line (one
    per refusal)."""
    result = run_cli(tmp_path, "--config", "config.yml", config=config,
                     env={"RABBITMQ_URL": broker.url})
    assert result.returncode == 4, result
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR: " in line]
    assert errors, result.stderr
    return errors[0].split(" ERROR: ", 1)[1]


def test_queue_keys_reach_the_broker(broker: BrokerHandle, tmp_path: Path) -> None:
    broker.channel.exchange_declare("notify", "topic")
    broker.channel.exchange_declare("dlx", "fanout")
    config = """
queues:
  - queue: defaults
  - queue: transient
    durable: false
    auto_delete: true
  - queue: with_args
    x_dead_letter_exchange: dlx
    x_dead_letter_routing_key: dead
    x_max_length: 2
    x_expires: 600000
    x_message_ttl: 60000
    bindings:
      - exchange: notify
        routing_key: transaction.*
      - exchange: notify
        routing_key: click.*
  - queue: nulls
    x_dead_letter_exchange: null
    x_max_length: null
consumers:
  - consumer: testconsumers:Recorder
    queue: transient
"""
    proc = DispatcherProcess(tmp_path, config, broker.url)
    try:
        proc.wait_consuming()
        defaults = broker.queue_info("defaults")
        assert (defaults["durable"], defaults["auto_delete"]) == ("true", "false")
        assert defaults["arguments"] == "[]"
        transient = broker.queue_info("transient")
        assert (transient["durable"], transient["auto_delete"]) == ("false", "true")
        args = broker.queue_info("with_args")["arguments"]
        for expected in ['{"x-dead-letter-exchange","dlx"}',
                         '{"x-dead-letter-routing-key","dead"}', '{"x-max-length",2}',
                         '{"x-expires",600000}', '{"x-message-ttl",60000}']:
            assert expected in args, args
        assert broker.queue_info("nulls")["arguments"] == "[]"
        # The bindings route: two matching keys arrive, a non-matching one does not,
        # and x-max-length 2 keeps only two of the three.
        broker.publish("transaction.new", "t", exchange="notify")
        broker.publish("click.new", "c", exchange="notify")
        broker.publish("other.new", "o", exchange="notify")
        broker.publish("click.again", "c2", exchange="notify")
        wait_until(lambda: broker.ready("with_args") == 2, what="routed messages")
        assert broker.get_all("with_args") == [b"c", b"c2"]
    finally:
        assert proc.stop() == 0
    # auto_delete: the queue goes when its consumer does.
    wait_until(lambda: "transient" not in broker.node.ctl(
        "list_queues", "-p", broker.vhost, "-q", "name"), what="auto-deleted queue")


def test_exclusive_queue(broker: BrokerHandle, tmp_path: Path) -> None:
    config = ("queues:\n  - queue: mine\n    exclusive: true\n"
              "consumers:\n  - consumer: testconsumers:Recorder\n    queue: mine\n")
    proc = DispatcherProcess(tmp_path, config, broker.url)
    try:
        proc.wait_consuming()
        assert broker.queue_info("mine")["exclusive"] == "true"
        broker.publish("mine", "x")
        wait_until(lambda: proc.records() == ["x"], what="message on exclusive queue")
    finally:
        assert proc.stop() == 0


def test_passive_checks_an_existing_queue(broker: BrokerHandle, tmp_path: Path) -> None:
    broker.declare("exists", durable=False)
    config = ("queues:\n  - queue: exists\n    passive: true\n"
              "consumers:\n  - consumer: testconsumers:Recorder\n    queue: exists\n")
    proc = DispatcherProcess(tmp_path, config, broker.url)
    try:
        proc.wait_consuming()
        # passive did not redeclare it durable
        assert broker.queue_info("exists")["durable"] == "false"
    finally:
        assert proc.stop() == 0


def test_passive_missing_queue_is_a_clear_error(broker: BrokerHandle, tmp_path: Path) -> None:
    config = ("queues:\n  - queue: missing\n    passive: true\n"
              "consumers:\n  - consumer: testconsumers:Recorder\n    queue: missing\n")
    result = run_cli(tmp_path, "--config", "config.yml", config=config,
                     env={"RABBITMQ_URL": broker.url})
    assert result.returncode == 4, result
    assert "config.yml: queues[0]: queue 'missing' does not exist" in result.stderr
    assert "NOT_FOUND" in result.stderr
    assert "Traceback" not in result.stderr


def test_binding_to_missing_exchange_names_the_binding(broker: BrokerHandle,
                                                        tmp_path: Path) -> None:
    config = ("queues:\n  - queue: q\n    bindings:\n      - exchange: nope\n"
              "        routing_key: k\n"
              "consumers:\n  - consumer: testconsumers:Recorder\n    queue: q\n")
    result = run_cli(tmp_path, "--config", "config.yml", config=config,
                     env={"RABBITMQ_URL": broker.url})
    assert result.returncode == 4, result
    assert "config.yml: queues[0].bindings[0]: cannot bind queue 'q' to exchange 'nope'" \
        in result.stderr


def test_prefetch_bounds_unacked(broker: BrokerHandle, tmp_path: Path) -> None:
    """With 10 slow consumers and prefetch 3, the broker never shows more than 3 unacked."""
    broker.declare("slow")
    for i in range(30):
        broker.publish("slow", f"m{i}")
    config = ("consumers:\n  - consumer: testconsumers:Sleeper\n    queue: slow\n"
              "    consumer_count: 10\n    prefetch_count: 3\n")
    proc = DispatcherProcess(tmp_path, config, broker.url, env={"SLEEP": "0.3"})
    try:
        proc.wait_consuming()
        peak = 0
        deadline = time.monotonic() + 60
        while len(proc.records()) < 30:
            assert time.monotonic() < deadline, "30 messages not handled in 60s"
            ready, unacked = broker.counts("slow")
            peak = max(peak, unacked)
            assert unacked <= 3
            assert proc.process.poll() is None
        assert peak == 3  # and it is used in full
        wait_until(lambda: broker.drained("slow"), what="queue drained")
    finally:
        assert proc.stop() == 0


# -- exchanges -------------------------------------------------------------------------

def test_exchanges_are_declared_and_bound(broker: BrokerHandle, tmp_path: Path) -> None:
    """The README's example: a topic exchange, a quorum queue dead-lettering to a fanout
    exchange, a headers binding with arguments, an exchange-to-exchange binding."""
    config = """
exchanges:
  - exchange: events
    type: topic
  - exchange: dlx
    type: fanout
    durable: false
    auto_delete: true
  - exchange: documents
    type: headers
    internal: false
    arguments: {alternate-exchange: unrouted}
  - exchange: audit
    type: fanout
    internal: true
    bindings:
      - exchange: events
        routing_key: "order.#"
queues:
  - queue: orders
    x_queue_type: quorum
    x_dead_letter_exchange: dlx
    x_delivery_limit: 3
    bindings:
      - exchange: events
        routing_key: order.*
  - queue: dead
    bindings:
      - exchange: dlx
        routing_key: ""
  - queue: pdfs
    bindings:
      - exchange: documents
        routing_key: ""
        arguments: {x-match: all, format: pdf}
  - queue: audited
    bindings:
      - exchange: audit
        routing_key: ""
consumers:
  - consumer: testconsumers:ProxyCommands
    queue: orders
"""
    proc = DispatcherProcess(tmp_path, config, broker.url)
    try:
        proc.wait_consuming()
        exchanges = {row[0]: row[1:] for row in listing(
            broker, "exchanges", "name", "type", "durable", "auto_delete", "internal",
            "arguments")}
        assert exchanges["events"] == ["topic", "true", "false", "false", "[]"]
        assert exchanges["dlx"] == ["fanout", "false", "true", "false", "[]"]
        assert exchanges["documents"] == ["headers", "true", "false", "false",
                                          '[{"alternate-exchange","unrouted"}]']
        assert exchanges["audit"] == ["fanout", "true", "false", "true", "[]"]
        bindings = listing(broker, "bindings", "source_name", "destination_name",
                           "destination_kind", "routing_key")
        assert ["events", "audit", "exchange", "order.#"] in bindings
        queues = {row[0]: row[1] for row in listing(broker, "queues", "name", "type")}
        assert queues["orders"] == "quorum"
        # Routing through each: the topic binding and the exchange-to-exchange one...
        broker.publish("order.new", "reject-drop:1", exchange="events")
        # ... the dead-letter exchange (the consumer rejected it without requeue) ...
        wait_until(lambda: broker.ready("dead") == 1, what="dead-lettered message")
        assert broker.get_all("dead") == [b"reject-drop:1"]
        assert broker.get_all("audited") == [b"reject-drop:1"]
        # ... and the headers binding, which matches on its arguments.
        broker.publish("", "a-pdf", exchange="documents", headers={"format": "pdf"})
        broker.publish("", "a-txt", exchange="documents", headers={"format": "txt"})
        wait_until(lambda: broker.ready("pdfs") == 1, what="header-routed message")
        assert broker.get_all("pdfs") == [b"a-pdf"]
    finally:
        assert proc.stop() == 0, proc.output


def test_plugin_exchange_type(broker: BrokerHandle, tmp_path: Path) -> None:
    broker.node.plugins("enable", "rabbitmq_consistent_hash_exchange")
    config = ("exchanges:\n  - exchange: spread\n    type: x-consistent-hash\n"
              "queues:\n  - queue: q\n    bindings:\n      - exchange: spread\n"
              "        routing_key: '1'\n"
              "consumers:\n  - consumer: testconsumers:Recorder\n    queue: q\n")
    proc = DispatcherProcess(tmp_path, config, broker.url)
    try:
        proc.wait_consuming()
        assert ["spread", "x-consistent-hash"] in listing(broker, "exchanges", "name", "type")
        broker.publish("any-key", "hashed", exchange="spread")
        wait_until(lambda: proc.records() == ["hashed"], what="message through the plugin")
    finally:
        assert proc.stop() == 0, proc.output


def test_unknown_exchange_type_is_refused_at_start(broker: BrokerHandle,
                                                   tmp_path: Path) -> None:
    """The broker closes the whole connection over it (503): still status 4, one line."""
    config = ("exchanges:\n  - exchange: later\n    type: x-delayed-message\n"
              "    arguments: {x-delayed-type: direct}\n"
              "consumers:\n  - consumer: testconsumers:Recorder\n    queue: q\n")
    assert start_refused(broker, tmp_path, config) == (
        "config.yml: exchanges[0].type: cannot declare exchange 'later' of type "
        "'x-delayed-message': broker said 503 COMMAND_INVALID - unknown exchange type "
        "'x-delayed-message' (is the plugin that provides it enabled?)")


HASH_PLUGIN = "rabbitmq_consistent_hash_exchange"
HASHED = ("exchanges:\n  - exchange: hashed\n    type: x-consistent-hash\n"
          "queues:\n  - queue: work\n"
          "consumers:\n  - consumer: testconsumers:Recorder\n    queue: work\n")


@pytest.fixture(scope="module")
def plugin_node() -> Iterator[Broker]:
    """A private node (plugins are node-wide) that loaded the consistent-hash plugin: once
    disabled, RabbitMQ calls its type "invalid", not "unknown"."""
    node = Broker()
    node.base.joinpath("enabled_plugins").write_text(f"[{HASH_PLUGIN}].\n")
    node.start()
    try:
        yield node
    finally:
        node.stop()


def test_disabled_plugin_type_is_refused_at_start(plugin_node: Broker, tmp_path: Path) -> None:
    plugin_node.plugins("disable", HASH_PLUGIN)
    assert start_refused(BrokerHandle(plugin_node, "/"), tmp_path, HASHED) == (
        "config.yml: exchanges[0].type: cannot declare exchange 'hashed' of type "
        "'x-consistent-hash': broker said 503 COMMAND_INVALID - invalid exchange type "
        "'x-consistent-hash' (is the plugin that provides it enabled?)")


def test_check_reports_a_disabled_plugin_type_and_goes_on(plugin_node: Broker,
                                                         tmp_path: Path) -> None:
    """--check: the broker closes the connection over the type; the line names it, and
    the rest is checked on a new connection (the queue, the consumer: nothing to say)."""
    plugin_node.plugins("disable", HASH_PLUGIN)
    result = run_cli(tmp_path, "--check", "--config", "config.yml", config=HASHED,
                     env={"RABBITMQ_URL": plugin_node.url})
    assert result.returncode == 1, result
    assert result.stderr.splitlines() == [
        "config.yml: exchanges[0].type: exchange type 'x-consistent-hash' is unknown to the "
        "broker (is the plugin that provides it enabled?): broker said 503 COMMAND_INVALID - "
        "invalid exchange type 'x-consistent-hash'"]


def test_disabled_plugin_type_is_retried_alone_while_every_entry_consumes(
        plugin_node: Broker, tmp_path: Path) -> None:
    """Before: after a reconnect, declaring the exchange made the broker close the whole
    connection again, so no entry ever consumed again. Now the session is opened
    without it, and the exchange is retried on a connection of its own until its
    plugin is back."""
    plugin_node.plugins("enable", HASH_PLUGIN)
    broker = BrokerHandle(plugin_node, "/")
    proc = DispatcherProcess(tmp_path, HASHED, plugin_node.url)
    try:
        proc.wait_consuming()
        broker.publish("work", "before")
        wait_until(lambda: proc.records() == ["before"], what="a message before")
        plugin_node.plugins("disable", HASH_PLUGIN)
        plugin_node.ctl("close_all_connections", "test closes every connection")
        proc.wait_for_log("reconnected after")
        broker.close()
        broker.publish("work", "after")
        wait_until(lambda: proc.records() == ["before", "after"], timeout=20,
                   what="the entry consuming again after the reconnect")
        proc.wait_for_log(r"config.yml: exchanges\[0\].type: cannot declare exchange "
                          r"'hashed' .* invalid exchange type 'x-consistent-hash' \(is the "
                          r"plugin that provides it enabled\?\); retrying in")
        plugin_node.plugins("enable", HASH_PLUGIN)
        # Declared at start, then by the check on a connection of its own, then in the
        # session again (with whatever is bound to it).
        wait_until(lambda: proc.output.count("declared exchange hashed") == 3, timeout=40,
                   what="the exchange declared again once its plugin is back")
        broker.publish("work", "later")
        wait_until(lambda: proc.records() == ["before", "after", "later"],
                   what="still consuming")
    finally:
        broker.close()
        assert proc.stop() == 0, proc.output


def test_exchange_of_another_type_is_refused_at_start(broker: BrokerHandle,
                                                      tmp_path: Path) -> None:
    broker.channel.exchange_declare("events", "fanout")
    config = ("exchanges:\n  - exchange: events\n    type: topic\n"
              "consumers:\n  - consumer: testconsumers:Recorder\n    queue: q\n")
    assert start_refused(broker, tmp_path, config) == (
        "config.yml: exchanges[0].type: exchange 'events' already exists with type fanout, "
        "the config asks for topic (an exchange's type and arguments cannot change: "
        "delete it or change the config)")


def test_passive_exchange(broker: BrokerHandle, tmp_path: Path) -> None:
    config = ("exchanges:\n  - exchange: theirs\n    passive: true\n"
              "queues:\n  - queue: q\n    bindings:\n      - exchange: theirs\n"
              "        routing_key: k\n"
              "consumers:\n  - consumer: testconsumers:Recorder\n    queue: q\n")
    line = start_refused(broker, tmp_path, config)
    assert line.startswith("config.yml: exchanges[0]: exchange 'theirs' does not exist "
                           "(passive: true only checks it): broker said 404 NOT_FOUND"), line
    broker.channel.exchange_declare("theirs", "direct", durable=False)
    proc = DispatcherProcess(tmp_path, config, broker.url)
    try:
        proc.wait_consuming()
        # Only checked: not declared again durable.
        assert ["theirs", "direct", "false"] in listing(broker, "exchanges", "name", "type",
                                                        "durable")
        broker.publish("k", "through-theirs", exchange="theirs")
        wait_until(lambda: proc.records() == ["through-theirs"], what="message")
    finally:
        assert proc.stop() == 0, proc.output


def test_exchange_refused_after_a_reconnect_is_repaired_on_its_own(
        broker: BrokerHandle, proxy: FaultProxy, tmp_path: Path) -> None:
    """Refused while running, an exchange is retried alone (the other entries consume);
    once it can be declared, the bindings to it are made again too."""
    config = """
exchanges:
  - exchange: events
    type: topic
queues:
  - queue: orders
    bindings:
      - exchange: events
        routing_key: order.*
  - queue: other
consumers:
  - consumer: testconsumers:Recorder
    queue: orders
  - consumer: testconsumers:Recorder
    queue: other
"""
    proc = DispatcherProcess(tmp_path, config, proxy.rewrite_url(broker.url))
    try:
        wait_until(lambda: proc.output.count("consuming from") == 2, what="two entries")
        proxy.refuse(True)
        proxy.drop_all()
        # While the dispatcher is away, someone declares the exchange with another type.
        broker.channel.exchange_delete("events")
        broker.channel.exchange_declare("events", "fanout")
        proxy.refuse(False)
        wait_until(lambda: "reconnected after" in proc.output, what="reconnect")
        broker.publish("other", "still-consuming")
        wait_until(lambda: "still-consuming" in proc.records(), what="the other entry")
        assert ("config.yml: exchanges[0].type: exchange 'events' already exists with type "
                "fanout, the config asks for topic") in proc.output
        assert "retrying in" in proc.output
        broker.channel.exchange_delete("events")  # the fix
        wait_until(lambda: ["events", "topic"] in listing(broker, "exchanges", "name", "type"),
                   what="the exchange declared again")
        wait_until(lambda: ["events", "orders", "queue", "order.*"] in listing(
            broker, "bindings", "source_name", "destination_name", "destination_kind",
            "routing_key"), what="the queue bound again")
        broker.publish("order.new", "routed-again", exchange="events")
        wait_until(lambda: "routed-again" in proc.records(), what="routing restored")
        assert proc.process.poll() is None
    finally:
        assert proc.stop() == 0, proc.output


# -- queue arguments -------------------------------------------------------------------

def test_queue_types_and_arguments_reach_the_broker(broker: BrokerHandle,
                                                    tmp_path: Path) -> None:
    config = """
queues:
  - queue: quorum
    x_queue_type: quorum
    x_delivery_limit: 5
    x_max_length_bytes: 1048576
    x_overflow: reject-publish
    x_single_active_consumer: true
    x_queue_leader_locator: balanced
  - queue: classic
    x_queue_type: classic
    x_max_priority: 10
    x_queue_mode: lazy
    x_overflow: reject-publish-dlx
    x_max_length: 100
  - queue: stream
    x_queue_type: stream
    x_max_length_bytes: 10000000
    arguments: {x-max-age: 7D, x-stream-max-segment-size-bytes: 1000000}
consumers:
  - consumer: testconsumers:Recorder
    queue: classic
"""
    proc = DispatcherProcess(tmp_path, config, broker.url)
    try:
        proc.wait_consuming()
        queues = {row[0]: row[1:] for row in listing(broker, "queues", "name", "type",
                                                     "arguments")}
        expected = {
            "quorum": ['{"x-queue-type","quorum"}', '{"x-delivery-limit",5}',
                       '{"x-max-length-bytes",1048576}', '{"x-overflow","reject-publish"}',
                       '{"x-single-active-consumer",true}',
                       '{"x-queue-leader-locator","balanced"}'],
            "classic": ['{"x-queue-type","classic"}', '{"x-max-priority",10}',
                        '{"x-queue-mode","lazy"}', '{"x-overflow","reject-publish-dlx"}'],
            "stream": ['{"x-queue-type","stream"}', '{"x-max-age","7D"}',
                       '{"x-stream-max-segment-size-bytes",1000000}'],
        }
        for name, arguments in expected.items():
            assert queues[name][0] == name
            for argument in arguments:
                assert argument in queues[name][1], queues[name]
    finally:
        assert proc.stop() == 0, proc.output


@pytest.mark.parametrize("existing, config_keys, expected", [
    ({"x-max-length": 10}, "    x_max_length: 20\n",
     "config.yml: queues[0].x_max_length: queue 'q' already exists with x-max-length 10, the "
     "config asks for 20 (a queue's arguments cannot change: delete it or change the config)"),
    ({"x-queue-type": "quorum"}, "",
     "config.yml: queues[0].x_queue_type: queue 'q' already exists with x-queue-type quorum, "
     "the config does not set it (a queue's arguments cannot change: delete it or change "
     "the config)"),
    ({}, "    arguments: {x-max-age: 1D}\n    x_queue_type: stream\n",
     "config.yml: queues[0].x_queue_type: queue 'q' already exists without x-queue-type, the "
     "config asks for stream (a queue's arguments cannot change: delete it or change the "
     "config)"),
])
def test_queue_with_other_arguments_is_one_line(broker: BrokerHandle, tmp_path: Path,
                                                existing: dict[str, object], config_keys: str,
                                                expected: str) -> None:
    broker.declare("q", durable=True, arguments=existing)
    config = ("queues:\n  - queue: q\n" + config_keys +
              "consumers:\n  - consumer: testconsumers:Recorder\n    queue: q\n")
    assert start_refused(broker, tmp_path, config) == expected


# -- consume arguments -----------------------------------------------------------------

def stream_config(consumer: str = "testconsumers:Recorder", offset: str = "first",
                  extra: str = "") -> str:
    return f"""
queues:
  - queue: log
    x_queue_type: stream
consumers:
  - consumer: {consumer}
    queue: log
    stream_offset: {offset}
    prefetch_count: 10
{extra}"""


def publish_to_stream(broker: BrokerHandle, bodies: list[str]) -> None:
    broker.declare("log", durable=True, arguments={"x-queue-type": "stream"})
    for body in bodies:
        broker.publish("log", body)


def test_stream_read_from_first_after_a_restart(broker: BrokerHandle, tmp_path: Path) -> None:
    """A stream keeps its messages: each start with stream_offset first reads them all.
    The first run is stopped while deliveries wait: giving them back must not reject
    them (RabbitMQ closes the connection over a reject on a stream)."""
    bodies = [f"m{i}" for i in range(5)]
    publish_to_stream(broker, bodies)
    first_run = tmp_path / "first"
    first_run.mkdir()
    proc = DispatcherProcess(first_run, stream_config("testconsumers:Sleeper"), broker.url,
                             env={"SLEEP": "0.5"})
    try:
        wait_until(lambda: proc.records() == ["m0"], what="the first message")
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0, proc.output
    finally:
        proc.stop()
    assert "connection lost" not in proc.output and "NOT_IMPLEMENTED" not in proc.output
    second_run = tmp_path / "second"
    second_run.mkdir()
    proc = DispatcherProcess(second_run, stream_config(), broker.url)
    try:
        wait_until(lambda: proc.records() == bodies, what="the stream read again")
    finally:
        assert proc.stop() == 0, proc.output
    third_run = tmp_path / "third"
    third_run.mkdir()
    proc = DispatcherProcess(third_run, stream_config(), broker.url)
    try:
        wait_until(lambda: proc.records() == bodies, what="and again")
    finally:
        assert proc.stop() == 0, proc.output


@pytest.mark.parametrize("offset, expected", [
    ("2", ["m2", "m3", "m4", "new"]),              # an offset
    ("2020-01-01", ["m0", "m1", "m2", "m3", "m4", "new"]),  # a timestamp (a YAML date)
    ("2020-01-01T10:00:00Z", ["m0", "m1", "m2", "m3", "m4", "new"]),
    ("next", ["new"]),                             # only what comes after the start
])
def test_stream_offsets(broker: BrokerHandle, tmp_path: Path, offset: str,
                        expected: list[str]) -> None:
    publish_to_stream(broker, [f"m{i}" for i in range(5)])
    proc = DispatcherProcess(tmp_path, stream_config(offset=offset), broker.url)
    try:
        proc.wait_consuming()
        broker.publish("log", "new")
        wait_until(lambda: proc.records()[-1:] == ["new"], what="the new message")
        assert proc.records() == expected
    finally:
        assert proc.stop() == 0, proc.output


def test_stream_failures_and_nacks_are_acks(broker: BrokerHandle, tmp_path: Path) -> None:
    """RabbitMQ closes the whole connection over a reject or nack on a stream: a failed
    consume, and a consumer's own nack or reject, are acked instead (the stream keeps
    the message; it is not delivered again)."""
    publish_to_stream(broker, ["fail-1", "ok-1"])
    proc = DispatcherProcess(tmp_path, stream_config("testconsumers:FailOnce"), broker.url)
    try:
        wait_until(lambda: "ok-1:redelivered=False" in proc.records(), what="ok-1")
        broker.publish("log", "ok-2")
        wait_until(lambda: "ok-2:redelivered=False" in proc.records(), what="ok-2")
        assert not any(r.startswith("fail-1:") for r in proc.records())  # not redelivered
        assert "message acked (a stream keeps it" in proc.output
        assert "NOT_IMPLEMENTED" not in proc.output
    finally:
        assert proc.stop() == 0, proc.output
    (tmp_path / "nacks").mkdir()
    publish_to_stream(broker, ["nack-once:a", "reject-drop:b", "ack:c"])
    proc = DispatcherProcess(tmp_path / "nacks",
                             stream_config("testconsumers:ProxyCommands", offset="3"),
                             broker.url)
    try:
        wait_until(lambda: "done:ack:c:True" in proc.records(), what="the last message")
        assert proc.records() == ["nacked:nack-once:a", "done:reject-drop:b:True",
                                  "done:ack:c:True"]
        assert "NOT_IMPLEMENTED" not in proc.output
    finally:
        assert proc.stop() == 0, proc.output


def two_dispatchers(broker: BrokerHandle, tmp_path: Path, first: str,
                    second: str) -> tuple[DispatcherProcess, DispatcherProcess]:
    procs = []
    for name, config in (("a", first), ("b", second)):
        (tmp_path / name).mkdir()
        procs.append(DispatcherProcess(tmp_path / name, config, broker.url))
        procs[-1].wait_consuming()
    return procs[0], procs[1]


def consumer_config(extra: str, queue_keys: str = "") -> str:
    return (f"queues:\n  - queue: work\n{queue_keys}"
            "consumers:\n  - consumer: testconsumers:Recorder\n    queue: work\n"
            f"    prefetch_count: 50\n{extra}")


def test_consumer_priority(broker: BrokerHandle, tmp_path: Path) -> None:
    """Deliveries go to the highest priority consumer while it has prefetch room."""
    low, high = two_dispatchers(broker, tmp_path, consumer_config("    priority: -5\n"),
                                consumer_config("    priority: 10\n"))
    try:
        for i in range(20):
            broker.publish("work", f"m{i}")
        wait_until(lambda: len(high.records()) == 20, what="all to the high priority one")
        assert low.records() == []
        assert high.stop() == 0
        broker.publish("work", "to-low")
        wait_until(lambda: low.records() == ["to-low"], what="the low priority one")
    finally:
        assert high.stop() == 0
        assert low.stop() == 0


def test_exclusive_consumer(broker: BrokerHandle, tmp_path: Path) -> None:
    """An exclusive consumer is the queue's only one: whichever comes second is refused
    at start (status 4)."""
    first = DispatcherProcess(tmp_path, consumer_config("    exclusive: true\n"), broker.url)
    try:
        first.wait_consuming()
        (tmp_path / "second").mkdir()
        line = start_refused(broker, tmp_path / "second", consumer_config(""))
        assert line.startswith("config.yml: consumers[0]: cannot consume from queue 'work': "
                               "broker said 403 ACCESS_REFUSED"), line
        assert "in exclusive use" in line
    finally:
        assert first.stop() == 0
    first = DispatcherProcess(tmp_path, consumer_config(""), broker.url)
    try:
        first.wait_consuming()
        line = start_refused(broker, tmp_path / "second",
                             consumer_config("    exclusive: true\n"))
        assert "403 ACCESS_REFUSED" in line, line
    finally:
        assert first.stop() == 0


def test_single_active_consumer(broker: BrokerHandle, tmp_path: Path) -> None:
    """Of two daemons on an x_single_active_consumer queue only the first gets messages;
    the other takes over when the first stops."""
    config = consumer_config("", queue_keys="    x_single_active_consumer: true\n")
    active, standby = two_dispatchers(broker, tmp_path, config, config)
    try:
        for i in range(10):
            broker.publish("work", f"m{i}")
        wait_until(lambda: len(active.records()) == 10, what="all to the active one")
        assert standby.records() == []
        assert active.stop() == 0
        broker.publish("work", "after")
        wait_until(lambda: standby.records() == ["after"], what="the standby taking over")
    finally:
        assert active.stop() == 0
        assert standby.stop() == 0


# -- stopping while stream deliveries are in transit -------------------------------------

STREAM_AND_SLOW_CONFIG = """
queues:
  - queue: log
    x_queue_type: stream
  - queue: jobs
consumers:
  - consumer: testconsumers:Recorder
    queue: log
    stream_offset: first
    prefetch_count: 200
  - consumer: testconsumers:Timed
    queue: jobs
"""
STREAM_BACKLOG = 60000


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_stop_and_reload_with_stream_deliveries_in_transit(
        broker: BrokerHandle, tmp_path: Path, signum: int) -> None:
    """A stream read at full speed is cancelled while the broker still has deliveries on
    the way: they are acked (pika would reject them, and RabbitMQ closes the whole
    connection over a reject on a stream), and the other entry's consume in progress
    finishes on a connection that is still open: its message is acked, once."""
    publish_to_stream(broker, [f"m{i}" for i in range(STREAM_BACKLOG)])
    broker.declare("jobs", durable=True)
    broker.publish("jobs", "slow")
    proc = DispatcherProcess(tmp_path, STREAM_AND_SLOW_CONFIG, broker.url, env={"SLOW": "4"})
    try:
        wait_until(lambda: "start:slow" in proc.records() and len(proc.records()) > 1000,
                   what="the slow consume in progress, the stream flowing")
        proc.signal(signum)
        if signum == signal.SIGHUP:
            proc.wait_for_log("the previous generation stopped")
            # Had its ack been lost, the new generation would be handling it again now.
            wait_until(lambda: broker.has_counts("jobs", 0, 0), what="the slow message acked")
            proc.signal(signal.SIGTERM)  # the new generation reads the stream again: once more
        assert proc.wait(timeout=60) == 0, proc.output
    finally:
        proc.stop()
    records = proc.records()
    if signum == signal.SIGTERM:
        assert len(records) - 2 < STREAM_BACKLOG, \
            "the stream was read to its end before the stop: nothing was in transit"
    assert records.count("start:slow") == 1 and records.count("done:slow") == 1
    assert broker.counts("jobs") == (0, 0)
    assert "NOT_IMPLEMENTED" not in proc.output and "connection lost" not in proc.output, \
        proc.output

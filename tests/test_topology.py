"""Each queue config key has an effect the broker shows."""

from __future__ import annotations

import time
from pathlib import Path

from helpers import BrokerHandle, DispatcherProcess, run_cli, wait_until


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
        wait_until(lambda: broker.counts("with_args")[0] == 2, what="routed messages")
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

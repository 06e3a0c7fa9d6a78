"""http.queue_depth_interval: amqp_dispatcher_queue_messages_ready{queue} and
amqp_dispatcher_queue_consumers{queue} follow the broker's own figures, read once for the
service under --processes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import BrokerHandle, DispatcherProcess, run_cli, wait_until
from rabbitnode import free_port
from test_metrics import Samples, scrape

from amqpdispatcher.supervision.endpoint import Totals, parse

CONFIG = """
http:
  port: {port}
  {interval}
stats_interval: 0
queues:
  - queue: work
  - queue: other
consumers:
  - consumer: testconsumers:Outcomes
    queue: work
    prefetch_count: 1
  - consumer: testconsumers:Outcomes
    queue: other
"""


def depth(samples: Samples) -> dict[str, tuple[float, float]]:
    """queue: (ready, consumers), as /metrics shows them."""
    ready = {dict(labels)["queue"]: v for (name, labels), v in samples.items()
             if name == "amqp_dispatcher_queue_messages_ready"}
    consumers = {dict(labels)["queue"]: v for (name, labels), v in samples.items()
                 if name == "amqp_dispatcher_queue_consumers"}
    return {queue: (ready[queue], consumers.get(queue, -1)) for queue in ready}


def follows_a_publish(broker: BrokerHandle, proc: DispatcherProcess, port: int,
                      consumers: int) -> None:
    wait_until(lambda: depth(scrape(port)) == {"work": (0, consumers),
                                               "other": (0, consumers)},
               what="both queues empty, each with its consumers")
    # One held in consume by each instance (prefetch 1): the rest stay ready.
    for i in range(consumers):
        broker.publish("work", f"hold-{i}")
    for i in range(5):
        broker.publish("work", f"ack-{i}")
    wait_until(lambda: depth(scrape(port)).get("work") == (5, consumers), timeout=10,
               what="5 ready in work on /metrics")
    assert broker.ready("work") == 5
    (proc.record.parent / "release").touch()
    wait_until(lambda: depth(scrape(port)).get("work") == (0, consumers), timeout=10,
               what="work empty again on /metrics")
    assert len(proc.records()) == 5 + consumers


def test_queue_depth_follows_a_publish(broker: BrokerHandle, tmp_path: Path) -> None:
    port = free_port()
    proc = DispatcherProcess(tmp_path, CONFIG.format(port=port,
                                                     interval="queue_depth_interval: 1"),
                             broker.url, env={"RELEASE_FILE": str(tmp_path / "release")})
    try:
        proc.wait_consuming()
        follows_a_publish(broker, proc, port, 1)
        # Another service's consumer is counted too: the broker's figure.
        other = broker.channel.basic_consume("other", lambda *args: None)
        wait_until(lambda: depth(scrape(port)).get("other") == (0, 2), timeout=10,
                   what="2 consumers on other")
        broker.channel.basic_cancel(other)
        # A consumed queue deleted: its series go (nothing stale), the others stay.
        broker.channel.queue_delete("other")
        wait_until(lambda: "other" not in depth(scrape(port)), timeout=10,
                   what="other's series gone")
        assert depth(scrape(port))["work"] == (0, 1)
    finally:
        assert proc.stop() == 0, proc.output
    assert "Traceback" not in proc.output


def test_a_consumed_stream_has_no_depth_series(broker: BrokerHandle, tmp_path: Path) -> None:
    """A stream keeps what its consumers read: the broker's declare-ok counts every
    message it holds, and no consumer. Read as "ready" and "consumers", a stream
    whose every message was consumed would look like a backlog nobody consumes."""
    port = free_port()
    config = f"""
http:
  port: {port}
  queue_depth_interval: 1
stats_interval: 0
queues:
  - queue: work
  - queue: log
    x_queue_type: stream
consumers:
  - consumer: testconsumers:Recorder
    queue: work
  - consumer: testconsumers:Recorder
    queue: log
    stream_offset: first
    prefetch_count: 10
"""
    proc = DispatcherProcess(tmp_path, config, broker.url)
    try:
        proc.wait_consuming()
        for i in range(3):
            broker.publish("log", f"s{i}")
        wait_until(lambda: proc.records() == ["s0", "s1", "s2"], what="the stream read")
        # Each read sets every queue's figures at once: work's series is there, so the
        # stream has been read too.
        wait_until(lambda: depth(scrape(port)).get("work") == (0, 1), timeout=10,
                   what="work's series")
        assert "log" not in depth(scrape(port))
    finally:
        assert proc.stop() == 0, proc.output


def test_queue_depth_interval_0_reads_nothing(broker: BrokerHandle, tmp_path: Path) -> None:
    port = free_port()
    proc = DispatcherProcess(tmp_path, CONFIG.format(port=port,
                                                     interval="queue_depth_interval: 0"),
                             broker.url)
    try:
        proc.wait_consuming()
        broker.publish("work", "ack-1")
        wait_until(lambda: proc.records(), what="the message handled")
        text = scrape(port)
        assert depth(text) == {}
    finally:
        assert proc.stop() == 0, proc.output


def channels_by_worker(broker: BrokerHandle) -> dict[str, int]:
    """Worker name ("1/2"): the channels of its consuming connection."""
    listed = broker.node.ctl("list_connections", "vhost", "channels", "client_properties")
    found = {}
    for line in listed.splitlines():
        if line.startswith(broker.vhost + "\t"):
            # The consuming connection's name ends with the worker's: not "... publisher".
            match = re.search(r'\{"connection_name","[^"]* worker (\d+/\d+)"\}', line)
            if match:
                found[match.group(1)] = int(line.split("\t")[1])
    return found


def test_under_processes_the_depth_is_read_once_for_the_service(broker: BrokerHandle,
                                                                tmp_path: Path) -> None:
    port = free_port()
    proc = DispatcherProcess(tmp_path, CONFIG.format(port=port,
                                                     interval="queue_depth_interval: 1"),
                             broker.url, env={"RELEASE_FILE": str(tmp_path / "release")},
                             args=("--processes", "2"))
    try:
        proc.wait_for_log("all 2 workers consuming")
        # Not added up over the workers: the broker's figures, once.
        follows_a_publish(broker, proc, port, 2)
        # Worker 1 has a side channel for the reads, worker 2 none: a channel per entry.
        assert channels_by_worker(broker) == {"1/2": 3, "2/2": 2}
    finally:
        assert proc.stop() == 0, proc.output


@pytest.mark.parametrize(("snippet", "line"), [
    ("queue_depth_interval: -1", "http.queue_depth_interval: expected zero or more, got -1"),
    ("queue_depth_interval: 0.5",
     "http.queue_depth_interval: expected 0 (not read) or at least 1, got 0.5"),
    ("queue_depth_interval: often",
     "http.queue_depth_interval: expected a number, got 'often'"),
])
def test_bad_queue_depth_interval_values(tmp_path: Path, snippet: str, line: str) -> None:
    config = (f"http:\n  {snippet}\n"
              "consumers:\n  - consumer: testconsumers:Recorder\n    queue: q\n")
    result = run_cli(tmp_path, "--config", "config.yml", "--validate", config=config)
    assert result.returncode == 1
    assert result.stderr == f"config.yml: {line}\n"


DEPTH_TEXT = """# HELP amqp_dispatcher_queue_messages_ready Messages ready
# TYPE amqp_dispatcher_queue_messages_ready gauge
{ready}
# HELP amqp_dispatcher_in_flight In flight
# TYPE amqp_dispatcher_in_flight gauge
amqp_dispatcher_in_flight{{queue="q",consumer="m:C"}} 1.0
"""


def test_the_arbiter_passes_the_depth_on_instead_of_adding_it_up() -> None:
    def answer(ready: int | None) -> dict:
        line = "" if ready is None else f'amqp_dispatcher_queue_messages_ready{{queue="q"}} {ready}'
        return parse(DEPTH_TEXT.format(ready=line))

    def sums(metrics: list) -> dict[str, float]:
        return {s.name: s.value for m in metrics for s in m.samples}

    totals = Totals()
    totals.keep({"1", "2"})
    # Worker 1 reads, worker 2 does not: its figure, not a sum (in_flight is one).
    assert sums(totals.add_up({"1": answer(40), "2": answer(None)})) == {
        "amqp_dispatcher_queue_messages_ready": 40, "amqp_dispatcher_in_flight": 2}
    # A reload's hand-over: the old and the new worker 1 both read; the larger.
    totals.keep({"1", "2", "1-new"})
    assert sums(totals.add_up({"1": answer(40), "2": answer(None), "1-new": answer(42)}))[
        "amqp_dispatcher_queue_messages_ready"] == 42
    # Worker 1 not answering: no figure rather than a stale one.
    assert "amqp_dispatcher_queue_messages_ready" not in sums(totals.add_up({"2": answer(None)}))

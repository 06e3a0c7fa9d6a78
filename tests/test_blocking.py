"""blocking_warning: consumer code that blocks the gevent hub is named, with its stack, in
one WARNING, and counted in amqp_dispatcher_hub_blocked_seconds_total; the other
consumers' work is delayed, not lost."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import BrokerHandle, DispatcherProcess, run_cli, wait_until
from rabbitnode import free_port
from test_metrics import scrape, value

CONFIG = """
http:
  port: {port}
stats_interval: 0
{extra}
queues:
  - queue: blocking
  - queue: other
consumers:
  - consumer: testconsumers:HubBlocker
    queue: blocking
  - consumer: testconsumers:Recorder
    queue: other
    consumer_count: 3
"""
WARNING = "the gevent hub has been blocked for"


def blocked_seconds(port: int) -> float:
    return value(scrape(port), "amqp_dispatcher_hub_blocked_seconds_total")


def test_a_blocking_consume_is_named_with_its_stack_and_counted(broker: BrokerHandle,
                                                               tmp_path: Path) -> None:
    port = free_port()
    proc = DispatcherProcess(tmp_path, CONFIG.format(port=port, extra=""), broker.url)
    try:
        proc.wait_consuming()
        assert blocked_seconds(port) == 0
        broker.publish("blocking", "2")
        proc.wait_for_log(WARNING)
        # Published while the process is blocked: handled once it yields.
        for i in range(20):
            broker.publish("other", f"m{i}")
        wait_until(lambda: len(proc.records()) == 21, what="every message handled")
        wait_until(lambda: broker.drained("other") and broker.drained("blocking"),
                   what="both queues drained")
        records = proc.records()
        assert records[0] == "slept:2", records  # nothing else ran meanwhile
        assert sorted(records[1:]) == sorted(f"m{i}" for i in range(20))
        seconds = blocked_seconds(port)
        assert 1.8 <= seconds < 3, seconds

        # A second block within the minute: counted, not logged again.
        broker.publish("blocking", "1.5")
        wait_until(lambda: blocked_seconds(port) >= seconds + 1.3,
                   what="the second block counted")
    finally:
        proc.stop()
    output = proc.output
    lines = [line for line in output.splitlines() if WARNING in line]
    assert len(lines) == 1, output
    assert re.search(r"blocked for \d\.\ds by consumers\[0\]'s consume "
                     r"\(testconsumers:HubBlocker, queue blocking\): heartbeats", lines[0])
    assert "(blocking_warning: 1s)" in lines[0]
    # The stack follows, down to the sleeping line of the consumer.
    stack = output[output.index(lines[0]):]
    assert re.search(r'testconsumers\.py", line \d+, in consume\n\s+time\.sleep\(', stack), \
        stack
    assert "Traceback" not in output
    assert proc.process.returncode == 0


def test_blocking_warning_0_watches_nothing(broker: BrokerHandle, tmp_path: Path) -> None:
    port = free_port()
    proc = DispatcherProcess(tmp_path, CONFIG.format(port=port, extra="blocking_warning: 0"),
                             broker.url)
    try:
        proc.wait_consuming()
        broker.publish("blocking", "1.5")
        wait_until(lambda: proc.records() == ["slept:1.5"], what="the block over")
        assert blocked_seconds(port) == 0
    finally:
        assert proc.stop() == 0
    assert WARNING not in proc.output


def test_a_longer_threshold_lets_a_shorter_block_pass(broker: BrokerHandle,
                                                      tmp_path: Path) -> None:
    port = free_port()
    proc = DispatcherProcess(tmp_path, CONFIG.format(port=port, extra="blocking_warning: 2.5"),
                             broker.url)
    try:
        proc.wait_consuming()
        broker.publish("blocking", "1.5")
        wait_until(lambda: proc.records() == ["slept:1.5"], what="the block over")
        assert blocked_seconds(port) == 0
        broker.publish("blocking", "4")
        proc.wait_for_log(r"\(blocking_warning: 2\.5s\)")
        wait_until(lambda: blocked_seconds(port) >= 3.8, what="the long block counted")
    finally:
        assert proc.stop() == 0


@pytest.mark.parametrize(("snippet", "line"), [
    ("blocking_warning: -1", "blocking_warning: expected zero or more, got -1"),
    ("blocking_warning: 0.01",
     "blocking_warning: expected 0 (not watched) or at least 0.1, got 0.01"),
    ("blocking_warning: slow", "blocking_warning: expected a number, got 'slow'"),
    ("blocking_warning: null", "blocking_warning: expected a number, got null"),
])
def test_bad_blocking_warning_values(tmp_path: Path, snippet: str, line: str) -> None:
    config = f"{snippet}\nconsumers:\n  - consumer: testconsumers:Recorder\n    queue: q\n"
    result = run_cli(tmp_path, "--config", "config.yml", "--validate", config=config)
    assert result.returncode == 1
    assert result.stderr == f"config.yml: {line}\n"


def test_the_watch_starts_stops_and_takes_a_reloads_threshold() -> None:
    """In-process: a block is counted, a reload's threshold applies, 0 stops gevent's
    monitor thread (started by the watch) and leaves gevent's config as it found it."""
    import time

    import gevent

    from amqpdispatcher.observability.blocking import BlockedHub

    hub = gevent.get_hub()
    assert hub.periodic_monitoring_thread is None
    found = (gevent.config.max_blocking_time, gevent.config.print_blocking_reports)
    watch = BlockedHub(0.2, lambda: [])
    watch.start()
    try:
        assert hub.periodic_monitoring_thread is not None
        gevent.sleep(0.05)
        time.sleep(0.4)  # blocks the hub: the point of the test
        wait_until(lambda: gevent.sleep(0.01) or watch.seconds > 0, timeout=5,
                   what="the block counted")
        assert 0.25 <= watch.seconds < 1, watch.seconds
        counted = watch.seconds
        watch.reconfigure(1.0)  # a reload's blocking_warning: 0.4 s no longer counts
        gevent.sleep(0.05)
        time.sleep(0.4)
        gevent.sleep(0.3)
        assert watch.seconds == counted
        watch.reconfigure(0)
        assert hub.periodic_monitoring_thread is None
        assert watch.seconds == counted  # the counter goes on from where it was
    finally:
        watch.stop()
    assert hub.periodic_monitoring_thread is None
    assert not gevent.config.monitor_thread
    assert (gevent.config.max_blocking_time, gevent.config.print_blocking_reports) == found

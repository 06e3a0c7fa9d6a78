"""Counts that survive a worker's death: under --processes, the arbiter's /metrics still
has what a SIGKILLed worker settled, up to its end, not only up to the last scrape
(contracts/counts.py: each worker's counters live in a file the arbiter reads)."""

from __future__ import annotations

import os
import re
import signal
import tempfile
from pathlib import Path

import pytest
from helpers import BrokerHandle, DispatcherProcess, wait_until
from rabbitnode import free_port
from test_metrics import get, scrape, value
from test_processes import gone, workers

from amqpdispatcher.consuming.outcomes import OUTCOMES
from amqpdispatcher.contracts.counts import COUNTS_SUFFIX, read_counts
from amqpdispatcher.contracts.metrics import help_text

PREFETCH = 5
CONFIG = f"""
http:
  port: {{port}}
stats_interval: 0
queues:
  - queue: work
consumers:
  - consumer: testconsumers:Sleeper
    queue: work
    consumer_count: 2
    prefetch_count: {PREFETCH}
"""
TOTAL = 600
LABELS = {"queue": "work", "consumer": "testconsumers:Sleeper"}


def test_a_sigkilled_workers_counts_stay_in_the_sums(broker: BrokerHandle,
                                                     tmp_path: Path) -> None:
    port = free_port()
    proc = DispatcherProcess(tmp_path, CONFIG.format(port=port), broker.url,
                             env={"SLEEP": "0.01"}, args=("--processes", "2"))
    try:
        proc.wait_for_log("all 2 workers consuming")
        for i in range(TOTAL):
            broker.publish("work", f"m{i}")
        # No scrape until the kill: what the worker counted is nowhere but in it.
        wait_until(lambda: len(proc.records()) >= TOTAL // 4, what="a quarter handled")
        victim = workers(proc)[1][0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: gone(victim), what="the worker gone")
        wait_until(lambda: broker.drained("work"), what="every message acked")
        wait_until(lambda: len(workers(proc).get(1, [])) == 2, what="worker 1 replaced")
        records = proc.records()
        assert set(records) == {f"m{i}" for i in range(TOTAL)}  # some twice: redelivered
        samples = scrape(port)
        text = get(port, "/metrics")[1]
    finally:
        assert proc.stop() == 0, proc.output
    settled = {outcome: value(samples, "amqp_dispatcher_messages_total", **LABELS,
                              outcome=outcome) for outcome in OUTCOMES}
    calls = value(samples, "amqp_dispatcher_consume_seconds_count", **LABELS)
    # Every consume call the consumer recorded was counted, and acked but for those the
    # killed worker finished and had not acked yet: at most its prefetch.
    assert len(records) - PREFETCH <= settled["ack"] <= len(records), (settled, len(records))
    assert len(records) - PREFETCH <= calls <= len(records), (calls, len(records))
    assert sum(settled.values()) == settled["ack"]  # nothing else happened
    # Families first known from a count file (the killed worker was never scraped) have
    # their help text all the same.
    for name in ("amqp_dispatcher_messages_total", "amqp_dispatcher_consume_seconds",
                 "amqp_dispatcher_hub_blocked_seconds_total"):
        assert f"# HELP {name} {help_text(name)}\n" in text, text


def test_the_count_files_hold_what_the_workers_metrics_say(broker: BrokerHandle,
                                                            tmp_path: Path) -> None:
    """Every counter sample of the workers' /metrics is in their count files, under the
    same name and labels, with the same value: what the arbiter reads after a death
    is what it would have added up."""
    port = free_port()
    proc = DispatcherProcess(tmp_path, CONFIG.format(port=port), broker.url,
                             env={"SLEEP": "0.01"}, args=("--processes", "2"))
    try:
        proc.wait_for_log("all 2 workers consuming")
        for i in range(50):
            broker.publish("work", f"m{i}")
        wait_until(lambda: broker.drained("work") and len(proc.records()) == 50,
                   what="every message acked")
        [directory] = [path for path in Path(tempfile.gettempdir()).glob(
            f"amqp-dispatcher-{proc.process.pid}-*")]
        files = sorted(directory.glob("*" + COUNTS_SUFFIX))
        assert len(files) == 2
        from_files: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for path in files:
            read = read_counts(str(path))
            assert read is not None
            for (_, (name, labels)), count in read[0].items():
                key = (name, frozenset(labels))
                from_files[key] = from_files.get(key, 0.0) + count
        samples = scrape(port)
    finally:
        assert proc.stop() == 0, proc.output
    counters = {key: count for key, count in samples.items()
                if key[0].startswith("amqp_dispatcher_") and key[0].endswith(
                    ("_total", "_bucket", "_count", "_sum"))
                and not key[0].startswith("amqp_dispatcher_workers_")}  # the processes' own
    assert set(from_files) == set(counters)
    for key, count in counters.items():
        assert from_files[key] == pytest.approx(count), key
    assert value(samples, "amqp_dispatcher_messages_total", **LABELS, outcome="ack") == 50


BREAKER = """
http:
  port: {port}
stats_interval: 0
queues:
  - queue: q
consumers:
  - consumer: testconsumers:Breakable
    queue: q
    prefetch_count: 4
    circuit_breaker: {{failure_ratio: 0.5, min_calls: 5, window: 2, open_for: 60}}
"""


def test_a_sigkilled_workers_circuit_trips_stay_in_the_sums(broker: BrokerHandle,
                                                            tmp_path: Path) -> None:
    """amqp_dispatcher_circuit_trips_total is a counter of the workers' too: a trip the
    arbiter never scraped is not lost with the worker."""
    port, fail = free_port(), tmp_path / "failing"
    fail.write_text("")
    proc = DispatcherProcess(tmp_path, BREAKER.format(port=port), broker.url,
                             env={"FAIL_FILE": str(fail)}, args=("--processes", "2"))

    def tripped() -> list[int]:
        return [int(pid) for pid in re.findall(r"\[(\d+)\] WARNING: circuit_breaker of "
                                               r"consumers\[0\] .*; trip 1$", proc.output,
                                               re.MULTILINE)]
    try:
        proc.wait_for_log("all 2 workers consuming")
        for i in range(20):
            broker.publish("q", f"m{i}")
        # No scrape until the kill: the trip is nowhere but in the worker.
        victim = wait_until(tripped, what="a worker's circuit open")[0]
        fail.unlink()
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: gone(victim), what="the worker gone")
        wait_until(lambda: sum(len(pids) for pids in workers(proc).values()) == 3,
                   what="its replacement consuming")
        trips = value(scrape(port), "amqp_dispatcher_circuit_trips_total", queue="q",
                      consumer="testconsumers:Breakable")
    finally:
        assert proc.stop() == 0, proc.output
    assert trips == len(tripped()), proc.output

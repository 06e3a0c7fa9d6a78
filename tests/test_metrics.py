"""Observability: /metrics against what the consumer did, /healthz and /readyz against a
broker that stops and starts, the http key's bad input, the stats line; and the
outcome counting in acks.py (pure logic)."""

from __future__ import annotations

import collections
import json
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import gevent
import gevent.socket
import pika.exceptions
import pytest
from helpers import BrokerHandle, DispatcherProcess, run_cli, wait_until
from prometheus_client.parser import text_string_to_metric_families
from rabbitnode import Broker, free_port

from amqpdispatcher.consuming.acks import Acknowledger
from amqpdispatcher.consuming.outcomes import (
    ACK,
    DEAD_LETTER,
    DROPPED,
    OUTCOMES,
    REJECT,
    REQUEUE,
    RETRY,
    Durations,
)
from amqpdispatcher.observability import http
from amqpdispatcher.observability.metrics import cumulative

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def get(port: int, path: str) -> tuple[int, str]:
    """(status, body) of GET http://127.0.0.1:port/path."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(port: int) -> Samples:
    status, text = get(port, "/metrics")
    assert status == 200, text
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def ready(port: int) -> bool:
    try:
        return get(port, "/readyz")[0] == 200
    except urllib.error.URLError:  # not listening yet
        return False


# -- /metrics against what the consumer recorded ------------------------------------

METRICS_CONFIG = """
http:
  port: {port}
stats_interval: 0
queues:
  - queue: plain
  - queue: retried
consumers:
  - consumer: testconsumers:Outcomes
    queue: plain
    consumer_count: 3
    prefetch_count: 10
  - consumer: testconsumers:Outcomes
    queue: retried
    consumer_count: 2
    retry:
      max_attempts: 2
      delay: 0.1
      dead_letter_queue: retried.dead
"""
CONSUMER = "testconsumers:Outcomes"
MAX_ATTEMPTS = {"plain": None, "retried": 2}


def expected_from(records: list[str]) -> dict[str, Any]:
    """Per queue: each outcome's count, consume calls and failures, from the consumer's
    own record of what each call did (testconsumers.Outcomes)."""
    result: dict[str, Any] = {q: {"outcomes": collections.Counter(), "calls": 0,
                                  "failures": 0} for q in MAX_ATTEMPTS}
    for line in records:
        queue, _, attempt, what = line.split(":")
        entry = result[queue]
        entry["calls"] += 1
        if what == "raised":
            entry["failures"] += 1
            limit = MAX_ATTEMPTS[queue]
            outcome = ("requeue" if limit is None
                       else "retry" if int(attempt) < limit else "dead_letter")
        else:
            outcome = {"returned": "ack", "acked": "ack", "nacked": "requeue",
                       "rejected": "reject"}[what]
        entry["outcomes"][outcome] += 1
    return result


def observed(samples: Samples) -> dict[str, Any]:
    """The same figures, as /metrics shows them."""
    result = {}
    for queue in MAX_ATTEMPTS:
        labels = {"queue": queue, "consumer": CONSUMER}
        result[queue] = {
            "outcomes": collections.Counter({
                outcome: int(value(samples, "amqp_dispatcher_messages_total", **labels,
                                   outcome=outcome))
                for outcome in OUTCOMES if value(samples, "amqp_dispatcher_messages_total",
                                                 **labels, outcome=outcome)}),
            "calls": int(value(samples, "amqp_dispatcher_consume_seconds_count", **labels)),
            "failures": int(value(samples, "amqp_dispatcher_consume_failures_total",
                                  **labels)),
        }
    return result


def test_metrics_match_what_the_consumer_did(broker: BrokerHandle, tmp_path: Path) -> None:
    port = free_port()
    release = tmp_path / "release"
    proc = DispatcherProcess(tmp_path, METRICS_CONFIG.format(port=port), broker.url,
                             env={"RELEASE_FILE": str(release)})
    try:
        wait_until(lambda: proc.process.poll() is None and ready(port), what="/readyz 200")
        before = scrape(port)
        for queue, count in (("plain", 3), ("retried", 2)):
            labels = {"queue": queue, "consumer": CONSUMER}
            assert value(before, "amqp_dispatcher_instances", **labels) == count
            assert value(before, "amqp_dispatcher_consuming", **labels) == 1
            assert value(before, "amqp_dispatcher_in_flight", **labels) == 0
            assert value(before, "amqp_dispatcher_instance_replacements_total", **labels) == 0
            for outcome in OUTCOMES:
                assert value(before, "amqp_dispatcher_messages_total", **labels,
                             outcome=outcome) == 0
        assert value(before, "amqp_dispatcher_connected") == 1
        assert value(before, "amqp_dispatcher_reconnects_total") == 0
        assert ("process_resident_memory_bytes", frozenset()) in before
        assert any(name == "python_gc_collections_total" for name, _ in before)

        # During the run: one message held in consume while the others go by.
        broker.publish("plain", "hold-1")
        plain = {"queue": "plain", "consumer": CONSUMER}
        wait_until(lambda: value(scrape(port), "amqp_dispatcher_in_flight", **plain) == 1,
                   what="the held message in flight")
        bodies = {"plain": [*(f"ok-{i}" for i in range(10)), *(f"ack-{i}" for i in range(3)),
                            "nack-1", "nack-2", "drop-1", "drop-2", "fail-1", "fail-2",
                            "fail-3"],
                  "retried": [*(f"ok-{i}" for i in range(4)), "fail-1", "fail-2",
                              "always-1", "always-2"]}
        for queue, messages in bodies.items():
            for body in messages:
                broker.publish(queue, body)
        # Everything but the held message: 25 calls on plain, 12 on retried.
        wait_until(lambda: len(proc.records()) == 37, what="37 consume calls")
        wait_until(lambda: value(scrape(port), "amqp_dispatcher_messages_total", **plain,
                                 outcome="ack") == 18, what="18 acks on plain")
        assert value(scrape(port), "amqp_dispatcher_in_flight", **plain) == 1

        release.touch()
        wait_until(lambda: len(proc.records()) == 38, what="the held message")
        wait_until(lambda: broker.drained("plain") and broker.drained("retried")
                   and broker.has_counts("retried.dead", 2, 0), what="queues settled")
        records = proc.records()
        expected = expected_from(records)
        assert expected["plain"]["outcomes"] == {"ack": 19, "requeue": 5, "reject": 2}
        assert expected["retried"]["outcomes"] == {"ack": 6, "retry": 4, "dead_letter": 2}
        # The last frames reach the broker before the counts (acks count when sent),
        # and each replacement follows its failed call: wait for the counts to settle,
        # then compare every one of them.
        wait_until(lambda: observed(scrape(port)) == expected, timeout=10,
                   what=f"metrics matching the record {expected}")
        after = scrape(port)
        for queue, count in (("plain", 3), ("retried", 2)):
            labels = {"queue": queue, "consumer": CONSUMER}
            assert value(after, "amqp_dispatcher_in_flight", **labels) == 0
            assert value(after, "amqp_dispatcher_instances", **labels) == count
            assert value(after, "amqp_dispatcher_instance_replacements_total", **labels) \
                == expected[queue]["failures"]
            assert value(after, "amqp_dispatcher_messages_total", **labels,
                         outcome="dropped") == 0
        # The held call lasted at least until the release, and lands in a slow bucket.
        assert value(after, "amqp_dispatcher_consume_seconds_sum", **plain) > 0.02
        assert value(after, "amqp_dispatcher_consume_seconds_bucket", **plain, le="0.001") \
            < value(after, "amqp_dispatcher_consume_seconds_bucket", **plain, le="+Inf") \
            == expected["plain"]["calls"]
    finally:
        assert proc.stop() == 0


DRAIN_CONFIG = """
http:
  port: {port}
stats_interval: 0
queues:
  - queue: plain
{queue_keys}
consumers:
  - consumer: testconsumers:Outcomes
    queue: plain
    consumer_count: 2
    prefetch_count: 200
"""


# Not a quorum queue: there the broker also returns, itself, what it had not yet sent
# when it took the cancel; those come back redelivered without reaching the daemon.
@pytest.mark.parametrize("queue_keys, arguments", [
    ("", {}),
    ("    x_single_active_consumer: true", {"x-single-active-consumer": True}),
], ids=["classic", "single-active-consumer"])
def test_deliveries_given_back_at_a_stop_are_counted(
        broker: BrokerHandle, tmp_path: Path, queue_keys: str,
        arguments: dict[str, Any]) -> None:
    """SIGTERM while the broker is still sending: every delivery given back is counted as
    ``requeue``, those already on their way when the consumer was cancelled included (pika
    would reject those itself, uncounted). The broker marks each message given back as
    redelivered: the count must match them."""
    port = free_port()
    release = tmp_path / "release"
    broker.declare("plain", durable=True, arguments=arguments)
    broker.publish("plain", "hold-1")
    total = 20000
    for i in range(total):
        broker.publish("plain", f"ok-{i}")
    proc = DispatcherProcess(tmp_path, DRAIN_CONFIG.format(port=port, queue_keys=queue_keys),
                             broker.url, env={"RELEASE_FILE": str(release)})
    labels = {"queue": "plain", "consumer": CONSUMER}
    try:
        # hold-1 came first: a worker holds it while the other takes the rest.
        wait_until(lambda: len(proc.records()) > 200, what="messages flowing")
        proc.signal(signal.SIGTERM)
        proc.wait_for_log("received SIGTERM")
        # Everything but hold-1 is back with the broker once its cancel took effect and
        # every delivery sent before it was settled: the counts are final.
        wait_until(lambda: broker.counts("plain")[1] == 1, what="only hold-1 unacked")
        samples = scrape(port)
        requeued = value(samples, "amqp_dispatcher_messages_total", **labels,
                         outcome="requeue")
        acked = value(samples, "amqp_dispatcher_messages_total", **labels, outcome="ack")
        dropped = value(samples, "amqp_dispatcher_messages_total", **labels,
                        outcome="dropped")
        release.touch()
        assert proc.wait() == 0, proc.output
    finally:
        proc.stop()
    returned = [r for r in proc.records() if r.startswith("plain:ok-")]
    assert acked == len(returned) and dropped == 0
    redelivered = 0
    left = 0
    for method, _, _ in broker.channel.consume("plain", auto_ack=True, inactivity_timeout=1):
        if method is None:
            break
        left += 1
        redelivered += method.redelivered
    broker.channel.cancel()
    assert left == total - len(returned)
    assert redelivered == requeued > 0


# -- /healthz and /readyz -------------------------------------------------------------

PROBE_CONFIG = """
http:
  port: {port}
queues:
  - queue: probed
consumers:
  - consumer: testconsumers:Outcomes
    queue: probed
"""


def test_readyz_follows_the_broker_healthz_stays_up_until_stopping(tmp_path: Path) -> None:
    node = Broker()
    node.start()
    port = free_port()
    release = tmp_path / "release"
    proc = DispatcherProcess(tmp_path, PROBE_CONFIG.format(port=port), node.url,
                             env={"RELEASE_FILE": str(release)})
    try:
        wait_until(lambda: proc.process.poll() is None and ready(port), what="/readyz 200")
        assert get(port, "/healthz") == (200, '{"status": "ok"}\n')

        node.ctl("stop_app")
        wait_until(lambda: not ready(port), what="/readyz 503")
        status, body = get(port, "/readyz")
        assert status == 503
        assert json.loads(body) == {
            "ready": False, "connected": False, "stopping": False,
            "not_consuming": [{"entry": "consumers[0]", "queue": "probed",
                               "consumer": "testconsumers:Outcomes"}]}
        assert get(port, "/healthz")[0] == 200  # reconnecting is alive
        assert value(scrape(port), "amqp_dispatcher_connected") == 0

        node.ctl("start_app")
        wait_until(lambda: ready(port), timeout=60, what="/readyz 200 again")
        samples = scrape(port)
        assert value(samples, "amqp_dispatcher_connected") == 1
        assert value(samples, "amqp_dispatcher_reconnects_total") == 1
        assert get(port, "/healthz")[0] == 200

        # Stopping: a drain in progress answers 503 on both.
        publisher = pika.BlockingConnection(pika.URLParameters(node.url))
        publisher.channel().basic_publish("", "probed", b"hold-1")
        publisher.close()
        wait_until(lambda: value(scrape(port), "amqp_dispatcher_in_flight",
                                 queue="probed", consumer="testconsumers:Outcomes") == 1,
                   what="a message in consume")
        proc.signal(signal.SIGTERM)
        wait_until(lambda: get(port, "/healthz")[0] == 503, what="/healthz 503")
        assert get(port, "/healthz") == (503, '{"status": "stopping"}\n')
        status, body = get(port, "/readyz")
        assert status == 503 and json.loads(body)["stopping"] is True
        release.touch()
        assert proc.wait() == 0
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
    finally:
        proc.stop()
        node.stop()


def test_a_settle_after_the_connection_was_lost_counts_as_dropped(broker: BrokerHandle,
                                                                  tmp_path: Path) -> None:
    port = free_port()
    release = tmp_path / "release"
    proc = DispatcherProcess(tmp_path, PROBE_CONFIG.format(port=port), broker.url,
                             env={"RELEASE_FILE": str(release)})
    labels = {"queue": "probed", "consumer": "testconsumers:Outcomes"}
    try:
        wait_until(lambda: proc.process.poll() is None and ready(port), what="/readyz 200")
        broker.publish("probed", "hold-1")
        wait_until(lambda: value(scrape(port), "amqp_dispatcher_in_flight", **labels) == 1,
                   what="the message in consume")
        broker.node.ctl("close_all_connections", "-p", broker.vhost, "metrics test")
        wait_until(lambda: value(scrape(port), "amqp_dispatcher_reconnects_total") == 1,
                   what="a reconnect")
        release.touch()  # the first call returns: its ack cannot be sent any more
        wait_until(lambda: proc.records() == ["probed:hold-1:1:returned"] * 2,
                   what="the message handled again after its redelivery")
        wait_until(lambda: broker.drained("probed"), what="the redelivered message acked")

        def outcomes() -> dict[str, float]:
            samples = scrape(port)
            return {outcome: value(samples, "amqp_dispatcher_messages_total", **labels,
                                   outcome=outcome) for outcome in OUTCOMES}

        wait_until(lambda: outcomes() == {"ack": 1, "requeue": 0, "reject": 0, "retry": 0,
                                          "dead_letter": 0, "dropped": 1},
                   timeout=10, what="one dropped, one ack")
    finally:
        assert proc.stop() == 0


def test_unknown_path_bad_method_and_head(broker: BrokerHandle, tmp_path: Path) -> None:
    port = free_port()
    proc = DispatcherProcess(tmp_path, PROBE_CONFIG.format(port=port), broker.url)
    try:
        wait_until(lambda: proc.process.poll() is None and ready(port), what="/readyz 200")
        assert get(port, "/nope")[0] == 404
        request = urllib.request.Request(f"http://127.0.0.1:{port}/readyz", method="POST")
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=5)
        assert error.value.code == 405
        for path in ("/metrics", "/healthz", "/readyz"):
            head = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="HEAD")
            with urllib.request.urlopen(head, timeout=5) as response:
                assert response.status == 200 and response.read() == b"", path
    finally:
        assert proc.stop() == 0


def test_probes_answer_while_idle_connections_are_open(broker: BrokerHandle,
                                                       tmp_path: Path) -> None:
    # Connections that send nothing (a port scanner, a load balancer's TCP check, a
    # slowloris) once held all 16 slots, and /healthz did not answer until they closed.
    port = free_port()
    proc = DispatcherProcess(tmp_path, PROBE_CONFIG.format(port=port), broker.url)
    idle: list[socket.socket] = []
    try:
        wait_until(lambda: proc.process.poll() is None and ready(port), what="/readyz 200")
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
            assert response.status == 200
    finally:
        for connection in idle:
            connection.close()
        assert proc.stop() == 0


class Tricklers:
    """``count`` slow clients (a slowloris), a thread each: each sends a request a byte a
    second and never finishes it, and connects again as soon as the server closes it."""

    HEAD = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: "

    def __init__(self, port: int, count: int = 70) -> None:
        self.port = port
        self.count = count
        self.connects = 0  # connections made, reconnections included
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._trickle, name="trickler", daemon=True)
                        for _ in range(count)]

    def __enter__(self) -> Tricklers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join()

    def all_connected(self) -> bool:
        with self.lock:
            return self.connects >= self.count

    def _trickle(self) -> None:
        while not self.stopping.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                    sock.settimeout(None)  # else a recv with MSG_DONTWAIT waits the timeout
                    sock.sendall(self.HEAD)
                    with self.lock:
                        self.connects += 1
                    self.hold(sock)
            except OSError:
                self.stopping.wait(0.2)  # refused (the server is gone): not a busy loop

    def hold(self, sock: socket.socket) -> None:
        """Keep the connection busy until the server closes it (then connect again)."""
        while not self.stopping.wait(1.0) and not self._closed(sock):
            sock.sendall(b"a")

    @staticmethod
    def _closed(sock: socket.socket) -> bool:
        try:
            sock.recv(1, socket.MSG_DONTWAIT)  # end-of-file, or an answer: the end
        except BlockingIOError:
            return False
        return True


def probe_failures(port: int, seconds: float) -> list[str]:
    """GET /healthz with a probe's 1 s timeout, again and again for ``seconds``: what
    went wrong, with when."""
    failures = []
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < seconds:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz",
                                        timeout=1) as response:
                if response.status != 200:
                    failures.append(f"{elapsed:.1f}s: {response.status}")
        except (OSError, urllib.error.URLError) as exc:
            failures.append(f"{elapsed:.1f}s: {exc}")
        threading.Event().wait(0.25)  # pacing, as a prober's period
    return failures


def test_probes_answer_while_slow_clients_hold_every_connection(broker: BrokerHandle,
                                                                tmp_path: Path) -> None:
    # 64 clients sending a byte a second once held every slot for good: the timeout was
    # per read, not per request, and a liveness probe failed for as long as they kept on.
    port = free_port()
    proc = DispatcherProcess(tmp_path, PROBE_CONFIG.format(port=port), broker.url)
    try:
        wait_until(lambda: proc.process.poll() is None and ready(port), what="/readyz 200")
        with Tricklers(port) as tricklers:
            wait_until(tricklers.all_connected, what="the slow clients connected")
            assert probe_failures(port, 12) == []
    finally:
        assert proc.stop() == 0, proc.output
    assert "Traceback" not in proc.output


def test_an_idle_connection_is_closed_by_the_server() -> None:
    server = http.Server(("127.0.0.1", 0), lambda environ, start_response: [])
    server.connections.timeout = 0.2  # REQUEST_TIMEOUT's 5 s, shortened for the test
    server.start()
    try:
        client = gevent.socket.create_connection(("127.0.0.1", server.server_port))
        client.settimeout(5)
        with gevent.Timeout(5, AssertionError("the idle connection was not closed")):
            assert client.recv(100) == b""  # closed by the server, nothing sent
        client.close()
    finally:
        server.stop(timeout=1)


def test_broken_requests_get_400_and_one_warning_without_traceback(
        broker: BrokerHandle, tmp_path: Path) -> None:
    port = free_port()
    proc = DispatcherProcess(tmp_path, PROBE_CONFIG.format(port=port), broker.url)
    broken = [b"GET /healthz HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n",
              b"GET /healthz HTTP/1.1\r\nX-A: " + b"b" * 70000 + b"\r\n\r\n",
              b"\x16\x03\x01 garbage\r\n\r\n"]
    try:
        wait_until(lambda: proc.process.poll() is None and ready(port), what="/readyz 200")
        for request in broken * 3:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
                connection.sendall(request)
                assert connection.recv(100).startswith(b"HTTP/1.1 400 "), request[:40]
        assert get(port, "/healthz")[0] == 200
    finally:
        assert proc.stop() == 0
    assert "Traceback" not in proc.output
    warnings = [line for line in proc.output.splitlines() if "broken request" in line]
    assert len(warnings) == 1, warnings
    assert " WARNING: " in warnings[0]


# -- bad input ------------------------------------------------------------------------

def test_port_in_use_fails_the_start_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(tmp_path, "--config", "config.yml",
                         config=PROBE_CONFIG.format(port=port))
    assert result.returncode == 1
    assert result.stderr == (f"config.yml: http.port: cannot listen on 127.0.0.1:{port}: "
                             "address already in use\n")


def test_address_not_on_this_machine_fails_the_start_in_one_line(tmp_path: Path) -> None:
    config = PROBE_CONFIG.format(port=9800).replace("http:\n", "http:\n  address: 192.0.2.1\n")
    result = run_cli(tmp_path, "--config", "config.yml", config=config)
    assert result.returncode == 1
    assert result.stderr == ("config.yml: http.address: cannot listen on 192.0.2.1:9800: "
                             "cannot assign requested address\n")


@pytest.mark.parametrize(("snippet", "line"), [
    ("http: 9800", "http: expected a mapping, got 9800"),
    ("http:\n  port: '9800'", "http.port: expected an integer, got '9800'"),
    ("http:\n  port: 0", "http.port: expected a positive integer, got 0"),
    ("http:\n  port: 65536", "http.port: expected at most 65535, got 65536"),
    ("http:\n  address: ''", "http.address: expected a non-empty string, got ''"),
    ("http:\n  adress: 0.0.0.0", "http.adress: unknown key (did you mean 'address'?); "
                                 "known keys: address, port, "
                                 "queue_depth_interval"),
    ("stats_interval: -1", "stats_interval: expected zero or more, got -1"),
    # Not a flood of stats lines as fast as the hub loops.
    ("stats_interval: 0.000001",
     "stats_interval: expected 0 (no stats line) or at least 0.1, got 1e-06"),
    ("stats_interval: fast", "stats_interval: expected a number, got 'fast'"),
    ("stats_interval: null", "stats_interval: expected a number, got null"),
])
def test_bad_http_and_stats_interval_values(tmp_path: Path, snippet: str, line: str) -> None:
    config = f"{snippet}\nconsumers:\n  - consumer: testconsumers:Recorder\n    queue: q\n"
    result = run_cli(tmp_path, "--config", "config.yml", "--validate", config=config)
    assert result.returncode == 1
    assert result.stderr == f"config.yml: {line}\n"


def test_http_defaults_and_fractional_stats_interval_validate(tmp_path: Path) -> None:
    config = ("http: {}\nstats_interval: 0.5\n"
              "consumers:\n  - consumer: testconsumers:Recorder\n    queue: q\n")
    result = run_cli(tmp_path, "--config", "config.yml", "--validate", config=config)
    assert result.returncode == 0, result.stderr


# -- the stats line ---------------------------------------------------------------------

STATS_CONFIG = """
stats_interval: {interval}
queues:
  - queue: {queue}
consumers:
  - consumer: testconsumers:Outcomes
    queue: {queue}
    consumer_count: 2
"""


def stats_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "stats (last" in line]


def test_stats_line_every_interval_and_never_with_zero(broker: BrokerHandle,
                                                       tmp_path: Path) -> None:
    (tmp_path / "off").mkdir()
    (tmp_path / "on").mkdir()
    off = DispatcherProcess(tmp_path / "off", STATS_CONFIG.format(interval=0, queue="quiet"),
                            broker.url)
    on = None
    try:
        off.wait_consuming()
        on = DispatcherProcess(tmp_path / "on", STATS_CONFIG.format(interval=0.5,
                                                                    queue="counted"),
                               broker.url)
        on.wait_consuming()
        for body in ("ok-1", "ok-2", "fail-1"):
            broker.publish("counted", body)
        # fail-1 is requeued once, then returns: 4 settled, 1 failure.
        wait_until(lambda: len(on.records()) == 4, what="4 consume calls")

        def totals() -> tuple[int, int, int]:
            lines = stats_lines(on.output)
            figures = [re.search(r"(\d+) handled, (\d+) failed", line) for line in lines]
            return (len(lines), sum(int(f[1]) for f in figures if f),
                    sum(int(f[2]) for f in figures if f))

        wait_until(lambda: totals()[1:] == (4, 1) and totals()[0] >= 3,
                   what="stats lines adding up to 4 handled, 1 failed")
        assert "consumers[0] counted: " in stats_lines(on.output)[-1]
        assert stats_lines(on.output)[-1].endswith("0 in flight")
        # The silent one has been running all along, longer than three intervals.
        assert off.process.poll() is None
        assert stats_lines(off.output) == []
    finally:
        if on is not None:
            assert on.stop() == 0
        assert off.stop() == 0


# -- outcome counting in acks.py (pure logic) -------------------------------------------

class FakeChannel:
    def __init__(self, closed: bool = False) -> None:
        self.closed = closed
        self.frames: list[tuple[str, int]] = []

    def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        if self.closed:
            raise pika.exceptions.ChannelWrongStateError("Channel is closed.")
        self.frames.append(("ack", delivery_tag))

    def basic_reject(self, delivery_tag: int, requeue: bool) -> None:
        if self.closed:
            raise pika.exceptions.ChannelWrongStateError("Channel is closed.")
        self.frames.append(("reject", delivery_tag))


def acker_for(channel: FakeChannel, tags: int) -> tuple[Acknowledger, list[int]]:
    outcomes = [0] * len(OUTCOMES)
    acker = Acknowledger(channel, 100, outcomes)
    for tag in range(1, tags + 1):
        acker.delivered(tag)
    return acker, outcomes


def test_each_settle_counts_one_outcome_when_sent() -> None:
    acker, outcomes = acker_for(FakeChannel(), 6)
    acker.ack(1)
    acker.ack(2)
    assert outcomes[ACK] == 0  # coalesced: counted when the flush sends them
    gevent.sleep(0)
    assert outcomes[ACK] == 2
    acker.reject(3, requeue=True)
    acker.reject(4, requeue=False)
    acker.ack_now(5, RETRY)
    acker.ack_now(6, DEAD_LETTER)
    assert outcomes == [2, 1, 1, 1, 1, 0]
    assert acker.unsettled() == 0


def test_settles_that_cannot_be_sent_count_as_dropped() -> None:
    channel = FakeChannel()
    acker, outcomes = acker_for(channel, 5)
    acker.ack(1)
    acker.ack(2)  # pending in the coalesced flush when the channel goes
    acker.close()
    acker.ack(3)
    acker.reject(4, requeue=True)
    acker.ack_now(5, RETRY)
    assert outcomes[DROPPED] == 5 and sum(outcomes) == 5

    closed = FakeChannel(closed=True)  # pika refuses the frames before we hear of it
    acker, outcomes = acker_for(closed, 3)
    acker.ack(1)
    acker.flush()
    acker.reject(2, requeue=False)
    acker.drop()  # a delivery discarded unstarted
    assert outcomes[DROPPED] == 3 and outcomes[REJECT] == outcomes[REQUEUE] == 0


def test_duration_buckets_are_cumulative_and_inclusive() -> None:
    durations = Durations()
    for seconds in (0.0005, 0.001, 0.003, 400.0):
        durations.observe(seconds)
    buckets = dict(cumulative(durations))
    assert buckets["0.001"] == 2  # "le": an observation on the bound is in its bucket
    assert buckets["0.0025"] == 2 and buckets["0.005"] == 3
    assert buckets["300.0"] == 3 and buckets["+Inf"] == 4
    assert durations.sum == pytest.approx(400.0045)


def test_entries_with_the_same_queue_and_consumer_share_one_series() -> None:
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from amqpdispatcher.config import ConsumerConfig
    from amqpdispatcher.consuming.outcomes import EntryMetrics
    from amqpdispatcher.observability.metrics import registry

    def pool(queue: str, acks: int, busy: int) -> SimpleNamespace:
        metrics = EntryMetrics(timed=True)
        metrics.outcomes[ACK] = acks
        metrics.durations.observe(0.002)
        return SimpleNamespace(entry=ConsumerConfig("m:C", queue), metrics=metrics, busy=busy,
                               breaker=None, live_instances=lambda: 1)

    dispatcher = SimpleNamespace(pools=[pool("a", 3, 1), pool("a", 4, 0), pool("b", 5, 2)],
                                 channels={0: object(), 2: object()}, reconnects=2,
                                 is_connected=lambda: True, queue_depth={"a": (4, 2)})
    samples: Samples = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(
            generate_latest(registry(lambda: dispatcher)).decode())
        for sample in family.samples}
    a, b = {"queue": "a", "consumer": "m:C"}, {"queue": "b", "consumer": "m:C"}
    assert value(samples, "amqp_dispatcher_messages_total", **a, outcome="ack") == 7
    assert value(samples, "amqp_dispatcher_messages_total", **b, outcome="ack") == 5
    assert value(samples, "amqp_dispatcher_in_flight", **a) == 1
    assert value(samples, "amqp_dispatcher_instances", **a) == 2
    assert value(samples, "amqp_dispatcher_consuming", **a) == 1  # one of its two entries
    assert value(samples, "amqp_dispatcher_consume_seconds_bucket", **a, le="0.0025") == 2
    assert value(samples, "amqp_dispatcher_consume_seconds_count", **b) == 1
    assert value(samples, "amqp_dispatcher_reconnects_total") == 2
    assert value(samples, "amqp_dispatcher_connected") == 1
    # Read once per queue, whatever the entries on it.
    assert value(samples, "amqp_dispatcher_queue_messages_ready", queue="a") == 4
    assert value(samples, "amqp_dispatcher_queue_consumers", queue="a") == 2

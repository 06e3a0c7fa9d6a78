"""The http endpoint with --processes: the arbiter's /metrics adds up the workers',
its /readyz asks every worker, its /healthz follows the arbiter; a kill -9, a broker
that stops, a SIGHUP and a SIGTERM; and, in a single process, the endpoint across a
SIGHUP reload."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import pika
from helpers import BrokerHandle, DispatcherProcess, run_cli, wait_until
from rabbitnode import Broker, free_port
from test_metrics import (
    CONSUMER,
    METRICS_CONFIG,
    PROBE_CONFIG,
    Tricklers,
    expected_from,
    get,
    observed,
    probe_failures,
    ready,
    scrape,
    value,
)
from test_processes import gone, workers
from test_reload import FakeProcess, reloadable
from test_reload import config as reload_config

from amqpdispatcher.config import HttpConfig
from amqpdispatcher.supervision.arbiter import Arbiter, Worker
from amqpdispatcher.supervision.endpoint import (
    WORKER_TIMEOUT,
    ArbiterEndpoint,
    Totals,
    WorkerView,
    parse,
)

# The same two entries as the single-process metrics test.
CONFIG = METRICS_CONFIG


def readyz(port: int) -> tuple[int, dict]:
    status, body = get(port, "/readyz")
    return status, json.loads(body)


def not_ready_workers(port: int) -> list[str] | None:
    """The workers /readyz names, or None while it answers 200."""
    status, body = readyz(port)
    return None if status == 200 else [w["worker"] for w in body["not_ready"]]


def publish_outcomes(broker: BrokerHandle, tag: str) -> None:
    """Messages ending in every outcome (testconsumers.Outcomes). Which worker sees a
    body first decides how often a nack-* or fail-* one is handled, so on the retried
    queue, where that would change the outcome, only bodies whose end is known: two
    always-* dead-lettered each time."""
    for body in (*(f"ok-{tag}{i}" for i in range(10)), *(f"ack-{tag}{i}" for i in range(3)),
                 f"nack-{tag}1", f"nack-{tag}2", f"drop-{tag}1", f"drop-{tag}2",
                 f"fail-{tag}1", f"fail-{tag}2", f"fail-{tag}3"):
        broker.publish("plain", body)
    for body in (*(f"ok-{tag}{i}" for i in range(4)), f"always-{tag}1", f"always-{tag}2"):
        broker.publish("retried", body)


def settled(broker: BrokerHandle, dead: int) -> bool:
    return broker.drained("plain") and broker.drained("retried") \
        and broker.counts("retried.dead") == (dead, 0)


def test_metrics_add_up_the_workers_and_survive_a_killed_one(broker: BrokerHandle,
                                                             tmp_path: Path) -> None:
    port = free_port()
    proc = DispatcherProcess(tmp_path, CONFIG.format(port=port), broker.url,
                             args=("--processes", "2"))
    try:
        proc.wait_for_log("all 2 workers consuming")
        wait_until(lambda: ready(port), what="/readyz 200")
        samples = scrape(port)
        for queue, count in (("plain", 3), ("retried", 2)):
            labels = {"queue": queue, "consumer": CONSUMER}
            assert value(samples, "amqp_dispatcher_instances", **labels) == 2 * count
            assert value(samples, "amqp_dispatcher_consuming", **labels) == 2
        assert value(samples, "amqp_dispatcher_connected") == 2
        assert value(samples, "amqp_dispatcher_workers") == 2
        assert value(samples, "amqp_dispatcher_workers_cpu_seconds_total") > 0
        assert value(samples, "amqp_dispatcher_workers_resident_memory_bytes") > \
            value(samples, "process_resident_memory_bytes")  # two workers, one arbiter

        publish_outcomes(broker, "a")
        wait_until(lambda: settled(broker, dead=2), what="queues settled")
        # The broker hands the deliveries out in turn: both workers have counts.
        expected = expected_from(proc.records())
        wait_until(lambda: observed(scrape(port)) == expected, timeout=10,
                   what=f"metrics adding up to the record {expected}")
        before = scrape(port)

        victim = workers(proc)[1][0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: not_ready_workers(port) == ["1/2"], what="/readyz naming 1/2")
        wait_until(lambda: len(workers(proc).get(1, [])) == 2, what="a new worker 1 consuming")
        wait_until(lambda: ready(port), what="/readyz 200 again")
        after = scrape(port)
        # The killed worker's counts are still in the sums: no counter went down.
        for key, was in before.items():
            if key[0].endswith(("_total", "_count", "_sum", "_bucket")):
                assert after[key] >= was, key
        assert observed(after) == expected
        assert value(after, "amqp_dispatcher_instances", queue="plain",
                     consumer=CONSUMER) == 6

        publish_outcomes(broker, "b")
        wait_until(lambda: settled(broker, dead=4), what="queues settled again")
        expected = expected_from(proc.records())
        wait_until(lambda: observed(scrape(port)) == expected, timeout=10,
                   what=f"metrics adding up to the record {expected}")
    finally:
        assert proc.stop() == 0, proc.output


def test_readyz_names_the_workers_while_the_broker_is_down(tmp_path: Path) -> None:
    node = Broker()
    node.start()
    port = free_port()
    release = tmp_path / "release"
    config = ("http:\n  port: {port}\nqueues:\n  - queue: probed\n"
              "consumers:\n  - consumer: testconsumers:Outcomes\n    queue: probed\n")
    proc = DispatcherProcess(tmp_path, config.format(port=port), node.url,
                             env={"RELEASE_FILE": str(release)}, args=("--processes", "2"))
    try:
        wait_until(lambda: proc.process.poll() is None and ready(port), what="/readyz 200")
        assert get(port, "/healthz") == (200, '{"status": "ok"}\n')

        node.ctl("stop_app")
        wait_until(lambda: not_ready_workers(port) == ["1/2", "2/2"],
                   what="/readyz naming both workers")
        status, body = readyz(port)
        assert status == 503 and body["ready"] is False and body["stopping"] is False
        pids = {number: pids[-1] for number, pids in workers(proc).items()}
        for worker in body["not_ready"]:
            number = int(worker["worker"][0])
            assert worker == {"worker": f"{number}/2", "pid": pids[number], "connected": False,
                              "stopping": False,
                              "not_consuming": [{"entry": "consumers[0]", "queue": "probed",
                                                 "consumer": "testconsumers:Outcomes"}]}
        assert get(port, "/healthz")[0] == 200  # reconnecting is alive
        assert value(scrape(port), "amqp_dispatcher_connected") == 0

        node.ctl("start_app")
        wait_until(lambda: ready(port), timeout=60, what="/readyz 200 again")
        samples = scrape(port)
        assert value(samples, "amqp_dispatcher_connected") == 2
        assert value(samples, "amqp_dispatcher_reconnects_total") == 2

        # SIGTERM: both answer 503 while a worker drains; /metrics still adds up.
        probed = {"queue": "probed", "consumer": "testconsumers:Outcomes"}
        publisher = pika.BlockingConnection(pika.URLParameters(node.url))
        publisher.channel().basic_publish("", "probed", b"hold-1")
        publisher.close()
        wait_until(lambda: value(scrape(port), "amqp_dispatcher_in_flight", **probed) == 1,
                   what="a message in consume")
        proc.signal(signal.SIGTERM)
        wait_until(lambda: get(port, "/healthz")[0] == 503, what="/healthz 503")
        assert get(port, "/healthz") == (503, '{"status": "stopping"}\n')
        assert readyz(port) == (503, {"ready": False, "stopping": True, "not_ready": []})
        assert value(scrape(port), "amqp_dispatcher_in_flight", **probed) == 1
        release.touch()
        assert proc.wait() == 0, proc.output
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, "still listening"
    finally:
        proc.stop()
        node.stop()
    assert not [line for line in proc.output.splitlines() if "Traceback" in line]


def test_a_wedged_worker_is_named_alone_under_concurrent_probes(broker: BrokerHandle,
                                                                tmp_path: Path) -> None:
    # The arbiter once asked through a pool of 2 x N threads: a wedged worker's questions
    # held them for 0.8 s each, and with a few requests at once the healthy worker's
    # question waited past its deadline, getting it named too.
    port = free_port()
    release = tmp_path / "release"
    config = ("http:\n  port: {port}\nstats_interval: 0\nqueues:\n  - queue: wedged\n"
              "consumers:\n  - consumer: testconsumers:Outcomes\n    queue: wedged\n"
              "    prefetch_count: 1\n")
    proc = DispatcherProcess(tmp_path, config.format(port=port), broker.url,
                             env={"RELEASE_FILE": str(release)}, args=("--processes", "2"))
    try:
        wait_until(lambda: proc.process.poll() is None and ready(port), what="/readyz 200")
        broker.publish("wedged", "wedge-1")
        wait_until(lambda: not_ready_workers(port) is not None, what="a worker wedged")
        bodies: list[tuple[int, dict]] = []
        threads = [threading.Thread(target=lambda: bodies.append(readyz(port)))
                   for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        named = [[(w["worker"], w.get("error")) for w in body["not_ready"]]
                 for _, body in bodies]
        wedged = named[0][:1]
        assert len(wedged) == 1 and wedged[0][1] == "did not answer within 0.8s", named
        assert named == [wedged] * 16, named
        assert all(status == 503 for status, _ in bodies)
    finally:
        release.touch()
        proc.stop()


def test_arbiter_probes_answer_while_slow_clients_hold_every_connection(
        broker: BrokerHandle, tmp_path: Path) -> None:
    # As test_probes_answer_while_slow_clients_hold_every_connection, on the arbiter's
    # own server (threads).
    port = free_port()
    proc = DispatcherProcess(tmp_path, PROBE_CONFIG.format(port=port), broker.url,
                             args=("--processes", "2"))
    try:
        wait_until(lambda: proc.process.poll() is None and ready(port), what="/readyz 200")
        with Tricklers(port) as tricklers:
            wait_until(tricklers.all_connected, what="the slow clients connected")
            assert probe_failures(port, 12) == []
    finally:
        assert proc.stop() == 0, proc.output
    assert "Traceback" not in proc.output


def accepted(pid: int, port: int) -> int:
    """How many connections to ``port`` process ``pid`` has accepted (and not closed)."""
    out = subprocess.run(["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return sum(f"pid={pid}," in line for line in out.splitlines())


def test_arbiter_exits_promptly_while_slow_clients_hold_its_endpoint(
        broker: BrokerHandle, tmp_path: Path) -> None:
    # The arbiter's server once waited for a free slot before accepting, and its stop
    # waited for that: with slow clients holding every slot, the workers exited 0 and
    # the arbiter never did.
    port = free_port()
    proc = DispatcherProcess(tmp_path, PROBE_CONFIG.format(port=port), broker.url,
                             args=("--processes", "2"))
    try:
        wait_until(lambda: proc.process.poll() is None and ready(port), what="/readyz 200")
        with Tricklers(port) as tricklers:
            wait_until(tricklers.all_connected, what="the slow clients connected")
            wait_until(lambda: accepted(proc.process.pid, port) >= 64,
                       what="the arbiter holding 64 connections")
            proc.signal(signal.SIGTERM)
            wait_until(lambda: len(re.findall(r"worker \d/2 \(pid \d+\) exited with "
                                              r"status 0", proc.output)) == 2,
                       what="both workers to exit 0")
            assert proc.wait(timeout=5) == 0, proc.output
    finally:
        proc.stop()


def test_a_killed_arbiters_socket_directory_is_removed_by_the_next(
        broker: BrokerHandle, tmp_path: Path) -> None:
    # The directory of the workers' sockets was left in the temporary directory, with
    # its sockets, by every arbiter killed with SIGKILL.
    temp = Path(tempfile.mkdtemp(prefix="ad-"))  # short: a socket's path has 108 bytes
    env = {"TMPDIR": str(temp)}
    config = PROBE_CONFIG.format(port=free_port())
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = DispatcherProcess(tmp_path / "first", config, broker.url, env=env,
                              args=("--processes", "2"))
    second: DispatcherProcess | None = None
    try:
        first.wait_for_log("all 2 workers consuming")
        stale = temp / next(p.name for p in temp.iterdir() if p.name.startswith("amqp-"))
        first.process.kill()
        first.process.wait()
        pids = [found[0] for found in workers(first).values()]
        wait_until(lambda: all(gone(pid) for pid in pids), what="the workers to drain")
        # The sockets are still there, and the workers' count files.
        assert sorted(p.suffix for p in stale.iterdir()) == [".counts", ".counts",
                                                            ".sock", ".sock"]
        # Not to be touched: a live process's directory, a name without a pid, a
        # symlink named as a dead arbiter's, and what it points to.
        live = temp / f"amqp-dispatcher-{os.getpid()}-live"
        live.mkdir()
        unrelated = temp / "amqp-dispatcher-notes"
        unrelated.mkdir()
        target = tmp_path / "target"
        target.mkdir()
        (target / "keep").touch()
        link = temp / f"amqp-dispatcher-{first.process.pid}-link"
        link.symlink_to(target)
        # Named as a dead arbiter's, but holding what no arbiter puts there: a user's.
        data = temp / f"amqp-dispatcher-{first.process.pid}-data"
        data.mkdir()
        (data / "notes.txt").write_text("keep me")

        second = DispatcherProcess(tmp_path / "second", config, broker.url, env=env,
                                   args=("--processes", "2"))
        second.wait_for_log("all 2 workers consuming")
        assert not stale.exists()
        assert live.is_dir() and unrelated.is_dir() and link.is_symlink()
        assert (target / "keep").exists()
        assert (data / "notes.txt").read_text() == "keep me"
        assert second.stop() == 0, second.output
        assert sorted(p.name for p in temp.iterdir()) == \
            sorted(p.name for p in (live, unrelated, link, data))  # its own one removed
    finally:
        first.stop()
        if second is not None:
            second.stop()
        shutil.rmtree(temp)


def test_port_in_use_fails_the_arbiter_in_one_line(tmp_path: Path) -> None:
    config = "http:\n  port: {port}\nconsumers:\n  - consumer: testconsumers:Recorder\n" \
             "    queue: jobs\n"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(tmp_path, "--processes", "2", "--config", "config.yml",
                         config=config.format(port=port))
    assert result.returncode == 1, result.stderr
    line = f"config.yml: http.port: cannot listen on 127.0.0.1:{port}: address already in use"
    assert line in result.stderr.splitlines(), result.stderr
    assert not re.search(r"worker \d/2 \(pid", result.stderr)  # no worker was started


def test_sighup_under_processes_keeps_the_endpoint_ready(broker: BrokerHandle,
                                                         tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "reloadable.py").write_text(reloadable(1))
    http = f"http:\n  port: {port}\n"
    proc = DispatcherProcess(tmp_path, http + reload_config(2), broker.url,
                             args=("--processes", "2"))
    answers: list[tuple[int, str]] = []
    polling = threading.Event()

    def poll() -> None:
        while not polling.wait(0.05):
            try:
                answers.append(get(port, "/readyz"))
            except OSError as exc:  # no answer at all: as much a failure as a 503
                answers.append((0, repr(exc)))

    poller = threading.Thread(target=poll)
    try:
        proc.wait_for_log("all 2 workers consuming")
        wait_until(lambda: ready(port), what="/readyz 200")
        for i in range(20):
            broker.publish("jobs", f"m{i}")
        acks = {"queue": "jobs", "consumer": "reloadable:Consumer", "outcome": "ack"}
        wait_until(lambda: value(scrape(port), "amqp_dispatcher_messages_total", **acks) == 20,
                   what="20 acks")
        poller.start()
        (tmp_path / "reloadable.py").write_text(reloadable(2))
        proc.config_path.write_text(http + reload_config(3))
        proc.signal(signal.SIGHUP)
        proc.wait_for_log("reloaded: the 2 new workers consume")
        wait_until(lambda: proc.output.count("of the previous set stopped") == 2,
                   what="the previous workers to stop")
        polling.set()
        poller.join()
        assert answers and {status for status, _ in answers} == {200}, \
            [answer for answer in answers if answer[0] != 200]  # what a 503 said
        samples = scrape(port)
        labels = {"queue": "jobs", "consumer": "reloadable:Consumer"}
        assert value(samples, "amqp_dispatcher_instances", **labels) == 2 * 3
        assert value(samples, "amqp_dispatcher_workers") == 2
        # The previous workers' acks are still counted.
        assert value(samples, "amqp_dispatcher_messages_total", **acks) == 20
    finally:
        polling.set()
        if poller.is_alive():
            poller.join()
        assert proc.stop() == 0, proc.output


class WorkerEndpoint:
    """A worker's endpoint on a unix socket, as the arbiter asks it: /readyz answers
    ``status`` with ``body``, after ``meanwhile()`` (if any) has run."""

    def __init__(self, path: str, status: int, body: dict,
                 meanwhile: Callable[[], None] | None = None) -> None:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the base's name
                if outer.meanwhile is not None:
                    outer.meanwhile()
                outer.asked += 1
                data = json.dumps(outer.body).encode()
                self.send_response(outer.status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.status, self.body, self.meanwhile, self.asked = status, body, meanwhile, 0
        self.server = socketserver.ThreadingUnixStreamServer(path, Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_readyz_asked_during_a_hand_over_answers_for_the_new_set(tmp_path: Path) -> None:
    """A /readyz request that read the arbiter's workers just before a reload handed
    over asked the previous set, which by then had its SIGTERM and answered 503
    (stopping): under load, test_sighup_under_processes_keeps_the_endpoint_ready once
    saw one 503. The set that serves once the request has its answers is asked."""
    endpoint = ArbiterEndpoint(HttpConfig(port=free_port()), "config.yml", 1)
    old = WorkerView(1, 100, str(tmp_path / "old.sock"), current=True)
    new = WorkerView(1, 200, str(tmp_path / "new.sock"), current=False)

    def hand_over() -> None:  # the arbiter, while the old worker is being asked
        endpoint.update([replace(old, current=False), replace(new, current=True)], False)

    stopping = {"ready": False, "connected": True, "stopping": True, "not_consuming": []}
    previous = WorkerEndpoint(old.socket, 503, stopping, meanwhile=hand_over)
    serving = WorkerEndpoint(new.socket, 200, {"ready": True})
    try:
        endpoint.update([old, new], False)
        assert endpoint._readyz() == (True, {"ready": True})
        assert (previous.asked, serving.asked) == (1, 1)
        # Without a hand-over meanwhile, a worker that is not ready is named at once.
        serving.status, serving.body = 503, stopping
        started = time.monotonic()
        assert endpoint._readyz() == (False, {"ready": False, "stopping": False, "not_ready": [
            {"worker": "1/1", "pid": 200, "connected": True, "stopping": True,
             "not_consuming": []}]})
        assert serving.asked == 2 and time.monotonic() - started < WORKER_TIMEOUT
    finally:
        previous.close()
        serving.close()


def test_a_hand_over_makes_the_new_set_current_before_the_previous_one_stops(
        tmp_path: Path) -> None:
    """The arbiter sent the previous set its SIGTERM, and only later told the endpoint
    that the new set served: a /readyz between the two asked workers that were stopping,
    and answered 503 during a reload."""
    arbiter = Arbiter(str(tmp_path / "config.yml"), 1)
    published: list[list[WorkerView]] = []

    class Endpoint:
        def update(self, workers: Iterable[WorkerView], stopping: bool) -> None:
            published.append(list(workers))

    try:
        old = Worker(1, 1, FakeProcess(100), None, time.monotonic(), "old.sock",  # type: ignore[arg-type]
                     consuming=True)
        new = Worker(1, 1, FakeProcess(200), None, time.monotonic(), "new.sock")  # type: ignore[arg-type]
        arbiter.running = True
        arbiter.workers, arbiter.serving, arbiter.new_set = [old, new], {1: old}, {1: new}
        arbiter.http = Endpoint()  # type: ignore[assignment]
        seen_at_term: list[list[WorkerView]] = []
        old.process.send_signal = (  # type: ignore[method-assign]
            lambda signum: seen_at_term.append(published[-1] if published else []))
        new.consuming = True
        arbiter._on_consuming(new)
        assert arbiter.serving == {1: new} and seen_at_term
        assert {view.pid: view.current for view in seen_at_term[0]} == {100: False, 200: True}
    finally:
        os.close(arbiter.wake_r)
        os.close(arbiter.wake_w)


def test_sighup_sent_to_a_worker_itself_keeps_the_arbiters_counts(broker: BrokerHandle,
                                                                    tmp_path: Path) -> None:
    # A SIGHUP sent to the workers rather than the arbiter once reloaded each on its own:
    # their counters started again from zero, and the arbiter, which keeps the highest
    # figure a live worker reported, under-counted what they had counted before.
    port = free_port()
    proc = DispatcherProcess(tmp_path, PROBE_CONFIG.format(port=port), broker.url,
                             args=("--processes", "2"))
    acks = {"queue": "probed", "consumer": CONSUMER, "outcome": "ack"}

    def acked(count: int) -> bool:
        return value(scrape(port), "amqp_dispatcher_messages_total", **acks) == count

    try:
        proc.wait_for_log("all 2 workers consuming")
        wait_until(lambda: ready(port), what="/readyz 200")
        for i in range(20):
            broker.publish("probed", f"ok-a{i}")
        wait_until(lambda: acked(20), what="20 acks")
        pids = [found[0] for found in workers(proc).values()]
        for pid in pids:
            os.kill(pid, signal.SIGHUP)
        for pid in pids:
            proc.wait_for_log(rf"\[{pid}\] (INFO: reloaded|WARNING: received SIGHUP)")
        for i in range(20):
            broker.publish("probed", f"ok-b{i}")
        wait_until(lambda: broker.drained("probed") and len(proc.records()) == 40,
                   what="40 messages consumed")
        wait_until(lambda: acked(40), timeout=5, what="40 acks in the arbiter's sums")
        arbiter = proc.process.pid
        for pid in pids:
            assert f"[{pid}] WARNING: received SIGHUP: this is a worker of --processes: " \
                   f"ignored; send SIGHUP to the arbiter (pid {arbiter}), which reloads " \
                   f"every worker" in proc.output
    finally:
        assert proc.stop() == 0, proc.output


def test_sighup_in_a_single_process_keeps_the_endpoint(broker: BrokerHandle,
                                                        tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "reloadable.py").write_text(reloadable(1))
    http = f"http:\n  port: {port}\n"
    proc = DispatcherProcess(tmp_path, http + reload_config(2), broker.url)
    labels = {"queue": "jobs", "consumer": "reloadable:Consumer"}
    try:
        wait_until(lambda: proc.process.poll() is None and ready(port), what="/readyz 200")
        assert value(scrape(port), "amqp_dispatcher_instances", **labels) == 2
        (tmp_path / "reloadable.py").write_text(reloadable(2))
        proc.config_path.write_text(http + reload_config(3))
        proc.signal(signal.SIGHUP)
        proc.wait_for_log("reloaded: the new generation consumes")
        assert ready(port)
        assert get(port, "/healthz")[0] == 200
        # The same port now serves the new generation.
        assert value(scrape(port), "amqp_dispatcher_instances", **labels) == 3
        broker.publish("jobs", "after")
        wait_until(lambda: "done:v2:after" in proc.records(), what="the new code consumes")
    finally:
        assert proc.stop() == 0, proc.output


# -- adding up (pure logic) ---------------------------------------------------------------

WORKER_TEXT = """# HELP amqp_dispatcher_messages_total Deliveries settled
# TYPE amqp_dispatcher_messages_total counter
amqp_dispatcher_messages_total{{queue="q",consumer="m:C",outcome="ack"}} {acks}
# HELP amqp_dispatcher_in_flight Deliveries in consume now
# TYPE amqp_dispatcher_in_flight gauge
amqp_dispatcher_in_flight{{queue="q",consumer="m:C"}} {busy}
# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total {cpu}
# HELP python_info Python platform information
# TYPE python_info gauge
python_info{{version="3"}} 1.0
"""


def test_counters_keep_an_exited_workers_part_and_gauges_only_answers() -> None:
    def answer(acks: int, busy: int, cpu: float = 1.0) -> dict:
        return parse(WORKER_TEXT.format(acks=acks, busy=busy, cpu=cpu))

    def sums(metrics: list) -> dict[str, float]:
        return {s.name: s.value for m in metrics for s in m.samples}

    totals = Totals()
    assert totals.keep({"a", "b"}) == []
    assert sums(totals.add_up({"a": answer(5, 1), "b": answer(7, 2)})) == {
        "amqp_dispatcher_messages_total": 12, "amqp_dispatcher_in_flight": 3,
        "amqp_dispatcher_workers_cpu_seconds_total": 2.0}  # python_info left out
    # b does not answer: its counters stay at what it last said, its gauges go.
    assert sums(totals.add_up({"a": answer(6, 0)})) == {
        "amqp_dispatcher_messages_total": 13, "amqp_dispatcher_in_flight": 0,
        "amqp_dispatcher_workers_cpu_seconds_total": 2.0}
    # b exits, c replaces it from zero: the sum does not go down.
    assert totals.keep({"a", "c"}) == ["b"]
    assert sums(totals.add_up({"a": answer(6, 0), "c": answer(0, 0, 0.1)})) == {
        "amqp_dispatcher_messages_total": 13, "amqp_dispatcher_in_flight": 0,
        "amqp_dispatcher_workers_cpu_seconds_total": 2.1}
    # An answer b gave before it exited, recorded late, changes nothing; an older answer
    # of a's (two requests in parallel) does not take its counters back.
    assert sums(totals.add_up({"b": answer(100, 9), "a": answer(1, 0)})) == {
        "amqp_dispatcher_messages_total": 13, "amqp_dispatcher_in_flight": 0,
        "amqp_dispatcher_workers_cpu_seconds_total": 2.1}

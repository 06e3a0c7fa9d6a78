"""Never lose a message: graceful drain, reconnects, misbehaving consumers, under faults
injected against the real broker. Each test publishes known ids and checks at the end
that every id was handled successfully at least once and the queue is empty."""

from __future__ import annotations

import collections
import os
import random
import signal
import time
from pathlib import Path

import pytest
from faultproxy import FaultProxy
from helpers import BrokerHandle, DispatcherProcess, wait_until

CYCLES = int(os.environ.get("FAULT_CYCLES", "3"))


def faulty_config(extra: str = "", count: int = 20, prefetch: int = 30) -> str:
    return f"""{extra}
queues:
  - queue: faults
consumers:
  - consumer: testconsumers:Faulty
    queue: faults
    consumer_count: {count}
    prefetch_count: {prefetch}
"""


def publish_ids(broker: BrokerHandle, n: int, queue: str = "faults") -> set[str]:
    ids = {f"id{i}" for i in range(n)}
    for body in sorted(ids):
        broker.publish(queue, body, delivery_mode=2)
    return ids


def done_ids(records: list[str]) -> collections.Counter[str]:
    return collections.Counter(r[5:] for r in records if r.startswith("done:"))


def report(name: str, ids: set[str], done: collections.Counter[str], **figures: object) -> None:
    duplicates = sum(done.values()) - len(done)
    extra = " ".join(f"{k}={v}" for k, v in figures.items())
    print(f"\n[{name}] messages={len(ids)} lost={len(ids - set(done))} "
          f"duplicates={duplicates} {extra}")


def test_sigterm_under_load_then_restart(broker: BrokerHandle, tmp_path: Path) -> None:
    broker.declare("faults", durable=True)
    ids = publish_ids(broker, 400)
    all_records: list[str] = []
    for cycle in range(CYCLES):
        run_dir = tmp_path / f"run{cycle}"
        run_dir.mkdir()
        proc = DispatcherProcess(run_dir, faulty_config(), broker.url, env={"PAUSE": "0.2"})
        proc.wait_consuming()
        # SIGTERM at a random moment: after 5 to 60 more messages are done.
        target = random.randint(5, 60)
        wait_until(lambda p=proc, t=target: len(done_ids(p.records())) >= t,
                   what="some progress")
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.output
        records = proc.records()
        started = sum(1 for r in records if r.startswith("start:"))
        finished = sum(1 for r in records if r.startswith(("done:", "fail:")))
        assert started == finished, "a consume in progress at SIGTERM was not finished"
        all_records += records
        assert broker.counts("faults")[1] == 0
    proc = DispatcherProcess(tmp_path, faulty_config(), broker.url)
    try:
        wait_until(lambda: ids <= set(done_ids(all_records + proc.records())), timeout=120,
                   what="every id handled")
        wait_until(lambda: broker.drained("faults"), what="queue drained")
    finally:
        assert proc.stop() == 0
    done = done_ids(all_records + proc.records())
    report("sigterm", ids, done, cycles=CYCLES)
    assert set(done) == ids


def _fault_while_in_flight(broker: BrokerHandle, tmp_path: Path, name: str, inject,
                           rounds: int = 3) -> DispatcherProcess:
    broker.declare("faults", durable=True)
    # Enough work (about 8 s at 20 x 0.15 s on average) to be in flight at every fault.
    ids = publish_ids(broker, 1000)
    proc = DispatcherProcess(tmp_path, faulty_config(), broker.url, env={"PAUSE": "0.3"})
    reconnect_times = []
    try:
        proc.wait_consuming()
        for round_ in range(rounds):
            before = len(done_ids(proc.records()))
            wait_until(lambda b=before: len(done_ids(proc.records())) > b + 10,
                       what="messages in flight")
            started = time.monotonic()
            inject()
            wait_until(lambda r=round_: proc.output.count("reconnected after") > r, timeout=60,
                       what=f"reconnect {round_ + 1}")
            reconnect_times.append(round(time.monotonic() - started, 2))
            assert proc.process.poll() is None
        wait_until(lambda: ids <= set(done_ids(proc.records())), timeout=120,
                   what="every id handled")
        wait_until(lambda: broker.drained("faults"), what="queue drained")
        done = done_ids(proc.records())
        report(name, ids, done, faults=rounds, reconnect_seconds=reconnect_times)
        assert set(done) == ids
        assert proc.process.poll() is None
    finally:
        assert proc.stop() == 0, proc.output
    return proc


def test_broker_closes_all_connections(broker: BrokerHandle, tmp_path: Path) -> None:
    proc = _fault_while_in_flight(
        broker, tmp_path, "close_all_connections",
        lambda: broker.node.ctl("close_all_connections", "-p", broker.vhost, "fault test"))
    assert "CONNECTION_FORCED - fault test" in proc.output


def test_broker_app_stops_and_starts(broker: BrokerHandle, tmp_path: Path) -> None:
    def restart() -> None:
        broker.node.ctl("stop_app")
        broker.node.ctl("start_app")

    _fault_while_in_flight(broker, tmp_path, "stop_app/start_app", restart, rounds=2)


def misbehaving_config(extra: str = "") -> str:
    return f"""{extra}
queues:
  - queue: bad
  - queue: good
consumers:
  - consumer: testconsumers:Misbehaving
    queue: bad
    consumer_count: 2
  - consumer: testconsumers:Recorder
    queue: good
"""


@pytest.mark.parametrize("body", ["system-exit", "keyboard-interrupt", "greenlet-exit",
                                  "shutdown-raises", "init-raises"])
def test_misbehaving_consumer_does_not_kill_the_daemon(broker: BrokerHandle, tmp_path: Path,
                                                       body: str) -> None:
    proc = DispatcherProcess(tmp_path, misbehaving_config(), broker.url)
    try:
        proc.wait_consuming()
        broker.publish("bad", body)
        wait_until(lambda: f"done:{body}" in proc.records(), timeout=30,
                   what="the message redelivered and handled")
        # Both slots still work: two messages at once are handled.
        broker.publish("bad", "after-1")
        broker.publish("bad", "after-2")
        broker.publish("good", "other-entry")
        wait_until(lambda: {"done:after-1", "done:after-2", "other-entry"}
                   <= set(proc.records()), what="later messages")
        wait_until(lambda: broker.drained("bad"), what="queue drained")
        assert proc.process.poll() is None
    finally:
        assert proc.stop() == 0, proc.output


def test_channel_closed_by_broker_is_reopened(broker: BrokerHandle, tmp_path: Path) -> None:
    proc = DispatcherProcess(tmp_path, misbehaving_config(), broker.url)
    try:
        proc.wait_consuming()
        broker.publish("bad", "break-channel")
        wait_until(lambda: "done:break-channel" in proc.records(), what="redelivered and done")
        assert "the broker closed the channel of consumers[0] (bad): 406 PRECONDITION_FAILED" \
            in proc.output
        broker.publish("good", "other-entry")
        broker.publish("bad", "next")
        wait_until(lambda: {"other-entry", "done:next"} <= set(proc.records()),
                   what="both entries still consuming")
        wait_until(lambda: broker.drained("bad"), what="queue drained")
        assert "reconnected" not in proc.output  # the connection itself stayed up
    finally:
        assert proc.stop() == 0


def test_drain_timeout_gives_unfinished_messages_back(broker: BrokerHandle,
                                                      tmp_path: Path) -> None:
    proc = DispatcherProcess(tmp_path, misbehaving_config("drain_timeout: 1"), broker.url)
    proc.wait_consuming()
    broker.publish("bad", "hang-1")
    wait_until(lambda: "hanging:hang-1" in proc.records(), what="consume in progress")
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 6
    assert "drain_timeout (1s) ran out with 1 message(s) still in consume" in proc.output
    wait_until(lambda: broker.has_counts("bad", 1, 0), what="message back in the queue")


def test_second_sigterm_stops_at_once(broker: BrokerHandle, tmp_path: Path) -> None:
    proc = DispatcherProcess(tmp_path, misbehaving_config(), broker.url)
    proc.wait_consuming()
    broker.publish("bad", "hang-2")
    wait_until(lambda: "hanging:hang-2" in proc.records(), what="consume in progress")
    proc.signal(signal.SIGTERM)
    proc.wait_for_log("finishing messages in progress")
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 128 + signal.SIGTERM
    wait_until(lambda: broker.has_counts("bad", 1, 0), what="message back in the queue")


def test_sigint_stops_at_once(broker: BrokerHandle, tmp_path: Path) -> None:
    proc = DispatcherProcess(tmp_path, misbehaving_config(), broker.url)
    proc.wait_consuming()
    broker.publish("bad", "hang-3")
    wait_until(lambda: "hanging:hang-3" in proc.records(), what="consume in progress")
    proc.signal(signal.SIGINT)
    assert proc.wait(timeout=15) == 128 + signal.SIGINT
    wait_until(lambda: broker.has_counts("bad", 1, 0), what="message back in the queue")


def test_reconnect_gives_up_after_bound(broker: BrokerHandle, tmp_path: Path) -> None:
    config = misbehaving_config("reconnect_give_up_after: 2")
    # A user without permissions after the first connection: reconnecting fails.
    broker.node.ctl("add_user", "flaky", "flakypw")
    broker.node.ctl("set_permissions", "-p", broker.vhost, "flaky", ".*", ".*", ".*")
    url = broker.url.replace("guest:guest", "flaky:flakypw")
    proc = DispatcherProcess(tmp_path, config, url)
    proc.wait_consuming()
    broker.node.ctl("delete_user", "flaky")  # also closes its connections
    assert proc.wait(timeout=30) == 3
    assert "reconnect attempt 1 failed" in proc.output
    assert "could not reconnect within reconnect_give_up_after (2s)" in proc.output
    assert "flakypw" not in proc.output


def test_reconnects_leave_no_file_descriptor_behind(broker: BrokerHandle,
                                                    tmp_path: Path) -> None:
    """Every connection, failed attempts included, consuming and publishing alike, is
    released whole: pika's GeventConnection keeps a pipe (2 fds) for its thread-safe
    callbacks that pika never closes (broker.release_connection)."""
    broker.declare("commands", durable=True)
    broker.declare("published_out")
    config = ("queues:\n  - queue: commands\n"
              "consumers:\n  - consumer: testconsumers:ProxyCommands\n    queue: commands\n")
    with FaultProxy("127.0.0.1", broker.node.port) as proxy:
        proc = DispatcherProcess(tmp_path, config, proxy.rewrite_url(broker.url))

        def fds() -> int:
            return len(os.listdir(f"/proc/{proc.process.pid}/fd"))

        try:
            proc.wait_consuming()
            broker.publish("commands", "publish")  # opens the publishing connection
            wait_until(lambda: broker.ready("published_out") == 1, what="a publish")
            before = fds()
            proxy.refuse(True)
            proxy.drop_all()
            proc.wait_for_log("reconnect attempt 2 failed")
            proc.wait_for_log("cannot open the publishing connection")
            proxy.refuse(False)
            proc.wait_for_log("reconnected after")
            broker.publish("commands", "publish")
            wait_until(lambda: broker.ready("published_out") == 2, what="a publish again",
                       timeout=60)
            attempts = proc.output.count("reconnect attempt") + proc.output.count(
                "cannot open the publishing connection") + 2
            after = fds()
        finally:
            assert proc.stop() == 0, proc.output
    assert attempts >= 5
    assert after - before <= 1, f"{after - before} more open fds after {attempts} connections"

"""Production traffic, the hostile way: slow outliers, a channel closed under running
consumes, connections cut in the middle of declaring, queues that vanish, flapping
connections, signals at the worst moment. Each test names the defect it pins."""

from __future__ import annotations

import signal
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultproxy import FaultProxy
from helpers import BrokerHandle, DispatcherProcess, run_cli, wait_until


@pytest.fixture
def proxy(broker: BrokerHandle) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", broker.node.port) as fault_proxy:
        yield fault_proxy


def done(proc: DispatcherProcess, prefix: str = "") -> list[str]:
    return [r[5:] for r in proc.records() if r.startswith("done:" + prefix)]


# -- 1. no head-of-line stall ----------------------------------------------------------

def test_one_slow_message_does_not_stall_its_entry(broker: BrokerHandle,
                                                   tmp_path: Path) -> None:
    """Before: the contiguous-prefix ack held every completed delivery behind the slow
    one, the prefetch window filled, and 15 of 400 were consumed in 10 s."""
    broker.declare("q")
    config = ("drain_timeout: 1\nconsumers:\n  - consumer: testconsumers:Timed\n"
              "    queue: q\n    consumer_count: 4\n    prefetch_count: 16\n")
    proc = DispatcherProcess(tmp_path, config, broker.url, env={"SLOW": "120"})
    try:
        proc.wait_consuming()
        broker.publish("q", "slow")
        wait_until(lambda: "start:slow" in proc.records(), what="the slow message started")
        for i in range(400):
            broker.publish("q", f"f{i}")
        # 400 x 10 ms on the 3 free instances is about 1.5 s; the slow one takes 120 s.
        wait_until(lambda: len(done(proc, "f")) == 400, timeout=30,
                   what="the 400 quick messages, while the slow one runs")
        wait_until(lambda: broker.has_counts("q", 0, 1), what="only the slow one unacked")
    finally:
        proc.signal(signal.SIGINT)
        proc.wait()


# -- 2. a transient error is never a config error --------------------------------------

def many_queues_config(count: int = 60) -> str:
    queues = "".join(f"  - queue: extra{i}\n    bindings:\n      - exchange: amq.topic\n"
                     f"        routing_key: k{i}\n" for i in range(count))
    return ("queues:\n" + queues + "  - queue: work\nconsumers:\n"
            "  - consumer: testconsumers:Recorder\n    queue: work\n")


def declaring_bytes(proxy: FaultProxy, broker: BrokerHandle, tmp_path: Path) -> int:
    """Client bytes of a whole start (handshake, declarations, consume), measured."""
    probe = tmp_path / "probe"
    probe.mkdir()
    proc = DispatcherProcess(probe, many_queues_config(), proxy.rewrite_url(broker.url))
    try:
        proc.wait_consuming()
        return proxy.client_bytes(proxy.connections - 1)
    finally:
        assert proc.stop() == 0


def test_connection_cut_while_declaring_at_start_is_a_broker_error(
        broker: BrokerHandle, proxy: FaultProxy, tmp_path: Path) -> None:
    """Before: exit 4 ("the broker refused the config"), which systemd does not restart."""
    total = declaring_bytes(proxy, broker, tmp_path)
    proxy.cut_after(total // 2)  # well past the handshake, among the 60 declarations
    result = run_cli(tmp_path, "--config", "config.yml", config=many_queues_config(),
                     env={"RABBITMQ_URL": proxy.rewrite_url(broker.url)})
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr


def test_connection_cut_while_declaring_after_a_reconnect_keeps_reconnecting(
        broker: BrokerHandle, proxy: FaultProxy, tmp_path: Path) -> None:
    total = declaring_bytes(proxy, broker, tmp_path)
    proc = DispatcherProcess(tmp_path, many_queues_config(), proxy.rewrite_url(broker.url))
    try:
        proc.wait_consuming()
        proxy.cut_after(total // 2)  # the next connection dies among the declarations
        proxy.drop_all()
        wait_until(lambda: "reconnected after" in proc.output, timeout=30, what="reconnect")
        assert "reconnect attempt 1 failed" in proc.output
        broker.publish("work", "after")
        wait_until(lambda: "after" in proc.records(), what="consuming again")
        assert proc.process.poll() is None
    finally:
        assert proc.stop() == 0, proc.output


# -- 3. one entry's problem never takes the others down --------------------------------

def test_missing_queue_while_running_retries_that_entry_alone(
        broker: BrokerHandle, proxy: FaultProxy, tmp_path: Path) -> None:
    """Before: after a reconnect, one entry whose queue is gone failed the whole session
    (every entry torn down, in a loop); a refused passive queue exited 4."""
    broker.declare("gone")
    broker.declare("p")
    broker.declare("other")
    config = """
queues:
  - queue: p
    passive: true
consumers:
  - consumer: testconsumers:Recorder
    queue: gone
  - consumer: testconsumers:Recorder
    queue: p
  - consumer: testconsumers:Recorder
    queue: other
"""
    proc = DispatcherProcess(tmp_path, config, proxy.rewrite_url(broker.url))
    try:
        wait_until(lambda: proc.output.count("consuming from") == 3, what="three entries")
        broker.channel.queue_delete("gone")
        broker.channel.queue_delete("p")
        proxy.drop_all()
        wait_until(lambda: "reconnected after" in proc.output, what="reconnect")
        broker.publish("other", "still-consuming")
        wait_until(lambda: "still-consuming" in proc.records(), what="the healthy entry")
        assert "consumers[0]: cannot consume from queue 'gone'" in proc.output
        assert "queues[0]: queue 'p' does not exist" in proc.output
        assert "retrying in" in proc.output
        broker.declare("gone")
        broker.declare("p")
        broker.publish("gone", "back-1")
        broker.publish("p", "back-2")
        wait_until(lambda: {"back-1", "back-2"} <= set(proc.records()), timeout=60,
                   what="the entries consuming again once their queues are back")
        assert proc.process.poll() is None
    finally:
        assert proc.stop() == 0, proc.output


def test_missing_queue_at_start_names_the_entry(broker: BrokerHandle, tmp_path: Path) -> None:
    broker.declare("here")
    config = ("consumers:\n  - consumer: testconsumers:Hostile\n    queue: here\n"
              "    consumer_count: 2\n  - consumer: testconsumers:Recorder\n"
              "    queue: not-here\n")
    result = run_cli(tmp_path, "--config", "config.yml", config=config,
                     env={"RABBITMQ_URL": broker.url,
                          "RECORD_FILE": str(tmp_path / "record.txt")})
    assert result.returncode == 4, result.stderr
    assert "config.yml: consumers[1]: cannot consume from queue 'not-here'" in result.stderr
    # Start-up failed after the instances were built: each one was shut down, once.
    records = (tmp_path / "record.txt").read_text().split()
    assert sorted(r for r in records if r.startswith("shutdown:")) == ["shutdown:i1",
                                                                       "shutdown:i2"]


# -- 4. a worker slot never dies silently ----------------------------------------------

def test_every_slot_survives_a_channel_closed_under_running_consumes(
        broker: BrokerHandle, tmp_path: Path) -> None:
    """Before: acking on the channel pika had just closed raised ChannelWrongStateError in
    the worker, and the entry quietly ran with fewer instances."""
    broker.declare("q")
    config = ("consumers:\n  - consumer: testconsumers:Hostile\n    queue: q\n"
              "    consumer_count: 3\n    prefetch_count: 3\n")
    proc = DispatcherProcess(tmp_path, config, broker.url)
    try:
        proc.wait_consuming()
        broker.publish("q", "hold-1")
        broker.publish("q", "hold-2")
        broker.publish("q", "break-channel")
        wait_until(lambda: "the broker closed the channel" in proc.output, what="channel closed")
        wait_until(lambda: len(done(proc, "hold")) == 2, what="the held consumes ended")
        broker.publish("q", "bad-str")  # an exception whose __str__ raises
        for _ in range(3):
            broker.publish("q", "barrier-b-3")
        wait_until(lambda: len(done(proc, "barrier-b-3")) == 3, timeout=30,
                   what="three messages in consume at once: three live slots")
        assert not [r for r in proc.records() if r.startswith("timeout:")]
        assert "consume raised _BadStr" in proc.output
        wait_until(lambda: broker.drained("q"), what="queue drained")
        # Only the consumer's own failure, logged once with its traceback.
        assert proc.output.count("Traceback") == 1, proc.output
    finally:
        assert proc.stop() == 0, proc.output


# -- 6. signals at every moment, every stop bounded ------------------------------------

@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_signal_during_startup_handler(broker: BrokerHandle, tmp_path: Path,
                                       signum: int, status: int) -> None:
    config = ("startup_handler: testconsumers:slow_startup\n"
              "consumers:\n  - consumer: testconsumers:Recorder\n    queue: q\n")
    proc = DispatcherProcess(tmp_path, config, broker.url)
    wait_until(lambda: "startup-begin" in proc.records(), what="startup handler running")
    proc.signal(signum)
    assert proc.wait(timeout=10) == status, proc.output
    assert "Traceback" not in proc.output


def test_sigterm_while_connecting(tmp_path: Path) -> None:
    """A host that accepts TCP and never speaks AMQP: connecting waits up to 15 s."""
    held: list[socket.socket] = []

    def accepted() -> bool:
        try:
            held.append(silent.accept()[0])  # held open, never answered
        except BlockingIOError:
            return False
        return True

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(5)
        silent.setblocking(False)
        url = f"amqp://guest:guest@127.0.0.1:{silent.getsockname()[1]}/"
        proc = DispatcherProcess(tmp_path, "consumers:\n  - consumer: testconsumers:Recorder\n"
                                           "    queue: q\n", url)
        try:
            wait_until(accepted, what="the connect attempt")
            started = time.monotonic()
            proc.signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0, proc.output
            assert time.monotonic() - started < 5
            assert "Traceback" not in proc.output
        finally:
            for conn in held:
                conn.close()
            proc.stop()


def test_graceful_stop_is_bounded_when_the_broker_does_not_answer(
        broker: BrokerHandle, proxy: FaultProxy, tmp_path: Path) -> None:
    """Before: each entry's basic.cancel waited 30 s for the broker, one after another."""
    for name in ("a", "b", "c"):
        broker.declare(name)
    config = "drain_timeout: 2\nconsumers:\n" + "".join(
        f"  - consumer: testconsumers:Hostile\n    queue: {name}\n" for name in "abc")
    proc = DispatcherProcess(tmp_path, config, proxy.rewrite_url(broker.url))
    try:
        wait_until(lambda: proc.output.count("consuming from") == 3, what="three entries")
        broker.publish("a", "hold-a")
        wait_until(lambda: "start:hold-a" in proc.records(), what="a consume in progress")
        proxy.pause()  # the broker goes silent: nothing is forwarded either way
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        status = proc.wait(timeout=30)
        elapsed = time.monotonic() - started
        assert status == 0, proc.output
        assert "done:hold-a" in proc.records()
        assert elapsed < 2 + 8, f"the stop took {elapsed:.1f}s"
        # The wait for the cancel-ok is bounded by drain_timeout too.
        assert "ran out waiting for the broker to confirm the consumers' cancel" \
            in proc.output, proc.output
    finally:
        proxy.resume()
        proc.stop()


def test_second_sigterm_acts_while_closing(broker: BrokerHandle, proxy: FaultProxy,
                                           tmp_path: Path) -> None:
    broker.declare("a")
    config = "drain_timeout: 1\nconsumers:\n  - consumer: testconsumers:Hostile\n" \
             "    queue: a\n"
    proc = DispatcherProcess(tmp_path, config, proxy.rewrite_url(broker.url))
    try:
        proc.wait_consuming()
        proxy.pause()
        proc.signal(signal.SIGTERM)
        # The drain waits for the silent broker's cancel-ok until drain_timeout, then
        # closes, waiting up to 5 s for it again: a second SIGTERM ends that wait.
        proc.wait_for_log("ran out waiting for the broker to confirm")
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 128 + signal.SIGTERM, proc.output
    finally:
        proxy.resume()
        proc.stop()


# -- 7. smaller lifecycle defects ------------------------------------------------------

def test_replacement_that_cannot_be_built_does_not_fail_the_drain(
        broker: BrokerHandle, tmp_path: Path) -> None:
    """Before: the slot counted as busy during the retry wait (exit 6, "1 message(s)
    still in consume") and the failed instance was shut down twice."""
    broker.declare("q")
    config = "consumers:\n  - consumer: testconsumers:Hostile\n    queue: q\n" \
             "    consumer_count: 2\n"
    proc = DispatcherProcess(tmp_path, config, broker.url)
    proc.wait_consuming()
    broker.publish("q", "fail-then-no-init")
    proc.wait_for_log("creating a replacement instance raised")
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0, proc.output
    shutdowns = Counter(r for r in proc.records() if r.startswith("shutdown:"))
    assert sorted(shutdowns) == ["shutdown:i1", "shutdown:i2"], shutdowns
    assert set(shutdowns.values()) == {1}, shutdowns
    assert "still in consume" not in proc.output


def test_fast_stop_prints_no_traceback(broker: BrokerHandle, tmp_path: Path) -> None:
    broker.declare("q")
    config = ("consumers:\n  - consumer: testconsumers:Hostile\n    queue: q\n"
              "    consumer_count: 5\n")
    proc = DispatcherProcess(tmp_path, config, broker.url)
    proc.wait_consuming()
    broker.publish("q", "hold-x")
    wait_until(lambda: "start:hold-x" in proc.records(), what="one busy worker")
    proc.signal(signal.SIGINT)
    assert proc.wait(timeout=15) == 130
    assert "Traceback" not in proc.output and "StopNow" not in proc.output, proc.output


def test_reopened_channel_does_not_consume_the_closed_ones_deliveries(
        broker: BrokerHandle, tmp_path: Path) -> None:
    """Before: deliveries waiting for a worker when their channel closed were consumed
    anyway, their acks dropped, and the broker redelivered them: certain duplicates."""
    broker.declare("q")
    config = ("consumers:\n  - consumer: testconsumers:Hostile\n    queue: q\n"
              "    consumer_count: 1\n    prefetch_count: 20\n")
    proc = DispatcherProcess(tmp_path, config, broker.url)
    try:
        proc.wait_consuming()
        broker.publish("q", "break-channel")
        for i in range(10):
            broker.publish("q", f"m{i}")
        wait_until(lambda: len(done(proc, "m")) == 10, what="every message")
        wait_until(lambda: broker.drained("q"), what="queue drained")
        starts = Counter(r for r in proc.records() if r.startswith("start:m"))
        assert set(starts.values()) == {1}, starts
    finally:
        assert proc.stop() == 0


def test_auto_delete_queue_is_declared_again_when_its_channel_reopens(
        broker: BrokerHandle, tmp_path: Path) -> None:
    config = ("queues:\n  - queue: ad\n    auto_delete: true\n"
              "consumers:\n  - consumer: testconsumers:Hostile\n    queue: ad\n")
    proc = DispatcherProcess(tmp_path, config, broker.url)
    try:
        proc.wait_consuming()
        broker.publish("ad", "break-channel")
        wait_until(lambda: proc.output.count("consuming from ad") == 2, what="reopened")
        broker.publish("ad", "after")
        wait_until(lambda: "after" in done(proc), what="consumed on the reopened channel")
    finally:
        assert proc.stop() == 0, proc.output


def test_flapping_connection_backs_off_and_gives_up(broker: BrokerHandle, proxy: FaultProxy,
                                                    tmp_path: Path) -> None:
    """Before: each short-lived session reset the backoff, so a connection that dropped
    every 0.3 s reconnected forever and reconnect_give_up_after never fired."""
    broker.declare("q")
    config = ("reconnect_give_up_after: 6\n"
              "consumers:\n  - consumer: testconsumers:Recorder\n    queue: q\n")
    proxy.close_after(0.3)
    proc = DispatcherProcess(tmp_path, config, proxy.rewrite_url(broker.url))
    assert proc.wait(timeout=40) == 3, proc.output
    assert "could not reconnect within reconnect_give_up_after (6s)" in proc.output
    # Backoff 0.5, 1, 2, 4 s (with jitter) fits at most 5 connections in 6 s, not 20.
    assert proxy.connections <= 6, proxy.connections


# -- found by trying to break the above ------------------------------------------------

def test_locked_exclusive_queue_after_reconnect_leaves_other_entries_consuming(
        broker: BrokerHandle, proxy: FaultProxy, tmp_path: Path) -> None:
    """405 RESOURCE_LOCKED is the broker refusing that one queue, not a lost connection."""
    broker.declare("work")
    config = ("queues:\n  - queue: ex\n    exclusive: true\n    durable: false\n"
              "consumers:\n  - consumer: testconsumers:Recorder\n    queue: ex\n"
              "  - consumer: testconsumers:Recorder\n    queue: work\n")
    proc = DispatcherProcess(tmp_path, config, proxy.rewrite_url(broker.url))
    try:
        wait_until(lambda: proc.output.count("consuming from") == 2, what="two entries")
        proxy.refuse(True)
        proxy.drop_all()
        # Another connection takes the exclusive queue before the dispatcher is back.
        wait_until(lambda: _declare_exclusive(broker, "ex"), what="queue taken")
        proxy.refuse(False)
        wait_until(lambda: "reconnected after" in proc.output, what="reconnect")
        broker.publish("work", "still-consuming")
        wait_until(lambda: "still-consuming" in proc.records(), what="the other entry")
        assert "405 RESOURCE_LOCKED" in proc.output
        assert "queues[0]: cannot declare queue 'ex'" in proc.output
    finally:
        assert proc.stop() == 0, proc.output


def _declare_exclusive(broker: BrokerHandle, name: str) -> bool:
    try:
        broker.channel.queue_declare(name, exclusive=True, durable=False)
    except Exception:  # noqa: BLE001 - the old connection's queue is not gone yet
        return False
    return True


def test_exclusive_mismatch_at_start_is_a_config_error(broker: BrokerHandle,
                                                       tmp_path: Path) -> None:
    broker.declare("shared", durable=True)
    config = ("queues:\n  - queue: shared\n    exclusive: true\n"
              "consumers:\n  - consumer: testconsumers:Recorder\n    queue: shared\n")
    result = run_cli(tmp_path, "--config", "config.yml", config=config,
                     env={"RABBITMQ_URL": broker.url})
    assert result.returncode == 4, result.stderr
    assert "config.yml: queues[0]: cannot declare queue 'shared'" in result.stderr


def test_channel_closed_again_and_again_backs_off(broker: BrokerHandle,
                                                  tmp_path: Path) -> None:
    """Before: a message that gets its channel closed every time reopened it at once,
    forever: hundreds of closes and log lines a second, and its entry stalled."""
    broker.declare("poison")
    broker.declare("other")
    config = ("consumers:\n  - consumer: testconsumers:PoisonAck\n    queue: poison\n"
              "  - consumer: testconsumers:Recorder\n    queue: other\n")
    proc = DispatcherProcess(tmp_path, config, broker.url)
    try:
        wait_until(lambda: proc.output.count("consuming from") == 2, what="two entries")
        broker.publish("poison", "p")
        wait_until(lambda: proc.output.count("the broker closed the channel") >= 3,
                   what="the channel closed a few times")
        closes = proc.output.count("the broker closed the channel")
        broker.publish("other", "still-consuming")
        wait_until(lambda: "still-consuming" in proc.records(), what="the other entry")
        # With backoff 1, 2, 4 s: a handful of closes in the next 6 s, not hundreds.
        deadline = time.monotonic() + 6
        wait_until(lambda: time.monotonic() > deadline, timeout=10, what="6 s")
        assert proc.output.count("the broker closed the channel") - closes <= 4, proc.output
        assert "retrying in" in proc.output
    finally:
        proc.signal(signal.SIGINT)
        proc.wait()


def test_user_code_exiting_at_start_is_a_user_code_failure(broker: BrokerHandle,
                                                           tmp_path: Path) -> None:
    """Before: sys.exit(0) in the startup handler ended the daemon with status 0."""
    broker.declare("q")
    config = ("startup_handler: testconsumers:exiting_startup\n"
              "consumers:\n  - consumer: testconsumers:Recorder\n    queue: q\n")
    result = run_cli(tmp_path, "--config", "config.yml", config=config,
                     env={"RABBITMQ_URL": broker.url})
    assert result.returncode == 5, result.stderr
    assert "startup_handler: testconsumers:exiting_startup raised SystemExit" in result.stderr
    record = tmp_path / "record.txt"
    config = ("consumers:\n  - consumer: testconsumers:ExitOnSecondInit\n    queue: q\n"
              "    consumer_count: 3\n")
    result = run_cli(tmp_path, "--config", "config.yml", config=config,
                     env={"RABBITMQ_URL": broker.url, "RECORD_FILE": str(record)})
    assert result.returncode == 5, result.stderr
    assert record.read_text().split() == ["shutdown:i1"]  # the one built was shut down


def test_second_signal_acts_while_stopping_during_startup(tmp_path: Path) -> None:
    """SIGTERM while connecting (instances built), then SIGINT during their slow
    shutdown(None): before, the second signal waited for it."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(5)
        url = f"amqp://guest:guest@127.0.0.1:{silent.getsockname()[1]}/"
        config = "consumers:\n  - consumer: testconsumers:SlowShutdown\n    queue: q\n"
        proc = DispatcherProcess(tmp_path, config, url)
        try:
            wait_until(lambda: "init" in proc.records(), what="instance built")
            proc.signal(signal.SIGTERM)
            wait_until(lambda: "shutdown-begin" in proc.records(), what="shutdown(None)")
            proc.signal(signal.SIGINT)
            assert proc.wait(timeout=5) == 130, proc.output
        finally:
            proc.stop()


def test_sigusr2_is_logged_and_ignored(broker: BrokerHandle, tmp_path: Path) -> None:
    """Before: its default action killed the process, without a drain. (SIGHUP reloads:
    tests/test_reload.py.)"""
    broker.declare("q")
    config = "consumers:\n  - consumer: testconsumers:Recorder\n    queue: q\n"
    proc = DispatcherProcess(tmp_path, config, broker.url)
    try:
        proc.wait_consuming()
        proc.signal(signal.SIGUSR2)
        proc.wait_for_log("received SIGUSR2: .* ignored")
        broker.publish("q", "after")
        wait_until(lambda: "after" in proc.records(), what="still consuming")
    finally:
        assert proc.stop() == 0, proc.output


def test_sigusr1_logs_where_every_consume_is(broker: BrokerHandle, tmp_path: Path) -> None:
    broker.declare("q")
    config = ("consumers:\n  - consumer: testconsumers:Hostile\n    queue: q\n"
              "    consumer_count: 2\n")
    proc = DispatcherProcess(tmp_path, config, broker.url)
    try:
        proc.wait_consuming()
        broker.publish("q", "hold-stack")
        wait_until(lambda: "start:hold-stack" in proc.records(), what="a consume in progress")
        proc.signal(signal.SIGUSR1)
        proc.wait_for_log("received SIGUSR1: the stack of every greenlet follows")
        proc.wait_for_log(r"consumers\[0\] testconsumers:Hostile slot 1")
        proc.wait_for_log(r"testconsumers.py\", line \d+, in consume")
        wait_until(lambda: "done:hold-stack" in proc.records(), what="the consume finished")
        assert proc.process.poll() is None
    finally:
        assert proc.stop() == 0, proc.output

"""The failure policy against the real broker: retries through delay queues, the
dead-letter queue, time limits, msg.attempt, restarts in a delay, and no log flood."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import BrokerHandle, DispatcherProcess, wait_until


def retry_config(queue: str = "q", max_attempts: int = 4, delay: float = 0.5,
                 backoff: float = 2, dead_letter_queue: str | None = "q.failed",
                 extra: str = "", declare: bool = True) -> str:
    dlq = f"      dead_letter_queue: {dead_letter_queue}\n" if dead_letter_queue else ""
    queues = f"queues:\n  - queue: {queue}\n{extra}" if declare else ""
    return (f"{queues}consumers:\n  - consumer: testconsumers:Retried\n    queue: {queue}\n"
            f"    consumer_count: 2\n    prefetch_count: 4\n    retry:\n"
            f"      max_attempts: {max_attempts}\n      delay: {delay}\n"
            f"      backoff: {backoff}\n      max_delay: 60\n{dlq}")


def attempts(records: list[str], body: str) -> list[tuple[int, float]]:
    """(msg.attempt, time) of each call for this body, in order."""
    found = []
    for line in records:
        if line.startswith(f"attempt:{body}:"):
            _, _, number, stamp = line.split(":")
            found.append((int(number), float(stamp)))
    return found


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def get_one(broker: BrokerHandle, queue: str) -> tuple[Any, bytes]:
    method, properties, body = broker.channel.basic_get(queue, auto_ack=True)
    assert method is not None, f"nothing in {queue}"
    return properties, body


def waiting(broker: BrokerHandle, queue: str) -> int:
    """Messages ready in the queue, as the queue itself says (a passive declare):
    rabbitmqctl's counts of a quorum queue, such as a delay queue, are refreshed only
    every few seconds."""
    return int(broker.channel.queue_declare(queue, passive=True).method.message_count)


def all_drained(broker: BrokerHandle, *queues: str) -> bool:
    return all(waiting(broker, queue) == 0 and broker.counts(queue)[1] == 0
               for queue in queues)


DELAY_QUEUES = ("q.retry.quorum.500ms", "q.retry.quorum.1000ms", "q.retry.quorum.2000ms")


def test_always_failing_message_is_retried_with_backoff_then_dead_lettered(
        broker: BrokerHandle, tmp_path: Path) -> None:
    proc = DispatcherProcess(tmp_path, retry_config(), broker.url)
    try:
        proc.wait_consuming()
        for name in DELAY_QUEUES + ("q.failed",):
            info = broker.queue_info(name)  # declared by the dispatcher
            assert info["durable"] == "true", info
        broker.publish("q", "always-1", message_id="m-1", content_type="text/plain",
                       headers={"x-app": "kept"})
        wait_until(lambda: len(attempts(proc.records(), "always-1")) == 3, timeout=30,
                   what="the third attempt")
        pid = proc.process.pid
        cpu_before, started = cpu_seconds(pid), time.monotonic()
        wait_until(lambda: len(attempts(proc.records(), "always-1")) == 4, timeout=30,
                   what="the fourth attempt")
        cpu_used, window = cpu_seconds(pid) - cpu_before, time.monotonic() - started
        # The move is confirmed, then logged, then the instance shut down: wait for all.
        wait_until(lambda: broker.ready("q.failed") == 1
                   and proc.records().count("shutdown:ValueError") == 4,
                   what="the dead-lettered message, and the failed instance shut down")
        calls = attempts(proc.records(), "always-1")
        assert [n for n, _ in calls] == [1, 2, 3, 4]
        gaps = [b - a for (_, a), (_, b) in zip(calls, calls[1:])]
        for gap, delay in zip(gaps, (0.5, 1, 2)):
            assert gap >= delay - 0.01, gaps
        # Nothing spins while the message waits on the broker: a 2 s delay window.
        assert window >= 1.9 and cpu_used < 0.3, (window, cpu_used)
        print(f"\n[always-failing] gaps={[round(g, 3) for g in gaps]} "
              f"cpu_in_2s_delay={cpu_used:.2f}s")
        properties, body = get_one(broker, "q.failed")
        assert body == b"always-1"
        assert (properties.message_id, properties.content_type) == ("m-1", "text/plain")
        headers = properties.headers
        assert headers["x-app"] == "kept"
        assert headers["x-amqp-dispatcher-attempts"] == 4
        assert headers["x-amqp-dispatcher-exception-type"] == "ValueError"
        assert headers["x-amqp-dispatcher-exception"].startswith(
            "ValueError: always failing always-1 (at testconsumers.py:")
        assert headers["x-amqp-dispatcher-queue"] == "q"
        assert headers["x-amqp-dispatcher-exchange"] == ""
        assert headers["x-amqp-dispatcher-routing-key"] == "q"
        assert headers["x-amqp-dispatcher-consumer"] == "testconsumers:Retried"
        first = headers["x-amqp-dispatcher-first-failure"]
        last = headers["x-amqp-dispatcher-last-failure"]
        assert first < last, (first, last)
        assert all_drained(broker, "q", *DELAY_QUEUES)
        output = proc.output
        assert output.count("retrying in") == 3
        assert "attempt 4 of 4, giving up: moved to q.failed" in output
        assert proc.records().count("shutdown:ValueError") == 4
    finally:
        assert proc.stop() == 0, proc.output


def test_restart_during_a_delay_keeps_the_count(broker: BrokerHandle, tmp_path: Path) -> None:
    first_dir, second_dir = tmp_path / "one", tmp_path / "two"
    first_dir.mkdir()
    second_dir.mkdir()
    config = retry_config(delay=1)  # delays of 1, 2 and 4 s
    first = DispatcherProcess(first_dir, config, broker.url)
    first.wait_consuming()
    broker.publish("q", "always-r", delivery_mode=2)
    wait_until(lambda: len(attempts(first.records(), "always-r")) == 2, what="two attempts")
    first.signal(signal.SIGTERM)  # the message waits 2 s in q.retry.quorum.2000ms meanwhile
    assert first.wait() == 0, first.output
    assert waiting(broker, "q.retry.quorum.2000ms") == 1
    second = DispatcherProcess(second_dir, config, broker.url)
    try:
        wait_until(lambda: broker.ready("q.failed") == 1, timeout=30,
                   what="dead-lettered by the second process")
        calls = attempts(first.records(), "always-r") + attempts(second.records(), "always-r")
        assert [n for n, _ in calls] == [1, 2, 3, 4], calls
        assert get_one(broker, "q.failed")[0].headers["x-amqp-dispatcher-attempts"] == 4
        assert all_drained(broker, "q", "q.retry.quorum.1000ms", "q.retry.quorum.2000ms",
                           "q.retry.quorum.4000ms")
    finally:
        assert second.stop() == 0, second.output


def test_fails_twice_then_succeeds(broker: BrokerHandle, tmp_path: Path) -> None:
    proc = DispatcherProcess(tmp_path, retry_config(delay=0.2), broker.url)
    try:
        proc.wait_consuming()
        broker.publish("q", "twice-1")
        broker.publish("q", "plain-1")
        wait_until(lambda: "done:twice-1" in proc.records(), what="the third attempt")
        assert [n for n, _ in attempts(proc.records(), "twice-1")] == [1, 2, 3]
        assert [n for n, _ in attempts(proc.records(), "plain-1")] == [1]
        wait_until(lambda: all_drained(broker, "q", "q.failed", "q.retry.quorum.200ms",
                                       "q.retry.quorum.400ms"), what="every queue empty")
    finally:
        assert proc.stop() == 0, proc.output


def test_time_limit_interrupts_consume_and_the_policy_applies(broker: BrokerHandle,
                                                              tmp_path: Path) -> None:
    config = retry_config(max_attempts=2, delay=0.2).replace(
        "    consumer_count: 2\n", "    consumer_count: 2\n    time_limit: 0.5\n")
    proc = DispatcherProcess(tmp_path, config, broker.url)
    try:
        proc.wait_consuming()
        broker.publish("q", "sleep-1")
        broker.publish("q", "swallow-1")
        # Each move is confirmed before the failed instance is shut down: wait for both.
        wait_until(lambda: broker.ready("q.failed") == 2
                   and proc.records().count("shutdown:TimeLimitExceeded") == 4, timeout=30,
                   what="both messages dead-lettered, and the instances shut down")
        records = proc.records()
        assert [n for n, _ in attempts(records, "sleep-1")] == [1, 2]
        assert [n for n, _ in attempts(records, "swallow-1")] == [1, 2]
        # Swallowed, it is thrown again a second later; returning late is still a failure.
        assert records.count("swallowed:swallow-1") == 4
        assert "done:swallow-1" in records
        assert records.count("shutdown:TimeLimitExceeded") == 4
        for _ in range(2):
            headers = get_one(broker, "q.failed")[0].headers
            assert headers["x-amqp-dispatcher-exception-type"] == "TimeLimitExceeded"
        assert "TimeLimitExceeded: consume ran past time_limit (0.5s)" in proc.output
    finally:
        assert proc.stop() == 0, proc.output


def test_without_dead_letter_queue_the_queues_own_dlx_receives_it(
        broker: BrokerHandle, tmp_path: Path) -> None:
    broker.channel.exchange_declare("dlx", "fanout")
    broker.declare("dead")
    broker.channel.queue_bind("dead", "dlx")
    config = retry_config(max_attempts=2, delay=0.2, dead_letter_queue=None,
                          extra="    x_dead_letter_exchange: dlx\n")
    proc = DispatcherProcess(tmp_path, config, broker.url)
    try:
        proc.wait_consuming()
        broker.publish("q", "always-d")
        # The reject reaches the broker before the line is logged: wait for both.
        wait_until(lambda: broker.ready("dead") == 1
                   and "giving up: rejected without requeue" in proc.output,
                   what="the queue's own DLX")
        assert [n for n, _ in attempts(proc.records(), "always-d")] == [1, 2]
        assert get_one(broker, "dead")[1] == b"always-d"
        assert "giving up: rejected without requeue" in proc.output
        assert all_drained(broker, "q", "q.retry.quorum.200ms")
    finally:
        assert proc.stop() == 0, proc.output


def test_quorum_queue_counts_its_own_attempts(broker: BrokerHandle, tmp_path: Path) -> None:
    broker.declare("q", durable=True, arguments={"x-queue-type": "quorum"})
    proc = DispatcherProcess(tmp_path, retry_config(max_attempts=3, delay=0.2, declare=False),
                             broker.url)
    try:
        proc.wait_consuming()
        broker.publish("q", "always-q")
        broker.publish("q", "twice-q")
        wait_until(lambda: broker.ready("q.failed") == 1 and "done:twice-q" in
                   proc.records(), timeout=30, what="dead-lettered and succeeded")
        assert [n for n, _ in attempts(proc.records(), "always-q")] == [1, 2, 3]
        assert [n for n, _ in attempts(proc.records(), "twice-q")] == [1, 2, 3]
        assert get_one(broker, "q.failed")[0].headers["x-amqp-dispatcher-attempts"] == 3
        wait_until(lambda: all_drained(broker, "q", "q.retry.quorum.200ms",
                                       "q.retry.quorum.400ms"), what="every queue empty")
    finally:
        assert proc.stop() == 0, proc.output


def test_attempt_is_one_without_a_policy(broker: BrokerHandle, tmp_path: Path) -> None:
    broker.declare("q")
    config = "consumers:\n  - consumer: testconsumers:Retried\n    queue: q\n"
    proc = DispatcherProcess(tmp_path, config, broker.url)
    try:
        proc.wait_consuming()
        broker.publish("q", "plain-a")
        broker.publish("q", "plain-b", headers={"x-amqp-dispatcher-attempt": 3})
        wait_until(lambda: {"done:plain-a", "done:plain-b"} <= set(proc.records()),
                   what="both consumed")
        assert [n for n, _ in attempts(proc.records(), "plain-a")] == [1]
        assert [n for n, _ in attempts(proc.records(), "plain-b")] == [3]
    finally:
        assert proc.stop() == 0, proc.output


@pytest.mark.parametrize("policy", [False, True])
def test_always_failing_message_does_not_flood_the_log(broker: BrokerHandle, tmp_path: Path,
                                                       policy: bool) -> None:
    broker.declare("q")
    config = "consumers:\n  - consumer: testconsumers:Retried\n    queue: q\n"
    if policy:
        config += ("    retry:\n      max_attempts: 1000\n      delay: 0.1\n      backoff: 1\n"
                   "      dead_letter_queue: q.failed\n")
    proc = DispatcherProcess(tmp_path, config, broker.url)
    try:
        proc.wait_consuming()
        broker.publish("q", "always-f")
        started = time.monotonic()
        wait_until(lambda: time.monotonic() - started > 11, timeout=15, interval=0.5,
                   what="11 s of failures")
        calls = len(attempts(proc.records(), "always-f"))
        lines = proc.output.splitlines()
        failure_lines = [line for line in lines if "consume raised" in line]
        print(f"\n[flood policy={policy}] calls={calls} log_lines={len(lines)} "
              f"log_bytes={len(proc.output)}")
        if policy:
            # One INFO line per retry, each retry at least 0.1 s apart; the last call's
            # line may not be written yet (it comes once its move is confirmed).
            assert calls <= 120 and calls - 1 <= len(failure_lines) <= calls, \
                (calls, len(failure_lines))
        else:
            assert calls > 100, calls  # requeued at once, again and again
            assert "Traceback" in proc.output
            # The first failure with its traceback, then one summary after 10 s.
            assert len(failure_lines) == 2, failure_lines
            assert "more time(s) in the last" in failure_lines[1]
            assert len(lines) < 40, len(lines)
    finally:
        assert proc.stop() == 0, proc.output


def test_broker_delivery_ack_timeout_is_recognised_and_only_that_entry_recovers(
        tmp_path: Path) -> None:
    """A private node whose consumer_timeout is 2 s (checked every second while the
    channel is active): a consume that outlives it gets its channel closed with 406."""
    import uuid

    from rabbitnode import Broker

    node = Broker(name=f"adtest-ct-{uuid.uuid4().hex[:6]}", conf="consumer_timeout = 2000\n",
                  advanced="[{rabbit, [{channel_tick_interval, 1000}]}].\n")
    node.start()
    broker = BrokerHandle(node, "/")
    proc = None
    try:
        broker.declare("slow")
        broker.declare("steady")
        config = ("consumers:\n  - consumer: testconsumers:Misbehaving\n    queue: slow\n"
                  "    consumer_count: 3\n    prefetch_count: 3\n"
                  "  - consumer: testconsumers:Recorder\n    queue: steady\n")
        proc = DispatcherProcess(tmp_path, config, node.url)
        wait_until(lambda: proc.output.count("consuming from") == 2, what="two entries")
        broker.publish("slow", "hang-forever")
        i = 0

        def timed_out() -> bool:
            nonlocal i
            i += 1  # keep both channels busy: the broker checks active channels
            broker.publish("slow", f"s{i}")
            broker.publish("steady", f"t{i}")
            return "consumer_timeout" in proc.output

        wait_until(timed_out, timeout=30, interval=0.2, what="the broker's 406")
        assert "the broker closed the channel of consumers[0] (slow): a delivery stayed " \
               "unacked past the broker's consumer_timeout" in proc.output
        assert "time_limit (not set)" in proc.output
        broker.publish("slow", "after-timeout")
        broker.publish("steady", "steady-after")
        wait_until(lambda: {"done:after-timeout", "steady-after"} <= set(proc.records()),
                   what="both entries consuming after the 406")
        assert "the broker closed the channel of consumers[1]" not in proc.output
    finally:
        if proc is not None:
            proc.signal(signal.SIGINT)
            proc.wait()
        broker.close()
        node.stop()


def test_publishing_channel_refused_again_and_again_backs_off(broker: BrokerHandle,
                                                              tmp_path: Path) -> None:
    """Before: the broker refusing every republish (write permission revoked) closed
    the publishing channel, which was reopened at once: 6,000 lines and a busy core in
    10 s. Now each reopening waits 1, 2, 4 ... s and the failing message waits with it."""
    import uuid

    user = f"u{uuid.uuid4().hex[:8]}"
    broker.node.ctl("add_user", user, "pw-for-test")
    broker.node.ctl("set_permissions", "-p", broker.vhost, user, ".*", ".*", ".*")
    url = broker.url.replace("guest:guest", f"{user}:pw-for-test")
    proc = DispatcherProcess(tmp_path, retry_config(), url)
    try:
        proc.wait_consuming()
        broker.node.ctl("set_permissions", "-p", broker.vhost, user, ".*", "^$", ".*")
        broker.publish("q", "always-denied")
        wait_until(lambda: proc.output.count("closed the publishing channel") >= 2,
                   what="the publishing channel refused")
        started, cpu_before = time.monotonic(), cpu_seconds(proc.process.pid)
        closes = proc.output.count("closed the publishing channel")
        wait_until(lambda: time.monotonic() - started > 6, timeout=10, what="6 s")
        assert proc.output.count("closed the publishing channel") - closes <= 4, proc.output
        assert cpu_seconds(proc.process.pid) - cpu_before < 1.5
        broker.node.ctl("set_permissions", "-p", broker.vhost, user, ".*", ".*", ".*")
        wait_until(lambda: broker.ready("q.failed") == 1, timeout=90,
                   what="dead-lettered once the broker accepts publishes again")
    finally:
        assert proc.stop() == 0, proc.output
        broker.node.ctl("delete_user", user)


def test_headers_too_large_to_republish_never_cost_the_connection(
        broker: BrokerHandle, tmp_path: Path) -> None:
    """Before: the republished header frame went past frame_max and the broker closed
    the whole connection, again at every reconnect."""
    proc = DispatcherProcess(tmp_path, retry_config(), broker.url)
    try:
        proc.wait_consuming()
        broker.publish("q", "always-big", headers={"blob": "x" * 130_800})
        proc.wait_for_log("headers too large for a frame")
        broker.publish("q", "fine")
        wait_until(lambda: "done:fine" in proc.records(), what="still consuming")
        assert "connection to the broker lost" not in proc.output
    finally:
        proc.signal(signal.SIGINT)
        proc.wait()


def _other_user(broker: BrokerHandle) -> tuple[str, str]:
    """A user besides the dispatcher's, allowed everything on the test's vhost: (name,
    its URL)."""
    import uuid

    user = f"u{uuid.uuid4().hex[:8]}"
    broker.node.ctl("add_user", user, "pw-for-test")
    broker.node.ctl("set_permissions", "-p", broker.vhost, user, ".*", ".*", ".*")
    return user, broker.url.replace("guest:guest", f"{user}:pw-for-test")


def test_message_published_by_another_user_is_retried_then_dead_lettered(
        broker: BrokerHandle, tmp_path: Path) -> None:
    """Before: the move kept user_id, which RabbitMQ refuses from any other user (406
    closes the channel): requeued at attempt 1 forever, never dead-lettered."""
    import pika

    user, url = _other_user(broker)
    proc = DispatcherProcess(tmp_path, retry_config(max_attempts=3, delay=0.2), broker.url)
    try:
        proc.wait_consuming()
        connection = pika.BlockingConnection(pika.URLParameters(url))
        connection.channel().basic_publish(
            "", "q", b"always-u", pika.BasicProperties(user_id=user, message_id="m-u"))
        connection.close()
        wait_until(lambda: broker.ready("q.failed") == 1, timeout=20,
                   what="the other user's message dead-lettered")
        assert [n for n, _ in attempts(proc.records(), "always-u")] == [1, 2, 3]
        properties, _ = get_one(broker, "q.failed")
        assert properties.user_id is None
        assert properties.message_id == "m-u"
        assert properties.headers["x-amqp-dispatcher-user-id"] == user
        assert "closed the publishing channel" not in proc.output
    finally:
        assert proc.stop() == 0, proc.output
        broker.node.ctl("delete_user", user)


def test_a_refused_move_fails_no_other_move(broker: BrokerHandle, tmp_path: Path) -> None:
    """A move the broker refuses closes its channel, and the broker sends no confirm for
    the moves before it on that channel, though they are in their queue. Here the refusal
    is a body over the broker's max_message_size, lowered after the message was queued
    (a channel takes the limit when it opens). Before: every move shared one channel, so
    the moves in flight next to the refused one were failed and their originals requeued
    (attempt 1 again) while their copies waited in the delay queue: handled twice."""
    config = retry_config(max_attempts=2, delay=0.5).replace(
        "consumer_count: 2\n    prefetch_count: 4\n",
        "consumer_count: 30\n    prefetch_count: 30\n")
    broker.declare("q", durable=True)
    small = [f"always-s{i}" for i in range(29)]
    for round_ in range(4):  # with the big message in every batch of moves
        broker.publish("q", f"always-big-{round_}" + "x" * 300_000)
        for body in small[round_::4]:
            broker.publish("q", body)
    node = broker.node
    node.ctl("eval", "application:set_env(rabbit, max_message_size, 100000).")
    proc = DispatcherProcess(tmp_path, config, broker.url)
    try:
        proc.wait_consuming()  # q.failed declared: counts() raises KeyError before
        wait_until(lambda: broker.ready("q.failed") == len(small), timeout=30,
                   what="every small message dead-lettered")
        records = proc.records()
        for body in small:
            assert [n for n, _ in attempts(records, body)] == [1, 2], (body, records)
        # The big ones keep failing to move (refused), and are never moved.
        assert "message size" in proc.output, proc.output
        assert {b.decode()[:12] for b in broker.get_all("q.failed")} == \
            {body[:12] for body in small}
    finally:
        node.ctl("eval", "application:set_env(rabbit, max_message_size, 134217728).")
        proc.signal(signal.SIGINT)
        proc.wait()


def test_a_move_does_not_keep_the_message_expiration(broker: BrokerHandle,
                                                     tmp_path: Path) -> None:
    """Before: the move kept ``expiration``: a 2 s delay was cut to the message's own
    500 ms, and a dead-lettered copy expired from the dead-letter queue."""
    proc = DispatcherProcess(tmp_path, retry_config(max_attempts=2, delay=2), broker.url)
    try:
        proc.wait_consuming()
        broker.publish("q", "always-e", expiration="500")
        wait_until(lambda: broker.ready("q.failed") == 1, timeout=20,
                   what="dead-lettered after two attempts")
        calls = attempts(proc.records(), "always-e")
        assert [n for n, _ in calls] == [1, 2]
        assert calls[1][1] - calls[0][1] >= 2 - 0.01, calls  # the whole delay
        moved_at = time.monotonic()
        # Past the message's own TTL in the dead-letter queue, it is still there.
        wait_until(lambda: time.monotonic() - moved_at > 1.5, timeout=5, what="1.5 s")
        properties, _ = get_one(broker, "q.failed")
        assert properties.expiration is None
        assert properties.headers["x-amqp-dispatcher-expiration"] == "500"
    finally:
        assert proc.stop() == 0, proc.output


def test_a_retry_does_not_copy_the_message_to_its_cc_queues(broker: BrokerHandle,
                                                            tmp_path: Path) -> None:
    """Before: the move kept the CC header, so each retry also put a copy in the queues
    it names (sender-selected distribution): 'audit' got one copy per attempt."""
    broker.declare("audit")
    broker.declare("hidden")
    proc = DispatcherProcess(tmp_path, retry_config(max_attempts=3, delay=0.2), broker.url)
    try:
        proc.wait_consuming()
        broker.publish("q", "twice-cc", headers={"CC": ["audit"], "BCC": ["hidden"]})
        wait_until(lambda: "done:twice-cc" in proc.records(), what="the third attempt")
        assert [n for n, _ in attempts(proc.records(), "twice-cc")] == [1, 2, 3]
        assert broker.counts("audit") == (1, 0)  # as published, and no more
        assert broker.counts("hidden") == (1, 0)
    finally:
        assert proc.stop() == 0, proc.output


def test_broker_restart_with_messages_waiting_in_a_delay_queue_of_a_quorum_queue(
        broker: BrokerHandle, tmp_path: Path) -> None:
    """Before: the delay queues were classic; on recovery one dead-lettered what had
    expired into the quorum queue before it had a leader ("leader not known. Command is
    dropped"), at most once: every message waiting in the delay queue was lost."""
    bodies = [f"twice-r{i}" for i in range(20)]
    config = retry_config(max_attempts=3, delay=4, backoff=1, declare=True,
                          extra="    x_queue_type: quorum\n")
    proc = DispatcherProcess(tmp_path, config, broker.url)
    try:
        proc.wait_consuming()
        for body in bodies:
            broker.publish("q", body, delivery_mode=2)
        delay_queue = "q.retry.quorum.4000ms"
        wait_until(lambda: waiting(broker, delay_queue) == len(bodies),
                   what="every message waiting in the delay queue")
        moved_at = time.monotonic()
        broker.node.ctl("stop_app")
        # Down until the messages have expired in the delay queue.
        wait_until(lambda: time.monotonic() - moved_at > 4.5, timeout=10, what="the delay")
        broker.node.ctl("start_app")
        broker.close()  # the test's own connection went with the stop: the next use opens one
        wait_until(lambda: all(f"done:{body}" in proc.records() for body in bodies),
                   timeout=60, what="every message handled after the restart")
        records = proc.records()
        for body in bodies:  # a move confirmed but not acked before the stop comes twice
            assert [n for n, _ in attempts(records, body)][-1] == 3, (body, records)
        wait_until(lambda: all_drained(broker, "q", delay_queue), what="every queue empty")
        assert broker.counts("q.failed") == (0, 0)
    finally:
        broker.node.ctl("start_app", check=False)
        assert proc.stop() == 0, proc.output


def test_upgrade_leaves_the_classic_delay_queues_to_empty_themselves(
        broker: BrokerHandle, tmp_path: Path) -> None:
    """A deployment of an earlier version has classic delay queues named
    '<queue>.retry.<ms>ms' (a queue's type cannot change: declaring them quorum would be
    refused). The new version starts beside them (--check says OK), declares its quorum
    delay queues, and --exit-when-drained waits for what the old ones still hold: it
    comes back to the entry's queue when its TTL runs out, and is handled."""
    from helpers import run_cli

    broker.declare("q", durable=True)
    broker.declare("q.retry.5000ms", durable=True, arguments={
        "x-message-ttl": 5000, "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "q"})
    broker.publish("q.retry.5000ms", "waited-l", delivery_mode=2,
                   headers={"x-amqp-dispatcher-attempt": 2})
    config = retry_config(max_attempts=3, delay=5, backoff=1)
    checked = run_cli(tmp_path, "--check", "--config", "config.yml", config=config,
                      env={"RABBITMQ_URL": broker.url})
    assert checked.returncode == 0, checked.stderr
    proc = DispatcherProcess(tmp_path, config, broker.url, args=("--exit-when-drained", "0.3"))
    assert proc.wait(timeout=30) == 0, proc.output
    assert [n for n, _ in attempts(proc.records(), "waited-l")] == [2]
    assert "done:waited-l" in proc.records()
    assert broker.queue_info("q.retry.quorum.5000ms")["durable"] == "true"
    assert all_drained(broker, "q", "q.retry.5000ms", "q.retry.quorum.5000ms")


def test_a_move_confirmed_before_its_channel_closes_is_not_failed() -> None:
    """The broker confirms publishes, then refuses a later one and closes the channel:
    the confirmed ones succeed (their originals are acked); only those still waiting
    fail. Pure logic: ConfirmChannel with a stand-in pika channel."""
    import gevent
    import pika.exceptions
    import pika.spec

    from amqpdispatcher.amqp.confirms import ConfirmChannel
    from amqpdispatcher.amqp.errors import PublishError

    class Channel:
        def add_on_close_callback(self, callback: Any) -> None:
            self.close = callback

        def add_on_return_callback(self, callback: Any) -> None:
            pass

        def basic_publish(self, *args: Any) -> None:
            pass

    channel = Channel()
    confirms = ConfirmChannel(channel, 131072, lambda method: None)
    properties = pika.spec.BasicProperties()

    def move(queue: str) -> str:
        try:
            confirms.publish("", queue, b"m", properties, True, True, time.monotonic() + 5)
        except PublishError as exc:
            return f"failed: {exc}"
        return "confirmed"

    moves = [gevent.spawn(move, f"q{i}") for i in range(3)]
    gevent.sleep(0)  # all three published, waiting for their confirms
    ack = type("Frame", (), {"method": pika.spec.Basic.Ack(delivery_tag=2, multiple=True)})
    confirms._on_confirm(ack)
    channel.close(channel, pika.exceptions.ChannelClosedByBroker(406, "PRECONDITION_FAILED"))
    results = [move.get(timeout=5) for move in moves]
    assert results[:2] == ["confirmed", "confirmed"]
    assert results[2].startswith("failed: the broker closed the publishing channel")


def test_moves_beyond_the_brokers_channel_max_share_a_channel_and_keep_their_delay(
        tmp_path: Path) -> None:
    """Each move in flight opens a channel of its own, up to consumer_count. Before: with
    a broker whose channel_max is below that (channel_max = 16, consumer_count 30), a
    move that found no channel number failed ('cannot open the publishing channel ...
    NoFreeChannels'), its message was requeued at once with the same attempt, and
    consume was called up to 12 times for a message the policy allows 3. Now such a
    move shares the entry's first channel."""
    import collections
    import uuid

    from rabbitnode import Broker

    node = Broker(name=f"adtest-chmax-{uuid.uuid4().hex[:6]}", conf="channel_max = 16\n")
    node.start()
    handle = BrokerHandle(node, "/")
    try:
        config = retry_config(max_attempts=3, delay=1, backoff=1).replace(
            "consumer_count: 2\n    prefetch_count: 4\n",
            "consumer_count: 30\n    prefetch_count: 30\n")
        proc = DispatcherProcess(tmp_path, config, node.url)
        try:
            proc.wait_consuming()
            bodies = [f"twice-c{i}" for i in range(200)]
            for body in bodies:
                handle.publish("q", body, delivery_mode=2)
            wait_until(lambda: all(f"done:{body}" in proc.records() for body in bodies),
                       timeout=120, what="every message done")
            calls = collections.Counter(line.split(":")[1] for line in proc.records()
                                        if line.startswith("attempt:"))
            assert set(calls.values()) == {3}, collections.Counter(calls.values())
            assert "cannot open the publishing channel" not in proc.output
        finally:
            assert proc.stop() == 0, proc.output
    finally:
        handle.close()
        node.stop()

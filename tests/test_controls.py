"""The controls of issue 19 against the real broker, run as users run the dispatcher:
retry.no_retry_for, --only, middleware, circuit_breaker, rate_limit and recycling
(docs/guides/controls.md)."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest
from helpers import REPO, BrokerHandle, DispatcherProcess, run_cli, wait_until
from rabbitnode import free_port
from test_metrics import get, ready, scrape, value
from test_retry import attempts, get_one

# -- retry.no_retry_for -------------------------------------------------------------------

NO_RETRY = """\
http:
  port: {port}
queues:
  - queue: q
consumers:
  - consumer: testconsumers:Retried
    queue: q
    consumer_count: 2
    prefetch_count: 4
    retry:
      max_attempts: 3
      delay: 0.2
      dead_letter_queue: {dlq}
      no_retry_for: [testconsumers:PayloadError, json:JSONDecodeError]
"""


def test_no_retry_for_dead_letters_on_the_first_failure_while_others_are_retried(
        broker: BrokerHandle, tmp_path: Path) -> None:
    port = free_port()
    proc = DispatcherProcess(tmp_path, NO_RETRY.format(port=port, dlq="q.failed"), broker.url)
    try:
        proc.wait_consuming()
        broker.publish("q", "invalid-1")  # InvalidPayload, a subclass of PayloadError
        broker.publish("q", "json-1")  # json.JSONDecodeError
        broker.publish("q", "always-1")  # ValueError: retried
        wait_until(lambda: broker.ready("q.failed") == 3
                   and proc.records().count("shutdown:ValueError") == 3,
                   what="all three dead-lettered")
        records = proc.records()
        assert [n for n, _ in attempts(records, "invalid-1")] == [1]
        assert [n for n, _ in attempts(records, "json-1")] == [1]
        assert [n for n, _ in attempts(records, "always-1")] == [1, 2, 3]
        found = {}
        for _ in range(3):
            properties, body = get_one(broker, "q.failed")
            found[body] = properties.headers
        assert found[b"invalid-1"]["x-amqp-dispatcher-attempts"] == 1
        assert found[b"invalid-1"]["x-amqp-dispatcher-exception-type"] == "InvalidPayload"
        assert found[b"json-1"]["x-amqp-dispatcher-exception-type"] == "JSONDecodeError"
        assert found[b"always-1"]["x-amqp-dispatcher-attempts"] == 3
        assert "attempt 1, InvalidPayload is in no_retry_for, giving up: moved to " \
               "q.failed" in proc.output
        assert proc.output.count("retrying in") == 2  # always-1's two retries only
        labels = {"queue": "q", "consumer": "testconsumers:Retried"}
        samples = scrape(port)
        assert value(samples, "amqp_dispatcher_messages_total", **labels,
                     outcome="dead_letter") == 3
        assert value(samples, "amqp_dispatcher_messages_total", **labels,
                     outcome="retry") == 2
    finally:
        assert proc.stop() == 0, proc.output


def test_no_retry_for_without_a_dead_letter_queue_rejects(broker: BrokerHandle,
                                                          tmp_path: Path) -> None:
    port = free_port()
    config = NO_RETRY.format(port=port, dlq="null")
    proc = DispatcherProcess(tmp_path, config, broker.url)
    try:
        wait_until(lambda: proc.process.poll() is None and ready(port), what="/readyz 200")
        broker.publish("q", "invalid-2")
        labels = {"queue": "q", "consumer": "testconsumers:Retried"}
        wait_until(lambda: value(scrape(port), "amqp_dispatcher_messages_total", **labels,
                                 outcome="reject") == 1, what="the reject counted")
        assert [n for n, _ in attempts(proc.records(), "invalid-2")] == [1]
        assert "InvalidPayload is in no_retry_for, giving up: rejected without requeue" \
            in proc.output
        assert broker.drained("q")
    finally:
        assert proc.stop() == 0, proc.output


def test_no_retry_for_is_validated(tmp_path: Path) -> None:
    config = NO_RETRY.format(port=free_port(), dlq="q.failed").replace(
        "[testconsumers:PayloadError, json:JSONDecodeError]",
        "[testconsumers:Recorder, testconsumers:not_a_class, json:NoSuchThing, 7, json]")
    result = run_cli(tmp_path, "--validate", "--config", "config.yml", config=config)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "config.yml: consumers[0].retry.no_retry_for[3]: expected 'module:Name' (an "
        "exception class), got 7",
        "config.yml: consumers[0].retry.no_retry_for[4]: expected 'module:Name' (an "
        "exception class), got 'json'",
    ]
    config = config.replace(", 7, json]", "]")
    result = run_cli(tmp_path, "--validate", "--config", "config.yml", config=config)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "config.yml: consumers[0].retry.no_retry_for[0]: 'testconsumers:Recorder' is not "
        "an exception class",
        "config.yml: consumers[0].retry.no_retry_for[1]: 'testconsumers:not_a_class' is "
        "not a class",
        "config.yml: consumers[0].retry.no_retry_for[2]: cannot import 'json:NoSuchThing': "
        "module 'json' has no 'NoSuchThing'",
    ]
    good = NO_RETRY.format(port=free_port(), dlq="q.failed")
    result = run_cli(tmp_path, "--validate", "--config", "config.yml", config=good)
    assert result.returncode == 0, result.stderr


# -- --only -------------------------------------------------------------------------------

ONLY = """\
http:
  port: {port}
queues:
  - queue: a
  - queue: b
  - queue: c
consumers:
  - consumer: testconsumers:Recorder
    queue: a
  - consumer: testconsumers:Recorder
    queue: b
    retry:
      dead_letter_queue: b.failed
  - consumer: testconsumers:Recorder
    queue: c
"""


@pytest.mark.parametrize("processes", [1, 2])
def test_only_consumes_the_queues_it_names(broker: BrokerHandle, tmp_path: Path,
                                           processes: int) -> None:
    port = free_port()
    proc = DispatcherProcess(tmp_path, ONLY.format(port=port), broker.url,
                             args=("--only", "a,c", "--processes", str(processes)))
    try:
        wait_until(lambda: proc.process.poll() is None and ready(port), what="/readyz 200")
        # The topology is declared as without --only: b's retry queues too.
        assert broker.consumers("b") == 0
        broker.ready("b.failed")
        broker.ready("b.retry.quorum.1000ms")
        for queue in "abc":
            broker.publish(queue, f"{queue}-1")
        wait_until(lambda: sorted(proc.records()) == ["a-1", "c-1"], what="a-1 and c-1")
        assert broker.consumers("a") == processes and broker.consumers("c") == processes
        assert broker.ready("b") == 1  # nobody consumes it
        samples = scrape(port)
        queues = {dict(labels).get("queue") for name, labels in samples
                  if name == "amqp_dispatcher_consuming"}
        assert queues == {"a", "c"}
        wait_until(lambda: value(scrape(port), "amqp_dispatcher_messages_total", queue="a",
                                 consumer="testconsumers:Recorder", outcome="ack") == 1,
                   what="a-1 acked")
    finally:
        assert proc.stop() == 0, proc.output


def test_only_an_unknown_queue_is_one_line(tmp_path: Path) -> None:
    config = ONLY.format(port=free_port())
    for args in (("--validate",), ()):
        result = run_cli(tmp_path, *args, "--config", "config.yml", "--only", "a,nope,z",
                         config=config)
        assert result.returncode == 1, result
        assert result.stderr.splitlines() == [
            "config.yml: --only: no consumer entry consumes 'nope', 'z' (the entries "
            "consume: a, b, c)"], result.stderr
    result = run_cli(tmp_path, "--validate", "--config", "config.yml", "--only", "b",
                     config=config)
    assert result.returncode == 0, result.stderr
    assert "3 queue(s), 1 consumer(s)" in result.stdout
    result = run_cli(tmp_path, "--config", "config.yml", "--only", "a,,b", config=config)
    assert result.returncode == 2
    assert "--only: expected QUEUE[,QUEUE...], got 'a,,b'" in result.stderr


# -- middleware ---------------------------------------------------------------------------

MIDDLEWARE = """\
middleware: [testconsumers:FirstMiddleware, testconsumers:SecondMiddleware,
             testconsumers:BrokenAfter]
queues:
  - queue: q
consumers:
  - consumer: testconsumers:Retried
    queue: q
    retry:
      max_attempts: 2
      delay: 0.1
      dead_letter_queue: q.failed
"""


def test_middleware_hooks_are_called_in_order_with_the_outcome(broker: BrokerHandle,
                                                               tmp_path: Path) -> None:
    proc = DispatcherProcess(tmp_path, MIDDLEWARE, broker.url)
    try:
        proc.wait_consuming()
        assert proc.records() == ["mw:first:on_start:1", "mw:second:on_start:1"]
        broker.publish("q", "ok-1")
        wait_until(lambda: "mw:first:after:ok-1:ack:-" in proc.records(), what="ok-1 done")
        assert proc.records()[2:] == [
            "mw:first:before:q:ok-1", "mw:second:before:q:ok-1",
            "attempt:ok-1:1:" + proc.records()[4].split(":", 3)[3], "done:ok-1",
            "mw:second:after:ok-1:ack:-", "mw:first:after:ok-1:ack:-"]
        broker.publish("q", "always-1")
        wait_until(lambda: broker.ready("q.failed") == 1
                   and "mw:first:after:always-1:dead_letter:ValueError" in proc.records(),
                   what="always-1 dead-lettered")
        broker.publish("q", "refuse-1")  # the second before_consume raises
        wait_until(lambda: broker.ready("q.failed") == 2
                   and "mw:first:after:refuse-1:dead_letter:PayloadError" in proc.records(),
                   what="refuse-1 dead-lettered")
        records = proc.records()
        hooks = [line for line in records if "always-1" in line or "refuse-1" in line]
        assert [line for line in hooks if not line.startswith("attempt:")] == [
            "mw:first:before:q:always-1", "mw:second:before:q:always-1",
            "mw:second:after:always-1:retry:ValueError",
            "mw:first:after:always-1:retry:ValueError",
            "mw:first:before:q:always-1", "mw:second:before:q:always-1",
            "mw:second:after:always-1:dead_letter:ValueError",
            "mw:first:after:always-1:dead_letter:ValueError",
            "mw:first:before:q:refuse-1", "mw:second:before:q:refuse-1",
            "mw:second:after:refuse-1:retry:PayloadError",
            "mw:first:after:refuse-1:retry:PayloadError",
            "mw:first:before:q:refuse-1", "mw:second:before:q:refuse-1",
            "mw:second:after:refuse-1:dead_letter:PayloadError",
            "mw:first:after:refuse-1:dead_letter:PayloadError",
        ]
        assert attempts(records, "refuse-1") == []  # consume never called
        assert records.count("shutdown:ValueError") == 2  # refuse-1 replaced no instance
        headers = get_one(broker, "q.failed")[0].headers
        headers = get_one(broker, "q.failed")[0].headers
        assert headers["x-amqp-dispatcher-exception-type"] == "PayloadError"
        # BrokenAfter's after_consume raised every time: logged, the outcome stood.
        assert "testconsumers:BrokenAfter.after_consume raised RuntimeError: after_consume " \
               "broke" in proc.output
    finally:
        assert proc.stop() == 0, proc.output
    assert proc.records()[-2:] == ["mw:second:on_stop", "mw:first:on_stop"]


def test_a_middleware_calling_sys_exit_is_logged_and_stops_nothing(broker: BrokerHandle,
                                                                    tmp_path: Path) -> None:
    # after_consume and on_stop are user code like consume: a SystemExit there used to
    # end the process at once, with status 3 (EXIT_BROKER's) and nothing logged.
    config = MIDDLEWARE.replace("testconsumers:BrokenAfter]", "testconsumers:ExitingHooks]")
    proc = DispatcherProcess(tmp_path, config, broker.url)
    try:
        proc.wait_consuming()
        broker.publish("q", "ok-1")
        broker.publish("q", "ok-2")
        wait_until(lambda: "mw:first:after:ok-2:ack:-" in proc.records(), timeout=10,
                   what="ok-2 done, every hook called")
        assert "mw:exiting:after:ok-1:ack" in proc.records()
        assert proc.process.poll() is None, proc.output
        assert "testconsumers:ExitingHooks.after_consume raised SystemExit: 3" in proc.output
        wait_until(lambda: broker.drained("q"), timeout=5, what="both acked")
    finally:
        assert proc.stop() == 0, proc.output
    assert proc.records()[-3:] == ["mw:exiting:on_stop", "mw:second:on_stop",
                                   "mw:first:on_stop"]
    assert "testconsumers:ExitingHooks.on_stop raised SystemExit: 3" in proc.output
    assert proc.output.rstrip().endswith("INFO: stopped"), proc.output


def test_middleware_is_validated(tmp_path: Path) -> None:
    config = MIDDLEWARE.replace(
        "testconsumers:BrokenAfter]",
        "testconsumers:Recorder, testconsumers:not_a_class, nosuchmodule:X, 7]")
    result = run_cli(tmp_path, "--validate", "--config", "config.yml", config=config)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "config.yml: middleware[5]: expected 'module:Name' (a class), got 7"]
    config = config.replace(", 7]", "]")
    result = run_cli(tmp_path, "--validate", "--config", "config.yml", config=config)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "config.yml: middleware[2]: 'testconsumers:Recorder' has none of the hooks "
        "on_start, before_consume, after_consume, on_stop",
        "config.yml: middleware[3]: 'testconsumers:not_a_class' is not a class",
        "config.yml: middleware[4]: cannot import 'nosuchmodule:X': no module named "
        "'nosuchmodule' (is it on PYTHONPATH?)",
    ]
    result = run_cli(tmp_path, "--validate", "--config", "config.yml", config=MIDDLEWARE)
    assert result.returncode == 0, result.stderr


# -- circuit_breaker ----------------------------------------------------------------------

BREAKER = """\
http:
  port: {port}
stats_interval: 0.5
queues:
  - queue: q
  - queue: other
consumers:
  - consumer: testconsumers:Breakable
    queue: q
    consumer_count: 2
    prefetch_count: 4
    circuit_breaker:
      failure_ratio: 0.5
      min_calls: 10
      window: 2
      open_for: {open_for}
  - consumer: testconsumers:Recorder
    queue: other
"""


def calls(records: list[str]) -> list[tuple[str, float, str]]:
    """(body, time, fail or ok) of each Breakable call."""
    found = []
    for line in records:
        if line.startswith("call:"):
            _, body, stamp, how = line.split(":")
            found.append((body, float(stamp), how))
    return found


def test_circuit_breaker_trips_gives_back_and_resumes(broker: BrokerHandle,
                                                      tmp_path: Path) -> None:
    port, fail = free_port(), tmp_path / "failing"
    fail.write_text("")
    open_for = 3
    proc = DispatcherProcess(tmp_path, BREAKER.format(port=port, open_for=open_for),
                             broker.url, env={"FAIL_FILE": str(fail)})
    labels = {"queue": "q", "consumer": "testconsumers:Breakable"}
    try:
        wait_until(lambda: proc.process.poll() is None and ready(port), what="/readyz 200")
        assert value(scrape(port), "amqp_dispatcher_circuit_open", **labels) == 0
        for i in range(10):
            broker.publish("q", f"m-{i}")
        # Without retry: each failure is requeued at once and fails again, fast.
        proc.wait_for_log(r"circuit_breaker of consumers\[0\] \(q\): \d+ of the \d+ calls "
                          r"settled in the last 2s failed .*: not consuming until "
                          r"\d\d:\d\d:\d\d UTC \(open_for 3s\); trip 1", timeout=10)
        # Stopped: nothing lost, nothing held (those not started went back).
        wait_until(lambda: broker.consumers("q") == 0 and broker.has_counts("q", 10, 0),
                   timeout=5, what="q not consumed, its 10 messages ready")
        last_failure = max(t for _, t, how in calls(proc.records()) if how == "fail")
        samples = scrape(port)
        assert value(samples, "amqp_dispatcher_circuit_open", **labels) == 1
        assert value(samples, "amqp_dispatcher_circuit_trips_total", **labels) == 1
        status, body = get(port, "/readyz")
        assert status == 200, body  # the process is healthy
        assert json.loads(body)["circuit_open"][0]["queue"] == "q"
        proc.wait_for_log(r"q: \d+ handled, \d+ failed, 0 in flight, circuit open until",
                          timeout=5)
        # Other entries are unaffected.
        broker.publish("other", "o-1")
        wait_until(lambda: "o-1" in proc.records(), timeout=5, what="o-1 consumed")
        fail.unlink()  # the downstream is back
        wait_until(lambda: broker.drained("q")
                   and sum(how == "ok" for _, _, how in calls(proc.records())) == 10,
                   timeout=15, what="the 10 messages consumed after open_for")
        first_ok = min(t for _, t, how in calls(proc.records()) if how == "ok")
        assert first_ok >= last_failure + open_for - 0.1, (first_ok - last_failure)
        assert "circuit_breaker of consumers[0] (q): open_for is over: consuming again" \
            in proc.output
        # It stays on once calls succeed.
        for i in range(30):
            broker.publish("q", f"n-{i}")
        wait_until(lambda: broker.drained("q")
                   and sum(how == "ok" for _, _, how in calls(proc.records())) == 40,
                   timeout=15, what="40 consumed")
        samples = scrape(port)
        assert value(samples, "amqp_dispatcher_circuit_open", **labels) == 0
        assert value(samples, "amqp_dispatcher_circuit_trips_total", **labels) == 1
        assert broker.consumers("q") == 1
        assert proc.output.count("trip 1") == 1 and "trip 2" not in proc.output
        # It trips again by the same rule; a SIGTERM while open stops at once, cleanly.
        fail.write_text("")
        for i in range(10):
            broker.publish("q", f"p-{i}")
        proc.wait_for_log(r"\(open_for 3s\); trip 2", timeout=10)
        wait_until(lambda: broker.has_counts("q", 10, 0), timeout=5, what="10 ready")
        proc.signal(signal.SIGTERM)
        started = time.monotonic()
        assert proc.wait(timeout=10) == 0, proc.output
        assert time.monotonic() - started < open_for - 1, proc.output
        assert broker.has_counts("q", 10, 0)
    finally:
        proc.stop()


def test_a_reload_keeps_an_open_circuit_open(broker: BrokerHandle, tmp_path: Path) -> None:
    # A SIGHUP while the circuit was open (to change anything else) started a generation
    # whose breaker was closed: it consumed at once from the queue whose downstream was
    # down, until it tripped again.
    port, fail = free_port(), tmp_path / "failing"
    fail.write_text("")
    config = BREAKER.format(port=port, open_for=6)
    proc = DispatcherProcess(tmp_path, config, broker.url, env={"FAIL_FILE": str(fail)})
    labels = {"queue": "q", "consumer": "testconsumers:Breakable"}
    try:
        wait_until(lambda: proc.process.poll() is None and ready(port), what="/readyz 200")
        for i in range(10):
            broker.publish("q", f"m-{i}")
        proc.wait_for_log(r"\(open_for 6s\); trip 1", timeout=10)
        wait_until(lambda: broker.consumers("q") == 0 and broker.has_counts("q", 10, 0),
                   timeout=5, what="q not consumed, its 10 messages ready")
        made = len(calls(proc.records()))
        proc.config_path.write_text(config.replace("stats_interval: 0.5",
                                                   "stats_interval: 0.4"))
        proc.signal(signal.SIGHUP)
        proc.wait_for_log("the previous generation stopped")
        broker.publish("other", "o-1")  # the new generation consumes
        wait_until(lambda: "o-1" in proc.records(), timeout=5, what="o-1 consumed")
        assert len(calls(proc.records())) == made
        assert broker.consumers("q") == 0 and broker.has_counts("q", 10, 0)
        assert value(scrape(port), "amqp_dispatcher_circuit_open", **labels) == 1
        status, body = get(port, "/readyz")
        assert status == 200 and json.loads(body)["circuit_open"][0]["queue"] == "q", body
        fail.unlink()
        proc.wait_for_log("open_for is over: consuming again", timeout=10)
        wait_until(lambda: broker.drained("q"), timeout=10, what="q consumed after open_for")
        assert proc.output.count("trip 1") == 1
    finally:
        assert proc.stop() == 0, proc.output


SLOW_BREAKER = """\
queues:
  - queue: q
consumers:
  - consumer: testconsumers:SlowBreakable
    queue: q
    consumer_count: 3
    prefetch_count: 6
    circuit_breaker:
      failure_ratio: 0.5
      min_calls: 4
      window: 5
      open_for: 1
"""


def channels(broker: BrokerHandle) -> int:
    """The channels open on the broker in this test's vhost (its own one included)."""
    rows = broker.node.ctl("list_channels", "vhost", "--no-table-headers", "--quiet")
    return rows.split().count(broker.vhost)


def test_a_tripped_channel_closes_once_its_own_consumes_are_done(broker: BrokerHandle,
                                                                 tmp_path: Path) -> None:
    # The channel given up at the trip waited until no consume of the entry was in
    # progress: with a consume of its own outlasting open_for and a backlog keeping the
    # channel consuming again busy, it stayed open (one more channel, one more polling
    # greenlet, per such trip) until the entry had nothing to do.
    fail = tmp_path / "failing"
    fail.write_text("")
    proc = DispatcherProcess(tmp_path, SLOW_BREAKER, broker.url, env={"FAIL_FILE": str(fail)})
    try:
        proc.wait_consuming()
        broker.ready("q")
        assert channels(broker) == 2  # the test's and the entry's
        broker.publish("q", "slow-1")  # in consume for 3 s: over the trip and open_for
        for i in range(6):
            broker.publish("q", f"f-{i}")
        proc.wait_for_log("trip 1", timeout=10)
        fail.unlink()
        bodies = [f"n-{i}" for i in range(200)]  # 0.2 s each, 3 at a time: 13 s of work
        for body in bodies:
            broker.publish("q", body)
        proc.wait_for_log("open_for is over: consuming again", timeout=10)
        wait_until(lambda: channels(broker) == 2, timeout=6, interval=0.5,
                   what="the tripped channel closed while the entry is busy")
        assert broker.consumers("q") == 1
        wait_until(lambda: broker.drained("q"), timeout=30, what="every message consumed")
        done = [body for body, _, how in calls(proc.records()) if how == "ok"]
        assert sorted(done) == sorted(["slow-1", *(f"f-{i}" for i in range(6)), *bodies])
    finally:
        assert proc.stop() == 0, proc.output


def logged_at(output: str, text: str) -> float:
    """The time.time() of the first log line holding ``text``."""
    line = next(line for line in output.splitlines() if text in line)
    stamp, millis = line[:23].split(",")
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000


def test_a_tripped_rate_limited_entry_starts_nothing_while_open(broker: BrokerHandle,
                                                                tmp_path: Path) -> None:
    # A delivery held by a slot waiting for its start (rate_limit) is one not started:
    # at the trip it goes back too, rather than starting while the circuit is open.
    fail = tmp_path / "failing"
    fail.write_text("")
    config = SLOW_BREAKER.replace("min_calls: 4", "min_calls: 3").replace(
        "open_for: 1", "open_for: 3") + "    rate_limit: 2\n"
    proc = DispatcherProcess(tmp_path, config, broker.url, env={"FAIL_FILE": str(fail)})
    try:
        proc.wait_consuming()
        broker.publish("q", "slow-1")  # in consume for 3 s, over the trip
        for i in range(5):
            broker.publish("q", f"f-{i}")
        proc.wait_for_log("trip 1", timeout=15)
        fail.unlink()
        proc.wait_for_log("open_for is over: consuming again", timeout=10)
        wait_until(lambda: broker.drained("q"), timeout=15, what="every message consumed")
        tripped = logged_at(proc.output, "trip 1")
        reopened = logged_at(proc.output, "open_for is over")
        # Each f-* call records itself 0.2 s after it started.
        started_while_open = [(body, round(t - tripped, 3)) for body, t, _ in
                              calls(proc.records()) if body.startswith("f-")
                              and tripped + 0.25 < t < reopened]
        assert started_while_open == [], proc.output
        done = [body for body, _, how in calls(proc.records()) if how == "ok"]
        assert sorted(done) == sorted(["slow-1", *(f"f-{i}" for i in range(5))])
    finally:
        assert proc.stop() == 0, proc.output


def test_a_consume_failing_on_a_paused_channel_after_the_connection_is_lost_is_not_retried(
        broker: BrokerHandle, tmp_path: Path) -> None:
    # The channel a trip gives up stays open until its consumes in progress finish. When
    # the connection went meanwhile, its Acknowledger was not told: a consume failing
    # after the loss was moved to the delay queue, the ack of the move was lost, and the
    # broker redelivered the message too: handled twice, once from each copy.
    fail = tmp_path / "failing"
    fail.write_text("")
    config = SLOW_BREAKER.replace("open_for: 1", "open_for: 1\n    retry:\n"
                                  "      max_attempts: 3\n      delay: 1")
    proc = DispatcherProcess(tmp_path, config, broker.url, env={"FAIL_FILE": str(fail)})
    try:
        proc.wait_consuming()
        broker.publish("q", "slow-1")  # in consume for 3 s: over the trip and the fault
        for i in range(6):
            broker.publish("q", f"f-{i}")
        proc.wait_for_log("trip 1", timeout=10)
        broker.node.ctl("close_all_connections", "-p", broker.vhost, "test closes them")
        broker.close()
        proc.wait_for_log("reconnected after", timeout=30)
        wait_until(lambda: ("slow-1", "fail") in {(body, how) for body, _, how
                                                  in calls(proc.records())},
                   timeout=10, what="slow-1 failed, after the connection was lost")
        fail.unlink()

        def slow_ok() -> int:
            return sum(1 for body, _, how in calls(proc.records())
                       if body == "slow-1" and how == "ok")

        # Once it succeeded and every queue is empty, with nothing unacknowledged, no
        # copy is left anywhere to be handled again.
        wait_until(lambda: slow_ok() >= 1 and broker.drained("q")
                   and broker.drained("q.retry.quorum.1000ms"), timeout=30,
                   what="slow-1 handled and every queue empty")
        assert slow_ok() == 1, proc.output
        done = {body for body, _, how in calls(proc.records()) if how == "ok"}
        assert done == {"slow-1", *(f"f-{i}" for i in range(6))}
    finally:
        assert proc.stop() == 0, proc.output


def test_circuit_breaker_is_validated(tmp_path: Path) -> None:
    config = BREAKER.format(port=free_port(), open_for=0).replace(
        "failure_ratio: 0.5", "failure_ratio: 1.5").replace("window: 2", "windw: 2")
    result = run_cli(tmp_path, "--validate", "--config", "config.yml", config=config)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "config.yml: consumers[0].circuit_breaker.failure_ratio: expected at most 1, got 1.5",
        "config.yml: consumers[0].circuit_breaker.windw: unknown key (did you mean "
        "'window'?); known keys: failure_ratio, min_calls, window, open_for",
        "config.yml: consumers[0].circuit_breaker.open_for: expected a positive number, "
        "got 0",
    ]


STREAM_BREAKER = """\
queues:
  - queue: s
    x_queue_type: stream
consumers:
  - consumer: testconsumers:Breakable
    queue: s
    stream_offset: next
    circuit_breaker: {}
"""


def test_circuit_breaker_is_refused_on_a_stream(tmp_path: Path) -> None:
    # Subscribing again after open_for starts at stream_offset: with next, everything
    # appended to the stream while the circuit was open was skipped, never consumed.
    declared_elsewhere = STREAM_BREAKER.replace("queues:\n  - queue: s\n    x_queue_type: "
                                                "stream\n", "")
    for config in (STREAM_BREAKER, declared_elsewhere):
        for args in (("--validate",), ()):
            result = run_cli(tmp_path, *args, "--config", "config.yml", config=config)
            assert result.returncode == 1, result
            assert result.stderr.splitlines() == [
                "config.yml: consumers[0].circuit_breaker: not for a stream: subscribing "
                "again after open_for starts at stream_offset, so the messages appended "
                "while it was open would be skipped or read again"], result.stderr


# -- rate_limit ---------------------------------------------------------------------------

RATE = """\
queues:
  - queue: q
consumers:
  - consumer: testconsumers:Stamped
    queue: q
    consumer_count: 3
    prefetch_count: 10
    rate_limit: 20
"""


def starts(records: list[str]) -> list[tuple[float, str]]:
    """(time, pid) of each call started."""
    return [(float(line.split(":")[2]), line.split(":")[3]) for line in records
            if line.startswith("start:")]


def test_rate_limit_is_shared_by_the_processes(broker: BrokerHandle, tmp_path: Path) -> None:
    broker.declare("q", durable=True)
    total = 400
    for i in range(total):
        broker.publish("q", f"m-{i}")
    proc = DispatcherProcess(tmp_path, RATE, broker.url, args=("--processes", "2"))
    try:
        # Both workers started: from then on, 10 s.
        try:
            wait_until(lambda: len({pid for _, pid in starts(proc.records())}) == 2,
                       timeout=30, what="both workers consuming")
        except AssertionError:
            raise AssertionError(proc.output) from None
        t0 = max(min(t for t, p in starts(proc.records()) if p == pid)
                 for pid in {pid for _, pid in starts(proc.records())})
        wait_until(lambda: max(t for t, _ in starts(proc.records())) >= t0 + 10.5,
                   timeout=30, what="10 s of starts")
        stamps = [t for t, _ in starts(proc.records()) if t0 <= t < t0 + 10]
        per_second = [sum(1 for t in stamps if t0 + s <= t < t0 + s + 1) for s in range(10)]
        print(f"\n[rate_limit 20/s, 2 processes] starts per second: {per_second}")
        assert 180 <= len(stamps) <= 220, per_second
        assert all(18 <= n <= 22 for n in per_second), per_second
        # A stop does not wait for the limiter, and gives back what waits.
        proc.signal(signal.SIGTERM)
        started = time.monotonic()
        assert proc.wait(timeout=10) == 0, proc.output
        assert time.monotonic() - started < 3, proc.output
        consumed = len(starts(proc.records()))
        assert len({line.split(":")[1] for line in proc.records()}) == consumed
        assert broker.has_counts("q", total - consumed, 0)
    finally:
        proc.stop()


# -- recycling ----------------------------------------------------------------------------

RECYCLE = """\
queues:
  - queue: q
consumers:
  - consumer: testconsumers:{consumer}
    queue: q
    consumer_count: 2
    prefetch_count: 5
{extra}"""


def test_a_single_process_recycled_after_n_messages_drains_and_exits_7(
        broker: BrokerHandle, tmp_path: Path) -> None:
    broker.declare("q", durable=True)
    for i in range(200):
        broker.publish("q", f"m-{i}")
    config = RECYCLE.format(consumer="Recorder", extra="    rate_limit: 50\n") \
        + "recycle_after_messages: 50\n"
    proc = DispatcherProcess(tmp_path, config, broker.url)
    assert proc.wait(timeout=30) == 7, proc.output
    consumed = proc.records()
    assert 45 <= len(consumed) <= 70, len(consumed)  # 50 +-10%, and what was in progress
    assert len(set(consumed)) == len(consumed)
    assert broker.has_counts("q", 200 - len(consumed), 0)
    assert re.search(r"recycling: \d+ messages handled \(recycle_after_messages 50, \d+ for "
                     r"this process with its jitter\): finishing messages in progress, then "
                     r"exiting with status 7", proc.output), proc.output


def test_a_leaking_process_is_recycled_above_its_memory_threshold(
        broker: BrokerHandle, tmp_path: Path) -> None:
    broker.declare("q", durable=True)
    for i in range(60):
        broker.publish("q", f"m-{i}")
    config = RECYCLE.format(consumer="Leaky", extra="    rate_limit: 20\n") \
        + "recycle_above_memory_mb: 100\n"
    proc = DispatcherProcess(tmp_path, config, broker.url)
    assert proc.wait(timeout=30) == 7, proc.output
    assert re.search(r"recycling: resident memory \d+ MiB above recycle_above_memory_mb "
                     r"\(100\)", proc.output), proc.output
    consumed = proc.records()
    assert 8 <= len(consumed) < 60
    assert len(set(consumed)) == len(consumed)
    assert broker.has_counts("q", 60 - len(consumed), 0)


def test_workers_recycled_under_load_lose_and_duplicate_nothing(broker: BrokerHandle,
                                                                tmp_path: Path) -> None:
    broker.declare("q", durable=True)
    config = RECYCLE.format(consumer="Stamped", extra="    rate_limit: 200\n") \
        + "recycle_after_messages: 100\n"
    proc = DispatcherProcess(tmp_path, config, broker.url, args=("--processes", "2"))
    try:
        proc.wait_for_log("all 2 workers consuming")
        bodies = [f"m-{i}" for i in range(800)]
        for body in bodies[:400]:
            broker.publish("q", body)
        proc.wait_for_log(r"\(recycled\) finishes its messages in progress", timeout=30)
        for body in bodies[400:]:  # while workers are being replaced
            broker.publish("q", body)
        wait_until(lambda: len(proc.records()) >= 800 and broker.drained("q"), timeout=60,
                   what="every message consumed")
        consumed = [line.split(":")[1] for line in proc.records()]
        assert sorted(consumed) == sorted(bodies)  # each once: nothing lost, nothing twice
        assert len({line.split(":")[3] for line in proc.records()}) >= 4  # recycled workers
        output = proc.output
        # The replacement first, then the drain of the recycled worker.
        first_start = output.index("is to be recycled (")
        first_drain = output.index("(recycled) finishes its messages in progress")
        assert first_start < first_drain
        proc.wait_for_log(r"\(recycled\) stopped")
    finally:
        assert proc.stop() == 0, proc.output


def test_the_shipped_examples_restart_on_the_recycle_status() -> None:
    import configparser

    from amqpdispatcher.contracts.exits import EXIT_RECYCLE

    program = configparser.RawConfigParser()
    program.read(REPO / "examples" / "supervisord.conf")
    section = program["program:amqp-dispatcher"]
    assert section["autorestart"] == "unexpected"
    assert str(EXIT_RECYCLE) not in section["exitcodes"].split(",")
    unit = (REPO / "examples" / "amqp-dispatcher.service").read_text()
    assert "\nRestart=on-failure\n" in unit
    prevent = re.search(r"\nRestartPreventExitStatus=(.*)\n", unit)
    assert prevent is not None and str(EXIT_RECYCLE) not in prevent.group(1).split()


def test_a_reload_takes_the_new_controls(broker: BrokerHandle, tmp_path: Path) -> None:
    broker.declare("q", durable=True)
    proc = DispatcherProcess(tmp_path, RECYCLE.format(consumer="Stamped", extra=""),
                             broker.url)
    try:
        proc.wait_consuming()
        proc.config_path.write_text(RECYCLE.format(consumer="Stamped",
                                                   extra="    rate_limit: 40\n")
                                    + "recycle_after_messages: 30\n")
        proc.signal(signal.SIGHUP)
        proc.wait_for_log("reloaded: the new generation consumes")
        for i in range(100):
            broker.publish("q", f"m-{i}")
        assert proc.wait(timeout=30) == 7, proc.output
        stamps = sorted(t for t, _ in starts(proc.records()))
        assert 27 <= len(stamps) <= 45, len(stamps)
        # 40 a second at most: n starts take at least (n - 1) / 40 s.
        assert stamps[-1] - stamps[0] >= (len(stamps) - 1) / 40 - 0.02
        assert broker.has_counts("q", 100 - len(stamps), 0)
    finally:
        proc.stop()


def test_the_arbiters_readyz_names_each_workers_open_circuits() -> None:
    from amqpdispatcher.supervision.endpoint import WorkerView, _circuits_open

    current = {1: WorkerView(1, 101, "/s/1.sock", True), 2: WorkerView(2, 102, "/s/2.sock", True)}
    entry = {"entry": "consumers[0]", "queue": "q", "consumer": "m:C", "until": "12:00:00 UTC"}
    answers = {"/s/1.sock": (200, json.dumps({"ready": True}).encode()),
               "/s/2.sock": (200, json.dumps({"ready": True, "circuit_open": [entry]}).encode())}
    assert _circuits_open(current, answers, 2) == {"circuit_open": [{"worker": "2/2", **entry}]}
    answers["/s/2.sock"] = (200, b'{"ready": true}')
    assert _circuits_open(current, answers, 2) == {}

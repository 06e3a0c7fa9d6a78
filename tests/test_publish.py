"""Publishing from consume against the real broker: properties, publisher confirms,
what a refused publish raises and what happens to the input, the separate publishing
connection (opened on first use, blocked by a resource alarm while acks go on)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import gevent
import pika
import pytest
from faultproxy import FaultProxy
from helpers import BrokerHandle, DispatcherProcess, run_cli, wait_until
from rabbitnode import Broker

from amqpdispatcher.amqp.arguments import build_message
from amqpdispatcher.amqp.channel import SyncChannel
from amqpdispatcher.amqp.confirms import ConfirmChannel
from amqpdispatcher.amqp.connection import close_connection, connect
from amqpdispatcher.amqp.errors import PublishError, PublishTimeout
from amqpdispatcher.amqp.publishing import Publisher, PublishingConnection
from amqpdispatcher.config.settings import parse_url
from amqpdispatcher.consuming.failure import TimeLimitExceeded
from amqpdispatcher.consuming.pool import StopNow


def order(id_: str, publish: list[Any] | None = None, **extra: Any) -> str:
    """A body for tests/consumers/publishers.py:Publisher."""
    fields: dict[str, Any] = {"id": id_, **extra}
    if publish is not None:
        fields["publish"] = publish
    return json.dumps(fields)


def calls(proc: DispatcherProcess, id_: str | None = None) -> list[dict[str, Any]]:
    if not proc.record.exists():
        return []
    found = [json.loads(line) for line in proc.record.read_text().splitlines()]
    return [c for c in found if id_ is None or c["id"] == id_]


def finished(proc: DispatcherProcess, *ids: str) -> bool:
    done = {c["id"] for c in calls(proc) if c["outcome"] == "ok"}
    return set(ids) <= done


def config(*entries: tuple[str, int, int], queues: tuple[str, ...] = ("out",),
           extra: str = "") -> str:
    """Publisher entries as (queue, consumer_count, prefetch_count)."""
    text = extra + "queues:\n" + "".join(f"  - queue: {q}\n" for q in queues)
    text += "consumers:\n"
    for queue, count, prefetch in entries:
        text += (f"  - consumer: publishers:Publisher\n    queue: {queue}\n"
                 f"    consumer_count: {count}\n    prefetch_count: {prefetch}\n")
    return text


def connection_names(node: Broker, vhost: str) -> list[str]:
    rows = node.ctl("list_connections", "-q", "--no-table-headers", "client_properties",
                    "vhost")
    return [row for row in rows.splitlines()
            if row.rstrip().endswith(vhost) and "amqp-dispatcher" in row]


# -- arguments (pure logic) -------------------------------------------------------

def test_build_message_keeps_the_0_4_3_call_and_checks_every_property() -> None:
    body, props = build_message("", "k", {"a": 1}, "text é", False, {})
    assert body == "text é".encode() and props.headers == {"a": 1}
    assert props.delivery_mode is None
    body, props = build_message("x", "k", None, b"raw", True, {
        "persistent": True, "priority": 9, "expiration": 1500, "content_type": "a/b",
        "timestamp": datetime(2024, 1, 2, tzinfo=timezone.utc), "message_id": None})
    assert (props.delivery_mode, props.priority, props.expiration) == (2, 9, "1500")
    assert props.timestamp == 1704153600 and props.headers is None
    assert props.message_id is None  # None: not set
    assert build_message("", "k", None, b"", False, {"expiration": "60000"})[1].expiration \
        == "60000"
    assert build_message("", "k", None, b"", False, {"persistent": False})[1].delivery_mode == 1


@pytest.mark.parametrize("options, error, text", [
    ({"priority": 300}, ValueError, "amqp.publish: priority: expected an int from 0 to 255, "
                                    "got 300"),
    ({"priority": "high"}, TypeError, "amqp.publish: priority: expected an int from 0 to 255, "
                                      "got str"),
    ({"delivery_mode": 3}, ValueError, "delivery_mode: expected 1 (transient) or 2 "
                                       "(persistent), got 3"),
    ({"persistent": True, "delivery_mode": 1}, ValueError, "persistent=True contradicts "
                                                           "delivery_mode=1"),
    ({"persistent": "yes"}, TypeError, "persistent: expected True or False, got str"),
    ({"expiration": "1.5s"}, ValueError, "expiration: expected milliseconds as digits"),
    ({"expiration": -1}, ValueError, "expiration: expected milliseconds"),
    ({"timestamp": 1.5}, TypeError, "timestamp: expected seconds since the epoch"),
    ({"content_type": 7}, TypeError, "content_type: expected a str, got int"),
    ({"message_id": "x" * 256}, ValueError, "message_id: at most 255 bytes, got 256"),
    ({"colour": "red"}, TypeError, "amqp.publish() got an unexpected keyword argument "
                                   "'colour'"),
])
def test_build_message_refuses_bad_properties_in_one_line(options: dict[str, Any],
                                                          error: type, text: str) -> None:
    with pytest.raises(error) as caught:
        build_message("", "k", None, b"", False, options)
    assert text in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("args, text", [
    ((None, "k", None, b""), "exchange: expected a str, got NoneType"),
    (("", "k", ["h"], b""), "headers: expected a dict or None, got list"),
    (("", "k", None, 42), "body: expected bytes or str, got int"),
])
def test_build_message_refuses_bad_positional_arguments(args: tuple[Any, ...],
                                                        text: str) -> None:
    with pytest.raises(TypeError, match=text.replace("(", r"\(").replace(")", r"\)")):
        build_message(*args, False, {})


def test_publisher_confirms_is_a_checked_boolean(tmp_path: Path) -> None:
    consumer = "consumers:\n  - consumer: publishers:Publisher\n    queue: q\n"
    result = run_cli(tmp_path, "--config", "config.yml", "--validate",
                     config="publisher_confirms: 1\n" + consumer)
    assert result.returncode == 1
    assert "config.yml: publisher_confirms: expected true or false, got 1" in result.stdout \
        + result.stderr
    result = run_cli(tmp_path, "--config", "config.yml", "--validate",
                     config="publisher_confirms: false\n" + consumer)
    assert result.returncode == 0, result.stdout + result.stderr


# -- against the broker -----------------------------------------------------------

def test_publish_with_properties_is_confirmed_on_a_connection_of_its_own(
        broker: BrokerHandle, tmp_path: Path) -> None:
    proc = DispatcherProcess(tmp_path, config(("in", 2, 2), queues=("in", "out")), broker.url)
    try:
        proc.wait_consuming()
        assert len(connection_names(broker.node, broker.vhost)) == 1  # none until needed
        options = {"content_type": "application/json", "content_encoding": "utf-8",
                   "persistent": True, "priority": 5, "correlation_id": "c-1",
                   "reply_to": "replies", "expiration": 60000, "message_id": "id-1",
                   "timestamp": 1700000000, "type": "order.created", "app_id": "shop",
                   "mandatory": True}
        broker.publish("in", order("full", ["", "out", {"x-k": "v", "n": 3}, '{"a":1}'],
                                   options=options))
        broker.publish("in", order("plain", ["", "out", None, "0.4.3 style"]))
        wait_until(lambda: finished(proc, "full", "plain"), what="both published")
        wait_until(lambda: broker.drained("in"), what="the inputs acked")
        got = {}
        for _ in range(2):
            method, props, body = broker.channel.basic_get("out", auto_ack=True)
            got[body] = props
        props = got[b'{"a":1}']
        assert props.headers == {"x-k": "v", "n": 3}
        assert (props.content_type, props.content_encoding) == ("application/json", "utf-8")
        assert (props.delivery_mode, props.priority) == (2, 5)
        assert (props.correlation_id, props.reply_to, props.expiration) == ("c-1", "replies",
                                                                             "60000")
        assert (props.message_id, props.timestamp, props.type, props.app_id) == (
            "id-1", 1700000000, "order.created", "shop")
        plain = got[b"0.4.3 style"]
        assert plain.headers is None and plain.delivery_mode is None
        names = connection_names(broker.node, broker.vhost)
        assert len(names) == 2, names
        assert sum(f"pid {proc.process.pid} " in n and " publisher\"" in n for n in names) == 1
        assert "opened the publisher connection to" in proc.output
    finally:
        assert proc.stop() == 0, proc.output


def test_refused_publishes_raise_and_the_input_goes_back(broker: BrokerHandle,
                                                         tmp_path: Path) -> None:
    """A nack, an unroutable mandatory message, a missing exchange and a bad argument:
    each raises into consume once, the input is requeued and redelivered, and the
    second delivery (which no longer publishes) is acked."""
    broker.declare("full", arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    proc = DispatcherProcess(tmp_path, config(("in", 1, 1), queues=("in",)), broker.url)
    try:
        proc.wait_consuming()
        broker.publish("in", order("nacked", ["", "full", None, "x"], once=True))
        broker.publish("in", order("returned", ["", "nowhere", None, "x"], once=True,
                                   options={"mandatory": True}))
        broker.publish("in", order("dropped", ["", "nowhere", None, "x"]))  # not mandatory
        broker.publish("in", order("missing", ["no-such-exchange", "k", None, "x"], once=True))
        broker.publish("in", order("bad-arg", ["", "full", None, "x"], once=True,
                                   options={"priority": 300}))
        wait_until(lambda: finished(proc, "nacked", "returned", "dropped", "missing",
                                    "bad-arg"), what="every input handled")
        wait_until(lambda: broker.drained("in"), what="every input acked")
        expected = {
            "nacked": "PublishNacked: the broker nacked the message to exchange '' routing "
                      "key 'full': it did not take it",
            "returned": "PublishReturned: the broker returned the message to exchange '' "
                        "routing key 'nowhere' as unroutable (mandatory): 312 NO_ROUTE",
            "missing": "PublishError: exchange 'no-such-exchange' does not exist (the broker "
                       "said 404 NOT_FOUND - no exchange 'no-such-exchange'",
            "bad-arg": "ValueError: amqp.publish: priority: expected an int from 0 to 255, "
                       "got 300",
        }
        for id_, outcome in expected.items():
            first, second = calls(proc, id_)
            assert first["outcome"].startswith(outcome), first
            assert (first["redelivered"], second) == (False, {"id": id_, "redelivered": True,
                                                              "outcome": "ok"})
            assert f"consume raised {outcome}" in proc.output
        assert [c["outcome"] for c in calls(proc, "dropped")] == ["ok"]
        # The missing exchange was found on a channel of its own.
        assert "the broker closed the publishing channel" not in proc.output
        assert "the broker closed the channel of" not in proc.output  # consuming: untouched
    finally:
        assert proc.stop() == 0, proc.output


def test_missing_exchange_disturbs_no_other_delivery(broker: BrokerHandle,
                                                     tmp_path: Path) -> None:
    """Before: the publish closed the consuming channel, and every delivery in flight on
    it (up to prefetch_count) was redelivered. Now no channel of the entry closes: the
    exchange is checked on a channel of its own."""
    proc = DispatcherProcess(tmp_path, config(("in", 10, 100), queues=("in", "out")),
                             broker.url)
    try:
        proc.wait_consuming()
        ids = [f"m{i}" for i in range(100)]
        for i, id_ in enumerate(ids):
            if i == 5:
                broker.publish("in", order("bad", ["no-such-exchange", "k", None, "x"],
                                           once=True))
            broker.publish("in", order(id_, sleep=0.05))
        wait_until(lambda: finished(proc, "bad", *ids), what="every message consumed")
        for id_ in ids:
            assert calls(proc, id_) == [{"id": id_, "redelivered": False, "outcome": "ok"}]
        assert [c["redelivered"] for c in calls(proc, "bad")] == [False, True]
        # The next publish of the entry reopens its publishing channel at once.
        for i in range(10):
            broker.publish("in", order(f"p{i}", ["", "out", None, f"p{i}"]))
        wait_until(lambda: finished(proc, *(f"p{i}" for i in range(10))), what="publishes")
        assert broker.counts("out") == (10, 0)
        wait_until(lambda: broker.drained("in"), what="every input acked")
        output = proc.output
        assert "the broker closed the publishing channel" not in output
        assert "the broker closed the channel of" not in output
        assert "redelivers" not in output and "unsettled" not in output
    finally:
        assert proc.stop() == 0, proc.output


def test_a_publish_to_a_missing_exchange_does_not_stall_its_entry(broker: BrokerHandle,
                                                                  tmp_path: Path) -> None:
    """Before: the input whose publish names a missing exchange was requeued at the head,
    redelivered first, and each time closed the entry's publishing channel, failing every
    other publish in flight, with reopening backing off to 30 s: 0 of 20 other inputs
    done in 120 s. Now the exchange is checked on a channel of its own: that input
    fails alone, and the others publish on."""
    proc = DispatcherProcess(tmp_path, config(("in", 10, 10), queues=("in", "out")),
                             broker.url)
    try:
        proc.wait_consuming()
        broker.publish("in", order("poison", ["no-such-exchange", "k", None, "x"]))
        good = [f"good{i}" for i in range(20)]
        for id_ in good:
            broker.publish("in", order(id_, ["", "out", None, id_], sleep=0.05))
        wait_until(lambda: finished(proc, *good), timeout=15,
                   what="the other inputs handled while one keeps failing")
        for id_ in good:
            assert calls(proc, id_) == [{"id": id_, "redelivered": False, "outcome": "ok"}]
        assert broker.counts("out") == (20, 0)
        assert all(c["outcome"].startswith("PublishError: exchange 'no-such-exchange' does "
                                           "not exist") for c in calls(proc, "poison"))
        assert "the broker closed the publishing channel" not in proc.output
    finally:
        assert proc.stop() == 0, proc.output


def test_retry_moves_are_not_failed_by_another_consumes_publish(broker: BrokerHandle,
                                                                tmp_path: Path) -> None:
    """Before: the retry policy's moves shared amqp.publish's channel. Input x fails and
    its move to the delay queue is written; 3 ms later input y publishes to an exchange
    deleted since it was checked, and the broker closes that channel before confirming
    the move it had routed: x was requeued AND its copy waited in the delay queue, so x
    was handled twice (3 of 4 pairs). Now the moves have a channel of their own."""
    pairs = 4
    for i in range(pairs):
        broker.channel.exchange_declare(f"gone{i}", "fanout")
    text = ("queues:\n  - queue: in\n  - queue: out\nconsumers:\n"
            "  - consumer: publishers:Publisher\n    queue: in\n    consumer_count: 10\n"
            "    prefetch_count: 10\n"
            "    retry: {max_attempts: 3, delay: 0.5, backoff: 1, dead_letter_queue: dlq}\n")
    proc = DispatcherProcess(tmp_path, text, broker.url)
    try:
        proc.wait_consuming()
        for i in range(pairs):  # the dispatcher checks each exchange, and remembers it
            broker.publish("in", order(f"warm{i}", [f"gone{i}", "", None, "w"], once=True))
        wait_until(lambda: finished(proc, *(f"warm{i}" for i in range(pairs))),
                   what="the exchanges checked")
        for i in range(pairs):
            broker.channel.exchange_delete(f"gone{i}")
        start = time.time() + 1.0
        for i in range(pairs):
            at = start + i * 1.5
            broker.publish("in", order(f"x{i}", raise_once=True, at=at))
            broker.publish("in", order(f"y{i}", [f"gone{i}", "", None, "y"], once=True,
                                       at=at + 0.003))
        ids = [f"{kind}{i}" for kind in "xy" for i in range(pairs)]
        wait_until(lambda: finished(proc, *ids), timeout=pairs * 1.5 + 15,
                   what="every input handled")
        wait_until(lambda: broker.drained("in") and broker.drained("in.retry.quorum.500ms"),
                   what="no copy left")
        for id_ in ids:
            outcomes = [c["outcome"] for c in calls(proc, id_)]
            assert outcomes.count("ok") == 1 and len(outcomes) == 2, (id_, outcomes)
        assert broker.counts("dlq") == (0, 0)
    finally:
        assert proc.stop() == 0, proc.output


def test_a_refused_publish_fails_no_other_consumes_publish(broker: BrokerHandle,
                                                          tmp_path: Path) -> None:
    """Before: an entry's consumes shared one channel for amqp.publish. Input x publishes
    to a quorum queue; 2 ms later input y publishes to an exchange deleted since it was
    checked, and the broker closes that channel before confirming x's message, which it
    had routed: x's publish raised, x was requeued and published again (5 of 6 x in
    'out' twice). Now each publish waiting for its confirm has a channel to itself."""
    pairs = 6
    for i in range(pairs):
        broker.channel.exchange_declare(f"gone{i}", "fanout")
    text = ("queues:\n  - queue: in\n  - queue: out\n    x_queue_type: quorum\n"
            "consumers:\n  - consumer: publishers:Publisher\n    queue: in\n"
            "    consumer_count: 10\n    prefetch_count: 10\n")
    proc = DispatcherProcess(tmp_path, text, broker.url)
    try:
        proc.wait_consuming()
        for i in range(pairs):  # the dispatcher checks each exchange, and remembers it
            broker.publish("in", order(f"warm{i}", [f"gone{i}", "", None, "w"], once=True))
        wait_until(lambda: finished(proc, *(f"warm{i}" for i in range(pairs))),
                   what="the exchanges checked")
        for i in range(pairs):
            broker.channel.exchange_delete(f"gone{i}")
        start = time.time() + 1.0
        for i in range(pairs):
            at = start + i * 1.5
            broker.publish("in", order(f"x{i}", ["", "out", None, f"x{i}"], at=at))
            broker.publish("in", order(f"y{i}", [f"gone{i}", "", None, "y"], once=True,
                                       at=at + 0.002))
        ids = [f"{kind}{i}" for kind in "xy" for i in range(pairs)]
        wait_until(lambda: finished(proc, *ids), timeout=pairs * 1.5 + 15,
                   what="every input handled")
        wait_until(lambda: broker.drained("in"), what="every input acked")
        assert sorted(broker.get_all("out")) == sorted(f"x{i}".encode() for i in range(pairs))
        for i in range(pairs):
            assert [c["outcome"] for c in calls(proc, f"x{i}")] == ["ok"]
    finally:
        assert proc.stop() == 0, proc.output


def test_exchanges_are_checked_once_and_forgotten_when_deleted(broker: BrokerHandle) -> None:
    """In-process: the first publish to an exchange checks it on a side channel (a
    missing one raises without closing the publishing channel); a checked exchange
    deleted later closes the channel once, is forgotten, and the channel is reopened
    at once, since the check now guards it. Headers pika cannot encode are one line
    naming the header."""
    broker.channel.exchange_declare("checked", "fanout")
    publishing = PublishingConnection(parse_url(broker.url), confirms=True, timeout=5.0)
    publisher = publishing.publisher("test")

    def scenario() -> None:
        publisher.publish_message("checked", "", None, b"1", False, {})
        publisher.publish_message("amq.fanout", "", None, b"1", False, {})
        assert publishing.exchanges == {"", "checked", "amq.fanout"}
        channel = publisher._channel
        with pytest.raises(PublishError, match=r"^exchange 'nope' does not exist \(the broker "
                                               r"said 404 NOT_FOUND - no exchange 'nope' in "
                                               r"vhost '.*'\); nothing was sent$"):
            publisher.publish_message("nope", "", None, b"1", False, {})
        assert publisher._channel is channel and channel is not None and channel.open
        broker.channel.exchange_delete("checked")
        with pytest.raises(PublishError, match="the broker closed the publishing channel: "
                                               "404 NOT_FOUND - no exchange 'checked'"):
            publisher.publish_message("checked", "", None, b"2", False, {})
        assert "checked" not in publishing.exchanges
        started = time.monotonic()
        publisher.publish_message("", "nowhere", None, b"3", False, {})
        assert time.monotonic() - started < 0.5  # reopened without a backoff
        with pytest.raises(PublishError, match="^exchange 'checked' does not exist"):
            publisher.publish_message("checked", "", None, b"4", False, {})
        for headers, where in [({"weight": 1.5}, "['weight']"),
                               ({"a": [1, {"b": 0.5}]}, "['a'][1]['b']")]:
            with pytest.raises(TypeError) as info:
                publisher.publish_message("", "nowhere", headers, b"5", False, {})
            assert str(info.value) == (f"amqp.publish: headers{where}: a float cannot be "
                                       "sent in AMQP headers: use an int, a str or a "
                                       "decimal.Decimal")
        with pytest.raises(TypeError, match=r"^amqp.publish: headers\['at'\]: a datetime "
                                            r"before 1970"):
            publisher.publish_message("", "nowhere", {"at": datetime(1960, 1, 1)}, b"6",
                                      False, {})

    try:
        gevent.spawn(scenario).get(timeout=60)
    finally:
        publishing.close()
        broker.close()


def test_without_confirms_publish_returns_once_written(broker: BrokerHandle,
                                                       tmp_path: Path) -> None:
    proc = DispatcherProcess(tmp_path, config(("in", 2, 2), queues=("in", "out"),
                                              extra="publisher_confirms: false\n"),
                             broker.url)
    try:
        proc.wait_consuming()
        broker.publish("in", order("sent", ["", "out", None, "x"]))
        broker.publish("in", order("unroutable", ["", "nowhere", None, "x"],
                                   options={"mandatory": True}))
        wait_until(lambda: finished(proc, "sent", "unroutable"), what="both handled")
        wait_until(lambda: broker.has_counts("out", 1, 0), what="the published message")
        assert [c["outcome"] for c in calls(proc, "unroutable")] == ["ok"]  # acked: no raise
        proc.wait_for_log(r"consumers\[0\] \(in\): the broker returned 1 message\(s\) "
                          r"published with mandatory=True as unroutable \(last: exchange '' "
                          r"routing key 'nowhere': 312 NO_ROUTE\); publisher_confirms is off")
        wait_until(lambda: broker.drained("in"), what="both inputs acked")
    finally:
        assert proc.stop() == 0, proc.output


def test_publishing_connection_closed_by_an_operator_is_reopened(broker: BrokerHandle,
                                                                 tmp_path: Path) -> None:
    proc = DispatcherProcess(tmp_path, config(("in", 2, 2), queues=("in", "out")), broker.url)
    try:
        proc.wait_consuming()
        broker.publish("in", order("before", ["", "out", None, "x"]))
        wait_until(lambda: finished(proc, "before"), what="the first publish")
        rows = broker.node.ctl("list_connections", "-q", "--no-table-headers", "pid",
                               "client_properties", "vhost")
        pid = next(row.split("\t")[0] for row in rows.splitlines()
                   if row.rstrip().endswith(broker.vhost) and " publisher\"" in row)
        broker.node.ctl("close_connection", pid, "test closes the publisher")
        proc.wait_for_log("the publishing connection to the broker was lost: 320 "
                          "CONNECTION_FORCED - test closes the publisher; reconnecting in")
        broker.publish("in", order("after", ["", "out", None, "x"]))
        wait_until(lambda: finished(proc, "after"), what="a publish after the loss")
        assert broker.counts("out") == (2, 0)
        assert proc.output.count("opened the publisher connection to") == 2
        assert "connection to the broker lost" not in proc.output  # consuming: untouched
        assert all(c["outcome"] == "ok" for c in calls(proc))
    finally:
        assert proc.stop() == 0, proc.output


def test_a_publish_waits_at_most_its_time_in_all_the_checks_included(
        broker: BrokerHandle) -> None:
    """In-process, with a 1 s bound instead of PUBLISH_TIMEOUT (30 s), and a broker that
    stops answering once the publishing connection is open. Before: the check that an
    exchange exists waited up to 30 s for its channel and 30 s more for its answer, and
    opening an entry's publishing channel as long again, whatever the publish's bound
    (then the message was sent with no time left to wait for its confirm). Now each
    ends at the publish's deadline with PublishTimeout, nothing sent."""
    broker.channel.exchange_declare("other", "fanout")
    broker.declare("out")
    with FaultProxy("127.0.0.1", broker.node.port) as proxy:
        publishing = PublishingConnection(parse_url(proxy.rewrite_url(broker.url)),
                                          confirms=True, timeout=1.0)
        first, second = publishing.publisher("first"), publishing.publisher("second")

        def timed(publisher: Publisher, exchange: str) -> tuple[float, str]:
            started = time.monotonic()
            with pytest.raises(PublishTimeout) as info:
                publisher.publish_message(exchange, "out", None, b"late", False, {})
            return time.monotonic() - started, str(info.value)

        def scenario() -> list[tuple[float, str]]:
            first.publish_message("", "out", None, b"warm", False, {})
            proxy.pause()  # the broker goes silent
            return [timed(first, "other"), timed(second, "")]

        try:
            (checking, checked), (opening, opened) = gevent.spawn(scenario).get(timeout=120)
        finally:
            proxy.resume()
            publishing.close()
    assert 0.9 <= checking < 2, checking
    assert checked == "no answer within 1s to the check that exchange 'other' exists; " \
                      "nothing was sent"
    assert 0.9 <= opening < 2, opening
    assert opened == "the publishing channel of second did not open within 1s"
    assert broker.get_all("out") == [b"warm"]


# -- a resource alarm: the broker blocks publishing connections -------------------

@pytest.fixture(scope="module")
def alarm_node() -> Iterator[Broker]:
    """A private node, since a memory alarm blocks every publisher on the node."""
    node = Broker(name=f"adtest-alarm-{uuid.uuid4().hex[:6]}")
    node.start()
    try:
        yield node
    finally:
        node.stop()


def set_alarm(node: Broker, on: bool) -> None:
    # A tiny watermark puts the node in a memory alarm at once; 0.4 is the default.
    node.ctl("set_vm_memory_high_watermark", "0.000001" if on else "0.4")


def connection_states(node: Broker) -> dict[str, str]:
    """'consuming' and 'publishing' connection -> state (running, blocking, blocked)."""
    rows = node.ctl("list_connections", "-q", "--no-table-headers", "client_properties",
                    "state")
    states = {}
    for row in rows.splitlines():
        if "amqp-dispatcher" in row:
            states["publishing" if " publisher\"" in row else "consuming"] = \
                row.split("\t")[-1].strip()
    return states


def test_blocked_publishing_connection_does_not_stall_acks(alarm_node: Broker,
                                                           tmp_path: Path) -> None:
    """The broker blocks a connection when it publishes during an alarm: the publishes
    wait for the unblock, while acks go on on the consuming connection (which would
    have been blocked too if it published)."""
    broker = BrokerHandle(alarm_node, "/")
    proc = DispatcherProcess(tmp_path, config(("pub", 3, 3), ("plain", 3, 3),
                                              queues=("pub", "plain", "out")),
                             alarm_node.url, env={"GATE_DIR": str(tmp_path)})
    try:
        wait_until(lambda: proc.output.count("consuming from") == 2, what="two entries")
        broker.publish("pub", order("warm", ["", "out", None, "w"]))
        wait_until(lambda: finished(proc, "warm"), what="the publishing connection open")
        for i in range(3):
            broker.publish("pub", order(f"b{i}", ["", "out", None, f"b{i}"], gate="pub"))
            broker.publish("plain", order(f"c{i}", gate="plain"))
        wait_until(lambda: broker.has_counts("pub", 0, 3) and broker.has_counts("plain", 0, 3),
                   what="every message in consume")
        set_alarm(alarm_node, True)
        (tmp_path / "pub").touch()  # publishing now gets the connection blocked
        proc.wait_for_log("the broker blocked the publishing connection")
        (tmp_path / "plain").touch()
        wait_until(lambda: broker.drained("plain"), what="plain messages acked")
        assert finished(proc, "c0", "c1", "c2")
        # The publish that got the connection blocked may have gone through; the
        # others wait for the unblock, their inputs unacked.
        assert not finished(proc, "b0", "b1", "b2")
        assert broker.counts("pub")[1] >= 2
        # "blocking": it would be blocked at its first publish, which never comes.
        assert connection_states(alarm_node) == {"consuming": "blocking",
                                                 "publishing": "blocked"}
        set_alarm(alarm_node, False)
        proc.wait_for_log("the broker unblocked the publishing connection")
        wait_until(lambda: finished(proc, "b0", "b1", "b2"), what="publishes after the alarm")
        wait_until(lambda: broker.drained("pub"), what="publishing inputs acked")
        assert broker.counts("out") == (4, 0)
        assert all(c["outcome"] == "ok" for c in calls(proc))
    finally:
        set_alarm(alarm_node, False)
        (tmp_path / "pub").touch()
        (tmp_path / "plain").touch()
        assert proc.stop() == 0, proc.output
        for queue in ("pub", "plain", "out"):
            broker.channel.queue_delete(queue)
        broker.close()


def test_publish_while_blocked_times_out(alarm_node: Broker) -> None:
    """In-process, with a 1 s bound instead of PUBLISH_TIMEOUT (30 s): once the broker
    blocked the connection a publish waits for the unblock, then raises
    PublishTimeout, having sent nothing."""
    broker = BrokerHandle(alarm_node, "/")
    broker.declare("timeout-out")
    publishing = PublishingConnection(parse_url(alarm_node.url), confirms=True, timeout=1.0)
    publisher = publishing.publisher("test")

    def scenario() -> float:
        publisher.publish_message("", "timeout-out", None, b"before", False, {})
        set_alarm(alarm_node, True)
        try:  # publishing during the alarm gets the connection blocked
            publisher.publish_message("", "timeout-out", None, b"trigger", False, {})
        except PublishTimeout:
            pass  # its confirm may wait for the unblock
        deadline = time.monotonic() + 30
        while not publishing.blocked and time.monotonic() < deadline:
            gevent.sleep(0.05)
        assert publishing.blocked
        started = time.monotonic()
        with pytest.raises(PublishTimeout, match="the publishing connection stayed blocked "
                                                 "by the broker"):
            publisher.publish_message("", "timeout-out", None, b"blocked", False, {})
        waited = time.monotonic() - started
        set_alarm(alarm_node, False)
        publisher.publish_message("", "timeout-out", None, b"after", False, {})
        return waited

    try:
        waited = gevent.spawn(scenario).get(timeout=60)
        assert 0.9 <= waited < 3, waited
        published = broker.get_all("timeout-out")
        assert b"blocked" not in published
        assert published[0] == b"before" and published[-1] == b"after", published
    finally:
        set_alarm(alarm_node, False)
        publishing.close()
        broker.close()


# -- returns matched to their publish ---------------------------------------------

def test_the_broker_returns_in_publish_order_and_before_any_confirm_at_or_above(
        broker: BrokerHandle) -> None:
    """What ConfirmChannel._on_return rests on, checked on the real broker: on a
    confirm-mode channel, returns come in publish order, each before every confirm
    whose delivery tag is its publish's or higher, and a returned publish is acked.
    Not asserted, as it depends on timing: confirms of lower tags can come between a
    return and its own ack (6-9% of returns here on RabbitMQ 3.10), so the ack next to
    a return does not name its publish."""
    queues = {"durable": {}, "transient": {}, "quorum": {"x-queue-type": "quorum"},
              "full": {"x-max-length": 0, "x-overflow": "reject-publish"}}
    frames: list[tuple[str, int, bool]] = []  # (return, ack or nack; tag; multiple)
    count = 2000

    def scenario() -> None:
        connection = connect(parse_url(broker.url))
        try:
            sync = SyncChannel.open(connection)
            sync.call(sync.channel.exchange_declare, exchange="hx", exchange_type="headers")
            for name, arguments in queues.items():
                sync.call(sync.channel.queue_declare, queue=name, durable=name != "transient",
                          arguments=arguments or None)
                sync.call(sync.channel.queue_bind, queue=name, exchange="hx",
                          arguments={"x-match": "all", "to": name})
            channel = sync.channel
            sync.call(channel.confirm_delivery, ack_nack_callback=lambda frame: frames.append(
                ("nack" if isinstance(frame.method, pika.spec.Basic.Nack) else "ack",
                 frame.method.delivery_tag, frame.method.multiple)))
            channel.add_on_return_callback(
                lambda _, method, props, body: frames.append(("return", props.headers["n"],
                                                              False)))
            targets = [*queues, "nowhere", "nowhere"]
            for n in range(1, count + 1):
                channel.basic_publish("hx", "", b"x", pika.BasicProperties(
                    headers={"to": targets[n * 7 % len(targets)], "n": n}, delivery_mode=2),
                    mandatory=True)
                if n % 50 == 0:
                    gevent.sleep(0)
            deadline = time.monotonic() + 30
            while not any(kind != "return" and tag == count for kind, tag, _ in frames):
                assert time.monotonic() < deadline
                gevent.sleep(0.05)
        finally:
            close_connection(connection, 5)

    gevent.spawn(scenario).get(timeout=60)
    highest_confirmed = last_returned = 0
    returns = 0
    for i, (kind, tag, _) in enumerate(frames):
        if kind != "return":
            highest_confirmed = max(highest_confirmed, tag)
            continue
        returns += 1
        assert tag > last_returned and tag > highest_confirmed, (i, tag)
        last_returned = tag
        settling = next(frame for frame in frames[i + 1:] if frame[0] != "return" and (
            frame[1] == tag or (frame[2] and frame[1] > tag)))
        assert settling[0] == "ack", (tag, settling)
    assert returns >= count // 4


def test_returns_of_publishes_differing_only_in_headers_go_to_their_own_publish(
        broker: BrokerHandle, tmp_path: Path) -> None:
    """Before: a basic.return was matched to the oldest waiting mandatory publish with
    the same exchange, routing key and body, whatever its headers. Through a headers
    exchange, publishes differing only in headers collided: of 200 routed and 200
    unroutable, about three in four unroutable ones were reported published (input
    acked, output lost) and as many routed ones returned (input requeued, output
    published twice). Now every routed output arrives once and every unroutable publish
    raises PublishReturned."""
    broker.channel.exchange_declare("hx", "headers")
    broker.declare("out")
    broker.channel.queue_bind("out", "hx", arguments={"x-match": "all", "tenant": "routed"})
    proc = DispatcherProcess(tmp_path, config(("in", 8, 16), queues=("in",)), broker.url)
    try:
        proc.wait_consuming()
        ids = {f"{tenant}{i}": tenant for i in range(200) for tenant in ("routed", "dropped")}
        for id_, tenant in ids.items():  # interleaved: each routed next to an unroutable
            broker.publish("in", order(id_, ["hx", "", {"tenant": tenant, "id": id_}, ""],
                                       once=True, options={"mandatory": True}))
        wait_until(lambda: finished(proc, *ids), timeout=60, what="every input handled")
        wait_until(lambda: broker.drained("in"), what="every input acked")
        published = []
        while True:
            method, props, _ = broker.channel.basic_get("out", auto_ack=True)
            if method is None:
                break
            published.append(props.headers["id"])
        routed = sorted(id_ for id_, tenant in ids.items() if tenant == "routed")
        assert sorted(published) == routed  # each once: none lost, none duplicated
        for id_, tenant in ids.items():
            outcomes = [(c["redelivered"], c["outcome"]) for c in calls(proc, id_)]
            if tenant == "routed":
                assert outcomes == [(False, "ok")], (id_, outcomes)
            else:  # returned, requeued, and the redelivery (once) publishes nothing
                assert len(outcomes) == 2 and outcomes[1] == (True, "ok"), (id_, outcomes)
                assert outcomes[0] == (False, "PublishReturned: the broker returned the "
                                              "message to exchange 'hx' routing key '' as "
                                              "unroutable (mandatory): 312 NO_ROUTE"), id_
    finally:
        assert proc.stop() == 0, proc.output


# -- a wait interrupted: nothing left open ----------------------------------------

def _open_channels(node: Broker, vhost: str) -> int:
    rows = node.ctl("list_connections", "-q", "--no-table-headers", "vhost", "channels")
    return sum(int(row.split("\t")[1]) for row in rows.splitlines()
               if row.split("\t")[0] == vhost)


@pytest.mark.parametrize("thrown", [TimeLimitExceeded, StopNow])
@pytest.mark.parametrize("waiting_for", ["channel.open", "confirm.select",
                                         "exchange.declare"])
def test_a_wait_interrupted_closes_the_channel_it_was_opening(
        broker: BrokerHandle, thrown: type[BaseException], waiting_for: str) -> None:
    """A time limit or a fast stop is thrown into the greenlet wherever it waits: here
    while it opens a channel (any SyncChannel), puts the publishing channel in confirm
    mode, or checks that an exchange exists. Before: the channel was opened all the
    same and nothing tracked or closed it, one leaked per occurrence. Now it is closed."""
    broker.channel.exchange_declare("checked", "fanout")
    broker.close()  # the publishing connection's are the only channels in the vhost
    publishing = PublishingConnection(parse_url(broker.url), confirms=True, timeout=5.0)

    def step() -> None:
        connection = publishing.wait_usable(time.monotonic() + 10)
        if waiting_for == "channel.open":
            SyncChannel.open(connection)
        elif waiting_for == "confirm.select":
            ConfirmChannel.open_on(connection, lambda method: None)
        else:
            publishing.check_exchange("checked", time.monotonic() + 10)

    def waiting(channel: Any) -> bool:
        if waiting_for == "channel.open":
            return bool(channel.is_opening)
        return bool(channel.is_open and channel._blocking == waiting_for.title())

    def scenario() -> None:
        publishing.wait_usable(time.monotonic() + 10)
        greenlet = gevent.spawn(step)
        deadline = time.monotonic() + 10
        while not any(waiting(c) for c in publishing.connection._channels.values()):
            assert time.monotonic() < deadline and not greenlet.dead
            gevent.sleep(0)
        greenlet.kill(thrown("thrown into the wait"), block=True, timeout=5)
        assert isinstance(greenlet.exception, thrown)
        gevent.sleep(1.0)  # the broker's answer arrives meanwhile
        assert not publishing.connection._channels

    try:
        gevent.spawn(scenario).get(timeout=60)
        assert _open_channels(broker.node, broker.vhost) == 0
    finally:
        publishing.close()

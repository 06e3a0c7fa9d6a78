"""Consumer semantics against the real broker, the dispatcher run as a subprocess."""

from __future__ import annotations

import json
import re
from pathlib import Path

from helpers import BrokerHandle, DispatcherProcess, wait_until


def config(consumer: str, queue: str = "work", count: int = 1, prefetch: int = 1,
           extra: str = "") -> str:
    return f"""
queues:
  - queue: {queue}
consumers:
  - consumer: {consumer}
    queue: {queue}
    consumer_count: {count}
    prefetch_count: {prefetch}
{extra}"""


def test_every_message_is_acked(broker: BrokerHandle, tmp_path: Path) -> None:
    proc = DispatcherProcess(tmp_path, config("testconsumers:Recorder", count=3, prefetch=5),
                             broker.url)
    try:
        proc.wait_consuming()
        for i in range(50):
            broker.publish("work", f"m{i}")
        wait_until(lambda: len(proc.records()) >= 50, what="50 messages handled")
        wait_until(lambda: broker.drained("work"), what="queue drained")
        assert sorted(proc.records()) == sorted(f"m{i}" for i in range(50))
    finally:
        assert proc.stop() == 0, proc.output


def test_message_and_proxy_as_consume_sees_them(broker: BrokerHandle, tmp_path: Path) -> None:
    proc = DispatcherProcess(tmp_path, config("testconsumers:Inspector"), broker.url)
    try:
        proc.wait_consuming()
        broker.publish("work", "hello", content_type="text/plain", headers={"k": "v"},
                       message_id="id-1", delivery_mode=2)
        wait_until(proc.records, what="message handled")
    finally:
        proc.stop()
    seen = json.loads(proc.records()[0])
    assert seen["body"] == "hello"
    assert seen["body_type"] == "bytes"
    assert seen["delivery_info"]["routing_key"] == "work"
    assert seen["delivery_info"]["exchange"] == ""
    assert seen["delivery_info"]["redelivered"] is False
    assert seen["delivery_info"]["delivery_tag"] == seen["tag"] == 1
    assert seen["delivery_info"]["consumer_tag"]
    assert seen["properties"] == {"content_type": "text/plain", "headers": {"k": "v"},
                                  "message_id": "id-1", "delivery_mode": 2}
    assert seen["responded_before"] is False


def test_raising_consume_requeues_and_replaces_instance(broker: BrokerHandle,
                                                         tmp_path: Path) -> None:
    proc = DispatcherProcess(tmp_path, config("testconsumers:FailOnce", count=2), broker.url)
    try:
        proc.wait_consuming()
        broker.publish("work", "fail-a")
        broker.publish("work", "ok-b")
        wait_until(lambda: {"fail-a:redelivered=True", "ok-b:redelivered=False"}
                   <= set(proc.records()), what="both messages handled")
        wait_until(lambda: broker.drained("work"), what="queue drained")
        records = proc.records()
        # Two instances at start, one replacement after the failure.
        assert [r for r in records if r.startswith("init:")] == ["init:1", "init:2", "init:3"]
        assert "shutdown:ValueError" in records
        assert "consume raised ValueError: failing fail-a once" in proc.output
        assert proc.process.poll() is None
    finally:
        assert proc.stop() == 0


def test_proxy_operations(broker: BrokerHandle, tmp_path: Path) -> None:
    broker.declare("published_out")
    proc = DispatcherProcess(tmp_path, config("testconsumers:ProxyCommands"), broker.url)
    try:
        proc.wait_consuming()
        for body in ["ack:1", "nack-once:2", "reject-drop:3", "double-ack:4", "publish:5"]:
            broker.publish("work", body)
        wait_until(lambda: len([r for r in proc.records() if r.startswith("done:")]) >= 5,
                   what="five messages done")
        wait_until(lambda: broker.drained("work"), what="queue drained")
        records = proc.records()
        assert "done:ack:1:True" in records
        assert "nacked:nack-once:2" in records and "done:nack-once:2:False" in records
        assert "done:reject-drop:3:True" in records
        assert any(re.fullmatch(r"error:AlreadyRespondedError:delivery_tag_\d+:"
                                r"_cannot_ack,_it_was_already_acked", r) for r in records)
        assert "done:publish:5:False" in records
        wait_until(lambda: broker.ready("published_out") == 1, what="published message")
        method, props, body = broker.channel.basic_get("published_out", auto_ack=True)
        assert body == b"from-consumer"
        assert props.headers == {"x-origin": "consumer"}
    finally:
        assert proc.stop() == 0


def test_respond_then_raise_is_not_settled_twice(broker: BrokerHandle, tmp_path: Path) -> None:
    proc = DispatcherProcess(tmp_path, config("testconsumers:ProxyCommands"), broker.url)
    try:
        proc.wait_consuming()
        broker.publish("work", "respond-then-raise:1")
        broker.publish("work", "ack:2")
        wait_until(lambda: "done:ack:2:True" in proc.records(), what="second message")
        wait_until(lambda: broker.drained("work"), what="queue drained")
        assert "was already settled" in proc.output
        assert "PRECONDITION_FAILED" not in proc.output
        assert proc.process.poll() is None
    finally:
        assert proc.stop() == 0

"""Failover: a three-node cluster on this machine, a quorum queue, and the node the
dispatcher is connected to stopped under load. Nothing may be lost."""

from __future__ import annotations

import collections
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
from helpers import DispatcherProcess, wait_until
from rabbitnode import Broker

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[Broker]]:
    cookie = uuid.uuid4().hex.upper()
    nodes = [Broker(name=f"adclu{i}-{cookie[:6].lower()}", cookie=cookie) for i in range(3)]
    try:
        for node in nodes:
            node.start()
        for node in nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", nodes[0].node)
            node.ctl("start_app")
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def connected_node(nodes: list[Broker], log: str) -> Broker:
    """The node of the dispatcher's latest 'connected to' log line."""
    port = int(re.findall(r"connected to 127\.0\.0\.1:(\d+)", log)[-1])
    return next(node for node in nodes if node.port == port)


def test_failover_to_another_node(cluster: list[Broker], tmp_path: Path) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(cluster[0].url))
    channel = connection.channel()
    channel.queue_declare("quorum_jobs", durable=True, arguments={"x-queue-type": "quorum"})
    ids = {f"id{i}" for i in range(300)}
    for body in sorted(ids):
        channel.basic_publish("", "quorum_jobs", body.encode(),
                              pika.BasicProperties(delivery_mode=2))
    connection.close()
    hosts = ",".join(f"127.0.0.1:{node.port}" for node in cluster)
    config = ("queues:\n  - queue: quorum_jobs\n    passive: true\n"
              "consumers:\n  - consumer: testconsumers:Faulty\n    queue: quorum_jobs\n"
              "    consumer_count: 10\n    prefetch_count: 20\n")
    proc = DispatcherProcess(tmp_path, config, f"amqp://guest:guest@{hosts}/%2F",
                             env={"PAUSE": "0.2"})

    def done() -> collections.Counter[str]:
        return collections.Counter(r[5:] for r in proc.records() if r.startswith("done:"))

    try:
        proc.wait_consuming()
        wait_until(lambda: len(done()) > 30, what="messages in flight")
        victim = connected_node(cluster, proc.output)
        started = time.monotonic()
        victim.ctl("stop_app")
        wait_until(lambda: "reconnected after" in proc.output, timeout=90, what="failover")
        failover = time.monotonic() - started
        assert proc.process.poll() is None
        wait_until(lambda: ids <= set(done()), timeout=120, what="every id handled")
        counts = done()
        print(f"\n[cluster failover] messages={len(ids)} lost={len(ids - set(counts))} "
              f"duplicates={sum(counts.values()) - len(counts)} failover_s={failover:.1f}")
        assert set(counts) == ids
        victim.ctl("start_app")
    finally:
        assert proc.stop() == 0, proc.output

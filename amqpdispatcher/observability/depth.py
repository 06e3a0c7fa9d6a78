"""The consumed queues' depth for ``/metrics`` (``http.queue_depth_interval``):
``amqp_dispatcher_queue_messages_ready{queue}`` and ``amqp_dispatcher_queue_consumers{queue}``.

Read every ``interval`` seconds by a greenlet of the generation, with a passive
``queue.declare`` per queue (the broker's declare-ok carries both counts) on a side
channel of the consuming connection: a channel of its own, so that the broker's 404
for a queue deleted meanwhile closes nothing else. Only while the http endpoint is on
(the generation makes none otherwise); under ``--processes`` only worker 1 reads, and
the arbiter passes its figures on instead of adding the workers' up
(supervision/endpoint.py, wsgi.SERVICE_GAUGES).

While the connection is down, or a queue cannot be read (deleted, no answer), its
series are left out: a stale figure would look like a stalled queue. A stream is not
read at all: it keeps the messages its consumers read, and its declare-ok counts every
one it holds (as if ready) and no consumer, a backlog that nobody consumes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import gevent

from ..amqp.channel import SyncChannel
from ..amqp.errors import BrokerError

log = logging.getLogger("amqp-dispatcher")


class QueueDepth:
    def __init__(self, queues: Sequence[str], interval: float,
                 connection: Callable[[], Any]) -> None:
        self.queues = list(dict.fromkeys(queues))  # once each, in the config's order
        self.interval = interval
        self.connection = connection  # the generation's consuming connection, or None
        self.values: dict[str, tuple[int, int]] = {}  # queue: (ready, consumers)
        self.channel: SyncChannel | None = None
        self.channel_of: Any = None  # the connection self.channel is on
        self.greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        if self.interval > 0 and self.queues:
            self.greenlet = gevent.spawn(self._run)
            self.greenlet.name = "queue depth"

    def stop(self) -> None:
        if self.greenlet is not None:
            self.greenlet.kill(block=False)  # a call in progress closes its channel
            self.greenlet = None
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        self.values = {}

    def _run(self) -> None:
        while True:
            self.read()
            gevent.sleep(self.interval)

    def read(self) -> None:
        """Every queue's figures now; those that cannot be read are left out."""
        connection = self.connection()
        if connection is None or not connection.is_open:
            self.values = {}
            return
        values = {}
        for queue in self.queues:
            try:
                if self.channel is None or self.channel_of is not connection \
                        or self.channel.close_reason is not None:
                    self.channel = SyncChannel.open(connection)
                    self.channel_of = connection
                ok = self.channel.call(self.channel.channel.queue_declare, queue, passive=True)
            except BrokerError:
                self.channel = None  # closed by the broker (404: no such queue), or no answer
                continue
            values[queue] = (int(ok.method.message_count), int(ok.method.consumer_count))
        self.values = values

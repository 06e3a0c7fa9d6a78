"""Publishing with publisher confirms: one confirm-mode channel per connection.

``Publisher.publish`` blocks the calling greenlet until the broker has taken
responsibility for the message (its ``basic.ack``: True) or it is clear that it
has not (a ``basic.nack``, the message returned as unroutable, the channel or
connection closed, no answer within PUBLISH_TIMEOUT: False). A caller that
moves a message elsewhere acks the original only after True, so a crash in
between can duplicate a message but never lose it.

Confirms are matched to publishes by sequence number: the broker numbers the
publishes of a confirm-mode channel 1, 2, 3 ... and a ``basic.ack`` or
``basic.nack`` with ``multiple`` settles every pending number up to its tag.
Publishes are ``mandatory``: a message no queue takes (a delay or dead-letter
queue deleted under us) comes back as ``basic.return`` before its ack, and is
reported as not published.

The dispatcher opens a Publisher when a session opens and forgets it with the
session; pools reach the current one through a PublisherRef.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import pika.exceptions
import pika.spec

from .broker import SyncChannel

log = logging.getLogger("amqp-dispatcher.publisher")

PUBLISH_TIMEOUT = 30.0
WAIT_FOR_CHANNEL = 5.0
# A content header frame: frame header (7), class, weight, body size (12), end (1).
HEADER_FRAME_OVERHEAD = 20


class Publisher:
    def __init__(self, sync: SyncChannel, frame_max: int = 131072) -> None:
        self.sync = sync
        self.frame_max = frame_max
        self.opened_at = time.monotonic()
        self.open = True
        self._next = 1  # sequence number of the next publish
        # sequence number -> (result, routing key, body), oldest first.
        self._pending: dict[int, tuple[gevent.event.AsyncResult, str, bytes]] = {}
        self._returned: set[int] = set()
        sync.channel.add_on_close_callback(self._on_close)
        sync.channel.add_on_return_callback(self._on_return)

    @classmethod
    def open_on(cls, connection: Any, on_close: Callable[[Publisher, Any], None]) -> Publisher:
        """Open a channel in confirm mode; ``on_close(publisher, reason)`` is called from
        the I/O loop if the channel closes. Raises BrokerError."""
        sync = SyncChannel.open(connection)
        publisher = cls(sync, connection.params.frame_max)
        sync.call(sync.channel.confirm_delivery, ack_nack_callback=publisher._on_confirm)
        sync.channel.add_on_close_callback(lambda _, reason: on_close(publisher, reason))
        return publisher

    def publish(self, exchange: str, routing_key: str, body: bytes,
                properties: pika.spec.BasicProperties) -> bool:
        """Publish and wait for the broker's confirm: True once it has the message."""
        if not self.open:
            return False
        seq = self._next
        result: gevent.event.AsyncResult = gevent.event.AsyncResult()
        try:
            self.sync.channel.basic_publish(exchange, routing_key, body, properties,
                                            mandatory=True)
        except pika.exceptions.AMQPError:
            self.open = False  # closing: the close callback settles the rest
            return False
        self._next += 1
        self._pending[seq] = (result, routing_key, body)
        try:
            return bool(result.get(timeout=PUBLISH_TIMEOUT))
        except gevent.Timeout:
            log.warning("no publisher confirm from the broker within %gs for a message to %r",
                        PUBLISH_TIMEOUT, routing_key)
            return False
        finally:
            self._pending.pop(seq, None)
            self._returned.discard(seq)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        ok = isinstance(method, pika.spec.Basic.Ack)
        tags = [tag for tag in self._pending if tag <= method.delivery_tag] \
            if method.multiple else [method.delivery_tag]
        for tag in tags:
            pending = self._pending.pop(tag, None)  # settled once, whatever follows
            if pending is not None:
                pending[0].set(ok and tag not in self._returned)

    def _on_return(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        # A return precedes the ack of its publish and carries no sequence number: it
        # belongs to the oldest pending publish with this routing key and body that
        # was not already returned.
        for seq, (_, routing_key, sent) in self._pending.items():
            if seq not in self._returned and routing_key == method.routing_key and sent == body:
                self._returned.add(seq)
                # The caller's failure log says so, summarised: this could repeat fast.
                log.debug("the broker returned a message published to %r: %s %s",
                          routing_key, method.reply_code, method.reply_text)
                return

    def _on_close(self, channel: Any, reason: Any) -> None:
        self.open = False
        for result, _, _ in list(self._pending.values()):
            result.set(False)

    def close(self) -> None:
        self.open = False
        self.sync.close()


class PublisherRef:
    """The current session's Publisher, or None while there is none; the dispatcher
    sets it with ``set``."""

    __slots__ = ("current", "_ready")

    def __init__(self) -> None:
        self.current: Publisher | None = None
        self._ready = gevent.event.Event()

    def set(self, publisher: Publisher | None) -> None:
        self.current = publisher
        if publisher is None:
            self._ready.clear()
        else:
            self._ready.set()

    def fits(self, properties: pika.spec.BasicProperties) -> bool:
        """Whether a message with these properties fits the connection's frame size: a
        content header over it makes the broker close the whole connection."""
        publisher = self.current
        if publisher is None:
            return True
        size = sum(len(part) for part in properties.encode()) + HEADER_FRAME_OVERHEAD
        return size <= publisher.frame_max

    def publish(self, exchange: str, routing_key: str, body: bytes,
                properties: pika.spec.BasicProperties) -> bool:
        # While the channel is being reopened, wait a little rather than fail at once
        # (the caller would requeue the message, and it would fail again at once).
        self._ready.wait(WAIT_FOR_CHANNEL)
        publisher = self.current
        if publisher is None:
            return False
        return publisher.publish(exchange, routing_key, body, properties)


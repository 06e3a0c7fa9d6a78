"""One confirm-mode channel: matching the broker's confirms and returns to publishes.

Confirms are matched to publishes by sequence number: the broker numbers the
publishes of a confirm-mode channel 1, 2, 3 ... and a ``basic.ack`` or
``basic.nack`` with ``multiple`` settles every pending number up to its tag. A
``mandatory`` message no queue takes comes back as ``basic.return`` before its
ack, and is reported as returned; a return carries no number, and is matched to
its publish by the broker's order and the message itself
(``ConfirmChannel._on_return``). --check (preflight.py) uses it too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import gevent.lock
import pika
import pika.exceptions
import pika.spec

from .arguments import header_problem
from .channel import SyncChannel
from .connection import (
    describe_close,
)
from .errors import (
    PublishError,
    PublishNacked,
    PublishReturned,
    PublishTimeout,
)

log = logging.getLogger("amqp-dispatcher.publisher")

PUBLISH_TIMEOUT = 30.0
# A content header frame: frame header (7), class, weight, body size (12), end (1).
HEADER_FRAME_OVERHEAD = 20


def check_headers(properties: pika.spec.BasicProperties, frame_max: int) -> None:
    """What a publish with these properties would raise before anything is sent: a
    TypeError naming a header pika cannot encode, or a PublishError for a content
    header over ``frame_max`` (the broker would close the whole connection over it).
    The harness (amqpdispatcher.testing) checks its publishes with it too."""
    try:
        size = sum(len(part) for part in properties.encode()) + HEADER_FRAME_OVERHEAD
    except Exception:  # noqa: BLE001 - pika's encoder on user data: say which header
        problem = header_problem(properties.headers) or ": a value pika cannot encode"
        raise TypeError(f"amqp.publish: headers{problem}") from None
    if size > frame_max:
        raise PublishError(f"headers too large for a frame: the content header would be "
                           f"{size} bytes, over the broker's frame_max ({frame_max}); "
                           "nothing was sent")


class _Pending:
    """A publish the broker has not confirmed yet: waited for, or mandatory (a return
    must find its own publish even when nobody waits for it)."""

    __slots__ = ("result", "exchange", "routing_key", "body", "properties", "mandatory",
                 "waited", "returned")

    def __init__(self, exchange: str, routing_key: str, body: bytes,
                 properties: pika.spec.BasicProperties, mandatory: bool, waited: bool) -> None:
        self.result: gevent.event.AsyncResult = gevent.event.AsyncResult()
        self.exchange = exchange
        self.routing_key = routing_key
        self.body = body
        self.properties = properties
        self.mandatory = mandatory
        self.waited = waited  # False: publisher_confirms is off, nobody can raise
        self.returned: Any = None  # the basic.return method, if the broker returned it

    def may_be_returned_as(self, method: Any, body: bytes) -> bool:
        """Whether a basic.return may be this publish's: mandatory, not returned yet,
        the same exchange, routing key and body."""
        return (self.mandatory and self.returned is None and body == self.body
                and method.routing_key == self.routing_key
                and method.exchange == self.exchange)

    def was_sent_with(self, properties: pika.spec.BasicProperties) -> bool:
        """Whether a returned message's properties are this publish's as the broker
        returns them: as pika decodes them, less the BCC header, which the broker
        removes from every message (verified on RabbitMQ 3.10)."""
        sent = pika.spec.BasicProperties()
        sent.decode(b"".join(self.properties.encode()))
        if sent.headers:
            sent.headers.pop("BCC", None)
        return sent == properties


class ConfirmChannel:
    """One channel in confirm mode: its publishes, and the confirms and returns that
    settle them. ``on_unclaimed_return(method)`` gets the returns no publish waits for."""

    def __init__(self, channel: Any, frame_max: int,
                 on_unclaimed_return: Callable[[Any], None],
                 timeout: float = PUBLISH_TIMEOUT) -> None:
        self.channel = channel
        self.frame_max = frame_max
        self.timeout = timeout  # for the message of PublishTimeout
        self.opened_at = time.monotonic()
        self.open = True
        self._on_unclaimed_return = on_unclaimed_return
        self._next = 1  # sequence number of the next publish
        self._pending: dict[int, _Pending] = {}  # by sequence number, oldest first
        # Returns only belong to publishes above this sequence number (see _on_return).
        self._return_floor = 0
        self.close_reason: Any = None  # why the channel closed, once it has
        channel.add_on_close_callback(self._on_close)
        channel.add_on_return_callback(self._on_return)

    @classmethod
    def open_on(cls, connection: Any, on_unclaimed_return: Callable[[Any], None],
                timeout: float = PUBLISH_TIMEOUT,
                deadline: float | None = None) -> ConfirmChannel:
        """A new channel on the connection, in confirm mode, by ``deadline`` if given;
        BrokerError (NoAnswer if in time) if it cannot be opened."""
        sync = SyncChannel.open(connection, deadline)
        channel = cls(sync.channel, connection.params.frame_max, on_unclaimed_return, timeout)
        sync.call(sync.channel.confirm_delivery, ack_nack_callback=channel._on_confirm)
        return channel

    def publish(self, exchange: str, routing_key: str, body: bytes,
                properties: pika.spec.BasicProperties, mandatory: bool, confirm: bool,
                deadline: float) -> None:
        """Publish; with ``confirm``, wait until ``deadline`` for the broker's answer.
        Raises PublishError (or a subclass); a TypeError for headers AMQP cannot carry."""
        if not self.open:
            raise PublishError("the publishing channel closed before the message was sent")
        if confirm and time.monotonic() >= deadline:
            # Sent now, it could not be waited for: the input would be retried while
            # the message is most likely on its way, and published twice.
            raise PublishTimeout(f"this publish's {self.timeout:g}s ran out before the "
                                 "message could be sent (waiting for the connection, the "
                                 "channel or the exchange check); nothing was sent")
        if properties.headers:
            self._check_size(properties)
        try:
            self.channel.basic_publish(exchange, routing_key, body, properties, mandatory)
        except pika.exceptions.AMQPError as exc:
            self.open = False  # closing: the close callback settles the rest
            raise PublishError(f"the publishing channel closed: {describe_close(exc)}") \
                from None
        seq = self._next
        self._next += 1
        if not (confirm or mandatory):
            return
        # Kept until the broker settles it, even after its waiter gave up: its return
        # could otherwise be taken for another publish's.
        pending = self._pending[seq] = _Pending(exchange, routing_key, body, properties,
                                                mandatory, confirm)
        if not confirm:
            return
        try:
            failure = pending.result.get(timeout=max(0.0, deadline - time.monotonic()))
        except gevent.Timeout:
            raise PublishTimeout(f"no confirm from the broker within {self.timeout:g}s "
                                 f"for a message to exchange {exchange!r} routing key "
                                 f"{routing_key!r}") from None
        if failure is not None:
            raise failure

    def _check_size(self, properties: pika.spec.BasicProperties) -> None:
        check_headers(properties, self.frame_max)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        nacked = isinstance(method, pika.spec.Basic.Nack)
        self._return_floor = max(self._return_floor, method.delivery_tag)
        if method.multiple:
            tags = []
            for tag in self._pending:
                if tag > method.delivery_tag:
                    break
                tags.append(tag)
        else:
            tags = [method.delivery_tag]
        for tag in tags:
            pending = self._pending.pop(tag, None)  # settled once, whatever follows
            if pending is None:
                continue  # neither waited for nor mandatory
            where = f"exchange {pending.exchange!r} routing key {pending.routing_key!r}"
            if nacked:
                pending.result.set(PublishNacked(f"the broker nacked the message to {where}: "
                                                 "it did not take it"))
            elif pending.returned is not None:
                code, text = pending.returned.reply_code, pending.returned.reply_text
                pending.result.set(PublishReturned(
                    f"the broker returned the message to {where} as unroutable "
                    f"(mandatory): {code} {text}", code, text))
            else:
                pending.result.set(None)

    def _on_return(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        # A basic.return carries no sequence number. What RabbitMQ guarantees about
        # the order (rabbit_channel: a publish no queue takes is returned while the
        # channel handles it, and its ack is recorded after that and sent with the
        # confirms collected so far, coalesced):
        # - returns come in publish order, and a return comes before every confirm
        #   frame whose delivery tag is its publish's or higher; so it belongs to a
        #   publish above both the last one returned and the highest tag confirmed
        #   (``_return_floor``);
        # - but not always right before its own ack: confirms of lower, routed
        #   publishes held back by the channel can be sent between the two (seen in
        #   6 to 9% of returns when publishes to several queues are mixed). So the
        #   next ack cannot name it, and order alone cannot tell apart two waiting
        #   publishes of which one is returned.
        # What tells them apart is the message, which the broker returns as published
        # (less a BCC header). It belongs to the oldest publish above the floor with
        # the same exchange, routing key, body and properties (headers too: through a
        # headers exchange they are what routes it). Messages returned identically are
        # routed alike, so the oldest is the right one, unless they differ only in BCC
        # or a binding changed between them: no client can tell those apart without
        # adding something to the message. If no publish has those properties, the
        # broker changed them (a plugin such as rabbitmq_message_timestamp adds to
        # them): the oldest with the same exchange, routing key and body is taken, as
        # a return must never go unclaimed (its publish would be reported confirmed).
        found: tuple[int, _Pending] | None = None
        for seq, pending in self._pending.items():
            if seq > self._return_floor and pending.may_be_returned_as(method, body):
                if pending.was_sent_with(properties):
                    found = seq, pending
                    break
                found = found or (seq, pending)
        if found is None:
            self._on_unclaimed_return(method)
            return
        seq, pending = found
        self._return_floor = seq
        pending.returned = method
        if not pending.waited:
            self._on_unclaimed_return(method)

    def _on_close(self, channel: Any, reason: Any) -> None:
        self.open = False
        self.close_reason = reason
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            why = f"the broker closed the publishing channel: {describe_close(reason)}"
        else:
            why = f"the publishing connection closed: {describe_close(reason)}"
        for pending in self._pending.values():
            pending.result.set(PublishError(f"{why}; the message to exchange "
                                            f"{pending.exchange!r} may or may not have been "
                                            "taken"))
        self._pending.clear()



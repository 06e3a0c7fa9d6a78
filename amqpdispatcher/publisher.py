"""Publishing: where ``amqp.publish`` and the retry policy send messages, and what a
publish raises when the broker does not take a message.

This module owns:

- The publishing connection (``PublishingConnection``): one per process, separate
  from the consuming one, as RabbitMQ recommends. The broker blocks connections
  that publish while a memory or disk alarm is on (``connection.blocked``); acks
  travel on the consuming connection, which never publishes, so they go on. It
  is opened by the first publish (a process that never publishes never opens it),
  then kept open: reconnected with the consuming connection's backoff after a
  loss, and closed at stop, after the drain.
- Per consumer entry, channels on it for ``amqp.publish`` and others for its retry
  policy's moves (``Publishers``: one per publish waiting for its confirm, as a
  refused publish fails every other on its channel; each a ``Publisher``), each
  opened by its first publish, always in
  confirm mode (the retry policy needs confirms; ``publisher_confirms: false``
  only stops ``amqp.publish`` from waiting). The broker closing a channel fails
  the publishes in flight on it and nothing else: consumption never notices, and
  a move is never failed by another consume's publish. The next publish reopens
  it: at once, or after 1, 2, 4 ... 30 s while it keeps being closed within
  STABLE_SESSION of the last close.
- That exchanges exist (``PublishingConnection.check_exchange``): before the first
  publish to an exchange name on a connection, a passive ``exchange.declare`` on a
  short-lived channel of its own. A missing exchange (404) closes only that
  channel and raises PublishError at once, so a message to it cannot close the
  channel that other publishes are waiting on. Exchanges found are remembered
  for the connection; one the broker later says is missing is forgotten.
- What a publish raises (``PublishError`` and its subclasses), and the checks
  of ``amqp.publish``'s arguments (``build_message``).

A publish waits at most PUBLISH_TIMEOUT in all: for the connection (opening,
reconnecting, blocked), for the exchange check, for its channel, and for the
broker's confirm; once that time is gone nothing is sent. With a
confirm it returns once the broker has taken responsibility for the message
(its ``basic.ack``); otherwise it raises, so a consumer's input message is
handled as a failure, and a crash in between can duplicate a message, never
lose it.

Confirms are matched to publishes by sequence number: the broker numbers the
publishes of a confirm-mode channel 1, 2, 3 ... and a ``basic.ack`` or
``basic.nack`` with ``multiple`` settles every pending number up to its tag. A
``mandatory`` message no queue takes comes back as ``basic.return`` before its
ack, and is reported as returned; a return carries no number, and is matched to
its publish by the broker's order and the message itself
(``ConfirmChannel._on_return``).
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Any

import gevent
import gevent.event
import gevent.lock
import pika
import pika.exceptions
import pika.spec

from .broker import (
    RECONNECT_FIRST_DELAY,
    RECONNECT_MAX_DELAY,
    REOPEN_FIRST_DELAY,
    REOPEN_MAX_DELAY,
    STABLE_SESSION,
    BrokerError,
    NoAnswer,
    NoFreeChannel,
    SyncChannel,
    close_connection,
    connect,
    describe_close,
)
from .settings import Settings

log = logging.getLogger("amqp-dispatcher.publisher")

PUBLISH_TIMEOUT = 30.0
CLOSE_TIMEOUT = 5.0
# A content header frame: frame header (7), class, weight, body size (12), end (1).
HEADER_FRAME_OVERHEAD = 20
# Returns nobody waits for (publisher_confirms: false) are logged at most this often.
RETURNS_LOG_INTERVAL = 10.0
# The broker's text when a publish names a missing exchange (it closes the channel).
_NO_EXCHANGE = re.compile(r"no exchange '(.*)' in vhost")


class PublishError(Exception):
    """The broker did not take a published message, or it is not known that it did.

    Raised by ``amqp.publish`` into ``consume``, so the input message is handled
    as a failure (the entry's failure policy decides) and nothing is lost. Raised
    as such when the publishing channel or connection closed before the broker
    confirmed (a publish to a missing exchange closes the channel: 404), or the
    headers do not fit in a frame. After a close the message may still have
    reached a queue: a retry can duplicate it, never lose it.
    """


def _header_problem(value: Any, where: str = "") -> str | None:
    """Where in this AMQP header value pika cannot encode it, and why ("['a'][1]: ..."),
    or None. Mirrors pika.data.encode_value."""
    if value is None or isinstance(value, (str, bytes, bool, Decimal)):
        return None
    if isinstance(value, int):
        return None if -2**63 <= value < 2**63 else f"{where}: {value} does not fit in 64 bits"
    if isinstance(value, datetime):
        if value.timestamp() < 0:  # AMQP timestamps are unsigned
            return f"{where}: a datetime before 1970 ({value.isoformat()})"
        return None
    if isinstance(value, float):
        return (f"{where}: a float cannot be sent in AMQP headers: use an int, a str or a "
                "decimal.Decimal")
    if isinstance(value, list):
        for i, item in enumerate(value):
            problem = _header_problem(item, f"{where}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or len(key.encode("utf-8")) > 255:
                return f"{where}[{key!r}]: a header name must be a str of at most 255 bytes"
            problem = _header_problem(item, f"{where}[{key!r}]")
            if problem:
                return problem
        return None
    return (f"{where}: a {type(value).__name__} cannot be sent in AMQP headers (str, bytes, "
            "int, bool, Decimal, datetime, list, dict or None)")


class PublishNacked(PublishError):
    """The broker answered ``basic.nack``: it did not take the message (for example,
    a queue with ``x-overflow: reject-publish`` is full)."""


class PublishReturned(PublishError):
    """Published with ``mandatory=True`` and routed to no queue: the broker returned it."""

    def __init__(self, message: str, reply_code: int, reply_text: str) -> None:
        super().__init__(message)
        self.reply_code = reply_code
        self.reply_text = reply_text


class PublishNoChannel(PublishError):
    """No channel could be opened for the publish: the publishing connection has as
    many as the broker's channel_max allows. Nothing was sent."""


class PublishTimeout(PublishError):
    """No answer within PUBLISH_TIMEOUT: no confirm, or no usable connection or channel
    (the broker blocked the connection, is unreachable, or keeps closing the channel)."""


# -- amqp.publish's arguments ------------------------------------------------------

def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"amqp.publish: {name}: expected a str, got {type(value).__name__}")
    if len(value.encode("utf-8")) > 255:  # an AMQP short string
        raise ValueError(f"amqp.publish: {name}: at most 255 bytes, got "
                         f"{len(value.encode('utf-8'))}")
    return value


def _integer(name: str, value: Any, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"amqp.publish: {name}: expected {what}, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"amqp.publish: {name}: expected {what}, got {value}")
    return value


def _delivery_mode(name: str, value: Any) -> int:
    if isinstance(value, pika.DeliveryMode):
        return int(value.value)
    return _integer(name, value, 1, 2, "1 (transient) or 2 (persistent)")


def _persistent(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"amqp.publish: {name}: expected True or False, got "
                        f"{type(value).__name__}")
    return value


def _priority(name: str, value: Any) -> int:
    return _integer(name, value, 0, 255, "an int from 0 to 255")


_DIGITS = re.compile(r"[0-9]{1,20}")


def _expiration(name: str, value: Any) -> str:
    if isinstance(value, str):
        if not _DIGITS.fullmatch(value):
            raise ValueError(f"amqp.publish: {name}: expected milliseconds as digits, "
                             f"got {value[:40]!r}")
        return value
    return str(_integer(name, value, 0, 2**63 - 1, "milliseconds (an int >= 0 or a str "
                                                   "of digits)"))


def _timestamp(name: str, value: Any) -> int:
    if isinstance(value, datetime):  # a naive datetime is local time, as datetime says
        value = int(value.timestamp())
    return _integer(name, value, 0, 2**63 - 1, "seconds since the epoch (an int >= 0) "
                                               "or a datetime")


# amqp.publish's keyword arguments, each with its check; all but ``persistent`` are
# AMQP properties of the same name.
PROPERTY_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "content_type": _text,
    "content_encoding": _text,
    "delivery_mode": _delivery_mode,
    "persistent": _persistent,  # True: delivery_mode 2; False: 1
    "priority": _priority,
    "correlation_id": _text,
    "reply_to": _text,
    "expiration": _expiration,
    "message_id": _text,
    "timestamp": _timestamp,
    "type": _text,
    "app_id": _text,
}


def build_message(exchange: Any, routing_key: Any, headers: Any, body: Any, mandatory: Any,
                  options: dict[str, Any]) -> tuple[bytes, pika.spec.BasicProperties]:
    """Check ``amqp.publish``'s arguments: the body as bytes and the properties, or a
    TypeError or ValueError with a one-line message. A property given as None is
    not set."""
    _text("exchange", exchange)
    _text("routing_key", routing_key)
    if isinstance(body, str):
        body = body.encode("utf-8")
    elif isinstance(body, (bytearray, memoryview)):
        body = bytes(body)
    elif not isinstance(body, bytes):
        raise TypeError(f"amqp.publish: body: expected bytes or str, got {type(body).__name__}")
    if headers is not None and not isinstance(headers, dict):
        raise TypeError(f"amqp.publish: headers: expected a dict or None, got "
                        f"{type(headers).__name__}")
    if not isinstance(mandatory, bool):
        raise TypeError(f"amqp.publish: mandatory: expected True or False, got "
                        f"{type(mandatory).__name__}")
    values: dict[str, Any] = {}
    for name, value in options.items():
        check = PROPERTY_CHECKS.get(name)
        if check is None:
            raise TypeError(f"amqp.publish() got an unexpected keyword argument {name!r}")
        if value is not None:
            values[name] = check(name, value)
    persistent = values.pop("persistent", None)
    if persistent is not None:
        mode = 2 if persistent else 1
        if values.setdefault("delivery_mode", mode) != mode:
            raise ValueError(f"amqp.publish: persistent={persistent} contradicts "
                             f"delivery_mode={values['delivery_mode']}")
    return body, pika.spec.BasicProperties(headers=headers or None, **values)


# -- one confirm-mode channel -----------------------------------------------------

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
        # A content header over frame_max makes the broker close the whole connection.
        try:
            size = sum(len(part) for part in properties.encode()) + HEADER_FRAME_OVERHEAD
        except Exception:  # noqa: BLE001 - pika's encoder on user data: say which header
            problem = _header_problem(properties.headers) or ": a value pika cannot encode"
            raise TypeError(f"amqp.publish: headers{problem}") from None
        if size > self.frame_max:
            raise PublishError(f"headers too large for a frame: the content header would be "
                               f"{size} bytes, over the broker's frame_max ({self.frame_max}); "
                               "nothing was sent")

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


# -- one consumer entry's publishing ----------------------------------------------

class Publisher:
    """One consumer entry's publishing: its channel on the publishing connection,
    opened by the first publish and reopened by the next one after a close."""

    def __init__(self, publishing: PublishingConnection, name: str) -> None:
        self.publishing = publishing
        self.name = name  # "consumers[0] (orders)", for the log
        self._channel: ConfirmChannel | None = None
        self._opening = gevent.lock.Semaphore()  # one greenlet opens, the others wait
        self._last_close = -STABLE_SESSION
        self._reopen_delay = 0.0
        self._reopen_at = 0.0
        self._returns = 0  # returns nobody waited for, since the last line about them
        self._returns_logged_at = -RETURNS_LOG_INTERVAL

    def publish_message(self, exchange: Any, routing_key: Any, headers: Any, body: Any,
                        mandatory: Any, options: dict[str, Any]) -> None:
        """``amqp.publish``: check the arguments, publish, and with publisher_confirms
        wait for the broker's confirm."""
        data, properties = build_message(exchange, routing_key, headers, body, mandatory,
                                         options)
        self.publish(exchange, routing_key, data, properties, mandatory,
                     self.publishing.confirms)

    def publish(self, exchange: str, routing_key: str, body: bytes,
                properties: pika.spec.BasicProperties, mandatory: bool = True,
                confirm: bool = True) -> None:
        """Publish, within PUBLISH_TIMEOUT; raises PublishError (or a subclass)."""
        deadline = time.monotonic() + self.publishing.timeout
        if exchange not in self.publishing.exchanges:
            self.publishing.check_exchange(exchange, deadline)
        channel = self._channel
        if channel is None or not channel.open or not self.publishing.usable.is_set():
            channel = self._ready_channel(deadline)
        channel.publish(exchange, routing_key, body, properties, mandatory, confirm, deadline)

    def _ready_channel(self, deadline: float) -> ConfirmChannel:
        self.publishing.wait_usable(deadline)
        if not self._opening.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise self._open_timeout()
        try:
            channel = self._channel
            if channel is not None and channel.open:  # opened by another greenlet meanwhile
                return channel
            wait = self._reopen_at - time.monotonic()
            if wait > 0:
                gevent.sleep(min(wait, max(0.0, deadline - time.monotonic())))
                if time.monotonic() < self._reopen_at:
                    raise PublishTimeout(f"the broker keeps closing the publishing channel "
                                         f"of {self.name}: it is reopened in "
                                         f"{self._reopen_at - time.monotonic():.1f}s, after "
                                         "this publish's time ran out")
            self._channel = channel = self._open(self.publishing.wait_usable(deadline), deadline)
            return channel
        finally:
            self._opening.release()

    def _open_timeout(self) -> PublishTimeout:
        return PublishTimeout(f"the publishing channel of {self.name} did not open within "
                              f"{self.publishing.timeout:g}s")

    def _open(self, connection: Any, deadline: float) -> ConfirmChannel:
        try:
            channel = ConfirmChannel.open_on(connection, self._unclaimed_return,
                                             self.publishing.timeout, deadline)
        except NoAnswer:
            raise self._open_timeout() from None
        except NoFreeChannel as exc:
            raise PublishNoChannel(f"cannot open the publishing channel of {self.name}: "
                                   f"{exc}; nothing was sent") from None
        except BrokerError as exc:
            raise PublishError(f"cannot open the publishing channel of {self.name}: {exc}") \
                from None
        channel.channel.add_on_close_callback(
            lambda _, reason: self._on_channel_closed(reason))
        return channel

    def _on_channel_closed(self, reason: Any) -> None:
        """Runs in the I/O loop: log a close by the broker and set the reopening backoff."""
        if not isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            return  # closed with the connection (logged once for all) or by us
        now = time.monotonic()
        missing = _NO_EXCHANGE.search(reason.reply_text) if reason.reply_code == 404 else None
        if missing:
            # Deleted since it was checked: the next publish to it checks again, and fails
            # on a channel of its own, so reopening at once cannot spin.
            self.publishing.exchanges.discard(missing[1])
            self._reopen_delay = 0.0
            when = "the next publish reopens it"
        elif now - self._last_close >= STABLE_SESSION:
            self._reopen_delay = 0.0
            when = "the next publish reopens it"
        else:
            self._reopen_delay = min(max(self._reopen_delay * 2, REOPEN_FIRST_DELAY),
                                     REOPEN_MAX_DELAY)
            when = (f"it was closed again within {STABLE_SESSION:g}s: the next publish "
                    f"reopens it after {self._reopen_delay:g}s")
        self._last_close = now
        self._reopen_at = now + self._reopen_delay
        log.error("the broker closed the publishing channel of %s: %s; %s", self.name,
                  describe_close(reason), when)

    def _unclaimed_return(self, method: Any) -> None:
        """A mandatory message came back and no publish waits for it (publisher_confirms:
        false): logged, at most once per RETURNS_LOG_INTERVAL, as this could repeat fast."""
        self._returns += 1
        now = time.monotonic()
        if now - self._returns_logged_at >= RETURNS_LOG_INTERVAL:
            log.warning("%s: the broker returned %d message(s) published with mandatory=True "
                        "as unroutable (last: exchange %r routing key %r: %s %s); "
                        "publisher_confirms is off, so amqp.publish could not raise",
                        self.name, self._returns, method.exchange, method.routing_key,
                        method.reply_code, method.reply_text)
            self._returns, self._returns_logged_at = 0, now


class Publishers:
    """One consumer entry's publishing channels of one kind (``amqp.publish``'s, or its
    retry policy's moves), each carrying at most one confirmed publish at a time.

    A publish the broker refuses (a 404 for an exchange deleted since it was checked,
    a 403 topic permission, a 406 ``user_id`` or message size) closes its channel, and
    the broker then sends no confirm for the publishes before it on that channel,
    though they may already be in their queue: a publish sharing the channel would
    raise, its input be retried, and its message be published twice. Each confirmed
    publish takes an idle channel, or opens another on the publishing connection (a
    Publisher: opened by its first publish, reopened with backoff): one per
    concurrent publish, up to ``limit`` (the entry's consumer_count: one per worker;
    greenlets a consume spawns to publish side by side share the channels beyond
    that, or the broker's channel_max: a channel that cannot be opened for it lowers
    the limit). The most recently used is taken first, so publishes one after another
    share one channel and its reopening backoff. A publish nobody waits for
    (``confirm`` false) goes on the first channel: a refusal fails no publish that
    waits, and one consume's publishes keep their order.
    """

    def __init__(self, first: Publisher, limit: int) -> None:
        self.first = first
        self.limit = max(1, limit)
        self._idle = [first]
        self._opened = 1

    def publish_message(self, exchange: Any, routing_key: Any, headers: Any, body: Any,
                        mandatory: Any, options: dict[str, Any]) -> None:
        """``amqp.publish``: as Publisher.publish_message."""
        data, properties = build_message(exchange, routing_key, headers, body, mandatory,
                                         options)
        self.publish(exchange, routing_key, data, properties, mandatory,
                     self.first.publishing.confirms)

    def publish(self, exchange: str, routing_key: str, body: bytes,
                properties: pika.spec.BasicProperties, mandatory: bool = True,
                confirm: bool = True) -> None:
        """As Publisher.publish, on a channel no other waiting publish is on."""
        if not confirm or (not self._idle and self._opened >= self.limit):
            self.first.publish(exchange, routing_key, body, properties, mandatory, confirm)
            return
        publisher: Publisher | None
        if self._idle:
            publisher = self._idle.pop()
        else:
            self._opened += 1
            publisher = self.first.publishing.publisher(
                f"{self.first.name}, channel {self._opened}")
        try:
            publisher.publish(exchange, routing_key, body, properties, mandatory, confirm)
        except PublishNoChannel:
            if publisher is self.first:
                raise
            # The broker's channel_max is reached: this entry keeps the channels it has,
            # and the publish (nothing was sent) shares the first one.
            self._opened -= 1
            self.limit = self._opened
            publisher = None
            self.first.publish(exchange, routing_key, body, properties, mandatory, confirm)
        finally:
            if publisher is not None:
                self._idle.append(publisher)


# -- the process's publishing connection ------------------------------------------

class PublishingConnection:
    """The process's connection for publishing: opened on first use, reconnected with
    backoff, ``connection.blocked`` honoured. ``confirms``: whether ``amqp.publish``
    waits for the broker's confirm (the config's ``publisher_confirms``)."""

    def __init__(self, settings: Settings, confirms: bool,
                 timeout: float = PUBLISH_TIMEOUT) -> None:
        self.settings = settings
        self.confirms = confirms
        self.timeout = timeout
        self.connection: Any = None
        self.blocked = False
        self.usable = gevent.event.Event()  # set while open and not blocked
        self._keeper: gevent.Greenlet | None = None
        self._closing = False
        # Exchanges known to exist on this connection (the default one always does), and
        # the checks in progress, which later publishes to the same name wait for.
        self.exchanges: set[str] = {""}
        self._checking: dict[str, gevent.event.AsyncResult] = {}

    def publisher(self, name: str) -> Publisher:
        """A consumer entry's Publisher; nothing is opened until it publishes."""
        return Publisher(self, name)

    def wait_usable(self, deadline: float) -> Any:
        """The open, unblocked connection; the first call opens it. PublishTimeout at the
        deadline."""
        if self._keeper is None:
            if self._closing:
                raise PublishError("amqp-dispatcher is stopping: the publishing connection "
                                   "is closed")
            self._keeper = gevent.spawn(self._keep)
            self._keeper.name = "publishing connection"
        if not self.usable.wait(max(0.0, deadline - time.monotonic())):
            state = ("blocked by the broker (a resource alarm: memory or disk)" if self.blocked
                     else "not open (the broker is unreachable)")
            raise PublishTimeout(f"the publishing connection stayed {state} for "
                                 f"{self.timeout:g}s; nothing was sent")
        return self.connection

    def check_exchange(self, exchange: str, deadline: float) -> None:
        """Raise PublishError if ``exchange`` does not exist; else remember that it does.
        One check per name at a time; the others publishing to it wait for its answer."""
        check = self._checking.get(exchange)
        if check is None:
            check = self._checking[exchange] = gevent.event.AsyncResult()
            try:
                check.set(self._exchange_missing(exchange, deadline))
            except BaseException as exc:  # a timeout, or this greenlet killed
                check.set_exception(exc if isinstance(exc, PublishError) else PublishError(
                    f"the check that exchange {exchange!r} exists was interrupted"))
                raise
            finally:
                del self._checking[exchange]
        try:
            missing = check.get(timeout=max(0.0, deadline - time.monotonic()))
        except gevent.Timeout:
            raise self._check_timeout(exchange) from None
        if missing is not None:
            raise missing

    def _check_timeout(self, exchange: str) -> PublishTimeout:
        return PublishTimeout(f"no answer within {self.timeout:g}s to the check that "
                              f"exchange {exchange!r} exists; nothing was sent")

    def _exchange_missing(self, exchange: str, deadline: float) -> PublishError | None:
        """A passive exchange.declare on a channel of its own: a 404 closes only that.
        It ends by the publish's deadline: the broker not answering by then is a
        PublishTimeout, for this publish and those waiting for the same check."""
        if exchange.startswith("amq."):  # the broker's own: always there
            self.exchanges.add(exchange)
            return None
        connection = self.wait_usable(deadline)
        try:
            sync = SyncChannel.open(connection, deadline)
        except NoAnswer:
            return self._check_timeout(exchange)
        except BrokerError as exc:
            return PublishError(f"cannot check that exchange {exchange!r} exists: {exc}")
        try:
            sync.call(sync.channel.exchange_declare, exchange=exchange, passive=True)
        except BrokerError as exc:
            if getattr(sync.close_reason, "reply_code", None) == 404:
                return PublishError(f"exchange {exchange!r} does not exist (the broker said "
                                    f"{exc}); nothing was sent")
            if isinstance(exc, NoAnswer):
                return self._check_timeout(exchange)
            if not exc.refused:
                return PublishError(f"cannot check that exchange {exchange!r} exists: {exc}")
            # Refused otherwise (403): the publish itself will say what the broker thinks.
        else:
            sync.close()
        if connection is self.connection:
            self.exchanges.add(exchange)
        return None

    def _keep(self) -> None:
        """Open the connection, and open it again whenever it is lost, with backoff."""
        delay = RECONNECT_FIRST_DELAY
        while True:
            try:
                connection = connect(self.settings, purpose="publisher")
            except BrokerError as exc:
                wait = random.uniform(delay / 2, delay)
                log.error("cannot open the publishing connection: %s; retrying in %.1fs",
                          exc, wait)
            else:
                opened_at = time.monotonic()
                reason = self._serve(connection)
                if time.monotonic() - opened_at >= STABLE_SESSION:
                    delay = RECONNECT_FIRST_DELAY
                wait = random.uniform(delay / 2, delay)
                log.error("the publishing connection to the broker was lost: %s; "
                          "reconnecting in %.1fs", describe_close(reason), wait)
            gevent.sleep(wait)
            delay = min(delay * 2, RECONNECT_MAX_DELAY)

    def _serve(self, connection: Any) -> Any:
        """Publish on this connection until it is lost; return why it was."""
        lost: gevent.event.AsyncResult = gevent.event.AsyncResult()
        connection.add_on_close_callback(lambda _, reason: lost.set(reason))
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(self._on_unblocked)
        self.connection, self.blocked = connection, False
        self.exchanges = {""}  # a new connection checks again
        self.usable.set()
        try:
            return lost.get()
        finally:
            self.usable.clear()
            self.connection = None

    def _on_blocked(self, connection: Any, frame: Any) -> None:
        if connection is not self.connection:
            return
        self.blocked = True
        self.usable.clear()
        log.warning("the broker blocked the publishing connection (%s): publishes wait for "
                    "it, up to %gs each, then fail; consuming and acking go on",
                    getattr(frame.method, "reason", "resource alarm"), self.timeout)

    def _on_unblocked(self, connection: Any, frame: Any) -> None:
        if connection is not self.connection:
            return
        self.blocked = False
        if connection.is_open:
            self.usable.set()
        log.info("the broker unblocked the publishing connection: publishing resumes")

    def close(self) -> None:
        """At stop, after the drain: close the connection, waiting at most CLOSE_TIMEOUT.
        Publishing after this raises PublishError."""
        self._closing = True
        keeper, self._keeper = self._keeper, None
        connection = self.connection
        if keeper is not None:
            keeper.kill()
        self.usable.clear()
        close_connection(connection, CLOSE_TIMEOUT)

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
A publish waits at most PUBLISH_TIMEOUT in all: for the connection (opening,
reconnecting, blocked), for the exchange check, for its channel, and for the
broker's confirm; once that time is gone nothing is sent. With a
confirm it returns once the broker has taken responsibility for the message
(its ``basic.ack``); otherwise it raises, so a consumer's input message is
handled as a failure, and a crash in between can duplicate a message, never
lose it. What a publish raises is in errors.py; the checks of ``amqp.publish``'s
arguments in arguments.py; the confirm protocol in confirms.py.
"""

from __future__ import annotations

import logging
import random
import re
import time
from typing import Any

import gevent
import gevent.event
import gevent.lock
import pika
import pika.exceptions
import pika.spec

from ..config.settings import Settings
from ..contracts.timeouts import CLOSE_TIMEOUT
from .arguments import build_message
from .channel import SyncChannel
from .confirms import PUBLISH_TIMEOUT, ConfirmChannel
from .connection import (
    RECONNECT_FIRST_DELAY,
    RECONNECT_MAX_DELAY,
    REOPEN_FIRST_DELAY,
    REOPEN_MAX_DELAY,
    STABLE_SESSION,
    close_connection,
    connect,
    describe_close,
)
from .errors import (
    BrokerError,
    NoAnswer,
    NoFreeChannel,
    PublishError,
    PublishNoChannel,
    PublishTimeout,
)

log = logging.getLogger("amqp-dispatcher.publisher")

# Returns nobody waits for (publisher_confirms: false) are logged at most this often.
RETURNS_LOG_INTERVAL = 10.0
# The broker's text when a publish names a missing exchange (it closes the channel).
_NO_EXCHANGE = re.compile(r"no exchange '(.*)' in vhost")


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
        # Set by the consumer pool once an OpenTelemetry SDK is configured: publishes
        # are then spans whose context the message carries (consuming/tracing.py).
        self.tracer: Any = None
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

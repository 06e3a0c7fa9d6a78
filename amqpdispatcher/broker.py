"""Talking to the broker from greenlets: connect, open channels, declare topology.

pika's asynchronous API reports results through callbacks that run in the I/O
loop (the gevent hub). These helpers turn each request into a call that blocks
the calling greenlet until the broker answers, and turn a channel or
connection closed by the broker into an exception.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import time
from collections.abc import Callable, Iterable
from typing import Any, Union

import gevent.event
import pika.exceptions
from pika.adapters.gevent_connection import GeventConnection

from .config import EXCHANGE_KEYS, QUEUE_KEYS, Config, ExchangeConfig, QueueConfig
from .settings import Settings, ssl_reason

log = logging.getLogger("amqp-dispatcher.connection")

RPC_TIMEOUT = 30.0

# pika keeps only the repr of an SSL error that ends the stream during the handshake
# (a broker that wants a client certificate): "... SSLError(1, '[SSL: ...] ...')".
_LOST_SSL = re.compile(r"(SSL\w*Error)\(\d+, '(.*?)'\)")

# What declare_topology declares: each has the ``path`` of its config entry.
Declared = Union[ExchangeConfig, QueueConfig]

# Backoff for the consuming and the publishing connection alike: reconnecting waits
# a random time up to this delay, doubling from the first to the max. A connection
# (or channel) that stayed up STABLE_SESSION seconds starts over from the first.
RECONNECT_FIRST_DELAY = 0.5
RECONNECT_MAX_DELAY = 30.0
STABLE_SESSION = 30.0
# A channel the broker closed again soon after it opened is reopened after 1, 2, 4 ... s.
REOPEN_FIRST_DELAY = 1.0
REOPEN_MAX_DELAY = 30.0


# Reply codes with which the broker refuses what the config asks for: retrying
# the same request fails the same way. 405 is an exclusive queue that another
# connection holds, or that exists without being exclusive.
REFUSAL_CODES = {403: "ACCESS_REFUSED", 404: "NOT_FOUND", 405: "RESOURCE_LOCKED",
                 406: "PRECONDITION_FAILED"}
# 503 COMMAND_INVALID, closing the connection: "unknown exchange type 'x'" for a type
# the node never knew, "invalid exchange type 'x'" once its plugin was disabled.
_REFUSED_TYPE = re.compile(r"(unknown|invalid) exchange type")


class BrokerError(Exception):
    """The broker could not be reached, or did not do what was asked: one line.

    ``channel_only``: the broker closed the channel over this request; the
    connection, and whatever else uses it, is fine. ``refused``: moreover the
    broker refused the request itself (see REFUSAL_CODES). Anything else (the
    connection lost, no answer) is about the connection.
    """

    def __init__(self, message: str, refused: bool = False, channel_only: bool = False) -> None:
        super().__init__(message)
        self.refused = refused
        self.channel_only = channel_only or refused


class NoAnswer(BrokerError):
    """The broker did not answer within RPC_TIMEOUT, or by the caller's deadline."""


class NoFreeChannel(BrokerError):
    """The connection has as many channels open as the broker's channel_max allows."""


class TopologyError(BrokerError):
    """The broker refused an exchange, queue, binding or consumer that the config asks
    for. ``refused_type``: the exchange whose type the broker does not know, over which
    it closed the whole connection, not only the channel."""

    def __init__(self, message: str, refused_type: ExchangeConfig | None = None) -> None:
        super().__init__(message, refused=True)
        self.refused_type = refused_type
        self.channel_only = refused_type is None


def is_refusal(reason: Any) -> bool:
    """Whether a channel close reason is the broker refusing the request itself."""
    if not isinstance(reason, pika.exceptions.ChannelClosedByBroker):
        return False  # closed by us, or with the whole connection
    # A durable queue whose node is down is a 404 too, but it comes back on its own.
    return reason.reply_code in REFUSAL_CODES and "down or inaccessible" not in reason.reply_text


def _channel_error(reason: Any) -> BrokerError:
    return BrokerError(describe_close(reason), refused=is_refusal(reason),
                       channel_only=isinstance(reason, pika.exceptions.ChannelClosedByBroker))


def is_delivery_ack_timeout(reason: Any) -> bool:
    """Whether the broker closed a channel because a delivery stayed unacked past its
    consumer_timeout ("delivery acknowledgement on channel N timed out")."""
    return (getattr(reason, "reply_code", None) == 406
            and "delivery acknowledgement" in str(getattr(reason, "reply_text", ""))
            and "timed out" in str(getattr(reason, "reply_text", "")))


def describe_close(reason: Any) -> str:
    code = getattr(reason, "reply_code", None)
    text = getattr(reason, "reply_text", None)
    if code is not None:
        return f"{code} {text}"
    return str(reason) or type(reason).__name__


def connect(settings: Settings, timeout: float = 60.0, purpose: str = "") -> GeventConnection:
    """Open a connection to the first host, tried in random order, that accepts one.

    ``purpose`` ("publisher") is added to the connection_name client property,
    so operators can tell the process's connections apart.
    """
    failures = []
    for params in settings.connection_parameters():
        if purpose:
            properties = dict(params.client_properties or {})
            properties["connection_name"] = f"{properties.get('connection_name', '')} {purpose}"
            params.client_properties = properties
        result: gevent.event.AsyncResult = gevent.event.AsyncResult()

        def failed(connection: GeventConnection, exc: BaseException,
                   result: gevent.event.AsyncResult = result) -> None:
            release_connection(connection)
            result.set(exc)

        attempt = GeventConnection(params, on_open_callback=result.set,
                                   on_open_error_callback=failed)
        try:
            outcome = result.get(timeout=timeout)
        except gevent.Timeout:
            outcome = TimeoutError(f"no answer within {timeout:.0f}s")
            try:
                attempt.close()  # aborts the attempt: ``failed`` releases it
            except pika.exceptions.AMQPError:
                pass  # failing already
        if not isinstance(outcome, BaseException):
            outcome.add_on_close_callback(release_connection)
            if purpose:
                log.info("opened the %s connection to %s:%s vhost %s", purpose, params.host,
                         params.port, params.virtual_host)
            else:
                log.info("connected to %s:%s vhost %s", params.host, params.port,
                         params.virtual_host)
            return outcome
        reason = _connect_failure(outcome)
        log.warning("cannot connect to %s:%s: %s", params.host, params.port, reason)
        failures.append(reason)
    raise BrokerError(f"no broker reachable at {settings.redacted_url()}: "
                      f"{len(failures)} host(s) tried, last error: {failures[-1]}")


def close_connection(connection: Any, timeout: float) -> None:
    """Close a connection (one already closing is only waited for), waiting at most
    ``timeout`` for the broker's answer."""
    if connection is None or connection.is_closed:
        return
    closed = gevent.event.Event()
    connection.add_on_close_callback(lambda *_: closed.set())
    if not connection.is_closing:
        try:
            connection.close()
        except pika.exceptions.AMQPError:
            return  # closed in the same read
    closed.wait(timeout=timeout)


def release_connection(connection: GeventConnection, *_: Any) -> None:
    """Close the pipe of a closed (or never opened) connection's I/O loop.

    Every GeventConnection makes an I/O loop of its own (``connection.ioloop``, a
    ``_GeventSelectorIOLoop``) whose ``_TSafeCallbackQueue``, for callbacks posted
    from other threads, holds a pipe (two fds) watched on the hub; pika never closes
    it (the loop's ``close()`` would destroy gevent's hub loop itself), so each
    connection, each failed attempt included, would leak two fds. connect() has this
    called once a connection is closed or lost, or its attempt failed: nothing posts
    from other threads then. Idempotent."""
    loop = connection.ioloop
    queue = getattr(loop, "_callback_queue", None)
    if queue is None or queue._read_fd < 0:
        return
    loop.remove_handler(queue._read_fd)
    os.close(queue._read_fd)
    os.close(queue._write_fd)
    queue._read_fd = queue._write_fd = -1


def _connect_failure(exc: BaseException) -> str:
    # pika wraps the socket error in a connector error; show the cause.
    while True:
        inner = getattr(exc, "exception", None) or getattr(exc, "exceptions", [None])[-1]
        if not isinstance(inner, BaseException):
            break
        exc = inner
    if isinstance(exc, ssl.SSLError):
        return f"{type(exc).__name__}: {ssl_reason(str(exc))}"
    lost_ssl = _LOST_SSL.search(str(exc))
    if lost_ssl:
        return f"{lost_ssl[1]}: {ssl_reason(lost_ssl[2])}"
    if not str(exc):  # pika raises some without a message
        return (f"{type(exc).__name__} (no reason given: the broker, or something in "
                "between, closed the connection before the AMQP handshake finished)")
    return f"{type(exc).__name__}: {exc}"


class SyncChannel:
    """A pika channel whose RPCs block the calling greenlet until answered.

    Every failure comes out as BrokerError, with ``refused`` set when the broker
    closed the channel to refuse the request; pika's own exceptions never escape.
    Each wait lasts at most RPC_TIMEOUT, and ends at ``deadline`` (time.monotonic())
    if one is given: that of a publish, which waits so long in all.
    """

    def __init__(self, channel: Any, deadline: float | None = None) -> None:
        self.channel = channel
        self.deadline = deadline
        self.close_reason: Any = None
        self._waiting: gevent.event.AsyncResult | None = None
        channel.add_on_close_callback(self._on_close)

    @classmethod
    def open(cls, connection: Any, deadline: float | None = None) -> SyncChannel:
        result: gevent.event.AsyncResult = gevent.event.AsyncResult()
        try:
            sync = cls(connection.channel(on_open_callback=result.set), deadline)
        except pika.exceptions.NoFreeChannels:
            raise NoFreeChannel(f"cannot open a channel: the connection has the "
                                f"{connection.params.channel_max} the broker allows "
                                "(channel_max)") from None
        except pika.exceptions.AMQPError as exc:  # the connection closed meanwhile
            raise BrokerError(f"cannot open a channel: {describe_close(exc)}") from None
        sync._waiting = result
        sync._wait(result)
        return sync

    def _on_close(self, channel: Any, reason: Any) -> None:
        self.close_reason = reason
        if self._waiting is not None and not self._waiting.ready():
            self._waiting.set_exception(_channel_error(reason))

    def _wait(self, result: gevent.event.AsyncResult) -> Any:
        timeout = RPC_TIMEOUT
        if self.deadline is not None:
            timeout = max(0.0, min(timeout, self.deadline - time.monotonic()))
        try:
            return result.get(timeout=timeout)
        except BrokerError:
            raise  # the channel closed
        except BaseException as exc:
            # No answer in time, or something thrown into the waiting greenlet (a time
            # limit, a stop): the caller is gone and the answer may still come, so
            # close the channel now, or nothing ever would (the channel it was opening,
            # too: pika closes it as soon as it is open).
            self.close()
            if isinstance(exc, gevent.Timeout):
                raise NoAnswer(f"no answer from the broker within {timeout:.3g}s") from None
            raise
        finally:
            self._waiting = None

    def call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.close_reason is not None:
            raise _channel_error(self.close_reason)
        result: gevent.event.AsyncResult = gevent.event.AsyncResult()
        self._waiting = result
        try:
            method(*args, callback=result.set, **kwargs)
        except pika.exceptions.AMQPError as exc:  # the channel is closing
            self._waiting = None
            raise BrokerError(describe_close(exc)) from None
        return self._wait(result)

    def close(self) -> None:
        """Close without waiting; a channel already closing or closed is left alone."""
        if not (self.channel.is_closing or self.channel.is_closed):
            try:
                self.channel.close()
            except pika.exceptions.AMQPError:
                pass  # closed in the same read


def cancel_consumer(channel: Any, consumer_tag: str,
                    on_cancel_ok: Callable[[Any], None]) -> bool:
    """Send basic.cancel; the deliveries the broker sent before it took the cancel keep
    reaching the consumer's callback until the broker's cancel-ok, which then calls
    ``on_cancel_ok``. False if pika no longer knows the consumer (the broker cancelled
    it): no cancel-ok will come.

    pika itself rejects, with requeue, every delivery that arrives for a consumer it is
    cancelling (Channel._on_deliver checks the private set Channel._cancelled): on a
    stream RabbitMQ closes the whole connection over a reject (540 NOT_IMPLEMENTED),
    losing every other entry's acks with it, and on a queue the requeue goes uncounted.
    pika's API has no way to keep the callback until cancel-ok, so the tag is taken
    out of that set again: pika then passes those deliveries on, and forgets the consumer
    at cancel-ok as usual. (A channel closed before the cancel-ok sends a second,
    nowait, cancel, which the broker ignores.) tests/test_units.py pins this behaviour of
    pika."""
    if consumer_tag not in channel.consumer_tags:
        return False
    channel.basic_cancel(consumer_tag, callback=on_cancel_ok)
    channel._cancelled.discard(consumer_tag)
    return True


def declare_topology(connection: Any, config: Config, exchanges: Iterable[ExchangeConfig],
                     queues: Iterable[QueueConfig]) -> list[tuple[Declared, BrokerError]]:
    """Declare these exchanges of the config, then their bindings to other exchanges,
    then these queues and their bindings.

    Returns, per exchange or queue the broker would not declare or bind, why: a
    TopologyError where it refused the config, a BrokerError where something
    passing failed on its side (a queue whose node is down). Either closes only
    that channel; the next one gets a new channel. Raises BrokerError when the
    connection itself fails: lost, no answer, or closed by the broker over an
    exchange type it does not know (a TopologyError then).
    """
    failed: list[tuple[Declared, BrokerError]] = []
    sync: SyncChannel | None = None
    # Every exchange exists before any binding names it as its source.
    steps: list[tuple[Declared, Callable[[SyncChannel, Config, Any], None]]] = []
    steps += [(exchange, _declare_exchange) for exchange in exchanges]
    steps += [(exchange, _bind_exchange) for exchange in exchanges if exchange.bindings]
    steps += [(queue, _declare_queue) for queue in queues]
    for item, step in steps:
        if any(item is other for other, _ in failed):
            continue  # an exchange that was not declared is not bound
        if sync is None:
            sync = SyncChannel.open(connection)
        try:
            step(sync, config, item)
        except BrokerError as exc:
            if not exc.channel_only:
                raise
            failed.append((item, exc))
            sync = None
    if sync is not None:
        sync.close()
    return failed


def _declare_exchange(sync: SyncChannel, config: Config, exchange: ExchangeConfig) -> None:
    what = (f"exchange {exchange.exchange!r} does not exist (passive: true only checks it)"
            if exchange.passive else
            f"cannot declare exchange {exchange.exchange!r} of type {exchange.type!r}")
    try:
        sync.call(sync.channel.exchange_declare, exchange=exchange.exchange,
                  exchange_type=exchange.type or "direct", passive=exchange.passive,
                  durable=exchange.durable, auto_delete=exchange.auto_delete,
                  internal=exchange.internal, arguments=exchange.arguments or None)
    except BrokerError as exc:
        if is_refused_exchange_type(sync.close_reason):
            # The broker closes the whole connection over it; a config error all the same.
            raise TopologyError(f"{config.path}: {exchange.path}.type: {what}: broker said "
                                f"{exc} (is the plugin that provides it enabled?)",
                                refused_type=exchange) from None
        raise config_error(exc, f"{config.path}: {exchange.path}: {what}",
                           config.path, exchange) from None
    log.info("declared exchange %s (%s)", exchange.exchange, exchange.type or "passive")


def is_refused_exchange_type(reason: Any) -> bool:
    """Whether the broker closed the connection over an exchange type it does not know
    (a plugin's, never enabled or disabled since)."""
    return (isinstance(reason, pika.exceptions.ConnectionClosedByBroker)
            and reason.reply_code == 503 and bool(_REFUSED_TYPE.search(reason.reply_text)))


def _bind_exchange(sync: SyncChannel, config: Config, exchange: ExchangeConfig) -> None:
    for i, binding in enumerate(exchange.bindings):
        try:
            sync.call(sync.channel.exchange_bind, destination=exchange.exchange,
                      source=binding.exchange, routing_key=binding.routing_key,
                      arguments=binding.arguments or None)
        except BrokerError as exc:
            raise config_error(exc, f"{config.path}: {exchange.path}.bindings[{i}]: cannot bind "
                                    f"exchange {exchange.exchange!r} to exchange "
                                    f"{binding.exchange!r}") from None


def _declare_queue(sync: SyncChannel, config: Config, queue: QueueConfig) -> None:
    what = (f"queue {queue.queue!r} does not exist or differs (passive: true only checks it)"
            if queue.passive else f"cannot declare queue {queue.queue!r}")
    try:
        sync.call(sync.channel.queue_declare, queue=queue.queue, passive=queue.passive,
                  durable=queue.durable, exclusive=queue.exclusive,
                  auto_delete=queue.auto_delete, arguments=queue.arguments() or None)
    except BrokerError as exc:
        raise config_error(exc, f"{config.path}: {queue.path}: {what}", config.path,
                           queue) from None
    for i, binding in enumerate(queue.bindings):
        try:
            sync.call(sync.channel.queue_bind, queue=queue.queue,
                      exchange=binding.exchange, routing_key=binding.routing_key,
                      arguments=binding.arguments or None)
        except BrokerError as exc:
            raise config_error(exc, f"{config.path}: {queue.path}.bindings[{i}]: cannot bind "
                                    f"queue {queue.queue!r} to exchange {binding.exchange!r}") \
                from None
    log.info("declared queue %s with %d binding(s)", queue.queue, len(queue.bindings))


# RabbitMQ's text for a declaration that differs from what exists, e.g.
# "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'q' in vhost 'v':
# received '20' but current is '10'". A value is none, 'V', or the value 'V' of type 'T'.
_VALUE = r"(none|(?:the value )?'(?:.*?)'(?: of type '[\w-]+')?)"
_INEQUIVALENT = re.compile(r"inequivalent arg '(?P<arg>[^']*)' for (?P<kind>queue|exchange) "
                           rf"'.*' in vhost '.*': received {_VALUE} but current is {_VALUE}$")


def _value(text: str) -> str | None:
    if text == "none":
        return None
    value = text.removeprefix("the value ").split("' of type '")[0].strip("'")
    return value or "''"


def describe_inequivalent(config_path: str, item: Declared, reply_text: str) -> str | None:
    """The one line for the broker's 406 "inequivalent arg" refusal of a queue or exchange
    of the config (a queue's or exchange's arguments and flags cannot change once it
    exists), naming the config key and both values; None for any other reply."""
    match = _INEQUIVALENT.search(reply_text)
    if match is None:
        return None
    arg, kind = match.group("arg"), match.group("kind")
    asked, current = _value(match.group(3)), _value(match.group(4))
    name = item.queue if isinstance(item, QueueConfig) else item.exchange
    key = arg.replace("-", "_")
    if isinstance(item, QueueConfig) and key not in QUEUE_KEYS:
        key = f"arguments.{arg}"
    elif isinstance(item, ExchangeConfig) and key not in EXCHANGE_KEYS:
        key = f"arguments.{arg}"
    # An entry of the config's own lists ("queues[0]") gets the key; a queue the
    # dispatcher derives (a retry policy's delay queue) is named by its entry alone.
    where = f"{item.path}.{key}" if item.path.endswith("]") else item.path
    exists = f"{kind} {name!r} already exists " + (
        f"with {arg} {current}" if current is not None else f"without {arg}")
    wants = (f"the config asks for {asked}" if asked is not None
             else "the config does not set it")
    fixed = "a queue's arguments" if kind == "queue" else "an exchange's type and arguments"
    return (f"{config_path}: {where}: {exists}, {wants} ({fixed} cannot change: delete it or "
            "change the config)")


def config_error(exc: BrokerError, what: str, config_path: str = "",
                 item: Declared | None = None) -> BrokerError:
    """The same failure, told as what the config asked for (file and key path first);
    for a queue or exchange that exists with other arguments, the line of
    describe_inequivalent."""
    if exc.refused:
        inequivalent = item and describe_inequivalent(config_path, item, str(exc))
        return TopologyError(inequivalent or f"{what}: broker said {exc}")
    if exc.channel_only:
        return BrokerError(f"{what}: broker said {exc}", channel_only=True)
    return exc

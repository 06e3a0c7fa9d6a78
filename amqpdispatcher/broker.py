"""Talking to the broker from greenlets: connect, open channels, declare topology.

pika's asynchronous API reports results through callbacks that run in the I/O
loop (the gevent hub). These helpers turn each request into a call that blocks
the calling greenlet until the broker answers, and turn a channel or
connection closed by the broker into an exception.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import gevent.event
import pika.exceptions
from pika.adapters.gevent_connection import GeventConnection

from .config import Config, QueueConfig
from .settings import Settings

log = logging.getLogger("amqp-dispatcher.connection")

RPC_TIMEOUT = 30.0

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


class TopologyError(BrokerError):
    """The broker refused a queue, binding or consumer that the config asks for."""

    def __init__(self, message: str) -> None:
        super().__init__(message, refused=True)


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
        GeventConnection(params, on_open_callback=result.set,
                         on_open_error_callback=lambda _, exc, r=result: r.set(exc))
        try:
            outcome = result.get(timeout=timeout)
        except gevent.Timeout:
            outcome = TimeoutError(f"no answer within {timeout:.0f}s")
        if not isinstance(outcome, BaseException):
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


def _connect_failure(exc: BaseException) -> str:
    # pika wraps the socket error in a connector error; show the cause.
    while True:
        inner = getattr(exc, "exception", None) or getattr(exc, "exceptions", [None])[-1]
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return f"{type(exc).__name__}: {exc}"


class SyncChannel:
    """A pika channel whose RPCs block the calling greenlet until answered.

    Every failure comes out as BrokerError, with ``refused`` set when the broker
    closed the channel to refuse the request; pika's own exceptions never escape.
    """

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.close_reason: Any = None
        self._waiting: gevent.event.AsyncResult | None = None
        channel.add_on_close_callback(self._on_close)

    @classmethod
    def open(cls, connection: Any) -> SyncChannel:
        result: gevent.event.AsyncResult = gevent.event.AsyncResult()
        try:
            sync = cls(connection.channel(on_open_callback=result.set))
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
        try:
            return result.get(timeout=RPC_TIMEOUT)
        except gevent.Timeout:
            self.close()  # never leave a channel behind that nobody tracks
            raise BrokerError(f"no answer from the broker within {RPC_TIMEOUT:.0f}s") from None
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


def declare_queues(connection: Any, config: Config,
                   queues: Iterable[QueueConfig]) -> list[tuple[QueueConfig, BrokerError]]:
    """Declare these queues of the config and their bindings.

    Returns, per queue the broker would not declare or bind, why: a
    TopologyError where it refused the config, a BrokerError where something
    passing failed on its side (a queue whose node is down). Either closes only
    that channel; the next queue gets a new one. Raises BrokerError when the
    connection itself fails: lost, or no answer.
    """
    failed: list[tuple[QueueConfig, BrokerError]] = []
    sync: SyncChannel | None = None
    for queue in queues:
        if sync is None:
            sync = SyncChannel.open(connection)
        try:
            _declare_queue(sync, config, queue)
        except BrokerError as exc:
            if not exc.channel_only:
                raise
            failed.append((queue, exc))
            sync = None
    if sync is not None:
        sync.close()
    return failed


def _declare_queue(sync: SyncChannel, config: Config, queue: QueueConfig) -> None:
    what = (f"queue {queue.queue!r} does not exist or differs (passive: true only checks it)"
            if queue.passive else f"cannot declare queue {queue.queue!r}")
    try:
        sync.call(sync.channel.queue_declare, queue=queue.queue, passive=queue.passive,
                  durable=queue.durable, exclusive=queue.exclusive,
                  auto_delete=queue.auto_delete, arguments=queue.arguments() or None)
    except BrokerError as exc:
        raise config_error(exc, f"{config.path}: {queue.path}: {what}") from None
    for i, binding in enumerate(queue.bindings):
        try:
            sync.call(sync.channel.queue_bind, queue=queue.queue,
                      exchange=binding.exchange, routing_key=binding.routing_key)
        except BrokerError as exc:
            raise config_error(exc, f"{config.path}: {queue.path}.bindings[{i}]: cannot bind "
                                    f"queue {queue.queue!r} to exchange {binding.exchange!r}") \
                from None
    log.info("declared queue %s with %d binding(s)", queue.queue, len(queue.bindings))


def config_error(exc: BrokerError, what: str) -> BrokerError:
    """The same failure, told as what the config asked for (file and key path first)."""
    if exc.refused:
        return TopologyError(f"{what}: broker said {exc}")
    if exc.channel_only:
        return BrokerError(f"{what}: broker said {exc}", channel_only=True)
    return exc

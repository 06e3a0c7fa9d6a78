"""Talking to the broker from greenlets: connect, open channels, declare topology.

pika's asynchronous API reports results through callbacks that run in the I/O
loop (the gevent hub). These helpers turn each request into a call that blocks
the calling greenlet until the broker answers, and turn a channel or
connection closed by the broker into an exception.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import gevent.event
from pika.adapters.gevent_connection import GeventConnection

from .config import Config
from .settings import Settings

log = logging.getLogger("amqp-dispatcher.connection")

RPC_TIMEOUT = 30.0


class BrokerError(Exception):
    """The broker could not be reached or refused a request: one line."""


class TopologyError(BrokerError):
    """The broker refused a queue declaration or binding from the config."""


def describe_close(reason: Any) -> str:
    code = getattr(reason, "reply_code", None)
    text = getattr(reason, "reply_text", None)
    if code is not None:
        return f"{code} {text}"
    return str(reason) or type(reason).__name__


def connect(settings: Settings, timeout: float = 60.0) -> GeventConnection:
    """Open a connection to the first host, tried in random order, that accepts one."""
    failures = []
    for params in settings.connection_parameters():
        result: gevent.event.AsyncResult = gevent.event.AsyncResult()
        GeventConnection(params, on_open_callback=result.set,
                         on_open_error_callback=lambda _, exc, r=result: r.set(exc))
        try:
            outcome = result.get(timeout=timeout)
        except gevent.Timeout:
            outcome = TimeoutError(f"no answer within {timeout:.0f}s")
        if not isinstance(outcome, BaseException):
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
    """A pika channel whose RPCs block the calling greenlet until answered."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.close_reason: Any = None
        self._waiting: gevent.event.AsyncResult | None = None
        channel.add_on_close_callback(self._on_close)

    @classmethod
    def open(cls, connection: Any) -> SyncChannel:
        result: gevent.event.AsyncResult = gevent.event.AsyncResult()
        sync = cls(connection.channel(on_open_callback=result.set))
        sync._waiting = result
        sync._wait(result)
        return sync

    def _on_close(self, channel: Any, reason: Any) -> None:
        self.close_reason = reason
        if self._waiting is not None and not self._waiting.ready():
            self._waiting.set_exception(BrokerError(describe_close(reason)))

    def _wait(self, result: gevent.event.AsyncResult) -> Any:
        try:
            return result.get(timeout=RPC_TIMEOUT)
        except gevent.Timeout:
            raise BrokerError(f"no answer from the broker within {RPC_TIMEOUT:.0f}s") from None
        finally:
            self._waiting = None

    def call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.close_reason is not None:
            raise BrokerError(describe_close(self.close_reason))
        result: gevent.event.AsyncResult = gevent.event.AsyncResult()
        self._waiting = result
        method(*args, callback=result.set, **kwargs)
        return self._wait(result)


def declare_topology(connection: Any, config: Config) -> None:
    """Declare every queue of the config and its bindings, before any consumer starts."""
    sync = SyncChannel.open(connection)
    for queue in config.queues:
        what = (f"queue {queue.queue!r} does not exist or differs (passive: true only checks it)"
                if queue.passive else f"cannot declare queue {queue.queue!r}")
        try:
            sync.call(sync.channel.queue_declare, queue=queue.queue, passive=queue.passive,
                      durable=queue.durable, exclusive=queue.exclusive,
                      auto_delete=queue.auto_delete, arguments=queue.arguments() or None)
        except BrokerError as exc:
            raise TopologyError(f"{config.path}: {queue.path}: {what}: broker said {exc}") from None
        for i, binding in enumerate(queue.bindings):
            try:
                sync.call(sync.channel.queue_bind, queue=queue.queue,
                          exchange=binding.exchange, routing_key=binding.routing_key)
            except BrokerError as exc:
                raise TopologyError(
                    f"{config.path}: {queue.path}.bindings[{i}]: cannot bind queue "
                    f"{queue.queue!r} to exchange {binding.exchange!r}: broker said {exc}"
                ) from None
        log.info("declared queue %s with %d binding(s)", queue.queue, len(queue.bindings))
    sync.channel.close()

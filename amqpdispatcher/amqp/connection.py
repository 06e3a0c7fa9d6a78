"""Talking to the broker from greenlets: connections, their backoff, and why they close.

pika's asynchronous API reports results through callbacks that run in the I/O
loop (the gevent hub). These helpers turn each request into a call that blocks
the calling greenlet until the broker answers, and turn a channel or
connection closed by the broker into an exception.
"""


from __future__ import annotations

import logging
import os
import random
import re
import socket
import ssl
import uuid
from typing import Any

import gevent
import gevent.event
import gevent.lock
import pika
import pika.exceptions
import pika.spec
from pika.adapters.gevent_connection import GeventConnection

from ..config.settings import Settings, ssl_reason
from .errors import (
    BrokerError,
)

log = logging.getLogger("amqp-dispatcher.connection")

RPC_TIMEOUT = 30.0

# pika keeps only the repr of an SSL error that ends the stream during the handshake
# (a broker that wants a client certificate): "... SSLError(1, '[SSL: ...] ...')".
_LOST_SSL = re.compile(r"(SSL\w*Error)\(\d+, '(.*?)'\)")


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


def connection_parameters(settings: Settings) -> list[pika.ConnectionParameters]:
    """One parameter set per host, in a fresh random order."""
    name = f"amqp-dispatcher {socket.gethostname()} pid {os.getpid()} {uuid.uuid4().hex[:6]}"
    if settings.worker:
        name += f" worker {settings.worker}"
    credentials = pika.PlainCredentials(settings.user, settings.password)
    # Without a server_hostname, pika checks each host against its own name.
    ssl_options = (pika.SSLOptions(settings.tls.context, settings.tls.server_name)
                   if settings.tls else None)
    params = []
    for host, port in settings.hosts:
        kwargs = dict(
            host=host,
            port=port,
            virtual_host=settings.vhost,
            credentials=credentials,
            client_properties={"connection_name": name, "product": "amqp-dispatcher"},
            connection_attempts=1,
            socket_timeout=5,
            stack_timeout=15,
            ssl_options=ssl_options,
        )
        if settings.heartbeat is not None:
            kwargs["heartbeat"] = settings.heartbeat
        params.append(pika.ConnectionParameters(**kwargs))
    random.shuffle(params)
    return params


def connect(settings: Settings, timeout: float = 60.0, purpose: str = "") -> GeventConnection:
    """Open a connection to the first host, tried in random order, that accepts one.

    ``purpose`` ("publisher") is added to the connection_name client property,
    so operators can tell the process's connections apart.
    """
    failures = []
    for params in connection_parameters(settings):
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
    raise BrokerError(f"no broker accepted a connection at {settings.redacted_url()}: "
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



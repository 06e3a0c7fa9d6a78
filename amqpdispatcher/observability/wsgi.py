"""What both HTTP endpoints share, without gevent: the worker's (observability/http.py,
on gevent's server) and the arbiter's of ``--processes`` (supervision/endpoint.py, on
the standard library's, in threads). The three paths (``make_app``), the limits on
connections (``Connections``), the quiet log of client errors (``ClientErrors``), and
the one line for a port that cannot be listened on (``ListenError``).
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..config import HttpConfig

log = logging.getLogger("amqp-dispatcher.http")

# Gauges of the service as a whole, not of one process: the consumed queues' depth
# (observability/depth.py). Under --processes only worker 1 reads them, and the arbiter
# passes on the largest figure its workers give (two during a reload's hand-over)
# instead of adding them up.
SERVICE_GAUGES = ("amqp_dispatcher_queue_messages_ready", "amqp_dispatcher_queue_consumers")

# Connections held at once. Scrapers and probes are few; the margin is for clients that
# are slow or send nothing (a port scanner, a load balancer's TCP check, a slowloris).
# When all are held, a new connection closes the one waiting longest for its request
# (Connections): a probe is served at once, whatever the slow clients do.
MAX_CONNECTIONS = 64
# Seconds a connection has for each request, whole: from when the server waits for it
# (request line, headers, a body it reads past) to the end of the answer. A timeout on
# each read was not enough: a client sending a byte a second kept its slot for ever.
REQUEST_TIMEOUT = 5.0
# How often the deadlines are looked at: a request's end is REQUEST_TIMEOUT late by
# at most this.
DEADLINE_CHECK_INTERVAL = 0.5
# A broken request (garbage, too many headers, a line too long) is the client's
# problem: one WARNING line at most every CLIENT_ERROR_INTERVAL seconds, no traceback,
# so that no remote client can flood the log.
CLIENT_ERROR_INTERVAL = 60.0

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
# /healthz and /readyz: whether to answer 200 (else 503), and the JSON body.
Probe = Callable[[], tuple[bool, dict[str, Any]]]


class ListenError(Exception):
    """The endpoint cannot listen: one line naming the config key and the address."""


def listen_error(exc: OSError, config: HttpConfig, config_path: str,
                 noise: str = "") -> ListenError:
    """The one line for a port or address that cannot be listened on. ``noise`` is what
    the server appended to the reason (gevent adds the address), left out."""
    key = "http.port" if exc.errno in (errno.EADDRINUSE, errno.EACCES) else "http.address"
    reason = (exc.strerror or str(exc)).removesuffix(noise)
    host = f"[{config.address}]" if ":" in config.address else config.address
    return ListenError(f"{config_path}: {key}: cannot listen on {host}:{config.port}: "
                       f"{reason[:1].lower()}{reason[1:]}")


def make_app(metrics_app: WSGIApp, healthz: Probe, readyz: Probe) -> WSGIApp:
    """The three paths; anything else is 404, and a method other than GET or HEAD on
    the probes 405 (on /metrics, prometheus-client's answer)."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            if environ.get("REQUEST_METHOD") == "HEAD":  # prometheus-client only has GET
                list(metrics_app({**environ, "REQUEST_METHOD": "GET"}, start_response))
                return []
            return metrics_app(environ, start_response)
        if path not in ("/healthz", "/readyz"):
            return _json(start_response, "404 Not Found",
                         {"error": "not found; try /metrics, /healthz or /readyz"})
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _json(start_response, "405 Method Not Allowed", {"error": "use GET"},
                         [("Allow", "GET, HEAD")])
        ok, body = (healthz if path == "/healthz" else readyz)()
        return _json(start_response, "200 OK" if ok else "503 Service Unavailable", body)

    return app


@dataclass(eq=False)
class _Held:
    sock: Any
    deadline: float  # the end of its current request's REQUEST_TIMEOUT
    answering: bool = False  # its request is read: the app runs, or the answer is sent


class Connections:
    """The connections an endpoint's server holds (this module's gevent server, and
    the arbiter's threads, supervision/endpoint.py): at most MAX_CONNECTIONS, each given
    REQUEST_TIMEOUT per request (``expire``, every DEADLINE_CHECK_INTERVAL).

    When every slot is held, a new connection closes the one that has been waiting
    longest for its request (a slow or silent client, or one idle between two
    requests), so that a probe is served at once however many slow clients there
    are; when every slot is answering a request, the new connection is closed
    instead (those answers take milliseconds, or the arbiter's WORKER_TIMEOUT). A
    connection closed by either is shut down, which its server's reads see as the
    end of the request, and is not answered.

    Thread-safe, and nothing under the lock waits: a shutdown does not block."""

    def __init__(self, errors: ClientErrors) -> None:
        self.errors = errors
        self.timeout = REQUEST_TIMEOUT
        self.lock = threading.Lock()
        self.held: dict[Any, _Held] = {}  # by socket

    def admit(self, sock: Any) -> bool:
        """Whether to serve a new connection; room is made for it if it can be."""
        with self.lock:
            full = len(self.held) >= MAX_CONNECTIONS
            waiting = [held for held in self.held.values() if not held.answering]
            if full and waiting:
                self._close(min(waiting, key=lambda held: held.deadline))
            if not full or waiting:
                self.held[sock] = _Held(sock, time.monotonic() + self.timeout)
        if full:
            self.errors.report(
                f"all {MAX_CONNECTIONS} connections held: closed the one waiting longest "
                f"for its request" if waiting else
                f"all {MAX_CONNECTIONS} connections are being answered: closed a new one")
        return not full or bool(waiting)

    def begin_request(self, sock: Any) -> None:
        """The server waits for the connection's next request (keep-alive)."""
        with self.lock:
            held = self.held.get(sock)
            if held is not None:
                held.deadline, held.answering = time.monotonic() + self.timeout, False

    def answer(self, sock: Any, evictable: bool = False) -> bool:
        """The connection's request is read: whether to answer it (False: the connection
        was closed meanwhile). ``evictable``: the request waits on its client even so
        (for a body the server reads after the answer), and a new connection may close it."""
        with self.lock:
            held = self.held.get(sock)
            if held is not None:
                held.answering = not evictable
            return held is not None

    def holds(self, sock: Any) -> bool:
        """False once the connection was closed for a new one, or ran out of time."""
        with self.lock:
            return sock in self.held

    def remove(self, sock: Any) -> None:
        """The server is done with the connection: before it closes the socket, so that
        a shutdown never reaches a closed socket's number, reused by another."""
        with self.lock:
            self.held.pop(sock, None)

    def expire(self) -> None:
        """Close the connections whose request has run out of REQUEST_TIMEOUT."""
        now = time.monotonic()
        with self.lock:
            late = [held for held in self.held.values() if held.deadline <= now]
            for held in late:
                self._close(held)
        if late:
            self.errors.report(f"closed {len(late)} connection(s) whose request was not "
                               f"done within {self.timeout:g}s (slow or silent clients)")

    def _close(self, held: _Held) -> None:
        del self.held[held.sock]
        try:
            held.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the client has gone already


class ClientErrors:
    """Broken requests and dropped connections, logged at most once every
    CLIENT_ERROR_INTERVAL seconds."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # the arbiter's server reports from many threads
        self.next_report = 0.0
        self.held_back = 0

    def report(self, what: str) -> None:
        now = time.monotonic()
        with self.lock:
            if now < self.next_report:
                self.held_back += 1
                return
            held_back, self.next_report, self.held_back = \
                self.held_back, now + CLIENT_ERROR_INTERVAL, 0
        more = f" ({held_back} more held back since the last)" if held_back else ""
        log.warning("%s%s; the next are held back %gs", what.strip()[:300], more,
                    CLIENT_ERROR_INTERVAL)


def _json(start_response: StartResponse, status: str, body: dict[str, Any],
          headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    data = json.dumps(body).encode() + b"\n"
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(data))), *(headers or [])])
    return [data]

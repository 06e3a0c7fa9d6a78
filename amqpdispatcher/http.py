"""The HTTP endpoint (config key ``http``): ``GET /metrics``, ``/healthz`` and ``/readyz``.

Served by gevent.pywsgi on the hub, beside the consumers: it needs no monkey
patching, and answers while the main greenlet waits on the broker.

- ``/metrics``: the dispatcher's registry (metrics.registry) in Prometheus' text
  format (OpenMetrics if the scraper asks for it).
- ``/healthz``: 200 while the main loop runs, reconnecting included; 503 once the
  dispatcher is stopping.
- ``/readyz``: 200 while connected with every consumer entry subscribed; else 503
  with a short JSON body saying what is missing.

The port is bound at start, before the startup handler and before connecting,
so that a port in use fails the start at once (ListenError: exit 1); the server
is stopped at the end of the stop. A worker of ``--processes`` serves the same
endpoint on a unix socket instead, for the arbiter to read (arbiter_http.py);
``make_app`` and ``listen_error`` are shared with the arbiter's endpoint.
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
from typing import TYPE_CHECKING, Any

import gevent.pool
import gevent.socket
from gevent.pywsgi import WSGIHandler, WSGIServer
from prometheus_client import make_wsgi_app

from . import metrics
from .config import HttpConfig

if TYPE_CHECKING:
    from .dispatcher import Dispatcher

log = logging.getLogger("amqp-dispatcher.http")

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
# How long the stop waits for requests in progress.
STOP_TIMEOUT = 1.0

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


class HttpEndpoint:
    """Serves the process's current dispatcher generation (``current()``): a SIGHUP
    reload hands the endpoint over with the rest, on the same port.

    ``where`` is the config's ``http`` section, or, in a worker of ``--processes``,
    the path of the unix socket the arbiter reads it on."""

    def __init__(self, current: Callable[[], Dispatcher], where: HttpConfig | str,
                 config_path: str) -> None:
        self.current = current
        self.where = where
        self.config_path = config_path
        self.app = make_app(make_wsgi_app(metrics.registry(current)), self._healthz,
                            self._readyz)
        self.server: Server | None = None

    def listen(self) -> None:
        """Bind the port (or the socket) and start serving; ListenError if it cannot."""
        if isinstance(self.where, str):
            self._listen_for_arbiter(self.where)
            return
        config = self.where
        self.server = Server((config.address, config.port), self.app)
        try:
            self.server.start()
        except OSError as exc:  # socket.gaierror included: an address that does not resolve
            raise listen_error(exc, config, self.config_path,
                               noise=f": {self.server.address!r}") from None
        log.info("serving /metrics, /healthz and /readyz on http://%s:%d/",
                 *self.server.address[:2])

    def _listen_for_arbiter(self, path: str) -> None:
        # A gevent socket: gevent's server does not accept on a stdlib unix socket.
        listener = gevent.socket.socket(gevent.socket.AF_UNIX, gevent.socket.SOCK_STREAM)
        try:
            listener.bind(path)
            listener.listen(MAX_CONNECTIONS)
        except OSError as exc:
            listener.close()
            raise ListenError(f"{self.config_path}: http: cannot serve the arbiter on "
                              f"{path}: {exc.strerror or exc}") from None
        self.server = Server(listener, self.app)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(timeout=STOP_TIMEOUT)

    def _healthz(self) -> tuple[bool, dict[str, Any]]:
        if self.current().stopping:
            return False, {"status": "stopping"}
        return True, {"status": "ok"}

    def _readyz(self) -> tuple[bool, dict[str, Any]]:
        d = self.current()
        not_consuming = [{"entry": pool.entry.path, "queue": pool.entry.queue,
                          "consumer": pool.entry.consumer}
                         for index, pool in enumerate(d.pools) if index not in d.channels]
        connected = d.is_connected()
        if connected and not not_consuming and not d.stopping:
            return True, {"ready": True}
        return False, {"ready": False, "connected": connected, "stopping": d.stopping,
                       "not_consuming": not_consuming}


class Server(WSGIServer):
    """gevent's WSGI server with Connections' limits, no access log (a scrape a second
    would drown everything else) and quiet client errors."""

    def __init__(self, listener: Any, app: WSGIApp) -> None:
        # An unbounded pool: Connections bounds the connections, and closes one to make
        # room; a bounded pool would stop accepting instead, and leave a probe waiting.
        super().__init__(listener, app, spawn=gevent.pool.Pool(), log=None, error_log=log,
                         handler_class=_Handler)
        self.client_errors = ClientErrors()
        self.connections = Connections(self.client_errors)
        self.deadlines = self.loop.timer(DEADLINE_CHECK_INTERVAL, DEADLINE_CHECK_INTERVAL)

    def start(self) -> None:
        super().start()
        self.deadlines.start(self.connections.expire)

    def stop(self, timeout: float | None = None) -> None:
        self.deadlines.stop()
        super().stop(timeout=timeout)

    def handle(self, sock: Any, address: Any) -> None:
        if not self.connections.admit(sock):
            sock.close()
            return
        try:
            super().handle(sock, address)
        except OSError:
            pass  # the client went away while it was sent a 400: not worth a traceback
        finally:
            self.connections.remove(sock)


class _Handler(WSGIHandler):
    def handle_one_request(self) -> Any:
        connections = self.server.connections
        connections.begin_request(self.socket)  # keep-alive: a new deadline
        result = super().handle_one_request()
        # Closed meanwhile (Connections): what was read is cut short, not broken.
        return result if connections.holds(self.socket) else None

    def handle_one_response(self) -> None:
        # After the answer pywsgi reads whatever the request's body the app left unread
        # (ours read none), which the client may never send: such a request stays one a
        # new connection can close, or clients announcing a body would hold every slot
        # "answering" and each probe be closed instead.
        body = self.environ.get("CONTENT_LENGTH", "0") not in ("", "0") \
            or "chunked" in self.environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if self.server.connections.answer(self.socket, evictable=body):
            super().handle_one_response()
        else:  # closed while it was sending the request: nothing to answer
            self.close_connection = True

    def _handle_client_error(self, ex: BaseException) -> Any:
        # pywsgi prints a traceback on stderr for a broken request that is not a
        # ValueError (over 100 headers, a header line too long); as a ValueError it
        # only says why, through log_error below.
        if not isinstance(ex, ValueError):
            ex = ValueError(str(ex) or type(ex).__name__)
        return super()._handle_client_error(ex)

    def log_error(self, msg: str, *args: Any) -> None:
        # Called by pywsgi for broken requests only (errors of the app go to the hub).
        if self.server.connections.holds(self.socket):
            self.server.client_errors.report("broken request: " + (msg % args if args else msg))


@dataclass(eq=False)
class _Held:
    sock: Any
    deadline: float  # the end of its current request's REQUEST_TIMEOUT
    answering: bool = False  # its request is read: the app runs, or the answer is sent


class Connections:
    """The connections an endpoint's server holds (this module's gevent server, and
    the arbiter's threads, arbiter_http.py): at most MAX_CONNECTIONS, each given
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

"""The HTTP endpoint (config key ``http``): ``GET /metrics``, ``/healthz`` and ``/readyz``.

Served by gevent.pywsgi on the hub, beside the consumers: it needs no monkey
patching, and answers while the main greenlet waits on the broker.

- ``/metrics``: the dispatcher's registry (metrics.registry) in Prometheus' text
  format (OpenMetrics if the scraper asks for it).
- ``/healthz``: 200 while the main loop runs, reconnecting included; 503 once the
  dispatcher is stopping.
- ``/readyz``: 200 while connected with every consumer entry subscribed (or its
  circuit_breaker open: named in the body under ``circuit_open``); else 503
  with a short JSON body saying what is missing.

The port is bound at start, before the startup handler and before connecting,
so that a port in use fails the start at once (ListenError: exit 1); the server
is stopped at the end of the stop. A worker of ``--processes`` serves the same
endpoint on a unix socket instead, for the arbiter to read (supervision/endpoint.py);
what both share is in wsgi.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import gevent.pool
import gevent.socket
from gevent.pywsgi import WSGIHandler, WSGIServer
from prometheus_client import make_wsgi_app

from ..config import HttpConfig
from . import metrics
from .wsgi import (
    DEADLINE_CHECK_INTERVAL,
    MAX_CONNECTIONS,
    ClientErrors,
    Connections,
    ListenError,
    WSGIApp,
    listen_error,
    make_app,
)

log = logging.getLogger("amqp-dispatcher.http")

# How long the stop waits for requests in progress.
STOP_TIMEOUT = 1.0


class HttpEndpoint:
    """Serves the process's current dispatcher generation (``current()``): a SIGHUP
    reload hands the endpoint over with the rest, on the same port.

    ``where`` is the config's ``http`` section, or, in a worker of ``--processes``,
    the path of the unix socket the arbiter reads it on."""

    def __init__(self, current: Callable[[], metrics.Observed], where: HttpConfig | str,
                 config_path: str,
                 blocked_seconds: Callable[[], float] = lambda: 0.0) -> None:
        self.current = current
        self.where = where
        self.config_path = config_path
        self.app = make_app(make_wsgi_app(metrics.registry(current, blocked_seconds)),
                            self._healthz, self._readyz)
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
        # An entry whose circuit_breaker is open does not consume, by design: the process
        # is healthy; the body names it, readiness stays.
        circuit_open = [{"entry": pool.entry.path, "queue": pool.entry.queue,
                         "consumer": pool.entry.consumer, "until": pool.breaker.until_text()}
                        for pool in d.pools if pool.breaker is not None and pool.breaker.is_open]
        not_consuming = [{"entry": pool.entry.path, "queue": pool.entry.queue,
                          "consumer": pool.entry.consumer}
                         for index, pool in enumerate(d.pools) if index not in d.channels
                         and not (pool.breaker is not None and pool.breaker.is_open)]
        connected = d.is_connected()
        if connected and not not_consuming and not d.stopping:
            body: dict[str, Any] = {"ready": True}
            if circuit_open:
                body["circuit_open"] = circuit_open
            return True, body
        body = {"ready": False, "connected": connected, "stopping": d.stopping,
                "not_consuming": not_consuming}
        if circuit_open:
            body["circuit_open"] = circuit_open
        return False, body


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

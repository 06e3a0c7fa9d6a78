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
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import gevent.socket
from gevent.pywsgi import WSGIHandler, WSGIServer
from prometheus_client import make_wsgi_app

from . import metrics
from .config import HttpConfig

if TYPE_CHECKING:
    from .dispatcher import Dispatcher

log = logging.getLogger("amqp-dispatcher.http")

# Connections served at once; more wait in the listen backlog. Scrapers and probes are
# few; the margin is for connections that send nothing (a port scanner, a load
# balancer's TCP check, a slowloris), which CONNECTION_TIMEOUT closes.
MAX_CONNECTIONS = 64
# Seconds a connection may stay silent (before or within a request) before the server
# closes it: without it, a few idle connections would hold every slot, and a liveness
# probe that cannot get one restarts a healthy daemon.
CONNECTION_TIMEOUT = 5.0
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
    """gevent's WSGI server with MAX_CONNECTIONS, CONNECTION_TIMEOUT, no access log (a
    scrape a second would drown everything else) and quiet client errors."""

    connection_timeout = CONNECTION_TIMEOUT

    def __init__(self, listener: Any, app: WSGIApp) -> None:
        super().__init__(listener, app, spawn=MAX_CONNECTIONS, log=None, error_log=log,
                         handler_class=_Handler)
        self.client_errors = _ClientErrors()

    def handle(self, sock: Any, address: Any) -> None:
        sock.settimeout(self.connection_timeout)
        super().handle(sock, address)


class _Handler(WSGIHandler):
    def _handle_client_error(self, ex: BaseException) -> Any:
        # pywsgi prints a traceback on stderr for a broken request that is not a
        # ValueError (over 100 headers, a header line too long, a read timing out);
        # as a ValueError it only says why, through log_error below.
        if not isinstance(ex, ValueError):
            ex = ValueError(str(ex) or type(ex).__name__)
        return super()._handle_client_error(ex)

    def log_error(self, msg: str, *args: Any) -> None:
        # Called by pywsgi for broken requests only (errors of the app go to the hub).
        self.server.client_errors.report(msg % args if args else msg)


class _ClientErrors:
    """Broken requests, logged at most once every CLIENT_ERROR_INTERVAL seconds."""

    def __init__(self) -> None:
        self.next_report = 0.0
        self.held_back = 0

    def report(self, what: str) -> None:
        now = time.monotonic()
        if now < self.next_report:
            self.held_back += 1
            return
        more = f" ({self.held_back} more held back since the last)" if self.held_back else ""
        log.warning("broken request: %s%s; the next are held back %gs",
                    what.strip()[:300], more, CLIENT_ERROR_INTERVAL)
        self.next_report, self.held_back = now + CLIENT_ERROR_INTERVAL, 0


def _json(start_response: StartResponse, status: str, body: dict[str, Any],
          headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    data = json.dumps(body).encode() + b"\n"
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(data))), *(headers or [])])
    return [data]

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
is stopped at the end of the stop.
"""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from gevent.pywsgi import WSGIServer
from prometheus_client import make_wsgi_app

from . import metrics
from .config import HttpConfig

if TYPE_CHECKING:
    from .dispatcher import Dispatcher

log = logging.getLogger("amqp-dispatcher.http")

# Requests served at once; more wait in the listen backlog. Scrapers and probes are few.
MAX_CONNECTIONS = 16
# How long the stop waits for requests in progress.
STOP_TIMEOUT = 1.0

StartResponse = Callable[..., Any]


class ListenError(Exception):
    """The endpoint cannot listen: one line naming the config key and the address."""


class HttpEndpoint:
    """Serves the process's current dispatcher generation (``current()``): a SIGHUP
    reload hands the endpoint over with the rest, on the same port."""

    def __init__(self, current: Callable[[], Dispatcher], config: HttpConfig,
                 config_path: str) -> None:
        self.current = current
        self.config = config
        self.config_path = config_path
        self.metrics_app = make_wsgi_app(metrics.registry(current))
        # No access log: a scrape a second would drown everything else.
        self.server = WSGIServer((config.address, config.port), self.app,
                                 spawn=MAX_CONNECTIONS, log=None, error_log=log)

    def listen(self) -> None:
        """Bind the port and start serving; ListenError if it cannot be bound."""
        try:
            self.server.start()
        except OSError as exc:  # socket.gaierror included: an address that does not resolve
            key = "http.port" if exc.errno in (errno.EADDRINUSE, errno.EACCES) \
                else "http.address"
            # gevent appends the address to the reason: we say it our way.
            reason = (exc.strerror or str(exc)).removesuffix(f": {self.server.address!r}")
            host = f"[{self.config.address}]" if ":" in self.config.address \
                else self.config.address
            raise ListenError(f"{self.config_path}: {key}: cannot listen on {host}:"
                              f"{self.config.port}: {reason[:1].lower()}{reason[1:]}") from None
        log.info("serving /metrics, /healthz and /readyz on http://%s:%d/",
                 *self.server.address[:2])

    def stop(self) -> None:
        self.server.stop(timeout=STOP_TIMEOUT)

    def app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self.metrics_app(environ, start_response)
        if path not in ("/healthz", "/readyz"):
            return _json(start_response, "404 Not Found",
                         {"error": "not found; try /metrics, /healthz or /readyz"})
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _json(start_response, "405 Method Not Allowed", {"error": "use GET"},
                         [("Allow", "GET, HEAD")])
        if path == "/healthz":
            if self.current().stopping:
                return _json(start_response, "503 Service Unavailable", {"status": "stopping"})
            return _json(start_response, "200 OK", {"status": "ok"})
        return self._readyz(start_response)

    def _readyz(self, start_response: StartResponse) -> Iterable[bytes]:
        d = self.current()
        not_consuming = [{"entry": pool.entry.path, "queue": pool.entry.queue,
                          "consumer": pool.entry.consumer}
                         for index, pool in enumerate(d.pools) if index not in d.channels]
        connected = d.is_connected()
        if connected and not not_consuming and not d.stopping:
            return _json(start_response, "200 OK", {"ready": True})
        return _json(start_response, "503 Service Unavailable",
                     {"ready": False, "connected": connected, "stopping": d.stopping,
                      "not_consuming": not_consuming})


def _json(start_response: StartResponse, status: str, body: dict[str, Any],
          headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    data = json.dumps(body).encode() + b"\n"
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(data))), *(headers or [])])
    return [data]


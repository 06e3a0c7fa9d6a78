"""The arbiter's HTTP endpoint under ``--processes N`` (config key ``http``): one
``/metrics``, ``/healthz`` and ``/readyz`` for the whole service.

The arbiter listens on ``http.address:http.port`` itself, once the config checks
out and before any worker starts (a port in use: one line, exit 1, as without
``--processes``). It knows nothing of consumers and never imports their code, so
it asks the workers: each serves its own endpoint (observability/http.py) on a unix socket in a
directory of the arbiter's that only its user can enter (link.py). A request to
the arbiter asks every worker at once and waits at most WORKER_TIMEOUT for them.

- ``/metrics``: the workers' ``amqp_dispatcher_*`` series added up, series by
  series (Totals), but for the queues' depth, which worker 1 alone reads
  (SERVICE_GAUGES); their CPU seconds and resident memory under names of their own
  (RENAMED); ``amqp_dispatcher_workers``, the worker processes running; and the
  arbiter's own process, platform and garbage collector metrics.
- ``/healthz``: 200 until the arbiter is stopping, while workers reconnect or are
  replaced too.
- ``/readyz``: 200 while every worker of the current set (a reload's new set once it
  has taken over) says it is ready; else 503 naming each one that is not, and what
  it lacks.

The server runs in threads of its own (wsgiref, a thread per request): the main
loop hands it the list of workers after each turn (``update``) and never waits on a
request; signals are still received by the main thread alone.
"""

from __future__ import annotations

import http.client
import itertools
import json
import logging
import os
import re
import shutil
import socket
import socketserver
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Union
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import make_wsgi_app
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from ..config import HttpConfig
from ..contracts.counts import COUNTS_SUFFIX, Counted, counts_path, read_counts
from ..contracts.metrics import help_text
from ..observability.wsgi import (
    SERVICE_GAUGES,
    ClientErrors,
    Connections,
    listen_error,
    make_app,
)

log = logging.getLogger("amqp-dispatcher.http")

# How long a request to the arbiter waits for the workers' answers. Under a
# Kubernetes probe's default timeout (1 s), so that the probe gets the arbiter's
# answer naming the worker rather than a timeout of its own.
WORKER_TIMEOUT = 0.8

# A worker's process metrics worth adding up, under names of their own: the
# arbiter's process_* describe the arbiter.
RENAMED = {
    "process_cpu_seconds": ("amqp_dispatcher_workers_cpu_seconds",
                            help_text("amqp_dispatcher_workers_cpu_seconds_total")),
    "process_resident_memory_bytes": ("amqp_dispatcher_workers_resident_memory_bytes",
                                      help_text("amqp_dispatcher_workers_resident_memory_bytes")),
}
# The directory of the workers' sockets: DIRECTORY_PREFIX, the arbiter's pid, "-" and
# mkdtemp's random letters. The pid tells the next arbiter which directories an arbiter
# killed by SIGKILL left behind (_remove_stale_directories).
DIRECTORY_PREFIX = "amqp-dispatcher-"
STALE_DIRECTORY = re.compile(re.escape(DIRECTORY_PREFIX) + r"([1-9][0-9]{0,8})-[a-z0-9_]+")
COUNT_FILE = re.compile(r"[1-9][0-9]*" + re.escape(COUNTS_SUFFIX))

# Families whose samples only ever grow in one worker's life.
CUMULATIVE = ("counter", "histogram", "summary")

SampleKey = tuple[str, tuple[tuple[str, str], ...]]  # a sample's name, its labels
# A worker's answer: (HTTP status, body), or why there is none.
Answer = Union[tuple[int, bytes], str]


@dataclass(frozen=True)
class WorkerView:
    """A worker process as the endpoint sees it (the arbiter's main loop makes these)."""

    number: int
    pid: int
    socket: str  # where it serves; one per process, so also the key to its counts
    current: bool  # in the set that serves (neither a reload's new set nor a retired one)


@dataclass
class Family:
    name: str
    type: str
    documentation: str
    samples: dict[SampleKey, float]


def parse(text: str) -> dict[str, Family]:
    """A worker's /metrics: its amqp_dispatcher_* families, and RENAMED's renamed."""
    families = {}
    for family in text_string_to_metric_families(text):
        name, documentation = RENAMED.get(family.name, (family.name, family.documentation))
        if name.startswith("amqp_dispatcher_"):
            samples = {(name + s.name[len(family.name):], tuple(sorted(s.labels.items()))): s.value
                       for s in family.samples}
            families[name] = Family(name, family.type, documentation, samples)
    return families


class Totals:
    """The workers' metrics added up, series by series: a gauge over the workers that
    answered this request; a counter (or histogram) over every worker that ever
    answered, so that a sum never goes down when a worker exits and a new one starts
    from zero (Prometheus would take the fall for a reset and count the new worker's
    whole figure again). Each live worker's last answer is kept; when the worker
    exits, its counters as its count file holds them (``final``: what it counted up to
    its end, SIGKILL included; contracts/counts.py), else its last answer, are added to
    ``exited``. Thread-safe: requests run in threads of their own."""

    def __init__(self, final: Callable[[str], tuple[Counted, dict[str, str]] | None]
                 = lambda key: None) -> None:
        self.lock = threading.Lock()
        self.kinds: dict[str, tuple[str, str]] = {}  # family: type, documentation; by age
        self.last: dict[str, dict[tuple[str, SampleKey], float]] = {}  # by live worker
        self.exited: dict[tuple[str, SampleKey], float] = {}
        self.final = final  # an exited worker's counters as it left them, by its key

    def keep(self, alive: set[str]) -> list[str]:
        """The workers alive now: those no longer alive have their counts added to
        ``exited``, and are returned. Their counts: what their count file holds (what
        they counted up to their end, contracts/counts.py), else their last answer."""
        with self.lock:
            gone = [key for key in self.last if key not in alive]
        finals = {key: self.final(key) for key in gone}  # reading files: not under the lock
        with self.lock:
            for key in gone:
                counted = self.last.pop(key)
                final = finals[key]
                if final is not None:
                    samples, types = final
                    for sample, value in samples.items():
                        counted[sample] = max(counted.get(sample, 0.0), value)
                    for family, kind in types.items():
                        self.kinds.setdefault(family, (kind, _help(family, kind)))
                for sample, value in counted.items():
                    self.exited[sample] = self.exited.get(sample, 0.0) + value
            for key in alive:
                self.last.setdefault(key, {})
        return gone

    def add_up(self, answers: dict[str, dict[str, Family]]) -> list[Metric]:
        """Every family summed over the workers, with ``answers`` (this request's, by
        worker) recorded first."""
        with self.lock:
            for key, families in answers.items():
                last = self.last.get(key)
                if last is None:
                    continue  # it exited meanwhile: what it had counted is in exited
                for family in families.values():
                    self.kinds.setdefault(family.name, (family.type, family.documentation))
                    if family.type in CUMULATIVE:
                        for sample, value in family.samples.items():
                            # max: two requests in parallel may record out of order.
                            last[family.name, sample] = max(
                                last.get((family.name, sample), 0.0), value)
            sums: dict[str, dict[SampleKey, float]] = {name: {} for name in self.kinds}
            for counted in (self.exited, *self.last.values()):
                for (name, sample), value in counted.items():
                    sums[name][sample] = sums[name].get(sample, 0.0) + value
            for key, families in answers.items():
                if key in self.last:
                    for family in families.values():
                        if family.name in SERVICE_GAUGES:  # read by one worker
                            for sample, value in family.samples.items():
                                sums[family.name][sample] = max(
                                    sums[family.name].get(sample, value), value)
                        elif family.type not in CUMULATIVE:
                            for sample, value in family.samples.items():
                                sums[family.name][sample] = \
                                    sums[family.name].get(sample, 0.0) + value
            kinds = dict(self.kinds)
        metrics = []
        for name, samples in sums.items():
            metric = Metric(name, kinds[name][1], kinds[name][0])
            for (sample_name, labels), value in samples.items():
                metric.add_sample(sample_name, dict(labels), value)
            metrics.append(metric)
        return metrics


def _help(family: str, kind: str) -> str:
    """The help text of a family first known from a count file (a worker that died before
    it was ever scraped): the one its /metrics would have given."""
    try:
        return help_text(family + "_total" if kind == "counter" else family)
    except KeyError:  # not one of contracts/metrics.py's
        return family


class ArbiterEndpoint(Collector):
    def __init__(self, config: HttpConfig, config_path: str, processes: int) -> None:
        self.config = config
        self.config_path = config_path
        self.processes = processes
        self.lock = threading.Lock()
        self.workers: tuple[WorkerView, ...] = ()
        self.stopping = False
        self.totals = Totals(lambda socket_path: read_counts(counts_path(socket_path)))
        registry = CollectorRegistry()
        registry.register(self)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self.app = make_app(make_wsgi_app(registry), self._healthz, self._readyz)
        self.server: _Server | None = None
        self.directory = ""
        self.sockets = itertools.count(1)

    # -- called by the arbiter's main loop ------------------------------------------

    def listen(self) -> None:
        """Bind the port and serve, in a thread; http.ListenError if it cannot be bound."""
        try:
            info = socket.getaddrinfo(self.config.address, self.config.port,
                                      type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, _, _, _, address = info[0]
            self.server = _Server((str(address[0]), self.config.port), family)
        except OSError as exc:  # socket.gaierror included: an address that does not resolve
            raise listen_error(exc, self.config, self.config_path) from None
        self.server.set_app(self.app)
        parent = tempfile.gettempdir()
        _remove_stale_directories(parent)
        # Only this user can enter it, and so reach the workers' sockets.
        self.directory = tempfile.mkdtemp(prefix=f"{DIRECTORY_PREFIX}{os.getpid()}-",
                                          dir=parent)
        threading.Thread(target=self.server.serve_forever, name="http", daemon=True).start()
        log.info("serving /metrics, /healthz and /readyz of the %d workers on "
                 "http://%s:%d/", self.processes, self.server.server_name,
                 self.server.server_port)

    def socket_for_worker(self) -> str:
        """A path for a new worker process to serve on."""
        return os.path.join(self.directory, f"{next(self.sockets)}.sock")

    def update(self, workers: Iterable[WorkerView], stopping: bool) -> None:
        """The worker processes not yet reaped, and whether the arbiter is stopping."""
        views = tuple(workers)
        gone = self.totals.keep({view.socket for view in views})
        with self.lock:
            self.workers, self.stopping = views, stopping
        for path in gone:
            for name in (path, counts_path(path)):
                try:
                    os.unlink(name)
                except FileNotFoundError:
                    pass  # the worker never got as far as serving

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    # -- called by the server's threads ---------------------------------------------

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            workers = self.workers
        answers = self._ask(workers, "/metrics")
        parsed = {key: parse(answer[1].decode()) for key, answer in answers.items()
                  if not isinstance(answer, str) and answer[0] == 200}
        yield from self.totals.add_up(parsed)
        yield GaugeMetricFamily("amqp_dispatcher_workers", help_text("amqp_dispatcher_workers"),
                                value=len(workers))

    def _healthz(self) -> tuple[bool, dict[str, Any]]:
        with self.lock:
            stopping = self.stopping
        return (False, {"status": "stopping"}) if stopping else (True, {"status": "ok"})

    def _readyz(self) -> tuple[bool, dict[str, Any]]:
        deadline = time.monotonic() + WORKER_TIMEOUT
        while True:
            with self.lock:
                workers, stopping = self.workers, self.stopping
            if stopping:
                return False, {"ready": False, "stopping": True, "not_ready": []}
            current = {view.number: view for view in workers if view.current}
            answers = self._ask(list(current.values()), "/readyz", deadline)
            not_ready = self._not_ready(current, answers)
            if not not_ready:
                return True, {"ready": True, **_circuits_open(current, answers,
                                                              self.processes)}
            # A reload handed over while the workers were asked: the previous set, told
            # to stop once the arbiter had made the new one current, says it is not
            # ready. The set that serves now is the one to ask, within the same time.
            with self.lock:
                handed_over = _current(self.workers) != _current(workers)
            if not handed_over or time.monotonic() >= deadline:
                return False, {"ready": False, "stopping": False, "not_ready": not_ready}

    def _not_ready(self, current: dict[int, WorkerView],
                   answers: dict[str, Answer]) -> list[dict[str, Any]]:
        """Each worker of the current set, by number, that is not ready, and why."""
        not_ready: list[dict[str, Any]] = []
        for number in range(1, self.processes + 1):
            name = f"{number}/{self.processes}"
            view = current.get(number)
            if view is None:
                not_ready.append({"worker": name, "pid": None,
                                  "error": "not running: a new one starts soon"})
                continue
            answer = answers[view.socket]
            if isinstance(answer, str):
                not_ready.append({"worker": name, "pid": view.pid, "error": answer})
            elif answer[0] != 200:
                try:
                    said = {k: v for k, v in json.loads(answer[1]).items() if k != "ready"}
                except ValueError:
                    said = {"error": f"answered {answer[0]}"}
                not_ready.append({"worker": name, "pid": view.pid, **said})
        return not_ready

    def _ask(self, workers: Sequence[WorkerView], path: str,
             deadline: float | None = None) -> dict[str, Answer]:
        """GET ``path`` of every worker at once; by worker, its answer or why there is
        none, by ``deadline`` (by default WORKER_TIMEOUT from now)."""
        # A thread per question, started now: with a shared pool, a wedged worker's
        # questions held its threads for WORKER_TIMEOUT each, and a healthy worker's
        # waited for one past their deadline (and got it blamed).
        if deadline is None:
            deadline = time.monotonic() + WORKER_TIMEOUT
        answers: dict[str, Answer] = {}

        def ask(view: WorkerView) -> None:
            answers[view.socket] = _get(view.socket, path)

        threads = [threading.Thread(target=ask, args=(view,), name="http-ask", daemon=True)
                   for view in workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        late = f"did not answer within {WORKER_TIMEOUT:g}s"
        return {view.socket: answers.get(view.socket, late) for view in workers}


def _circuits_open(current: dict[int, WorkerView], answers: dict[str, Answer],
                   processes: int) -> dict[str, Any]:
    """The entries whose circuit_breaker is open, by worker, as the workers' ready
    bodies say (``circuit_open``); nothing when none is."""
    found = []
    for number, view in sorted(current.items()):
        answer = answers.get(view.socket)
        if isinstance(answer, str) or answer is None:
            continue
        try:
            entries = json.loads(answer[1]).get("circuit_open", [])
        except (ValueError, AttributeError):
            continue
        found += [{"worker": f"{number}/{processes}", **entry} for entry in entries]
    return {"circuit_open": found} if found else {}


def _current(workers: Iterable[WorkerView]) -> set[WorkerView]:
    return {view for view in workers if view.current}


def _remove_stale_directories(parent: str) -> None:
    """Remove the socket directories that arbiters now gone left in ``parent`` (one
    killed by SIGKILL cannot remove its own): only those named as ours, with the pid
    of no process, that are directories (not symlinks) of this user, holding nothing
    but sockets (what an arbiter puts there: anything else is someone's data)."""
    for entry in os.scandir(parent):
        match = STALE_DIRECTORY.fullmatch(entry.name)
        try:
            if match is None or not entry.is_dir(follow_symlinks=False) \
                    or entry.stat(follow_symlinks=False).st_uid != os.getuid() \
                    or _running(int(match[1])) or not _only_sockets(entry.path):
                continue
        except OSError:
            continue  # gone meanwhile
        # rmtree follows no symlink within, nor one swapped in for the entry meanwhile.
        shutil.rmtree(entry.path, ignore_errors=True)
        log.info("removed %s, left behind by an arbiter that is gone", entry.path)


def _only_sockets(path: str) -> bool:
    """Nothing but sockets, and the workers' count files (N.counts, regular files)."""
    with os.scandir(path) as entries:
        return all(stat.S_ISSOCK(mode := entry.stat(follow_symlinks=False).st_mode)
                   or (stat.S_ISREG(mode) and COUNT_FILE.fullmatch(entry.name) is not None)
                   for entry in entries)


def _running(pid: int) -> bool:
    """Whether another process has this pid. This process has not made its directory
    yet: one with its pid was left by an earlier one (a container started again)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's
    return True


def _get(socket_path: str, path: str) -> Answer:
    """GET ``path`` from the endpoint on the unix socket ``socket_path``."""
    connection = _UnixConnection(socket_path)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    except (FileNotFoundError, ConnectionRefusedError):
        return "not serving (starting, or exiting)"
    except TimeoutError:
        return f"did not answer within {WORKER_TIMEOUT:g}s"
    except (OSError, http.client.HTTPException) as exc:
        return f"cannot be asked: {exc}"
    finally:
        connection.close()


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str) -> None:
        super().__init__("localhost", timeout=WORKER_TIMEOUT)
        self.socket_path = socket_path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    """A thread per connection, within the limits of the workers' server (observability/wsgi.py:
    Connections): so that slow or idle connections neither keep the probes out nor
    pile up threads. Accepting never waits for a slot: ``shutdown`` (the arbiter's
    exit) stops the loop within its poll interval, whatever the clients do."""

    daemon_threads = True  # a request in progress does not hold the arbiter's exit
    allow_reuse_port = False  # a port in use is an error, as with gevent's server

    def __init__(self, address: tuple[str, int], family: int) -> None:
        self.address_family = family
        self.connections = Connections(ClientErrors())
        super().__init__(address, _QuietHandler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.connections.admit(request)  # False: closed unanswered

    def shutdown_request(self, request: Any) -> None:
        self.connections.remove(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)  # a bug: its traceback
        # else the client went away (or was closed, Connections): not worth a traceback

    def service_actions(self) -> None:
        # Called by serve_forever at least every poll interval (0.5 s).
        self.connections.expire()

    def server_bind(self) -> None:
        # Not HTTPServer's, which looks the host's name up (socket.getfqdn) and can
        # wait on a DNS server.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])
        self.setup_environ()


class _QuietHandler(WSGIRequestHandler):
    server: _Server

    def parse_request(self) -> bool:
        # The request is read: answer it unless the connection was closed meanwhile.
        return super().parse_request() and self.server.connections.answer(self.request)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass  # no access log: a scrape a second would drown everything else

"""SIGHUP: reloading a running dispatcher process; and the process's signals.

A dispatcher process runs one generation (a Generation: its own connection,
consumer instances and worker greenlets), except during a reload. SIGHUP reads
the config file again and imports the consumer code afresh (``load_afresh``).
If that finds problems they are logged, the same lines ``--validate`` prints,
and nothing else changes. Otherwise a new generation starts beside the running
one; once every entry of the new one consumes, the old one drains as on
SIGTERM (its consume calls in progress finish and are acked, deliveries not yet
started go back to the queue) and stops. A new generation that fails to start,
or has not consumed within RELOAD_TIMEOUT, is stopped, and the running one
carries on.

The new code is imported, and the new generation's startup handler and consumer
constructors run, in the process's one thread: consumption pauses for as long as
they take (docs/guides/processes.md, "Reload (SIGHUP)"). Under ``--processes`` a reload imports
in fresh interpreters instead (supervision/arbiter.py), without that pause.

Generations happen inside the one process, so its pid, which supervisord and
systemd watch, never changes.

This module owns the process's signals: each is queued and acted on in
``Generations.run``, which passes it on to the generations it concerns
(``stop()`` is SIGTERM's graceful stop, for the library API and
``--exit-when-drained``, api.py and drain.py). Under ``--processes``
(supervision/link.py) it also tells the arbiter when the process first consumes, and
drains when the arbiter is gone.
"""

from __future__ import annotations

import importlib
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any, Protocol

import gevent
import gevent.queue
import gevent.util

from ..config import (
    Config,
    ConfigError,
    HttpConfig,
    Resolved,
    describe_exception,
    load_config,
    select,
)
from ..config.settings import Settings
from ..contracts.counts import CountFile, counts_path
from ..contracts.exits import EXIT_INTERNAL, EXIT_OK, EXIT_RECYCLE
from ..contracts.signals import IGNORED_SIGNALS, RELOAD_SIGNAL, STACKS_SIGNAL, STOP_SIGNALS
from ..contracts.timeouts import RELOAD_TIMEOUT
from ..observability.blocking import BlockedHub
from ..observability.http import HttpEndpoint
from . import recycle
from .counts import share_counts
from .generation import Generation

log = logging.getLogger("amqp-dispatcher")

# What each signal means to the process: contracts/signals.py.


def _log_stacks() -> None:
    """SIGUSR1: where every greenlet is (which instance is in which line of consume)."""
    log.warning("received SIGUSR1: the stack of every greenlet follows\n%s",
                "\n".join(gevent.util.format_run_info()))


def load_afresh(running: Config) -> tuple[Config, Resolved]:
    """``load_config`` on the running config's file, with the code it names imported
    afresh: every module of the top-level packages of the running consumers and
    startup handler is dropped from ``sys.modules`` first, so that a reload deploys
    the code as it is on disk now. If the new config has a problem, the modules in
    use are put back as they were.

    The import runs on the hub: nothing else in the process runs until it returns.
    (In a thread of its own, module-level code that uses gevent would get a hub of
    that thread's, and the imports would race the running generation's.)"""
    specs = [entry.consumer for entry in running.consumers] + list(running.middleware)
    if running.startup_handler:
        specs.append(running.startup_handler)
    packages = {spec.partition(":")[0].partition(".")[0] for spec in specs}
    packages.discard(__name__.partition(".")[0])  # never this package itself

    def afresh(name: str) -> bool:
        return name.partition(".")[0] in packages

    in_use = {name: module for name, module in sys.modules.items() if afresh(name)}
    for name in in_use:
        del sys.modules[name]
    importlib.invalidate_caches()  # modules added since the last import are found
    try:
        config, resolved = load_config(running.path)
        if running.only is not None:  # --only names the same queues in the new config
            config = select(config, running.only)
        return config, resolved
    except BaseException:
        for name in [name for name in sys.modules if afresh(name)]:
            del sys.modules[name]
        sys.modules.update(in_use)
        raise


class Link(Protocol):
    """This process's link to the arbiter of ``--processes``, when it is one of its
    workers (supervision/link.py's ArbiterLink; the command line passes it in)."""

    name: str  # "2/4": the second of four workers
    http_socket: str | None  # where to serve the HTTP endpoint for the arbiter
    arbiter_pid: int
    drain_timeout: float  # the longest drain_timeout run with: the watchdog's bound

    def consuming(self) -> None: ...
    def recycle(self, reason: str) -> None: ...
    def watch(self, gone: Callable[[], None]) -> None: ...


class _SignalHandlers:
    """The process's signals, queued on ``events`` while installed; ``cancel`` gives
    each back to the handler it had (Python's, for a program that goes on)."""

    def __init__(self, events: gevent.queue.Queue[tuple[str, Any]]) -> None:
        queued = (*STOP_SIGNALS, RELOAD_SIGNAL, *IGNORED_SIGNALS)
        self.previous = {signum: signal.getsignal(signum) for signum in (*queued, STACKS_SIGNAL)}
        self.handlers = [gevent.signal_handler(signum, events.put, ("signal", signum))
                         for signum in queued]
        # Read-only, so it runs in the hub's callback rather than waiting for the main
        # loop: it answers even while user code at start-up holds the process.
        self.handlers.append(gevent.signal_handler(STACKS_SIGNAL, _log_stacks))

    def cancel(self) -> None:
        for handler in self.handlers:
            handler.cancel()
        for signum, previous in self.previous.items():
            if previous is not None:  # None: set outside Python; left to the default
                signal.signal(signum, previous)


class Running:
    """A Generation, running in a greenlet of its own."""

    def __init__(self, generation: Generation) -> None:
        self.generation = generation
        self.greenlet: gevent.Greenlet | None = None
        self.started = False
        self.stopping = False  # told to stop: a first SIGTERM asks nothing more of it

    @property
    def alive(self) -> bool:
        return self.greenlet is not None and not self.greenlet.dead

    def send(self, signum: int) -> None:
        self.stopping = True
        self.generation.events.put(("signal", signum))

    def status(self) -> int:
        assert self.greenlet is not None
        if self.greenlet.successful():
            return int(self.greenlet.value)
        return EXIT_INTERNAL  # gevent has printed the traceback


class Generations:
    """The process: its signals, its current generation, and during a reload the new
    generation starting and the old ones draining. ``reloadable``: False for a config
    given as a dict (api.py), which has no file to read again: SIGHUP is ignored."""

    def __init__(self, config: Config, resolved: Resolved, settings: Settings,
                 link: Link | None = None, reloadable: bool = True) -> None:
        self.settings = settings
        self.link = link
        self.reloadable = reloadable
        self.events: gevent.queue.Queue[tuple[str, Any]] = gevent.queue.Queue()
        # Under --processes the queues' depth is read by worker 1 alone, for the service.
        self.read_depth = link is None or link.name.startswith("1/")
        self.current = Running(Generation(config, resolved, settings, self.read_depth))
        self.candidate: Running | None = None  # a reload's new generation, until it consumes
        self.retiring: list[Running] = []  # replaced by a reload, draining
        self.reload_pending = False
        self.stopping = False
        self.exit_status: int | None = None  # the current generation's, once it exited
        self.stop_statuses: list[int] = []  # of every generation that exited while stopping
        # Recycling (recycle.py): the messages settled by the generations that exited, and
        # whether this process is stopping to be recycled (a single process: exit 7).
        self.handled_before = 0
        self.recycler: gevent.Greenlet | None = None
        self.recycled = False
        if link is not None:
            link.drain_timeout = config.drain_timeout  # the watchdog's bound (supervision/link.py)
        # /metrics, /healthz, /readyz: the process's, serving whichever generation is
        # current. Under --processes the arbiter listens on the config's port, and a
        # worker serves it on the unix socket it was given (when the config has http).
        # blocking_warning: the process's one hub, whichever generations run on it.
        self.blocked = BlockedHub(config.blocking_warning, self._pools)
        where = config.http if link is None else link.http_socket
        self.http = (HttpEndpoint(lambda: self.current.generation, where, config.path,
                                  lambda: self.blocked.seconds)
                     if where is not None else None)
        # A worker serving the arbiter keeps its counters where the arbiter can read them
        # after its death (runtime/counts.py); it has this one generation.
        self.counts: CountFile | None = None
        if link is not None and link.http_socket is not None:
            path = counts_path(link.http_socket)
            try:
                self.counts = share_counts(path, self.current.generation, self.blocked)
            except OSError as exc:  # the temporary directory full: count as without it
                log.warning("cannot keep the counters in %s (%s): what this worker counts "
                            "after the arbiter's last scrape is lost if it dies",
                            path, exc.strerror or exc)

    def listen(self) -> None:
        """Open the HTTP endpoint, if configured, before anything else: a port in use
        raises http.ListenError (exit 1)."""
        if self.http is not None:
            self.http.listen()

    def run(self, handle_signals: bool = True) -> int:
        """Run until every generation has exited; return the current one's exit status.
        ``handle_signals``: act on the process's signals (the table above); a program
        embedding the dispatcher that keeps its own passes False and calls ``stop``."""
        handlers = _SignalHandlers(self.events) if handle_signals else None
        self.blocked.start()
        try:
            return self._run()
        finally:
            self.blocked.stop()
            if handlers is not None:
                handlers.cancel()

    def _pools(self) -> list[Any]:
        """The consumer entries of every generation running (blocking.py names them)."""
        running = [self.current, self.candidate, *self.retiring]
        return [pool for r in running if r is not None for pool in r.generation.pools]

    def stop(self) -> None:
        """Stop as a SIGTERM to the process does (a second call: as a second SIGTERM)."""
        self.events.put(("signal", signal.SIGTERM))

    def settled(self) -> Generation | None:
        """The current generation's dispatcher, unless the process is stopping or a reload
        is in progress (a new generation starting, or a replaced one draining)."""
        if self.stopping or self.candidate is not None or self.retiring:
            return None
        return self.current.generation

    def _run(self) -> int:
        if self.link is not None:
            self.link.watch(lambda: self.events.put(("arbiter_gone", None)))
        self._launch(self.current)
        while self.exit_status is None or self.candidate is not None or self.retiring:
            kind, detail = self.events.get()
            if kind == "signal":
                self._on_signal(detail)
            elif kind == "started":
                self._on_started(detail)
            elif kind == "exited":
                self._on_exited(detail)
            elif kind == "reload_timeout":
                self._on_reload_timeout(detail)
            elif kind == "recycle":
                self._on_recycle(detail)
            elif kind == "arbiter_gone":
                log.error("the arbiter is gone: finishing messages in progress, then stopping")
                if not self.stopping:
                    self._stop(signal.SIGTERM)
        if self.http is not None:
            self.http.stop()
        if self.recycler is not None:
            self.recycler.kill(block=False)
        assert self.exit_status is not None
        # A stop's status is the highest of the generations it stopped, those a reload
        # replaced and still draining included (6: one's drain_timeout ran out).
        status = max([self.exit_status, *self.stop_statuses])
        return EXIT_RECYCLE if self.recycled and status == EXIT_OK else status

    def _handled(self) -> int:
        """Messages settled by this process so far, every generation's (recycling)."""
        live = [g for g in (self.current, self.candidate, *self.retiring) if g is not None]
        return self.handled_before + sum(pool.metrics.handled() for g in live
                                         for pool in g.generation.pools)

    def _on_recycle(self, reason: str) -> None:
        if self.stopping:
            return
        if self.link is not None:
            log.warning("recycling: %s: asking the arbiter to start a replacement, then "
                        "to stop this worker", reason)
            self.link.recycle(reason)
            return
        log.warning("recycling: %s: finishing messages in progress, then exiting with "
                    "status %d for the supervisor to start a new process", reason,
                    EXIT_RECYCLE)
        self.recycled = True
        self._stop(signal.SIGTERM)

    def _launch(self, generation: Running) -> None:
        generation.greenlet = gevent.spawn(generation.generation.run,
                                           lambda: self.events.put(("started", generation)))
        generation.greenlet.link(lambda _: self.events.put(("exited", generation)))

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum in IGNORED_SIGNALS:
            log.warning("received %s: amqp-dispatcher does not use it; ignored", name)
        elif signum != RELOAD_SIGNAL:
            self._stop(signum)
        elif self.link is not None:
            # Reloaded alone, a worker would run another config than the others, and its
            # counters would start again from zero under the arbiter's sums.
            log.warning("received SIGHUP: this is a worker of --processes: ignored; send "
                        "SIGHUP to the arbiter (pid %d), which reloads every worker",
                        self.link.arbiter_pid)
        elif self.stopping:
            log.warning("received SIGHUP while stopping: ignored")
        elif not self.reloadable:
            log.warning("received SIGHUP: the config was given as a dict, with no file to "
                        "read again: ignored")
        elif self.candidate is not None or not self.current.started:
            log.info("received SIGHUP: reloading once the start in progress is done")
            self.reload_pending = True
        else:
            self._reload()

    def _stop(self, signum: int) -> None:
        """Pass a stop signal on. A first SIGTERM goes only to the generations not already
        draining (those replaced by a reload): to them it would be a second one."""
        first_term = signum == signal.SIGTERM and not self.stopping
        self.stopping = True
        self.reload_pending = False
        for generation in (self.current, self.candidate, *self.retiring):
            if generation is not None and generation.alive \
                    and not (first_term and generation.stopping):
                generation.send(signum)

    def _reload(self) -> None:
        path = self.current.generation.config.path
        log.info("received SIGHUP: reading %s and importing the consumer code again", path)
        try:
            config, resolved = load_afresh(self.current.generation.config)
        except ConfigError as exc:
            for line in exc.problems:
                log.error("%s", line)
            log.error("SIGHUP: %s has problems (above): carrying on with the running config",
                      path)
            return
        except BaseException as exc:  # noqa: BLE001 - user code at import: sys.exit() too
            log.error("SIGHUP: importing the consumer code raised %s: carrying on with the "
                      "running config", describe_exception(exc))
            return
        def where(http: HttpConfig | None) -> tuple[str, int] | None:
            return None if http is None else (http.address, http.port)

        if self.link is None and where(config.http) != where(self.current.generation.config.http):
            log.warning("SIGHUP: http: a changed address or port takes effect at the next "
                        "start; the endpoint stays where it is")
        if self.link is not None:
            self.link.drain_timeout = max(self.link.drain_timeout, config.drain_timeout)
        self.blocked.reconfigure(config.blocking_warning)
        self.candidate = Running(Generation(config, resolved, self.settings,
                                            self.read_depth))
        self.candidate.generation.keep_circuits_open(self.current.generation)
        self._launch(self.candidate)
        gevent.spawn_later(RELOAD_TIMEOUT, self.events.put, ("reload_timeout", self.candidate))

    def _on_reload_timeout(self, generation: Running) -> None:
        if generation is self.candidate and not generation.stopping:
            log.error("SIGHUP: the new generation did not consume within %gs: stopping it",
                      RELOAD_TIMEOUT)
            generation.send(signal.SIGTERM)  # during its start: it stops at once

    def _on_started(self, generation: Running) -> None:
        generation.started = True
        if self.stopping:
            return  # it has been told to stop too
        if generation.stopping:
            # A new generation whose report was queued just behind its reload timeout,
            # which stopped it: made the running one, it would stop, and the service with
            # it. Its exit ends the reload (_on_exited).
            log.warning("SIGHUP: the new generation consumes, but its reload had already "
                        "timed out: it stops; carrying on with the running one")
            return
        if generation is self.current:  # the first generation
            if self.link is not None:
                self.link.consuming()
        elif generation is self.candidate:
            old, self.current, self.candidate = self.current, generation, None
            log.info("reloaded: the new generation consumes; the previous one finishes its "
                     "messages in progress, then stops")
            self.retiring.append(old)
            old.send(RELOAD_SIGNAL)
        config = self.current.generation.config
        if self.recycler is None and (config.recycle_after_messages
                                      or config.recycle_above_memory_mb):
            # Once a config asks for it (at start, or by a reload), for the process's life.
            self.recycler = gevent.spawn(recycle.watch, lambda: self.current.generation.config,
                                         self._handled, self.events)
            self.recycler.name = "recycling"
        if self.reload_pending:
            self.reload_pending = False
            self._reload()

    def _on_exited(self, generation: Running) -> None:
        status = generation.status()
        self.handled_before += sum(pool.metrics.handled()
                                   for pool in generation.generation.pools)
        if self.stopping:
            self.stop_statuses.append(status)
        if generation is self.current:
            self.exit_status = status
            if not self.stopping:  # it stopped on its own (the broker, a bug): so does the rest
                self._stop(signal.SIGTERM)
        elif generation is self.candidate:
            self.candidate = None
            if not self.stopping:
                log.error("SIGHUP: the new generation did not start (status %d, see above): "
                          "carrying on with the running one", status)
                if self.reload_pending:
                    self.reload_pending = False
                    self._reload()
        else:
            self.retiring.remove(generation)
            if status == 0:
                log.info("the previous generation stopped")
            else:
                log.warning("the previous generation stopped with status %d", status)

"""``--processes N``: the arbiter, a plain Python process supervising N workers.

Each worker is a complete dispatcher in a fresh interpreter (``python -m
amqpdispatcher --config FILE``) with its own connection, named ``... worker
2/4``. The arbiter never runs consumer code and never talks to the broker. It
starts the workers at once (each checks the config as it loads it: one that
finds a problem tells the arbiter, which prints it once and stops the service
with status 1); replaces one that dies, backing off if it keeps dying; stops
them all on a signal, exiting only once every one has exited; and on SIGHUP
checks the config by running ``amqp-dispatcher --validate`` as a child process
(importing the consumer modules runs their code), starts a new set of workers,
and once every new worker consumes, has the old set drain and stop.

Fresh interpreters rather than forks of the arbiter: there is nothing worth
sharing (the arbiter has imported no consumer code), and a fresh interpreter
imports the consumer code as it is on disk now, which is what SIGHUP needs.
The workers run in sessions of their own, so signals meant for the service
(a terminal's Ctrl-C, supervisord's stopasgroup) reach the arbiter only, and
it passes each on once. link.py is the workers' side of the link between
them. With ``http`` in the config, the arbiter serves the service's /metrics,
/healthz and /readyz, asking the workers (endpoint.py).

With ``--exit-when-drained SECONDS``, each worker runs its own watch (runtime/drain.py)
and exits 0 once its work is done; the arbiter does not replace a worker that
consumed and then exited 0, and exits 0 once no worker is left.

Signals are queued by their handlers and acted on in the main loop, as in
gunicorn's arbiter; SIGNALS says what each one means.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from ..config import ConfigError, HttpConfig, read_http
from ..contracts.exits import (
    EXIT_BROKER,
    EXIT_CONFIG,
    EXIT_INTERNAL,
    EXIT_TOPOLOGY,
    EXIT_USER_CODE,
)
from ..contracts.link import (
    CONSUMING,
    HTTP_SOCKET_ENV,
    LINK_FD_ENV,
    PROBLEMS,
    RECYCLE,
    STARTED,
    WORKER_ENV,
)
from ..contracts.signals import ARBITER_SIGNALS
from ..contracts.timeouts import RELOAD_TIMEOUT
from ..observability.wsgi import ListenError
from .endpoint import ArbiterEndpoint, WorkerView

log = logging.getLogger("amqp-dispatcher.arbiter")

# How the arbiter and a worker talk: contracts/link.py.

# A worker of the service's first start that exits with one of these before it
# consumes would fail the same way again (the config, a refused topology, failing user
# code): instead of starting it again, the arbiter stops every worker and exits with
# that status, as a single process would. Once every first worker has consumed, the
# service has shown it can run: a replacement that exits so (a dependency of a
# constructor down for a while) is started again with the backoff, as after a crash.
START_FAILURES = {
    EXIT_CONFIG: "the config or the environment has a problem",
    EXIT_TOPOLOGY: "the broker refused the topology",
    EXIT_USER_CODE: "the startup handler or a consumer constructor raised",
}

RESPAWN_FIRST_DELAY = 1.0
RESPAWN_MAX_DELAY = 30.0
# A worker that was up this long is replaced at once, and its backoff starts over.
STABLE_WORKER = 30.0
# The loop wakes on every signal (SIGCHLD included) and link; it also polls its
# children this often, should a wake-up ever be missed.
LOOP_TIMEOUT = 1.0
# A reload is cancelled after contracts.timeouts.RELOAD_TIMEOUT.
# prctl(2): the signal the kernel sends a process when its parent dies.
PR_SET_PDEATHSIG = 1

SIGNALS = ARBITER_SIGNALS  # what each signal means to the arbiter (contracts/signals.py)


def _status(returncode: int) -> int:
    """A child's exit status as a shell shows it: 128 + n when killed by signal n."""
    return 128 - returncode if returncode < 0 else returncode


def _die_with_this_process() -> Callable[[], None] | None:
    """A preexec_fn for a child that must not outlive this process (on Linux: elsewhere
    None): the kernel sends it SIGKILL when this process dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def die_with_parent() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # it died before prctl took effect
            os._exit(1)

    return die_with_parent


def _describe(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


@dataclass(eq=False)
class Worker:
    number: int
    count: int
    process: subprocess.Popen[bytes]
    link: socket.socket  # the arbiter's end; the worker holds the other
    started_at: float
    http_socket: str  # where it serves /metrics and /readyz for the arbiter; "" without http
    link_open: bool = True
    received: bytes = b""  # the start of a line not yet read whole
    started: bool = False  # it has its signal handlers (link.py)
    consuming: bool = False
    term_sent: bool = False  # a second SIGTERM would stop it at once
    # "of the previous set", "of the cancelled reload": left behind by a reload, its
    # exit starts nothing (during a stop its status counts, as every worker's)
    retired: str = ""

    @property
    def name(self) -> str:
        return f"{self.number}/{self.count} (pid {self.process.pid})"


@dataclass(eq=False)
class Check:
    """``amqp-dispatcher --validate`` running in a child process, for a reload."""

    process: subprocess.Popen[bytes]
    output: IO[bytes]  # a temporary file: no pipe to drain, whatever the imports print


class Arbiter:
    def __init__(self, config_path: str, processes: int,
                 exit_when_drained: float | None = None,
                 only: tuple[str, ...] | None = None) -> None:
        self.config_path = config_path
        # --only, passed on to every worker and to a reload's check.
        self.only = [f"--only={','.join(only)}"] if only else []
        self.processes = processes
        self.exit_when_drained = exit_when_drained
        self.workers: list[Worker] = []  # every worker process not yet reaped
        self.serving: dict[int, Worker] = {}  # the current set, by number
        self.respawn_at: dict[int, float] = {}  # numbers to start again, and when
        self.backoff: dict[int, float] = {}  # each number's last respawn delay
        self.new_set: dict[int, Worker] | None = None  # a reload's workers, until all consume
        # Workers being recycled, by number: (the one asking, its replacement starting).
        self.recycling: dict[int, tuple[Worker, Worker]] = {}
        self.reload_deadline = 0.0  # when the new set must consume by
        self.running = False  # every worker of the first start has consumed
        self.check: Check | None = None
        self.reload_pending = False
        self.signals: list[int] = []
        self.stopping = False
        self.at_once: int | None = None  # the signal that made the stop one at once
        self.failed_status: int | None = None  # a failure at start decided the exit status
        self.stopped_statuses: list[int] = []  # of the workers that exited while stopping
        self.wake_r, self.wake_w = os.pipe()
        self.http_config: HttpConfig | None = None  # as read at start: a reload keeps it
        self.http_unread = False  # the file had problems at start, yet the workers run
        self.problems_told: list[str] | None = None  # the config problems last shown
        self.http: ArbiterEndpoint | None = None

    # -- the main loop ------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        log.info("arbiter pid %d: starting %d worker processes with %s",
                 os.getpid(), self.processes, self.config_path)
        try:
            if self._listen():
                for number in range(1, self.processes + 1):
                    self.serving[number] = self._spawn(number)
            while not self.stopping or self.workers or self.check is not None:
                self._wait()
                while self.signals:
                    signum = self.signals.pop(0)
                    getattr(self, SIGNALS[signum])(signum)
                self._reap()
                self._respawn_due()
                self._reload_timeout_due()
                self._publish()
        except Exception:  # noqa: BLE001 - a bug; the workers see the link close and drain
            log.critical("internal error in the arbiter; stopping (the workers drain and stop)",
                         exc_info=True)
            return EXIT_INTERNAL
        finally:
            if self.http is not None:
                self.http.stop()
        status = self._exit_status()
        log.info("every worker stopped; exiting with status %d", status)
        return status

    def _exit_status(self) -> int:
        if self.failed_status is not None:
            return self.failed_status
        if self.at_once is not None:
            return 128 + self.at_once
        return max(self.stopped_statuses, default=0)

    def _install_signals(self) -> None:
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        for signum in SIGNALS:
            signal.signal(signum, self._queue_signal)
        signal.signal(signal.SIGCHLD, lambda *_: self._wake())

    def _queue_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self.wake_w, b".")
        except BlockingIOError:
            pass  # the loop has a wake-up waiting already

    def _wait(self) -> None:
        """Sleep until a signal, a child's exit, a line on a link, or the next respawn."""
        due = list(self.respawn_at.values())
        if self.new_set is not None:
            due.append(self.reload_deadline)
        timeout = LOOP_TIMEOUT
        if due:
            timeout = max(0.0, min(timeout, min(due) - time.monotonic()))
        self._read_links(timeout)

    def _read_links(self, timeout: float) -> None:
        """Wait up to ``timeout`` for a wake-up or a line, and read the links that have
        one."""
        # poll, not select: select refuses a descriptor >= 1024, which a link gets once
        # the arbiter has that many files open (its endpoint's connections included).
        links = {w.link.fileno(): w for w in self.workers if w.link_open}
        poller = select.poll()
        for fd in (self.wake_r, *links):
            poller.register(fd, select.POLLIN)
        readable = [fd for fd, _ in poller.poll(timeout * 1000)]
        if self.wake_r in readable:
            while True:
                try:
                    if not os.read(self.wake_r, 512):
                        break
                except BlockingIOError:
                    break
        for fd in readable:
            if fd in links:
                self._read_link(links[fd])

    def _read_link(self, worker: Worker) -> None:
        try:
            data = worker.link.recv(65536)
        except OSError:
            data = b""
        if not data:  # the worker is exiting; _reap sees it
            worker.link_open = False
            return
        *lines, worker.received = (worker.received + data).split(b"\n")
        for line in lines:
            if line == STARTED:
                worker.started = True
            elif line == CONSUMING and not worker.consuming:
                worker.consuming = True
                log.info("worker %s consuming", worker.name)
                self._on_consuming(worker)
            elif line.startswith(RECYCLE + b" "):
                self._on_recycle(worker, line[len(RECYCLE) + 1:].decode("utf-8", "replace"))
            elif line.startswith(PROBLEMS + b" "):
                self._on_problems(worker, [str(p) for p in json.loads(line[len(PROBLEMS):])])

    def _reap(self) -> None:
        if self.check is not None and self.check.process.poll() is not None:
            self._on_check_done()
        for worker in list(self.workers):
            if worker.process.poll() is not None:
                self.workers.remove(worker)
                worker.link.setblocking(False)
                while worker.link_open:  # what it wrote just before it exited, to the end
                    self._read_link(worker)
                worker.link.close()
                self._on_worker_exit(worker)

    # -- signals ------------------------------------------------------------------

    def _on_term(self, signum: int) -> None:
        if self.stopping:
            self._on_fast_stop(signum)
            return
        log.info("received SIGTERM: every worker finishes its messages in progress, "
                 "then stops")
        self._stop()

    def _on_fast_stop(self, signum: int) -> None:
        log.info("received %s: stopping every worker now", signal.Signals(signum).name)
        self._stop(at_once=signum)

    def _on_hup(self, signum: int) -> None:
        if self.stopping:
            log.warning("received SIGHUP while stopping: ignored")
        elif self.check is not None or self.new_set is not None or not self.running:
            log.info("received SIGHUP: reloading once the start, check or reload in progress "
                     "is done")
            self.reload_pending = True
        else:
            log.info("received SIGHUP: checking %s", self.config_path)
            self._start_check()

    def _on_usr1(self, signum: int) -> None:
        # A worker still starting its interpreter has no handler yet: SIGUSR1's default
        # action would kill it.
        ready = [worker for worker in self.workers if worker.started]
        starting = len(self.workers) - len(ready)
        log.info("received SIGUSR1: passed on to every worker%s",
                 f" but the {starting} starting their interpreter" if starting else "")
        for worker in ready:
            self._send(worker, signum)

    def _on_usr2(self, signum: int) -> None:
        log.warning("received SIGUSR2: amqp-dispatcher does not use it; ignored")

    def _stop(self, at_once: int | None = None) -> None:
        """Nothing starts any more. Every worker drains and stops (a first SIGTERM to each:
        those already draining are left alone), or with ``at_once`` gets that signal.

        A worker that has not consumed gets SIGTERM either way: it stops at once in
        every phase of its start (before its handlers, SIGTERM's default action ends
        it silently, where SIGINT would print a KeyboardInterrupt traceback), and has
        nothing to drain."""
        self.stopping = True
        self.respawn_at.clear()
        self.reload_pending = False
        if self.check is not None:
            self.check.process.terminate()  # importing consumer code: nothing to drain
        if at_once is not None:
            self.at_once = at_once
            self._read_links(0)  # a worker that consumes by now gets the signal itself
        for worker in self.workers:
            if at_once is not None and worker.consuming:
                self._send(worker, at_once)
            elif at_once is not None or not worker.term_sent:
                self._send(worker, signal.SIGTERM)

    def _send(self, worker: Worker, signum: int) -> None:
        if signum == signal.SIGTERM:
            worker.term_sent = True
        worker.process.send_signal(signum)  # a no-op once the process has been reaped

    # -- the config check ---------------------------------------------------------

    def _start_check(self) -> None:
        output = tempfile.TemporaryFile()
        process = subprocess.Popen(
            [sys.executable, "-m", "amqpdispatcher", "--validate",
             f"--config={self.config_path}", *self.only],
            stdin=subprocess.DEVNULL, stdout=output, stderr=output, start_new_session=True,
            preexec_fn=_die_with_this_process())
        self.check = Check(process, output)

    def _on_check_done(self) -> None:
        check, self.check = self.check, None
        assert check is not None and check.process.returncode is not None
        returncode = check.process.returncode
        check.output.seek(0)
        lines = check.output.read().decode("utf-8", "replace").splitlines()
        check.output.close()
        if self.stopping:
            return
        if returncode == 0:
            log.info("%s is valid: starting %d new workers; the running ones stop once "
                     "every new one consumes", self.config_path, self.processes)
            self._warn_if_http_changed()
            self.new_set = {n: self._spawn(n) for n in range(1, self.processes + 1)}
            self.reload_deadline = time.monotonic() + RELOAD_TIMEOUT
            return
        for line in lines:
            log.error("%s", line)
        log.error("SIGHUP: %s has problems (above): the running workers carry on unchanged",
                  self.config_path)
        self._reload_if_pending()

    # -- the http endpoint ----------------------------------------------------------

    def _listen(self) -> bool:
        """Open the http endpoint, if the config has one, before any worker starts.
        False if it cannot listen: the line is printed, and the arbiter exits 1.

        A config with problems starts no endpoint, and the workers start all the same:
        each reads the file with the consumer code, finds every problem (the arbiter
        reads only the file's shape) and tells it, and the arbiter prints them once."""
        try:
            self.http_config = read_http(self.config_path)
        except ConfigError:
            self.http_unread = True
            return True
        if self.http_config is None:
            return True
        endpoint = ArbiterEndpoint(self.http_config, self.config_path, self.processes)
        try:
            endpoint.listen()
        except ListenError as exc:
            print(exc, file=sys.stderr)
            self.failed_status = EXIT_CONFIG
            self._stop()
            return False
        self.http = endpoint
        return True

    def _warn_if_http_changed(self) -> None:
        try:
            new, old = read_http(self.config_path), self.http_config
            # queue_depth_interval is the workers': the new ones read it.
            changed = (None if new is None else (new.address, new.port)) \
                != (None if old is None else (old.address, old.port))
        except ConfigError:
            return  # changed since its check: the new workers will say so
        if changed:
            log.warning("SIGHUP: http: a changed address or port takes effect at the next "
                        "start; the endpoint stays where it is")

    def _publish(self) -> None:
        """Tell the http endpoint, which serves in threads of its own, the workers there
        are now."""
        if self.http is not None:
            current = set(self.serving.values())
            self.http.update((WorkerView(w.number, w.process.pid, w.http_socket,
                                         w in current) for w in self.workers), self.stopping)

    # -- workers ------------------------------------------------------------------

    def _spawn(self, number: int) -> Worker:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env[WORKER_ENV] = f"{number}/{self.processes}"
        env[LINK_FD_ENV] = str(theirs.fileno())
        http_socket = self.http.socket_for_worker() if self.http is not None else ""
        if http_socket:
            env[HTTP_SOCKET_ENV] = http_socket
        args = [sys.executable, "-m", "amqpdispatcher", f"--config={self.config_path}",
                *self.only]
        if self.exit_when_drained is not None:
            args += ["--exit-when-drained", str(self.exit_when_drained)]
        try:
            process = subprocess.Popen(
                args, env=env, stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),),
                start_new_session=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the worker's alone now: it sees end-of-file when we are gone
        worker = Worker(number, self.processes, process, ours, time.monotonic(), http_socket)
        self.workers.append(worker)
        log.info("worker %s started", worker.name)
        return worker

    def _on_problems(self, worker: Worker, problems: list[str]) -> None:
        """A worker cannot start: the config has these problems (it exits 1 next, or
        hangs in its interpreter's exit on a thread the consumer code left running)."""
        if not self.running:  # the first start: printed once, the service exits 1
            if self.problems_told is None:
                self.problems_told = problems
                for line in problems:  # as without --processes
                    print(line, file=sys.stderr)
                if self.failed_status is None:
                    self.failed_status = EXIT_CONFIG
                if not self.stopping:
                    log.error("worker %s found problems in %s at start (above): stopping "
                              "every worker", worker.name, self.config_path)
                    self._stop()
        elif problems != self.problems_told:  # a replacement, a reload's new worker
            self.problems_told = problems
            for line in problems:
                log.error("worker %s: %s", worker.name, line)

    def _on_consuming(self, worker: Worker) -> None:
        if self.running:
            self.problems_told = None  # the config works: a problem found later is new
        if self.stopping:
            return  # every worker is stopping: nothing to hand over, nothing to start
        if self._recycled(worker):
            return
        if self.new_set is not None and self.new_set.get(worker.number) is worker:
            if all(w.consuming for w in self.new_set.values()):
                self._hand_over()
        elif self.serving.get(worker.number) is worker and len(self.serving) == self.processes \
                and all(w.consuming for w in self.serving.values()):
            log.info("all %d workers consuming", self.processes)
            if not self.running:
                self.running = True
                if self.http_unread:  # the file was mended while the workers started
                    log.warning("%s had problems when the arbiter read it: no http "
                                "endpoint until the next start", self.config_path)
                self._reload_if_pending()

    def _on_recycle(self, worker: Worker, reason: str) -> None:
        """A worker reached recycle_after_messages or recycle_above_memory_mb: start its
        replacement; once that one consumes, the worker drains and stops
        (_on_consuming), so that capacity never dips. Asked again meanwhile, or during
        a reload (which replaces every worker anyway) or a stop: nothing more."""
        if self.stopping or self.new_set is not None or worker.retired \
                or self.serving.get(worker.number) is not worker \
                or worker.number in self.recycling:
            return
        replacement = self._spawn(worker.number)
        self.recycling[worker.number] = (worker, replacement)
        log.info("worker %s is to be recycled (%s): its replacement %s starts first",
                 worker.name, reason, replacement.name)

    def _recycled(self, replacement: Worker) -> bool:
        """A replacement consumes: the worker it replaces drains and stops."""
        number = replacement.number
        pending = self.recycling.get(number)
        if pending is None or pending[1] is not replacement:
            return False
        old = pending[0]
        del self.recycling[number]
        self.serving[number] = replacement
        self._publish()  # /readyz asks the replacement from now on
        old.retired = "(recycled)"
        self._send(old, signal.SIGTERM)
        log.info("worker %s consumes: worker %s (recycled) finishes its messages in "
                 "progress, then stops", replacement.name, old.name)
        return True

    def _hand_over(self) -> None:
        """Every worker of a reload's set consumes: the previous set drains and stops."""
        assert self.new_set is not None
        previous, self.serving, self.new_set = self.serving, self.new_set, None
        for _, replacement in self.recycling.values():  # made moot: the new set replaces all
            replacement.retired = "(a recycle's replacement, made moot by the reload)"
            self._send(replacement, signal.SIGTERM)
        self.recycling.clear()
        # The endpoint's /readyz asks the new set before the previous one, told to
        # stop, answers that it is not ready (endpoint.py, ArbiterEndpoint._readyz).
        self._publish()
        for worker in previous.values():
            worker.retired = "of the previous set"
            self._send(worker, signal.SIGTERM)
        self.respawn_at.clear()
        self.backoff.clear()
        log.info("reloaded: the %d new workers consume; the previous ones finish their "
                 "messages in progress, then stop", self.processes)
        self._reload_if_pending()

    def _cancel_reload(self, reason: str) -> None:
        assert self.new_set is not None
        for worker in self.new_set.values():
            worker.retired = "of the cancelled reload"
            if worker in self.workers:
                self._send(worker, signal.SIGTERM)
        self.new_set = None
        log.error("SIGHUP: %s: the running workers carry on unchanged", reason)
        self._reload_if_pending()

    def _reload_timeout_due(self) -> None:
        if self.new_set is not None and not self.stopping \
                and time.monotonic() >= self.reload_deadline:
            self._cancel_reload(f"the new workers did not all consume within "
                                f"{RELOAD_TIMEOUT:g}s")

    def _reload_if_pending(self) -> None:
        """The start, a check or a reload is over: act on a SIGHUP received meanwhile."""
        if self.reload_pending and not self.stopping:
            self.reload_pending = False
            log.info("reloading again, for the SIGHUP received meanwhile: checking %s",
                     self.config_path)
            self._start_check()

    def _on_worker_exit(self, worker: Worker) -> None:
        returncode = worker.process.returncode
        assert returncode is not None
        status = _status(returncode)
        if returncode == -signal.SIGTERM and not worker.consuming and worker.term_sent:
            status = 0  # stopped while starting: it had consumed nothing
        # The stop's status is the highest of the workers it waited for; a worker that
        # lost the broker as the stop began would have been replaced (status 3 is never
        # the arbiter's).
        if self.stopping and status != EXIT_BROKER:
            self.stopped_statuses.append(status)
        if worker.retired:
            if status == 0:
                log.info("worker %s %s stopped", worker.name, worker.retired)
            else:
                log.warning("worker %s %s %s", worker.name, worker.retired,
                            _describe(returncode))
            return
        if self.stopping:
            log.info("worker %s %s", worker.name, _describe(returncode))
            return
        # It exited without being asked to.
        pending = self.recycling.get(worker.number)
        if pending is not None and worker in pending:
            del self.recycling[worker.number]
            old, replacement = pending
            if worker is replacement:
                log.error("worker %s, the replacement of worker %s (to be recycled), %s "
                          "before it consumed: worker %s carries on", worker.name, old.name,
                          _describe(returncode), old.name)
            else:
                self.serving[worker.number] = replacement
                log.warning("worker %s (to be recycled) %s: its replacement %s takes its "
                            "place", worker.name, _describe(returncode), replacement.name)
            return
        if self.exit_when_drained is not None and status == 0 and worker.consuming:
            self._on_drained(worker)
            return
        if self.new_set is not None and self.new_set.get(worker.number) is worker:
            self._cancel_reload(f"new worker {worker.name} {_describe(returncode)} before "
                                "every new worker consumed")
            return
        if self.serving.get(worker.number) is worker:
            del self.serving[worker.number]
        if not worker.consuming and status in START_FAILURES and not self.running:
            log.error("worker %s %s at start: stopping every worker (starting it again would "
                      "fail the same way)", worker.name, _describe(returncode))
            self.failed_status = status
            self._stop()
            return
        delay = self._respawn_delay(worker)
        when = f"in {delay:g}s" if delay else "now"
        if not worker.consuming and status in START_FAILURES:
            log.error("worker %s %s (%s) before it consumed; starting a new one %s",
                      worker.name, _describe(returncode), START_FAILURES[status], when)
        else:
            log.warning("worker %s %s; starting a new one %s", worker.name,
                        _describe(returncode), when)
        self.respawn_at[worker.number] = time.monotonic() + delay

    def _on_drained(self, worker: Worker) -> None:
        """--exit-when-drained: the worker found its work done. It is not replaced; once
        no worker of the running set (nor of a reload's new set) is left, neither is
        there any work: the arbiter stops."""
        log.info("worker %s drained and exited 0: not replaced", worker.name)
        if self.serving.get(worker.number) is worker:
            del self.serving[worker.number]
        if self.new_set is not None and self.new_set.get(worker.number) is worker:
            del self.new_set[worker.number]
            if not self.new_set:
                self.new_set = None
                self._reload_if_pending()
            elif all(w.consuming for w in self.new_set.values()):
                self._hand_over()
        if not self.serving and self.new_set is None:
            log.info("every worker drained: stopping")
            self._stop()

    def _respawn_delay(self, worker: Worker) -> float:
        if time.monotonic() - worker.started_at >= STABLE_WORKER:
            self.backoff.pop(worker.number, None)
            return 0.0
        delay = min(max(self.backoff.get(worker.number, 0.0) * 2, RESPAWN_FIRST_DELAY),
                    RESPAWN_MAX_DELAY)
        self.backoff[worker.number] = delay
        return delay

    def _respawn_due(self) -> None:
        if self.stopping:
            return
        now = time.monotonic()
        for number, due in list(self.respawn_at.items()):
            if due <= now:
                del self.respawn_at[number]
                self.serving[number] = self._spawn(number)

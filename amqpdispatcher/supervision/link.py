"""A worker process under the arbiter (``--processes N``, arbiter.py): its link to it
(what both sides agree on: contracts/link.py).

The arbiter starts each worker with its name in AMQP_DISPATCHER_WORKER (``2/4``,
added to the connection's ``connection_name``) and one end of a socket pair in
AMQP_DISPATCHER_LINK_FD; only the arbiter holds the other end, and it never
writes to it. The worker writes a line ``started`` once its signal handlers
are installed (before the consumer code is imported: from then on SIGUSR1 is
safe to send it) and a line ``consuming`` once every entry consumes; one that
cannot start because of config problems writes them in a line ``problems [...]``
instead of printing them (cli.py), so that the arbiter prints them once.

End-of-file on the link comes when the arbiter is gone, whatever killed it: the
worker then drains and stops, as on SIGTERM (``watch``, on the hub). A worker
whose hub is held by blocking code (an unpatched ``time.sleep`` or driver call
in ``consume``) would never see it, and runs in a session of its own, out of
reach of a supervisor's kill of the arbiter's group: so a watchdog thread (a real
OS thread: the dispatcher does not monkey patch) watches the link too, and ends
the process with ``os._exit(EXIT_DRAIN_TIMEOUT)`` if it is still there
WATCHDOG_MARGIN seconds after the longest ``drain_timeout`` it runs with.

When the config has ``http``, AMQP_DISPATCHER_HTTP_SOCKET names the unix socket
on which the worker serves its endpoint for the arbiter (endpoint.py).
"""

from __future__ import annotations

import json
import logging
import os
import select
import threading
import time
from collections.abc import Callable, MutableMapping
from typing import Any

import gevent
import gevent.monkey
import gevent.socket

from ..contracts.exits import EXIT_DRAIN_TIMEOUT
from ..contracts.link import (
    CONSUMING,
    HTTP_SOCKET_ENV,
    LINK_FD_ENV,
    PROBLEMS,
    RECYCLE,
    STARTED,
    WORKER_ENV,
)
from ..contracts.timeouts import WATCHDOG_MARGIN

log = logging.getLogger("amqp-dispatcher")

# How long the watchdog waits for its last line to be written before it exits anyway.
LAST_LINE_TIMEOUT = 1.0

# The blocking originals, should the consumer code monkey patch after the watchdog
# has started: the watchdog must not depend on the hub.
_poll = gevent.monkey.get_original("select", "poll")
_sleep = gevent.monkey.get_original("time", "sleep")
_allocate_lock = gevent.monkey.get_original("_thread", "allocate_lock")
_start_new_thread = gevent.monkey.get_original("_thread", "start_new_thread")


class ArbiterLink:
    def __init__(self, name: str, fd: int, http_socket: str | None = None) -> None:
        self.name = name
        self.fd = fd
        self.http_socket = http_socket  # where to serve /metrics, /readyz for the arbiter
        self.arbiter_pid = os.getppid()
        # The longest drain_timeout of the configs this process has run (runtime/generations.py
        # keeps it up to date); none before the config is loaded: nothing to drain.
        self.drain_timeout = 0.0

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] = os.environ) -> ArbiterLink | None:
        """The link if the arbiter started this process, else None. The variables are
        removed, so processes the consumer code starts do not inherit them."""
        name = environ.pop(WORKER_ENV, "")
        fd = environ.pop(LINK_FD_ENV, "")
        http_socket = environ.pop(HTTP_SOCKET_ENV, "") or None
        if not name or not fd.isdigit():
            return None
        try:
            os.set_inheritable(int(fd), False)
            os.set_blocking(int(fd), False)
        except OSError:  # not open: not started by an arbiter after all
            return None
        return cls(name, int(fd), http_socket)

    def _tell(self, line: bytes) -> bool:
        try:
            return os.write(self.fd, line) == len(line)
        except OSError:
            return False  # the arbiter is gone: watch() and the watchdog see it

    def started(self) -> None:
        """Tell the arbiter this process handles its signals; start the watchdog."""
        self._tell(STARTED + b"\n")
        threading.Thread(target=self._watchdog, name="arbiter watchdog", daemon=True).start()

    def consuming(self) -> None:
        """Tell the arbiter that every consumer entry consumes."""
        self._tell(CONSUMING + b"\n")

    def recycle(self, reason: str) -> None:
        """Ask the arbiter to replace this worker (recycle_after_messages, ...)."""
        self._tell(RECYCLE + b" " + " ".join(reason.split()).encode() + b"\n")

    def problems(self, lines: list[str]) -> bool:
        """Tell the arbiter why this process cannot start (it prints them once for the
        service), in one line however long, written whole; False if the arbiter is gone,
        and the caller prints them."""
        data = PROBLEMS + b" " + json.dumps(lines).encode() + b"\n"
        os.set_blocking(self.fd, True)
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError:
            return False
        finally:
            os.set_blocking(self.fd, False)
        return True

    def watch(self, gone: Callable[[], None]) -> None:
        """Call ``gone`` (in a greenlet of its own) once the arbiter is gone."""
        gevent.spawn(self._watch, gone)

    def _watch(self, gone: Callable[[], None]) -> None:
        while True:
            gevent.socket.wait_read(self.fd)
            try:
                data = os.read(self.fd, 64)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:  # end-of-file: the arbiter's end is closed
                gone()
                return

    def _watchdog(self) -> None:
        """In a thread of its own: once the arbiter is gone (the link readable, which
        only its end-of-file makes it, or this process reparented), give the normal
        drain its time, then end the process."""
        poller = _poll()
        poller.register(self.fd, select.POLLIN)
        while not poller.poll(1000) and os.getppid() == self.arbiter_pid:
            pass
        gone_at = time.monotonic()
        while (left := gone_at + self.drain_timeout + WATCHDOG_MARGIN - time.monotonic()) > 0:
            _sleep(min(left, 1.0))
        # The last line is written by a thread of its own: the stuck code may hold the
        # log handler's lock (blocked writing to a stderr pipe nobody reads), and the
        # exit must not wait for it.
        written = _allocate_lock()
        written.acquire()
        _start_new_thread(self._last_line, (written,))
        written.acquire(timeout=LAST_LINE_TIMEOUT)
        os._exit(EXIT_DRAIN_TIMEOUT)

    def _last_line(self, written: Any) -> None:
        try:
            log.critical("the arbiter is gone and this worker has not stopped within "
                         "drain_timeout (%gs) + %gs (blocking code in consume?): exiting "
                         "now with status %d; its unfinished messages go back to the queue",
                         self.drain_timeout, WATCHDOG_MARGIN, EXIT_DRAIN_TIMEOUT)
        finally:
            written.release()

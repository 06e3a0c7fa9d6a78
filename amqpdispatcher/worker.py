"""A worker process under the arbiter (``--processes N``, arbiter.py): its link to it.

The arbiter starts each worker with its name in AMQP_DISPATCHER_WORKER (``2/4``,
added to the connection's ``connection_name``) and one end of a socket pair in
AMQP_DISPATCHER_LINK_FD; only the arbiter holds the other end. The worker
writes one line there once it consumes, and watches it for end-of-file, which
comes when the arbiter is gone, whatever killed it: then the worker drains and
stops, as on SIGTERM, so it never outlives the arbiter by more than a drain.
When the config has ``http``, AMQP_DISPATCHER_HTTP_SOCKET names the unix socket
on which the worker serves its endpoint for the arbiter (arbiter_http.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, MutableMapping

import gevent
import gevent.socket

from .arbiter import HTTP_SOCKET_ENV, LINK_FD_ENV, WORKER_ENV


class ArbiterLink:
    def __init__(self, name: str, fd: int, http_socket: str | None = None) -> None:
        self.name = name
        self.fd = fd
        self.http_socket = http_socket  # where to serve /metrics, /readyz for the arbiter

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

    def consuming(self) -> None:
        """Tell the arbiter that every consumer entry consumes."""
        try:
            os.write(self.fd, b"consuming\n")
        except OSError:
            pass  # the arbiter is gone: watch() reports it

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

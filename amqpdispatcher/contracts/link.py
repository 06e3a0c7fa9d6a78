"""The link between the arbiter of ``--processes`` and each of its workers.

The arbiter (supervision/arbiter.py) starts each worker with its name in WORKER_ENV
(``2/4``, added to the connection's ``connection_name``), one end of a socket pair
in LINK_FD_ENV, and, when the config has ``http``, the path of the unix socket on
which the worker serves its endpoint for the arbiter in HTTP_SOCKET_ENV. The worker
(supervision/link.py) removes them from its environment, so that processes the
consumer code starts do not inherit them.

Only the worker writes on the link, one line per event: STARTED once its signal
handlers are installed (from then on SIGUSR1 is safe to send it), CONSUMING once
every consumer entry consumes, and, when it cannot start because of problems in
the config (exit status 1), one line PROBLEMS, a space and the problems as a JSON
array of strings, instead of printing them: the arbiter prints them once for the
whole service. RECYCLE, a space and the reason, when the worker reached
``recycle_after_messages`` or ``recycle_above_memory_mb``: the arbiter starts its
replacement, and once that one consumes, sends this one SIGTERM (it drains). It is
said again every RECYCLE_REPEAT seconds until then. End-of-file, either way, means
the other side is gone.
"""

from __future__ import annotations

WORKER_ENV = "AMQP_DISPATCHER_WORKER"
LINK_FD_ENV = "AMQP_DISPATCHER_LINK_FD"
HTTP_SOCKET_ENV = "AMQP_DISPATCHER_HTTP_SOCKET"

STARTED = b"started"
CONSUMING = b"consuming"
PROBLEMS = b"problems"
RECYCLE = b"recycle"

"""The environment variables amqp-dispatcher reads, each with what it means.

The reference page docs/reference/environment.md is generated from VARIABLES
(``python scripts/docs.py``), and tests/test_docs.py fails when the package reads a
variable that is not here. What each value may be, in full, is on that page; the
code that reads them is config/settings.py (the broker's), observability/logs.py
(logging) and supervision/link.py (the arbiter's link, set for its workers only).
"""

from __future__ import annotations

from typing import NamedTuple

from .link import HTTP_SOCKET_ENV, LINK_FD_ENV, WORKER_ENV


class Variable(NamedTuple):
    name: str
    default: str  # as the table shows it ("": none)
    meaning: str
    internal: bool = False  # set by the arbiter for its workers, never by a user


VARIABLES = (
    Variable("RABBITMQ_URL", "`amqp://guest:guest@localhost:5672/`",
             "the broker: `amqp://USER:PASS@HOST[,HOST...][:PORT]/VHOST`, or `amqps://` "
             "for TLS; hosts separated by commas are tried in random order (see below)"),
    Variable("RABBITMQ_HEARTBEAT", "the URL's `heartbeat`, else the broker's proposal",
             "the heartbeat in seconds, 0 to 65535 (0: none); overrides the URL's"),
    Variable("LOGGING_FILE_CONFIG", "",
             "a file for `logging.config.fileConfig`; without it, logs go to stderr at "
             "INFO as `TIME LOGGER[PID] LEVEL: MESSAGE`"),
    Variable("LOG_FORMAT", "`text`",
             "`text` or `json` (one JSON object per line); ignored when "
             "`LOGGING_FILE_CONFIG` is set; any other value is an error (exit 1)"),
    Variable("TMPDIR", "`/tmp`",
             "with `--processes` and `http`, where the workers' unix sockets go (a "
             "directory `amqp-dispatcher-PID-XXXXXXXX`, removed at exit)"),
    Variable(WORKER_ENV, "", "the worker's name (`2/4`), set by the arbiter", internal=True),
    Variable(LINK_FD_ENV, "", "the worker's end of its link to the arbiter", internal=True),
    Variable(HTTP_SOCKET_ENV, "", "the unix socket a worker serves its endpoint on",
             internal=True),
)

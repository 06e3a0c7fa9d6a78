"""Exit statuses: the same for a single process and for the arbiter of ``--processes``.

Each constant is documented in STATUSES, which docs/reference/exit-statuses.md is
generated from (``python scripts/docs.py``; tests/test_docs.py fails when the page
and this module disagree). Under a supervisor, EXIT_BROKER and EXIT_RECYCLE are the
statuses to restart on; EXIT_CONFIG, EXIT_TOPOLOGY and EXIT_USER_CODE fail the same way again
until the config or the code is fixed.
"""

from __future__ import annotations

from typing import NamedTuple

EXIT_OK = 0  # a graceful stop; --validate or --check found nothing
EXIT_CONFIG = 1  # bad input: config, environment, an http port that cannot listen
EXIT_USAGE = 2  # bad command-line usage (argparse's own status)
EXIT_BROKER = 3  # no broker at start, or the connection lost for good
EXIT_TOPOLOGY = 4  # at start, the broker refused the config's topology
EXIT_USER_CODE = 5  # the startup handler, a consumer constructor or a middleware's failed at start
EXIT_DRAIN_TIMEOUT = 6  # the drain ran out of drain_timeout with consume calls running
EXIT_RECYCLE = 7  # recycle_after_messages or recycle_above_memory_mb: drained, start again
EXIT_INTERNAL = 70  # a bug in amqp-dispatcher (EX_SOFTWARE); the traceback is logged


def killed_by(signum: int) -> int:
    """The status of a stop at once by signal ``signum`` (and how a shell shows a
    process killed by it): 128 + its number."""
    return 128 + signum


class Status(NamedTuple):
    status: str  # as the table shows it: one number, or several
    meaning: str
    with_processes: str  # what the arbiter of --processes adds ("": nothing)


STATUSES = (
    Status(str(EXIT_OK),
           "stopped by SIGTERM after finishing the messages in progress, or by "
           "`--exit-when-drained` once the work was done; `--validate` or `--check` "
           "found no problem",
           "every worker drained and exited 0 (a worker still starting counts); with "
           "`--exit-when-drained`, every worker exited 0 once its work was done"),
    Status(str(EXIT_CONFIG),
           "bad input: the config file, `RABBITMQ_URL`, `RABBITMQ_HEARTBEAT`, "
           "`LOGGING_FILE_CONFIG` or `LOG_FORMAT` (one line each on stderr); `--only` "
           "naming a queue no entry consumes; or the "
           "`http` endpoint cannot listen (`config.yml: http.port: cannot listen on "
           "127.0.0.1:9800: address already in use`); `--check` found a problem, or "
           "could not connect",
           "also: at the service's first start, a worker exited 1 before it consumed; "
           "the others were drained first (later, a replacement that exits 1 is started "
           "again, with backoff: see [Processes and reload](../guides/processes.md))"),
    Status(str(EXIT_USAGE), "bad command-line usage", ""),
    Status(str(EXIT_BROKER),
           "the broker: no host in `RABBITMQ_URL` accepted a connection at start; or the "
           "connection was lost and `reconnect: false`; or reconnecting failed for longer "
           "than `reconnect_give_up_after`",
           "never: a worker that exits 3 is replaced, with backoff"),
    Status(str(EXIT_TOPOLOGY),
           "at start, the broker refused the config's topology: a `passive: true` "
           "exchange or queue is missing, a binding names a missing exchange, an exchange "
           "exists with another type or arguments, an exchange's type is unknown to the "
           "broker (a plugin's type with the plugin not enabled), a queue exists with "
           "other arguments, a consumer's queue does not exist, an `exclusive` queue is "
           "held by another connection or exists without being exclusive, an `exclusive` "
           "consumer meets another consumer on its queue, or the user lacks permission "
           "(reply codes 403, 404, 405, 406, and 503 for the unknown exchange type, which "
           "RabbitMQ calls \"invalid\" once its plugin was loaded and then disabled). A "
           "lost connection or a timeout while declaring is status 3, not 4. Once "
           "running, a refusal never stops the process (see [Process lifecycle]"
           "(../guides/lifecycle.md))",
           "at the service's first start, a worker exited 4 before it consumed; the "
           "others were drained first"),
    Status(str(EXIT_USER_CODE),
           "user code failed at start: the startup handler raised (`SystemExit` "
           "included), a consumer class could not be constructed, or a `middleware` "
           "class could not be constructed or its `on_start` raised",
           "at the service's first start, a worker exited 5 before it consumed; the "
           "others were drained first"),
    Status(str(EXIT_DRAIN_TIMEOUT),
           "SIGTERM's drain ran out of `drain_timeout` with `consume` calls still "
           "running: they were stopped and their messages go back to the queue (the "
           "consumers a reload replaced, if still draining, count too)",
           "after SIGTERM, the highest status a worker exited with, those of a previous "
           "set still draining after a reload included: 6, or any other (a worker killed "
           "by signal n counts as 128 + n)"),
    Status(str(EXIT_RECYCLE),
           "recycled: the process handled about `recycle_after_messages` messages, or its "
           "resident memory exceeded `recycle_above_memory_mb`; it stopped taking "
           "deliveries and finished those in progress, as on SIGTERM. A supervisor should "
           "start it again (the shipped supervisord and systemd examples do)",
           "never: the arbiter recycles a worker itself, starting its replacement first, "
           "then draining it"),
    Status(str(EXIT_INTERNAL),
           "an internal error: a bug in amqp-dispatcher (the traceback is logged; please "
           "report it). A supervisor should restart on it",
           "in the arbiter; its workers drain and stop on their own. A worker that exits "
           "70 is replaced"),
    Status("130, 131, 143",
           "stopped at once by SIGINT, SIGQUIT, or a second SIGTERM during the drain "
           "(128 + signal number): unfinished messages go back to the queue",
           "the same, passed on to every worker"),
)


def markdown_table() -> str:
    """The reference page's table."""
    lines = ["| status | meaning | with `--processes` |", "|---|---|---|"]
    lines += [f"| {s.status} | {s.meaning} | {s.with_processes} |".replace("|  |", "| |")
              for s in STATUSES]
    return "\n".join(lines) + "\n"

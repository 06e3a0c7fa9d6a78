"""The command line: flags, start-up checks, exit statuses, and what a signal does until
the main loop (runtime/generations.py) or the arbiter (supervision/arbiter.py) takes
the signals over (see docs/guides/lifecycle.md)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import signal
import sys
import threading
import traceback
from types import FrameType
from typing import TYPE_CHECKING, TextIO

from . import __version__
from .config import ConfigError, load_config, schema_text, select
from .config.settings import Settings, SettingsError, settings_from_env
from .contracts.exits import EXIT_CONFIG
from .contracts.signals import START_SIGNALS
from .observability.logs import redact, redact_password, setup_logging
from .supervision.arbiter import Arbiter

if TYPE_CHECKING:
    from .supervision.link import ArbiterLink

# The single process's parts (gevent, pika, the consumer code) are imported by
# _single only: an arbiter never loads them, and starts its workers that much sooner.

log = logging.getLogger("amqp-dispatcher")

# Set once the dispatcher runs: until then no consume has started and no message is held.
_dispatching = False


def processes(text: str) -> int:
    """--processes: a positive whole number, or auto (one per core this process may use)."""
    if text == "auto":
        if hasattr(os, "sched_getaffinity"):  # honours taskset and cpusets
            return len(os.sched_getaffinity(0))
        return os.cpu_count() or 1
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number or 'auto', "
                                         f"got {text!r}")
    return int(text)


def seconds(text: str) -> float:
    """--exit-when-drained: a number of seconds, zero or more."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected zero or more seconds, got {text!r}")
    return value


def queue_names(text: str) -> tuple[str, ...]:
    """--only: queue names separated by commas."""
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",")))
    if not names or not all(names):
        raise argparse.ArgumentTypeError(f"expected QUEUE[,QUEUE...], got {text!r}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    """The command line (docs/reference/cli.md is generated from it)."""
    parser = argparse.ArgumentParser(
        prog="amqp-dispatcher",
        description="Run RabbitMQ consumers described in a YAML file.",
        epilog="Environment: RABBITMQ_URL, RABBITMQ_HEARTBEAT, LOGGING_FILE_CONFIG, "
               "LOG_FORMAT.",
    )
    parser.add_argument("--config", default="config.yml", metavar="FILE",
                        help="the YAML config file (default: config.yml)")
    parser.add_argument("--validate", action="store_true",
                        help="check the config and imports, without connecting; "
                             "exit 1 if there is any problem")
    parser.add_argument("--processes", default=1, type=processes, metavar="N",
                        help="run N worker processes under an arbiter; auto: one per core "
                             "(default: 1, a single process)")
    parser.add_argument("--check", action="store_true",
                        help="check the config against the broker, changing nothing there: "
                             "exchanges, queues, arguments, permissions; exit 1 if it would "
                             "not start")
    parser.add_argument("--exit-when-drained", type=seconds, metavar="SECONDS",
                        help="stop (exit 0) once every consumer's queue has been empty and "
                             "nothing in flight for SECONDS")
    parser.add_argument("--only", type=queue_names, metavar="QUEUE[,QUEUE...]",
                        help="run only the consumer entries consuming these queues (the "
                             "topology is declared as without it); exit 1 if no entry "
                             "consumes one of them")
    parser.add_argument("--print-schema", action="store_true",
                        help="print the JSON Schema of the config file and exit")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


# What each signal means while the process starts: contracts/signals.py (START_SIGNALS).


class StoppedAtStart(BaseException):
    """A stop signal arrived during start-up; raised wherever the start is (not an
    Exception: the import checks must not report it as a consumer module's)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _signal_at_start(signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    if signum == signal.SIGUSR1:
        log.warning("received SIGUSR1 during start-up: the start is at\n%s",
                    "".join(traceback.format_stack(frame)).rstrip())
    elif signum in (signal.SIGHUP, signal.SIGUSR2):
        log.warning("received %s during start-up, before the consumer code is loaded: "
                    "ignored", name)
    else:
        log.info("received %s during start-up: stopping", name)
        raise StoppedAtStart(0 if signum == signal.SIGTERM else 128 + signum)


def say(line: str, file: TextIO | None = None) -> None:
    """Print a line, with the broker password hidden as in the logs: the problems
    found in a config include what the consumer code raised, which may quote it."""
    print(redact(line), file=file or sys.stdout)


def fail(lines: list[str], link: ArbiterLink | None = None) -> int:
    """Exit 1 with these problems printed, or, in a worker of --processes, told to the
    arbiter, which prints them once for the whole service (supervision/arbiter.py)."""
    if link is None or not link.problems([redact(line) for line in lines]):
        for line in lines:
            say(line, sys.stderr)
    return EXIT_CONFIG


def main(argv: list[str] | None = None) -> int:
    previous = {signum: signal.signal(signum, _signal_at_start) for signum in START_SIGNALS}
    try:
        return _main(parse_args(argv))
    except StoppedAtStart as stop:
        return stop.status
    finally:
        # What follows is the interpreter's exit, which waits for any thread the consumer
        # code left running: a signal means again what it meant before (SIGTERM ends it).
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)


def _main(args: argparse.Namespace) -> int:
    if args.print_schema:
        sys.stdout.write(schema_text())
        return 0
    arbiter = args.processes > 1 and not (args.validate or args.check)
    link = None
    if not arbiter:  # set when this process is a worker of --processes
        from .supervision.link import ArbiterLink

        link = ArbiterLink.from_environ()
        if link is not None:
            link.started()
    # Like `python -m`: consumer modules in the working directory are importable.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        setup_logging()
        settings = settings_from_env()
    except SettingsError as exc:
        return fail([str(exc)])
    redact_password(settings.password)
    redact_password(settings.password_as_written)
    if arbiter:
        return Arbiter(args.config, args.processes, args.exit_when_drained,
                       only=args.only).run()
    return _single(args, settings, link)


def _single(args: argparse.Namespace, settings: Settings, link: ArbiterLink | None) -> int:
    """One process: --validate, --check, or the dispatcher (alone, or a worker)."""
    from .amqp import preflight
    from .api import Dispatcher
    from .consuming.failure import time_limit_warnings
    from .observability.wsgi import ListenError

    try:
        config, resolved = load_config(args.config)
        if args.only is not None:
            config = select(config, args.only)
    except ConfigError as exc:
        return fail(exc.problems, link)
    if args.validate:
        for line in time_limit_warnings(config):
            say(line, sys.stderr)
        exchanges = f"{len(config.exchanges)} exchange(s), " if config.exchanges else ""
        say(f"{args.config}: OK ({exchanges}{len(config.queues)} queue(s), "
            f"{len(config.consumers)} consumer(s))")
        return 0
    if args.check:
        return preflight.check(config, settings)
    if link is not None:
        settings = dataclasses.replace(settings, worker=link.name)
    dispatcher = Dispatcher.from_config(config, resolved, settings,
                                        exit_when_drained=args.exit_when_drained, link=link)
    global _dispatching
    _dispatching = True
    try:
        return dispatcher.run()
    except ListenError as exc:
        return fail([str(exc)], link)


def run() -> None:
    status = main()
    left = [t.name for t in threading.enumerate()
            if t.is_alive() and not t.daemon and t is not threading.main_thread()]
    if left and not _dispatching:
        # A start that failed or was stopped (or --validate, --check) with threads the
        # consumer code started at import: the interpreter's exit would wait for them,
        # for ever. Nothing ran: there is nothing for them to finish.
        log.warning("the consumer code left %d thread(s) running (%s): exiting without "
                    "waiting for them", len(left), ", ".join(left))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)

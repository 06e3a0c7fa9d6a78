"""The library API: run a config's consumers from Python, as the command line does.

    from amqpdispatcher import Dispatcher

    dispatcher = Dispatcher("config.yml")          # or a dict; url= or RABBITMQ_URL
    status = dispatcher.run()                       # blocks; the exit status
    dispatcher.stop()                               # from another greenlet: as SIGTERM

It is the process the command line runs (cli.py builds one with
``Dispatcher.from_config`` from the config it has checked): runtime/generations.py's
Generations (the signals, SIGHUP reload, the HTTP endpoint, the dispatcher
generations doing the work), and with ``exit_when_drained`` runtime/drain.py's watch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, Union

import gevent

from .config import Config, Resolved, load_config, load_config_dict
from .config.settings import Settings, parse_url, settings_from_env
from .observability.logs import redact_password
from .runtime.drain import DrainWatch
from .runtime.generations import Generations, Link

log = logging.getLogger("amqp-dispatcher")

ConfigSource = Union[str, "os.PathLike[str]", Mapping[str, Any]]


class Dispatcher:
    """The consumers of one config, in this process.

    ``config``: the path of a YAML config file, or the config as a dict (what
    ``yaml.safe_load`` returns for such a file; problem lines then name
    ``<dict>``, and SIGHUP, with no file to read again, is ignored). Imports the
    consumer classes and the startup handler (the caller's ``sys.path`` decides
    where they are found).

    ``url``: the broker, as ``RABBITMQ_URL`` is written (docs/reference/
    environment.md); by default ``RABBITMQ_URL`` and ``RABBITMQ_HEARTBEAT`` from the
    environment, as the command line reads them. Its password is kept out of
    every log line from then on.

    ``exit_when_drained``: seconds; ``run`` returns 0 once every consumer's queue
    has been empty and nothing has been in flight for that long (see runtime/drain.py).
    None (the default): run until stopped.

    Raises ``amqpdispatcher.ConfigError`` (its ``problems``: one line each) for a
    bad config, ``amqpdispatcher.SettingsError`` for a bad URL.
    """

    def __init__(self, config: ConfigSource, *, url: str | None = None,
                 exit_when_drained: float | None = None) -> None:
        settings = parse_url(url) if url is not None else settings_from_env()
        redact_password(settings.password)
        redact_password(settings.password_as_written)
        if isinstance(config, Mapping):
            checked, resolved = load_config_dict(config)
        else:
            checked, resolved = load_config(os.fspath(config))
        self._init(checked, resolved, settings, exit_when_drained, None,
                   reloadable=not isinstance(config, Mapping))

    @classmethod
    def from_config(cls, config: Config, resolved: Resolved, settings: Settings, *,
                    exit_when_drained: float | None = None,
                    link: Link | None = None) -> Dispatcher:
        """From a config ``load_config`` has read and imported (the command line's way;
        ``link``: this process is a worker of ``--processes``)."""
        self = cls.__new__(cls)
        self._init(config, resolved, settings, exit_when_drained, link, reloadable=True)
        return self

    def _init(self, config: Config, resolved: Resolved, settings: Settings,
              exit_when_drained: float | None, link: Link | None,
              reloadable: bool) -> None:
        if exit_when_drained is not None and not exit_when_drained >= 0:
            raise ValueError(f"exit_when_drained: expected zero or more seconds, "
                             f"got {exit_when_drained!r}")
        self.exit_when_drained = exit_when_drained
        self._generations = Generations(config, resolved, settings, link, reloadable)

    def run(self, *, handle_signals: bool = True) -> int:
        """Start and consume until stopped; return the exit status (docs/reference/
        exit-statuses.md): 0 after a graceful stop. Call it once, in the thread of the gevent
        hub that will run the dispatcher (normally the main thread).

        With an ``http`` key in the config, the endpoint's port is bound first:
        ``amqpdispatcher.ListenError`` (one line) if it cannot be.

        ``handle_signals``: act on SIGTERM, SIGINT, SIGQUIT, SIGHUP (reload), SIGUSR1
        and SIGUSR2 as the command line does (docs/guides/lifecycle.md), until
        ``run`` returns; pass False in a program that handles signals itself, and call
        ``stop`` instead.
        """
        self._generations.listen()
        watch = None
        if self.exit_when_drained is not None:
            watch = gevent.spawn(DrainWatch(self._generations, self.exit_when_drained).run)
            watch.name = "exit-when-drained"
        try:
            return self._generations.run(handle_signals)
        finally:
            if watch is not None:
                watch.kill()

    def stop(self) -> None:
        """Stop gracefully, as SIGTERM does: no new deliveries, the ``consume`` calls in
        progress finish (up to ``drain_timeout``), then ``run`` returns. A second call
        while stopping stops at once, as a second SIGTERM does. Call it from another
        greenlet of the same thread, before or during ``run``."""
        log.info("stop() called: stopping as on SIGTERM")
        self._generations.stop()

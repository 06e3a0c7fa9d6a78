"""Wires config, connection, topology and pools together, and runs the main loop.

Everything that changes the dispatcher's state (a signal, a lost connection, a
channel closed by the broker) arrives as an event on one queue and is acted on
in ``run``, in the main greenlet; callbacks and signal handlers only enqueue.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

import gevent
import gevent.event
import gevent.queue

from .acks import Acknowledger
from .broker import (
    BrokerError,
    SyncChannel,
    TopologyError,
    connect,
    declare_topology,
    describe_close,
)
from .config import Config, Resolved, describe_exception
from .pool import ConsumerPool
from .settings import Settings

log = logging.getLogger("amqp-dispatcher")

# Exit statuses; README.md documents each.
EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_USAGE = 2
EXIT_BROKER = 3
EXIT_TOPOLOGY = 4
EXIT_USER_CODE = 5

# What each signal means: TERM drains, INT and QUIT stop at once.
GRACEFUL_SIGNALS = (signal.SIGTERM,)
FAST_SIGNALS = (signal.SIGINT, signal.SIGQUIT)


class Dispatcher:
    def __init__(self, config: Config, resolved: Resolved, settings: Settings) -> None:
        self.config = config
        self.resolved = resolved
        self.settings = settings
        self.events: gevent.queue.Queue[tuple[str, Any]] = gevent.queue.Queue()
        self.pools = [ConsumerPool(entry, resolved.consumer_classes[entry.consumer])
                      for entry in config.consumers]
        self.connection: Any = None
        self.channels: dict[int, tuple[SyncChannel, Acknowledger, str]] = {}

    # -- start-up -----------------------------------------------------------

    def _start_user_code(self) -> None:
        if self.resolved.startup_handler is not None:
            try:
                self.resolved.startup_handler()
            except Exception as exc:  # noqa: BLE001 - user code
                raise UserCodeError(f"{self.config.path}: startup_handler: "
                                    f"{self.config.startup_handler} raised "
                                    f"{describe_exception(exc)}") from None
        for pool in self.pools:
            try:
                pool.create_instances()
            except Exception as exc:  # noqa: BLE001 - user code
                raise UserCodeError(f"{self.config.path}: {pool.entry.path}.consumer: "
                                    f"{pool.entry.consumer}() raised "
                                    f"{describe_exception(exc)}") from None

    def _start_consuming(self, pool: ConsumerPool, index: int) -> None:
        sync = SyncChannel.open(self.connection)
        sync.call(sync.channel.basic_qos, prefetch_count=pool.entry.prefetch_count)
        acker = Acknowledger(sync.channel, pool.entry.prefetch_count)
        sync.channel.add_on_close_callback(
            lambda channel, reason: self.events.put(("channel_closed", (index, reason))))
        consume_ok = sync.call(sync.channel.basic_consume, pool.entry.queue,
                               pool.on_message(acker))
        tag = consume_ok.method.consumer_tag
        self.channels[index] = (sync, acker, tag)
        log.info("consuming from %s with %d x %s, prefetch %d", pool.entry.queue,
                 pool.entry.consumer_count, pool.entry.consumer, pool.entry.prefetch_count)

    def _on_connection_closed(self, connection: Any, reason: Any) -> None:
        self.events.put(("connection_closed", reason))

    # -- the main loop --------------------------------------------------------

    def run(self) -> int:
        for signum in GRACEFUL_SIGNALS + FAST_SIGNALS:
            gevent.signal_handler(signum, self.events.put, ("signal", signum))
        try:
            self._start_user_code()
            self.connection = connect(self.settings)
            self.connection.add_on_close_callback(self._on_connection_closed)
            declare_topology(self.connection, self.config)
            for pool in self.pools:
                pool.start()
            for index, pool in enumerate(self.pools):
                self._start_consuming(pool, index)
        except UserCodeError as exc:
            log.error("%s", exc)
            return EXIT_USER_CODE
        except TopologyError as exc:
            log.error("%s", exc)
            self._close_connection()
            return EXIT_TOPOLOGY
        except BrokerError as exc:
            log.error("%s", exc)
            self._close_connection()
            return EXIT_BROKER

        while True:
            kind, detail = self.events.get()
            if kind == "signal":
                if detail in GRACEFUL_SIGNALS:
                    log.info("received %s: finishing messages in progress, then stopping",
                             signal.Signals(detail).name)
                    return self._stop_gracefully()
                log.info("received %s: stopping now", signal.Signals(detail).name)
                return self._stop_now(128 + detail)
            if kind == "connection_closed":
                log.error("connection to the broker lost: %s", describe_close(detail))
                self.connection = None
                return self._stop_now(EXIT_BROKER)
            if kind == "channel_closed":
                index, reason = detail
                if self.connection is None or not self.connection.is_open:
                    continue  # the connection_closed event says it all
                log.error("the broker closed the channel of %s: %s",
                          self.pools[index].entry.path, describe_close(reason))
                return self._stop_now(EXIT_BROKER)

    # -- stopping ---------------------------------------------------------------

    def _stop_gracefully(self) -> int:
        for sync, _, tag in self.channels.values():
            try:
                sync.call(sync.channel.basic_cancel, tag)
            except BrokerError:
                pass
        for pool in self.pools:
            pool.requeue_waiting()
        for pool in self.pools:
            pool.stop_workers(timeout=None)
        for _, acker, _ in self.channels.values():
            acker.flush()
        for pool in self.pools:
            pool.shutdown_instances()
        self._close_connection()
        log.info("stopped")
        return EXIT_OK

    def _stop_now(self, status: int) -> int:
        for _, acker, _ in self.channels.values():
            acker.close()
        for pool in self.pools:
            pool.kill_workers()
        self._close_connection()
        return status

    def _close_connection(self) -> None:
        connection, self.connection = self.connection, None
        if connection is None or connection.is_closed:
            return
        closed = gevent.event.Event()
        connection.add_on_close_callback(lambda *_: closed.set())
        if not connection.is_closing:
            connection.close()
        closed.wait(timeout=10)


class UserCodeError(Exception):
    """The startup handler or a consumer constructor failed at start: one line."""

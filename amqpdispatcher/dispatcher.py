"""Wires config, connection, topology and pools together, and runs the main loop.

Everything that changes the dispatcher's state (a signal, a lost connection, a
channel closed by the broker, the end of a drain) arrives as an event on one
queue and is acted on in ``run``, in the main greenlet; pika callbacks and
signal handlers only enqueue.

Consumer instances and their worker greenlets live for the whole process; a
connection (a "session") can come and go under them. Deliveries carry the
Acknowledger of the channel they came on, and settling on a channel that is
gone is a no-op: the broker redelivers those messages.
"""

from __future__ import annotations

import logging
import random
import signal
import time
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

# Exit statuses; README.md documents each (2, bad usage, is argparse's).
EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_BROKER = 3
EXIT_TOPOLOGY = 4
EXIT_USER_CODE = 5
EXIT_DRAIN_TIMEOUT = 6

# What each signal means: TERM drains (a second TERM stops at once), INT and
# QUIT stop at once. A stop at once exits 128 + the signal number.
GRACEFUL_SIGNALS = (signal.SIGTERM,)
FAST_SIGNALS = (signal.SIGINT, signal.SIGQUIT)

RECONNECT_FIRST_DELAY = 0.5
RECONNECT_MAX_DELAY = 30.0
CHANNEL_REOPEN_DELAY = 1.0


class UserCodeError(Exception):
    """The startup handler or a consumer constructor failed at start: one line."""


class Stop(Exception):
    """Leave the main loop with this exit status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class Channel:
    """One consumer entry's channel on the current connection."""

    def __init__(self, sync: SyncChannel, acker: Acknowledger, consumer_tag: str) -> None:
        self.sync = sync
        self.acker = acker
        self.consumer_tag = consumer_tag


class Dispatcher:
    def __init__(self, config: Config, resolved: Resolved, settings: Settings) -> None:
        self.config = config
        self.resolved = resolved
        self.settings = settings
        self.events: gevent.queue.Queue[tuple[str, Any]] = gevent.queue.Queue()
        self.pools = [ConsumerPool(entry, resolved.consumer_classes[entry.consumer])
                      for entry in config.consumers]
        self.connection: Any = None
        self.channels: dict[int, Channel] = {}

    # -- start-up and sessions --------------------------------------------------

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

    def _open_session(self) -> None:
        """Connect, declare the topology, and start consuming on every entry."""
        connection = connect(self.settings)
        self.connection = connection
        connection.add_on_close_callback(
            lambda conn, reason: self.events.put(("connection_closed", (conn, reason))))
        declare_topology(connection, self.config)
        for index in range(len(self.pools)):
            self._open_channel(index)

    def _open_channel(self, index: int) -> None:
        pool = self.pools[index]
        sync = SyncChannel.open(self.connection)
        sync.call(sync.channel.basic_qos, prefetch_count=pool.entry.prefetch_count)
        acker = Acknowledger(sync.channel, pool.entry.prefetch_count)
        consume_ok = sync.call(sync.channel.basic_consume, pool.entry.queue,
                               pool.on_message(acker))
        channel = Channel(sync, acker, consume_ok.method.consumer_tag)
        sync.channel.add_on_close_callback(
            lambda ch, reason: self.events.put(("channel_closed", (index, channel, reason))))
        sync.channel.add_on_cancel_callback(
            lambda frame: self.events.put(("consumer_cancelled", (index, channel))))
        self.channels[index] = channel
        log.info("consuming from %s with %d x %s, prefetch %d", pool.entry.queue,
                 pool.entry.consumer_count, pool.entry.consumer, pool.entry.prefetch_count)

    def _forget_session(self) -> None:
        """The connection is gone: its delivery tags mean nothing any more."""
        for channel in self.channels.values():
            channel.acker.close()
        self.channels.clear()
        for pool in self.pools:
            pool.discard_waiting()
        self.connection = None

    # -- the main loop ------------------------------------------------------------

    def run(self) -> int:
        for signum in GRACEFUL_SIGNALS + FAST_SIGNALS:
            gevent.signal_handler(signum, self.events.put, ("signal", signum))
        try:
            self._start_user_code()
            for pool in self.pools:
                pool.start()
            self._open_session()
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
        try:
            while True:
                self._handle(*self.events.get())
        except Stop as stop:
            return stop.status

    def _handle(self, kind: str, detail: Any) -> None:
        if kind == "signal":
            self._on_signal(detail)
        elif kind == "connection_closed":
            connection, reason = detail
            if connection is not self.connection:
                return  # an earlier connection, already dealt with
            self._on_connection_lost(describe_close(reason))
        elif kind == "channel_closed":
            index, channel, reason = detail
            if self.channels.get(index) is channel and self.connection is not None \
                    and self.connection.is_open:
                log.error("the broker closed the channel of %s (%s): %s; reopening it",
                          self.pools[index].entry.path, self.pools[index].entry.queue,
                          describe_close(reason))
                self._reopen_channel(index, channel)
        elif kind == "consumer_cancelled":
            index, cancelled = detail
            if self.channels.get(index) is cancelled:
                log.error("the broker cancelled the consumer of %s (was queue %s deleted?); "
                          "resubscribing", self.pools[index].entry.path,
                          self.pools[index].entry.queue)
                self.channels[index].sync.channel.close()  # the close event reopens it
        elif kind == "reopen_channel":
            if self.connection is not None and self.connection.is_open \
                    and detail not in self.channels:
                self._reopen_channel(detail, None)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum in GRACEFUL_SIGNALS:
            log.info("received %s: finishing messages in progress (up to %gs), then stopping",
                     name, self.config.drain_timeout)
            raise Stop(self._stop_gracefully())
        log.info("received %s: stopping now", name)
        raise Stop(self._stop_now(128 + signum))

    def _reopen_channel(self, index: int, old: Channel | None) -> None:
        if old is not None:
            old.acker.close()
            self.channels.pop(index, None)
        try:
            self._open_channel(index)
        except BrokerError as exc:
            if self.connection is None or not self.connection.is_open:
                return  # the connection_closed event takes over
            log.error("cannot reopen the channel of %s: %s; retrying in %gs",
                      self.pools[index].entry.path, exc, CHANNEL_REOPEN_DELAY)
            gevent.spawn_later(CHANNEL_REOPEN_DELAY, self.events.put, ("reopen_channel", index))

    def _on_connection_lost(self, reason: str) -> None:
        unsettled = sum(c.acker.unsettled() for c in self.channels.values())
        log.error("connection to the broker lost: %s", reason)
        if unsettled:
            log.warning("%d delivered message(s) were not yet acked; the broker redelivers them",
                        unsettled)
        self._forget_session()
        if not self.config.reconnect:
            raise Stop(self._stop_now(EXIT_BROKER))
        self._reconnect()

    def _reconnect(self) -> None:
        """Back off exponentially with full jitter until a session opens; signals still work."""
        started = time.monotonic()
        give_up = self.config.reconnect_give_up_after
        delay = RECONNECT_FIRST_DELAY
        attempt = 0
        while True:
            wait = random.uniform(delay / 2, delay)
            if give_up is not None and time.monotonic() + wait - started > give_up:
                log.error("could not reconnect within reconnect_give_up_after (%gs); exiting",
                          give_up)
                raise Stop(self._stop_now(EXIT_BROKER))
            self._wait_handling_signals(wait)
            attempt += 1
            try:
                self._open_session()
            except TopologyError as exc:
                log.error("%s", exc)
                self._forget_session()
                raise Stop(self._stop_now(EXIT_TOPOLOGY)) from None
            except BrokerError as exc:
                log.warning("reconnect attempt %d failed: %s", attempt, exc)
                self._close_connection()
                self._forget_session()
                delay = min(delay * 2, RECONNECT_MAX_DELAY)
                continue
            log.info("reconnected after %.1fs (%d attempt(s))", time.monotonic() - started,
                     attempt)
            return

    def _wait_handling_signals(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                kind, detail = self.events.get(timeout=remaining)
            except gevent.queue.Empty:
                return
            if kind == "signal":
                self._on_signal(detail)
            # Anything else is about a connection that no longer exists.

    # -- stopping -----------------------------------------------------------------

    def _stop_gracefully(self) -> int:
        for channel in list(self.channels.values()):
            try:
                channel.sync.call(channel.sync.channel.basic_cancel, channel.consumer_tag)
            except BrokerError:
                pass  # the channel or connection is already gone
        for pool in self.pools:
            pool.requeue_waiting()
        workers = [w for pool in self.pools for w in pool.stop_workers()]
        drained = gevent.spawn(gevent.joinall, workers)
        drained.link(lambda _: self.events.put(("drained", None)))
        deadline = time.monotonic() + self.config.drain_timeout
        while True:
            try:
                kind, detail = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except gevent.queue.Empty:
                busy = sum(pool.busy for pool in self.pools)
                log.error("drain_timeout (%gs) ran out with %d message(s) still in consume; "
                          "they go back to the queue", self.config.drain_timeout, busy)
                return self._stop_now(EXIT_DRAIN_TIMEOUT)
            if kind == "drained":
                break
            if kind == "signal":
                log.info("received %s while draining: stopping now",
                         signal.Signals(detail).name)
                return self._stop_now(128 + detail)
            if kind == "connection_closed" and detail[0] is self.connection:
                log.error("connection lost while draining: %s; messages finishing now "
                          "will be redelivered", describe_close(detail[1]))
                self._forget_session()
        for channel in self.channels.values():
            channel.acker.flush()
        for pool in self.pools:
            pool.shutdown_instances()
        self._close_connection()
        log.info("stopped")
        return EXIT_OK

    def _stop_now(self, status: int) -> int:
        for channel in self.channels.values():
            channel.acker.close()
        for pool in self.pools:
            pool.kill_workers()
        for pool in self.pools:
            pool.shutdown_instances()
        self._close_connection()
        log.info("stopped")
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

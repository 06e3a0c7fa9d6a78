"""Wires config, connection, topology and pools together, and runs the main loop.

Everything that changes the dispatcher's state (a signal, a lost connection, a
channel closed by the broker, a retry timer) arrives as an event on one queue
and is acted on in the main greenlet; pika callbacks and signal handlers only
enqueue. Every step that waits on the broker (connecting, declaring, opening a
channel, closing) runs in a greenlet of its own while the main greenlet keeps
reading events, so a signal is acted on at once in every phase, start-up
included.

Consumer instances and their slot greenlets live for the whole process; a
connection (a "session") can come and go under them. Deliveries carry the
Acknowledger of the channel they came on, and settling on a channel that is
gone is a no-op: the broker redelivers those messages.

A consumer entry whose channel cannot be opened (its queue is missing, the
broker refuses it) is retried on its own with backoff ("repair"); the other
entries consume meanwhile. Only at start does a refusal stop the process
(status 4): then it is a config error, not an incident.

Publishing (``amqp.publish``, the retry policies) has a connection of its own,
owned by amqp/publishing.py's ``PublishingConnection``: opened by the first publish,
repaired on its own, and closed here at stop, after the drain.
"""

from __future__ import annotations

import logging
import random
import signal
import time
from collections.abc import Callable, MutableSequence
from functools import partial
from typing import Any

import gevent
import gevent.event
import gevent.queue
import pika.exceptions

from ..amqp.channel import SyncChannel, cancel_consumer
from ..amqp.connection import (
    RECONNECT_FIRST_DELAY,
    RECONNECT_MAX_DELAY,
    REOPEN_FIRST_DELAY,
    REOPEN_MAX_DELAY,
    STABLE_SESSION,
    close_connection,
    connect,
    describe_close,
    is_delivery_ack_timeout,
)
from ..amqp.errors import BrokerError, TopologyError
from ..amqp.publishing import PublishingConnection
from ..amqp.topology import Declared, config_error, declare_topology
from ..config import Config, ExchangeConfig, Resolved, describe_exception
from ..config.retry import retry_queues
from ..config.settings import Settings
from ..consuming.acks import Acknowledger
from ..consuming.breaker import sample_interval
from ..consuming.middleware import Middlewares
from ..consuming.pool import ConsumerPool, StopNow
from ..contracts.exits import (
    EXIT_BROKER,
    EXIT_DRAIN_TIMEOUT,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_TOPOLOGY,
    EXIT_USER_CODE,
)
from ..contracts.signals import GRACEFUL_SIGNALS
from ..contracts.timeouts import CLOSE_TIMEOUT, KILL_TIMEOUT
from ..observability.depth import QueueDepth
from ..observability.metrics import StatsLog

log = logging.getLogger("amqp-dispatcher")

# What each signal means to a generation: contracts/signals.py (GRACEFUL_SIGNALS,
# FAST_SIGNALS); exit statuses: contracts/exits.py.

# The backoff delays (RECONNECT_*, REOPEN_*, STABLE_SESSION) are in amqp/connection.py:
# the publishing connection backs off the same way. A session that stayed up
# STABLE_SESSION resets the reconnect backoff; a connection that flaps faster keeps
# backing off, and reconnect_give_up_after keeps counting. The bounds on the steps of
# a stop (CLOSE_TIMEOUT, KILL_TIMEOUT) are in contracts/timeouts.py.


class UserCodeError(Exception):
    """The startup handler or a consumer constructor failed at start: one line."""


class Stop(Exception):
    """Leave the main loop with this exit status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class Interrupted(Exception):
    """A signal arrived while a step was waiting; carries the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _run_step(function: Callable[..., Any], args: tuple[Any, ...]) -> tuple[bool, Any]:
    """The body of a step's greenlet: hands the outcome over instead of raising,
    so that gevent prints no traceback for an expected failure."""
    try:
        return True, function(*args)
    except StopNow:
        return False, Interrupted(0)  # killed by Dispatcher._step; nobody reads it
    except BaseException as exc:  # noqa: BLE001 - re-raised in the main greenlet
        return False, exc


def _drain(slots: list[gevent.Greenlet], channels: list[Channel]) -> None:
    """The body of a graceful stop's wait: until the consume calls in progress are done
    and the broker has confirmed every cancel. Until then it may still deliver what it
    sent before it took the cancel: each is given back as it arrives, so that once this
    returns every delivery is settled, and the last acks go out before the close."""
    gevent.joinall(slots)
    gevent.wait([channel.cancelled for channel in channels])


def _redelivered(stream: bool) -> str:
    """What becomes of deliveries dropped unsettled: a stream keeps no position, so the
    next subscription starts from the entry's stream_offset, not from them."""
    if stream:
        return ("the broker redelivers those of queues; a stream's are read again only "
                "if the entry's stream_offset reaches them (with next, they are skipped)")
    return "the broker redelivers them"


def run_user_code(call: Callable[[], Any], what: str) -> None:
    """Start-up user code: any failure, SystemExit included, is a one-line UserCodeError."""
    try:
        call()
    except StopNow:
        raise
    except BaseException as exc:  # noqa: BLE001 - user code
        raise UserCodeError(f"{what} raised {describe_exception(exc)}") from None


def _share(rate_limit: float | None, worker: str) -> float | None:
    """This process's share of an entry's rate_limit: all of it, or 1/N of it in a
    worker of --processes N (its name is "k/N")."""
    if rate_limit is None:
        return None
    _, _, processes = worker.partition("/")
    return rate_limit / int(processes) if processes.isdigit() and int(processes) else rate_limit


def _append_instance(instances: list[Any], cls: type) -> None:
    instances.append(cls())


class Channel:
    """One consumer entry's channel on the current connection."""

    def __init__(self, sync: SyncChannel, acker: Acknowledger, consumer_tag: str) -> None:
        self.sync = sync
        self.acker = acker
        self.consumer_tag = consumer_tag
        self.opened_at = time.monotonic()
        # Nothing more is delivered on this channel: the broker confirmed cancel() or
        # the channel is gone.
        self.cancelled = gevent.event.Event()
        sync.channel.add_on_close_callback(self._closed)

    def _closed(self, *_: Any) -> None:
        # Its tags can no longer be settled, from now on: also for a channel a trip
        # paused (no longer in Generation.channels, so no one drops it when the
        # connection goes), whose consume failing later must not be moved to a delay
        # queue while the broker redelivers it anyway.
        self.acker.open = False
        self.cancelled.set()

    def cancel(self) -> None:
        """Ask the broker for no more deliveries. Those it sent before it took the cancel
        still reach the entry's on_message, which gives them back (consuming/pool.py), until its
        cancel-ok sets ``cancelled``."""
        if not self.sync.channel.is_open:
            return  # closing or closed: its close sets ``cancelled``
        try:
            cancelling = cancel_consumer(self.sync.channel, self.consumer_tag,
                                         lambda _: self.cancelled.set())
        except pika.exceptions.AMQPError:
            return  # closing in the same read: its close sets ``cancelled``
        if not cancelling:
            self.cancelled.set()  # the broker cancelled it already


class Generation:
    """``read_depth``: read the consumed queues' depth for /metrics (when the config has
    http); under --processes, only worker 1 does, for the whole service."""

    def __init__(self, config: Config, resolved: Resolved, settings: Settings,
                 read_depth: bool = True) -> None:
        self.config = config
        self.resolved = resolved
        self.settings = settings
        self.events: gevent.queue.Queue[tuple[str, Any]] = gevent.queue.Queue()
        # The config's queues, then the delay and dead-letter queues of retry policies.
        self.topology = config.queues + retry_queues(config)
        # amqp.publish and the retry policies publish on a connection of their own.
        self.publishing = PublishingConnection(settings, config.publisher_confirms)
        self.pools = [ConsumerPool(entry, resolved.consumer_classes[entry.consumer],
                                   self.publishing.publisher(f"{entry.path} ({entry.queue})"),
                                   self.publishing.publisher(f"{entry.path} ({entry.queue}) "
                                                             "retry policy"),
                                   timed=config.http is not None,
                                   no_retry_for=resolved.no_retry_for.get(entry.path, ()),
                                   rate=_share(entry.rate_limit, settings.worker))
                      for entry in config.consumers]
        self.connection: Any = None
        self.channels: dict[int, Channel] = {}
        self.session_opened_at = 0.0
        self.outage_started: float | None = None
        self.reconnect_delay = RECONNECT_FIRST_DELAY
        # Exchanges, queues and entries to retry on their own: config path -> when; and
        # each one's last backoff delay.
        self.broken: dict[str, float] = {}
        # Exchanges whose type the broker refused by closing the whole connection (its
        # plugin disabled), by config path: left out of sessions until a check on a
        # connection of its own declares them (_declares_on_its_own).
        self.refused_types: dict[str, str] = {}
        self.backoff: dict[str, float] = {}
        self.repair_timer: gevent.Greenlet | None = None
        self.repair_due = 0.0
        # Observability: what /metrics, /healthz and /readyz (observability/http.py) read, and the
        # stats line.
        self.stopping = False
        # Its reconnects: a list, or a view of the worker's count file (runtime/counts.py).
        self.reconnect_count: MutableSequence[int] = [0]
        self.stats = StatsLog(self.pools, config.stats_interval)
        interval = config.http.queue_depth_interval if config.http and read_depth else 0.0
        # Not a stream's: it keeps what was read, and its declare-ok counts every message
        # it holds and no consumer (observability/depth.py).
        self.depth = QueueDepth([entry.queue for entry in config.consumers
                                 if not entry.stream], interval, lambda: self.connection)
        self.middleware: Middlewares | None = None  # built with the consumer instances
        # circuit_breaker: the entries whose circuit is open, by index: the channel
        # given up at the trip while its consumes in progress finish (None once closed).
        self.circuits: dict[int, Channel | None] = {}
        self.breakers: gevent.Greenlet | None = None

    @property
    def queue_depth(self) -> dict[str, tuple[int, int]]:
        return self.depth.values

    def is_connected(self) -> bool:
        return self.connection is not None and self.connection.is_open

    @property
    def reconnects(self) -> int:
        """Sessions opened again after the connection was lost."""
        return self.reconnect_count[0]

    # -- the main loop ------------------------------------------------------------

    def run(self, started: Callable[[], None] | None = None) -> int:
        """Start, then consume until a signal (an event ``("signal", signum)``) stops it;
        return the exit status. ``started`` is called once every entry consumes."""
        try:
            try:
                self._start()
            except Interrupted as signal_:
                return self._stop_during_start(signal_.signum)
            if started is not None:
                started()
            while True:
                try:
                    self._handle(*self.events.get())
                except Interrupted as signal_:
                    self._on_signal(signal_.signum)
        except Stop as stop:
            return stop.status
        except Exception:  # noqa: BLE001 - a bug: say so, stop, let the supervisor restart
            log.critical("internal error; stopping", exc_info=True)
            return self._stop_now(EXIT_INTERNAL)

    def _start(self) -> None:
        """Start-up: user code, then the first session; any failure is final."""
        try:
            self._step(self._start_user_code)
            self._step(self._open_session, True)
        except UserCodeError as exc:
            raise Stop(self._fail_start(EXIT_USER_CODE, str(exc))) from None
        except TopologyError as exc:
            raise Stop(self._fail_start(EXIT_TOPOLOGY, str(exc))) from None
        except BrokerError as exc:
            raise Stop(self._fail_start(EXIT_BROKER, str(exc))) from None
        for pool in self.pools:
            pool.start()
        self.stats.start()
        self.depth.start()
        breakers = [pool.breaker for pool in self.pools if pool.breaker is not None]
        if breakers:
            interval = min(sample_interval(b.config.window) for b in breakers)
            self.breakers = gevent.spawn(self._sample_breakers, interval)
            self.breakers.name = "circuit breakers"

    def _fail_start(self, status: int, message: str) -> int:
        log.error("%s", message)
        return self._finish(status)

    def _stop_during_start(self, signum: int) -> int:
        # Nothing was consumed yet (slot greenlets start once every entry consumes).
        log.info("received %s during start-up: stopping", signal.Signals(signum).name)
        return self._finish(EXIT_OK if signum in GRACEFUL_SIGNALS else 128 + signum)

    def _finish(self, status: int) -> int:
        """The last steps of every stop: ``shutdown(None)`` on each instance, then close
        the connections. A signal meanwhile skips what is left: exit 128 + signal."""
        self.stopping = True
        self.stats.stop()
        self.depth.stop()
        if self.breakers is not None:
            self.breakers.kill(block=False)
        try:
            self._step(self._shutdown_instances)
            self._step(self._close_connections)
        except Interrupted as signal_:
            log.info("received %s while stopping: stopping now",
                     signal.Signals(signal_.signum).name)
            return 128 + signal_.signum
        log.info("stopped")
        return status

    def _handle(self, kind: str, detail: Any) -> None:
        if kind == "signal":
            self._on_signal(detail)
        elif kind == "connection_closed":
            connection, reason = detail
            if connection is self.connection:  # else: an earlier one, already dealt with
                self._on_connection_lost(describe_close(reason))
        elif kind == "channel_closed":
            index, channel, reason = detail
            # With the whole connection closing, connection_closed follows and says it once.
            if self.channels.get(index) is channel and self.connection is not None \
                    and self.connection.is_open:
                entry = self.pools[index].entry
                if is_delivery_ack_timeout(reason):
                    limit = f"{entry.time_limit:g}s" if entry.time_limit else "not set"
                    log.error("the broker closed the channel of %s (%s): a delivery stayed "
                              "unacked past the broker's consumer_timeout (%s); set the "
                              "entry's time_limit (%s) below it; reopening the channel",
                              entry.path, entry.queue, describe_close(reason), limit)
                else:
                    log.error("the broker closed the channel of %s (%s): %s; reopening it",
                              entry.path, entry.queue, describe_close(reason))
                self._entry_lost(index, self._drop_channel(index))
        elif kind == "consumer_cancelled":
            index, cancelled = detail
            if self.channels.get(index) is cancelled:
                pool = self.pools[index]
                log.error("the broker cancelled the consumer of %s (was queue %s deleted?); "
                          "declaring and subscribing again", pool.entry.path, pool.entry.queue)
                dropped = self._drop_channel(index)
                dropped.sync.close()
                self._entry_lost(index, dropped)
        elif kind == "repair":
            self.repair_timer = None
            if self.connection is not None:
                self._step(self._repair)
        elif kind == "circuit_trip":
            self._trip(*detail)
        elif kind == "circuit_closed":
            index, channel = detail
            if self.circuits.get(index) is channel:
                self.circuits[index] = None

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum in GRACEFUL_SIGNALS:
            log.info("received %s: finishing messages in progress (up to %gs), then stopping",
                     name, self.config.drain_timeout)
            raise Stop(self._stop_gracefully())
        log.info("received %s: stopping now", name)
        raise Stop(self._stop_now(128 + signum))

    def _step(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run a step that may wait (on the broker, on user code) in a greenlet of its
        own while reading events: a signal kills the step and raises Interrupted.

        Returns the step's result or raises its exception. Other events that
        arrive meanwhile are kept for the main loop, in order.
        """
        step = gevent.spawn(_run_step, function, args)
        step.link(lambda done: self.events.put(("step_done", done)))
        kept: list[tuple[str, Any]] = []
        try:
            while True:
                kind, detail = self.events.get()
                if kind == "step_done" and detail is step:
                    ok, outcome = step.get()
                    if ok:
                        return outcome
                    raise outcome
                if kind == "signal":
                    step.kill(StopNow, block=True, timeout=KILL_TIMEOUT)
                    raise Interrupted(detail)
                kept.append((kind, detail))
        finally:
            for event in kept:
                self.events.put(event)

    # -- circuit breakers ---------------------------------------------------------

    def _sample_breakers(self, interval: float) -> None:
        """The breakers' greenlet: sample every entry's counts (consuming/breaker.py);
        a trip is acted on in the main loop."""
        while True:
            gevent.sleep(interval)
            now = time.monotonic()
            for index, pool in enumerate(self.pools):
                if pool.breaker is not None and index not in self.circuits:
                    tripped = pool.breaker.sample(now)
                    if tripped is not None:
                        self.events.put(("circuit_trip", (index, *tripped)))

    def _trip(self, index: int, settled: int, failed: int) -> None:
        """Open an entry's circuit: cancel its consume, give back what it had not
        started, let its consumes in progress finish and settle on their channel
        (``_pause``), and consume again after open_for (as a repair, ``_retry_later``)."""
        pool = self.pools[index]
        breaker = pool.breaker
        if self.stopping or breaker is None or index in self.circuits:
            return
        breaker.trip()
        entry, config = pool.entry, breaker.config
        log.warning("circuit_breaker of %s (%s): %d of the %d calls settled in the last "
                    "%gs failed (failure_ratio %g, min_calls %d): not consuming until %s "
                    "(open_for %gs); trip %d", entry.path, entry.queue, failed, settled,
                    config.window, config.failure_ratio, config.min_calls,
                    breaker.until_text(), config.open_for, breaker.trips)
        channel = self.channels.pop(index, None)
        self.circuits[index] = channel
        if channel is not None:
            gevent.spawn(self._pause, index, channel).name = f"{entry.path} circuit open"
        self.backoff.pop(entry.path, None)
        if self.connection is not None:
            self._retry_later(entry.path, None, delay=config.open_for)

    def _pause(self, index: int, channel: Channel) -> None:
        """A tripped entry's channel: no more deliveries; those not started go back; once
        its own deliveries in progress are settled (not the entry's: once open_for is
        over, the channel consuming again has its own), or none of the entry is in
        progress (one a slot holds for its rate_limit start is then redelivered), its
        acks are sent and it is closed."""
        pool = self.pools[index]
        channel.cancel()
        pool.requeue_waiting()
        channel.cancelled.wait()
        pool.requeue_waiting()  # those the broker sent before it took the cancel
        while pool.busy and channel.acker.open and channel.acker.unsettled():
            gevent.sleep(0.05)
        channel.acker.flush()
        channel.acker.close()
        channel.sync.close()
        self.events.put(("circuit_closed", (index, channel)))

    def keep_circuits_open(self, previous: Generation) -> None:
        """A reload: an entry whose circuit is open in the generation this one replaces
        (the same queue and consumer, with a circuit_breaker in both) does not consume
        before the rest of its open_for is over (_open_session)."""
        open_until = {(pool.entry.queue, pool.entry.consumer): pool.breaker.open_until
                      for pool in previous.pools
                      if pool.breaker is not None and pool.breaker.is_open}
        for index, pool in enumerate(self.pools):
            until = open_until.get((pool.entry.queue, pool.entry.consumer))
            if until is not None and pool.breaker is not None:
                pool.breaker.open_until = until
                self.circuits[index] = None

    def _close_circuit(self, index: int) -> None:
        """The entry consumes again (``_open_channel``): its breaker starts afresh."""
        pool = self.pools[index]
        self.circuits.pop(index, None)  # a paused channel still closing goes on alone
        if pool.breaker is not None and pool.breaker.is_open:
            pool.breaker.close()
            log.info("circuit_breaker of %s (%s): open_for is over: consuming again",
                     pool.entry.path, pool.entry.queue)

    def _circuit_open(self, index: int) -> bool:
        """Whether the entry's circuit is open and not yet due to close."""
        breaker = self.pools[index].breaker
        return breaker is not None and breaker.open_until is not None \
            and breaker.open_until > time.time()

    # -- sessions -----------------------------------------------------------------

    def _start_user_code(self) -> None:
        if self.resolved.startup_handler is not None:
            run_user_code(self.resolved.startup_handler, f"{self.config.path}: startup_handler: "
                           f"{self.config.startup_handler}")
        for pool in self.pools:
            run_user_code(pool.create_instances, f"{self.config.path}: {pool.entry.path}."
                           f"consumer: {pool.entry.consumer}()")
        if self.resolved.middleware:
            self._start_middleware()

    def _start_middleware(self) -> None:
        """Build the middleware instances, call their on_start, and hand their hooks to
        the pools (only if some has a hook around consume)."""
        instances: list[Any] = []
        for i, cls in enumerate(self.resolved.middleware):
            spec = f"{self.config.path}: middleware[{i}]: {self.config.middleware[i]}"
            run_user_code(partial(_append_instance, instances, cls), f"{spec}()")
        middleware = Middlewares(instances)
        self.middleware = middleware
        run_user_code(lambda: middleware.start(self.config),
                       f"{self.config.path}: middleware: on_start")
        if middleware.around_consume():
            for pool in self.pools:
                pool.middleware = middleware

    def _open_session(self, at_start: bool) -> None:
        """Connect, declare the topology, and start consuming on every entry.

        At start, any failure is raised: a refusal as TopologyError (exit 4),
        anything else as BrokerError (exit 3). Later, a queue or entry that
        fails on its own channel is logged and retried alone (``_repair``),
        and the rest of the entries consume.
        """
        while True:
            connection = connect(self.settings)
            self.connection = connection
            self.session_opened_at = time.monotonic()
            connection.add_on_close_callback(
                lambda conn, reason: self.events.put(("connection_closed", (conn, reason))))
            exchanges = [e for e in self.config.exchanges if e.path not in self.refused_types]
            try:
                failed = declare_topology(connection, self.config, exchanges, self.topology)
                break
            except TopologyError as refused:
                if at_start or refused.refused_type is None:
                    raise
                # The broker closed the connection over this exchange's type: connect
                # again without it; _repair retries it on a connection of its own.
                self.refused_types[refused.refused_type.path] = str(refused)
        if failed and at_start:
            for _, exc in failed[:-1]:
                log.error("%s", exc)
            raise failed[-1][1]
        for item, exc in failed:
            self._retry_later(item.path, str(exc))
        for path, problem in self.refused_types.items():
            self._retry_later(path, problem)
        for index, pool in enumerate(self.pools):
            if self._circuit_open(index):  # after a reconnect: it waits out open_for
                assert pool.breaker is not None and pool.breaker.open_until is not None
                self._retry_later(pool.entry.path, None,
                                  delay=pool.breaker.open_until - time.time())
                continue
            try:
                self._open_channel(index)
            except BrokerError as exc:
                if at_start or not exc.channel_only:
                    raise
                self._retry_later(pool.entry.path, str(exc))

    def _open_channel(self, index: int) -> None:
        pool = self.pools[index]
        entry = pool.entry
        sync = SyncChannel.open(self.connection)
        try:
            sync.call(sync.channel.basic_qos, prefetch_count=entry.prefetch_count)
            acker = Acknowledger(sync.channel, entry.prefetch_count, pool.metrics.outcomes,
                                 stream=entry.stream)
            consume_ok = sync.call(sync.channel.basic_consume, entry.queue,
                                   pool.on_message(acker), exclusive=entry.exclusive,
                                   arguments=entry.consume_arguments() or None)
        except BrokerError as exc:
            sync.close()
            raise config_error(exc, f"{self.config.path}: {entry.path}: cannot consume from "
                                    f"queue {entry.queue!r}") from None
        channel = Channel(sync, acker, consume_ok.method.consumer_tag)
        sync.channel.add_on_close_callback(
            lambda ch, reason: self.events.put(("channel_closed", (index, channel, reason))))
        sync.channel.add_on_cancel_callback(
            lambda frame: self.events.put(("consumer_cancelled", (index, channel))))
        self.channels[index] = channel
        log.info("consuming from %s with %d x %s, prefetch %d", entry.queue,
                 entry.consumer_count, entry.consumer, entry.prefetch_count)
        if index in self.circuits:
            self._close_circuit(index)

    def _drop_channel(self, index: int) -> Channel:
        """One entry's channel is gone: its deliveries can no longer be settled."""
        channel = self.channels.pop(index)
        channel.acker.close()
        dropped = self.pools[index].discard_waiting()
        if dropped:
            log.warning("%d delivered message(s) of %s not yet started were dropped; %s",
                        dropped, self.pools[index].entry.path, _redelivered(
                            self.pools[index].entry.stream))
        return channel

    def _entry_lost(self, index: int, channel: Channel) -> None:
        """Reopen an entry whose channel the broker closed or whose consumer it cancelled:
        at once if the channel had been up a while, else backing off, so that a
        message that gets its channel closed every time cannot spin."""
        path = self.pools[index].entry.path
        if time.monotonic() - channel.opened_at >= STABLE_SESSION:
            self.backoff.pop(path, None)
            self._retry_later(path, None, delay=0)
        else:
            self._retry_later(path, f"{self.config.path}: {path}: its channel closed again "
                                    "soon after it opened")

    def _retry_later(self, path: str, problem: str | None, delay: float | None = None) -> None:
        """Retry the exchange, queue or entry at this config path on its own, with backoff."""
        if delay is None:
            delay = min(max(self.backoff.get(path, 0) * 2, REOPEN_FIRST_DELAY), REOPEN_MAX_DELAY)
            self.backoff[path] = delay
        if problem is not None:
            log.error("%s; retrying in %gs", problem, delay)
        self.broken[path] = time.monotonic() + delay
        self._schedule_repair()

    def _schedule_repair(self) -> None:
        """Have the main loop call _repair when the first retry is due."""
        due = min(self.broken.values())
        if self.repair_timer is not None:
            if self.repair_due <= due:
                return
            self.repair_timer.kill()
        self.repair_due = due
        self.repair_timer = gevent.spawn_later(max(0.0, due - time.monotonic()),
                                               self.events.put, ("repair", None))

    def _repair(self) -> None:
        """Declare the exchanges and queues and open the entries whose retry is due.

        An entry's own queue, if the config declares it, is declared again
        first: an auto_delete queue is gone once its last consumer's channel
        closed, and a deleted queue the config declares comes back. So are the
        config's exchanges that a queue declared again binds to (an auto_delete
        exchange is gone once its last binding went with such a queue), and the
        bindings to an exchange declared again (deleting an exchange deletes them).
        """
        now = time.monotonic()
        due = {path for path, at in self.broken.items() if at <= now}
        for path in due:
            del self.broken[path]
        entries = [i for i, pool in enumerate(self.pools) if pool.entry.path in due]
        names = {self.pools[i].entry.queue for i in entries}
        # An entry's delay and dead-letter queues come back with it.
        derived = tuple(f"{self.pools[i].entry.path}.retry" for i in entries)
        repaired = {e.exchange for e in self.config.exchanges if e.path in due}

        def bound_to_repaired(item: Declared) -> bool:
            return any(binding.exchange in repaired for binding in item.bindings)

        queues = [q for q in self.topology if q.path in due or q.queue in names
                  or q.path.startswith(derived) or bound_to_repaired(q)]
        sources = {binding.exchange for queue in queues for binding in queue.bindings}
        exchanges = [e for e in self.config.exchanges
                     if e.path in due or e.exchange in sources or bound_to_repaired(e)]
        for exchange in [e for e in exchanges if e.path in self.refused_types]:
            if exchange.path in due and self._declares_on_its_own(exchange):
                del self.refused_types[exchange.path]
            else:
                exchanges.remove(exchange)
        try:
            failed = declare_topology(self.connection, self.config, exchanges, queues)
            for item, exc in failed:
                self._retry_later(item.path, str(exc))
            declared: list[Declared] = [*exchanges, *queues]
            for item in declared:
                if all(item is not other for other, _ in failed):
                    self.backoff.pop(item.path, None)
            for index in entries:
                try:
                    self._open_channel(index)
                except BrokerError as exc:
                    if not exc.channel_only:
                        raise
                    self._retry_later(self.pools[index].entry.path, str(exc))
        except BrokerError as exc:
            if self.connection is None or not self.connection.is_open:
                return  # the connection_closed event takes over
            for path in due:  # no answer: try all of them again later
                if path not in self.broken:
                    self._retry_later(path, f"{self.config.path}: {path}: {exc}")
        if self.broken:
            self._schedule_repair()

    def _declares_on_its_own(self, exchange: ExchangeConfig) -> bool:
        """Declare an exchange whose type the broker refused on a short-lived connection
        of its own, which the broker closes if it still refuses it; whether it took it.
        Otherwise its retry is scheduled."""
        try:
            probe = connect(self.settings, purpose="exchange check")
        except BrokerError as exc:
            self._retry_later(exchange.path, f"{self.config.path}: {exchange.path}: {exc}")
            return False
        try:
            failed = declare_topology(probe, self.config, [exchange], [])
        except BrokerError as failure:
            failed = [(exchange, failure)]
        finally:
            if probe.is_open:
                try:
                    probe.close()
                except pika.exceptions.AMQPError:
                    pass  # closed in the same read
        for _, problem in failed:
            self.refused_types[exchange.path] = str(problem)
            self._retry_later(exchange.path, str(problem))
        return not failed

    def _forget_session(self) -> None:
        """The connection is gone: its delivery tags mean nothing any more."""
        for index in list(self.channels):
            self._drop_channel(index)
        if self.repair_timer is not None:
            self.repair_timer.kill()
            self.repair_timer = None
        self.broken.clear()  # the next session declares and opens everything
        self.connection = None

    def _on_connection_lost(self, reason: str) -> None:
        unsettled = sum(c.acker.unsettled() for c in self.channels.values())
        log.error("connection to the broker lost: %s", reason)
        if unsettled:
            stream = any(self.pools[index].entry.stream and channel.acker.unsettled()
                         for index, channel in self.channels.items())
            log.warning("%d delivered message(s) were not yet acked; %s", unsettled,
                        _redelivered(stream))
        self._forget_session()
        if not self.config.reconnect:
            raise Stop(self._stop_now(EXIT_BROKER))
        now = time.monotonic()
        if now - self.session_opened_at >= STABLE_SESSION or self.outage_started is None:
            self.outage_started = now
            self.reconnect_delay = RECONNECT_FIRST_DELAY
        self._reconnect()

    def _reconnect(self) -> None:
        """Back off exponentially with full jitter until a session opens; signals still work.

        The backoff and the give-up clock carry over from the last loss unless
        the session in between stayed up for STABLE_SESSION seconds.
        """
        assert self.outage_started is not None
        lost_at = time.monotonic()
        give_up = self.config.reconnect_give_up_after
        attempt = 0
        while True:
            wait = random.uniform(self.reconnect_delay / 2, self.reconnect_delay)
            if give_up is not None and time.monotonic() + wait - self.outage_started > give_up:
                log.error("could not reconnect within reconnect_give_up_after (%gs); exiting",
                          give_up)
                raise Stop(self._stop_now(EXIT_BROKER))
            self._wait_handling_signals(wait)
            self.reconnect_delay = min(self.reconnect_delay * 2, RECONNECT_MAX_DELAY)
            attempt += 1
            try:
                self._step(self._open_session, False)
            except BrokerError as exc:
                log.warning("reconnect attempt %d failed: %s", attempt, exc)
                self._close_connection()
                self._forget_session()
                continue
            self.reconnect_count[0] += 1
            log.info("reconnected after %.1fs (%d attempt(s))", time.monotonic() - lost_at,
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
        """Drain within drain_timeout, whatever the broker does; a signal stops at once."""
        self.stopping = True
        deadline = time.monotonic() + self.config.drain_timeout
        for pool in self.pools:
            pool.stopping.set()  # deliveries arriving from now on go straight back
        channels = list(self.channels.values())
        for channel in channels:
            channel.cancel()
        for pool in self.pools:
            pool.requeue_waiting()
        slots = [w for pool in self.pools for w in pool.stop_slots()]
        drained = gevent.spawn(_drain, slots, channels)
        drained.link(lambda _: self.events.put(("drained", None)))
        while True:
            try:
                kind, detail = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except gevent.queue.Empty:
                if all(slot.dead for slot in slots):
                    drained.kill()
                    log.warning("drain_timeout (%gs) ran out waiting for the broker to "
                                "confirm the consumers' cancel; closing: the broker takes "
                                "back whatever it still delivers", self.config.drain_timeout)
                    break
                busy = sum(pool.busy for pool in self.pools)
                log.error("drain_timeout (%gs) ran out with %d message(s) still in consume "
                          "(or waiting for a publisher confirm); "
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
            if kind == "channel_closed" and self.channels.get(detail[0]) is detail[1]:
                self._drop_channel(detail[0])
        paused = [channel for channel in self.circuits.values() if channel is not None]
        for channel in [*self.channels.values(), *paused]:
            channel.acker.flush()
        return self._finish(EXIT_OK)

    def _stop_now(self, status: int) -> int:
        self.stopping = True
        paused = [channel for channel in self.circuits.values() if channel is not None]
        for channel in [*self.channels.values(), *paused]:
            channel.acker.flush()  # what consume finished is acked, not handled again
            channel.acker.close()
        for pool in self.pools:
            pool.stopping.set()
        slots = [w for pool in self.pools for w in pool.slots]
        gevent.killall(slots, StopNow, block=True, timeout=KILL_TIMEOUT)
        return self._finish(status)

    def _shutdown_instances(self) -> None:
        for pool in self.pools:
            pool.shutdown_instances()
        middleware, self.middleware = self.middleware, None
        if middleware is not None:
            middleware.stop()

    def _close_connections(self) -> None:
        """Close the consuming and the publishing connection side by side (the drain is
        over: no publish is in flight), waiting at most CLOSE_TIMEOUT for the broker."""
        publishing = gevent.spawn(self.publishing.close)
        self._close_connection()
        publishing.join(timeout=CLOSE_TIMEOUT)

    def _close_connection(self) -> None:
        """Close the consuming connection, waiting at most CLOSE_TIMEOUT for the broker."""
        connection, self.connection = self.connection, None
        close_connection(connection, CLOSE_TIMEOUT)

"""``blocking_warning``: finding code that blocks the gevent hub.

Everything in a dispatcher process runs on one OS thread, taking turns on gevent's
hub: the slots' ``consume`` calls, pika's I/O (heartbeats, acks, deliveries), the
HTTP endpoint. Code that does not yield (``time.sleep``, a driver gevent has not
patched, a long CPU loop) holds all of them for as long as it runs; past the
heartbeat timeout the broker closes the connection and redelivers every unacked
message, to be handled twice.

Two parts, both cheap:

- gevent's own monitor thread (``gevent.config.monitor_thread``), which checks
  every ``max_blocking_time`` whether the hub has switched greenlets since, and
  notifies ``gevent.events.EventLoopBlocked`` with the greenlet that holds it. Its
  ``max_blocking_time`` is half the threshold, so that a block of the threshold
  is seen however the checks fall; the handler here (in the monitor thread,
  while the block goes on) logs one WARNING naming the consumer entry whose
  ``consume`` runs in that greenlet, with the stack the hub's thread is in, at
  most one a minute (RATE_LIMIT; the next says how many were left out).
- a timer on the hub every TICK seconds, which sees how late it runs: a block
  of ``threshold`` seconds or more is added to
  ``amqp_dispatcher_hub_blocked_seconds_total`` when the hub runs again.

A block is reported only once the timer has been late by the threshold: the
WARNING and the counter agree on what a block is (the counter has every block
logged, and may have a few more, of between the threshold and the threshold
and a half, that ended before a check saw them).
"""

from __future__ import annotations

import logging
import sys
import traceback
import warnings
from collections.abc import Callable, Iterable, MutableSequence, Sequence
from time import perf_counter
from typing import Any, Protocol

import gevent
import gevent.events

log = logging.getLogger("amqp-dispatcher")

# At most one WARNING per RATE_LIMIT seconds: a consumer that blocks on every message
# would otherwise log one per message.
RATE_LIMIT = 60.0
# How often the hub's timer runs (at most; a tenth of the threshold if less). Its
# lateness measures a block to within this.
MAX_TICK = 0.1


class WatchedPool(Protocol):
    """One consumer entry, as seen here (consuming.pool.ConsumerPool)."""

    @property
    def entry(self) -> Any: ...  # config.ConsumerConfig
    @property
    def slots(self) -> Sequence[Any]: ...  # its slot greenlets


class BlockedHub:
    """Watches the process's hub. ``pools()``: the consumer entries of every generation
    running (a reload's new and draining ones included), to name whose ``consume``
    blocks."""

    def __init__(self, threshold: float, pools: Callable[[], Iterable[WatchedPool]]) -> None:
        self.threshold = threshold
        self.pools = pools
        # amqp_dispatcher_hub_blocked_seconds_total: a list, or a view of the worker's
        # count file (runtime/counts.py).
        self.blocked_seconds: MutableSequence[float] = [0.0]
        self.blocks = 0  # blocks of threshold or more, seen by the timer
        self.tick = 0.0
        self.last_tick = perf_counter()
        self.timer: Any = None
        self.hub: Any = None
        self.started_monitor = False
        self.gevent_config: tuple[float, bool] = (0.1, True)  # as start found them
        self.reported = -1.0  # the last_tick of the block last reported (one line a block)
        self.last_warning = -RATE_LIMIT
        self.unlogged = 0  # blocks reported since the last WARNING, not logged

    @property
    def seconds(self) -> float:
        return self.blocked_seconds[0]

    def start(self) -> None:
        if self.threshold <= 0 or self.timer is not None:
            return
        self.hub = gevent.get_hub()
        self.tick = min(MAX_TICK, self.threshold / 10)
        self.last_tick = perf_counter()
        self.timer = self.hub.loop.timer(self.tick, self.tick)
        self.timer.ref = False  # keeps nothing running
        self.timer.start(self._on_tick)
        config = gevent.config
        self.gevent_config = (config.max_blocking_time, config.print_blocking_reports)
        config.max_blocking_time = self.threshold / 2
        config.print_blocking_reports = False  # the WARNING says it, in the log
        if self.hub.periodic_monitoring_thread is None:
            config.monitor_thread = True
            with warnings.catch_warnings():  # "Unable to monitor memory usage": not asked
                warnings.simplefilter("ignore")
                self.hub.start_periodic_monitoring_thread()
            self.started_monitor = True
        gevent.events.subscribers.append(self._on_event)

    def stop(self) -> None:
        if self.timer is None:
            return
        self.timer.stop()
        self.timer = None
        if self._on_event in gevent.events.subscribers:
            gevent.events.subscribers.remove(self._on_event)
        monitor = self.hub.periodic_monitoring_thread
        if self.started_monitor and monitor is not None:
            monitor.kill()  # in the hub's thread, as it must be (it removes its tracer)
            self.hub.periodic_monitoring_thread = None
            gevent.config.monitor_thread = False
        self.started_monitor = False
        gevent.config.max_blocking_time, gevent.config.print_blocking_reports = \
            self.gevent_config

    def reconfigure(self, threshold: float) -> None:
        """A reload's blocking_warning."""
        if threshold != self.threshold:
            self.stop()
            self.threshold = threshold
            self.start()

    # -- in the hub's thread ---------------------------------------------------------

    def _on_tick(self) -> None:
        now = perf_counter()
        late = now - self.last_tick - self.tick
        self.last_tick = now
        if late >= self.threshold:
            self.blocked_seconds[0] += late
            self.blocks += 1

    # -- in gevent's monitor thread, while the hub is blocked ------------------------

    def _on_event(self, event: object) -> None:
        if not isinstance(event, gevent.events.EventLoopBlocked) or self.timer is None:
            return
        since = self.last_tick
        now = perf_counter()
        blocked = now - since - self.tick  # at least this long
        if blocked < self.threshold or since == self.reported:
            return
        self.reported = since
        if now - self.last_warning < RATE_LIMIT:
            self.unlogged += 1
            return
        self.last_warning = now
        unlogged, self.unlogged = self.unlogged, 0
        frame = sys._current_frames().get(self.hub.thread_ident)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "(unknown)\n"
        more = (f" ({unlogged} more block(s) since the last such line were not logged)"
                if unlogged else "")
        log.warning("the gevent hub has been blocked for %.1fs by %s: heartbeats, acks and "
                    "every other consume call of this process wait until it yields "
                    "(blocking_warning: %gs)%s; the stack of the blocking code:\n%s",
                    blocked, self._who(event.greenlet), self.threshold, more,
                    stack.rstrip("\n"))

    def _who(self, greenlet: Any) -> str:
        """The consumer entry whose consume runs in ``greenlet``, or what the greenlet is."""
        try:
            for pool in list(self.pools()):
                if any(slot is greenlet for slot in pool.slots):
                    entry = pool.entry
                    return f"{entry.path}'s consume ({entry.consumer}, queue {entry.queue})"
        except RuntimeError:  # a list changed size in the hub's thread meanwhile
            pass
        name = getattr(greenlet, "name", None) or repr(greenlet)
        return f"code that is not a consume call (greenlet {name})"

"""``--exit-when-drained SECONDS``: stop gracefully once the work is done.

The work is done when, for SECONDS without a break:

- every consumer's queue has no message ready, and neither has any delay queue of
  its retry policy (``<queue>.retry.<ms>ms``: a message waiting for its retry is
  not done); a consumer's queue that is missing is not empty (its entry is being
  repaired), a missing delay queue holds nothing;
- no delivery is in this process: none waits for a worker, none is in
  ``consume`` or with the failure policy, none is settled but not yet acked;
- the dispatcher is connected and every entry consumes: while disconnected or
  repairing, nothing is known, so the work is never done.

DrainWatch samples this every min(1 s, SECONDS / 4), asking the broker on a
channel of its own (a passive ``queue.declare`` answers with the number of
messages ready) between two looks at the pools; then it calls ``on_drained``,
which stops the dispatcher as SIGTERM does. A message that arrives and is
handled entirely between two samples goes unseen: the stretch is then measured
from a sample before it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import gevent

from .broker import BrokerError, SyncChannel
from .dispatcher import Dispatcher
from .retry import delay_queue_name

log = logging.getLogger("amqp-dispatcher")

MAX_INTERVAL = 1.0
MIN_INTERVAL = 0.05  # for SECONDS 0: stop at the first sample that finds the work done


class DrainWatch:
    def __init__(self, dispatcher: Dispatcher, seconds: float,
                 on_drained: Callable[[], None]) -> None:
        self.dispatcher = dispatcher
        self.seconds = seconds
        self.interval = max(MIN_INTERVAL, min(MAX_INTERVAL, seconds / 4))
        self.on_drained = on_drained
        consumers = dispatcher.config.consumers
        self.queues = list(dict.fromkeys(entry.queue for entry in consumers))
        self.delay_queues = list(dict.fromkeys(
            delay_queue_name(entry.queue, ms)
            for entry in consumers if entry.retry for ms in entry.retry.delays_ms()))
        self._sync: SyncChannel | None = None
        self._connection: Any = None

    def run(self) -> None:
        """The watching greenlet's body: returns once it has called ``on_drained``."""
        idle_since: float | None = None
        try:
            while True:
                gevent.sleep(self.interval)
                if not self._done():
                    idle_since = None
                    continue
                now = time.monotonic()
                if idle_since is None:
                    idle_since = now
                if now - idle_since >= self.seconds:
                    log.info("exit-when-drained: the consumers' queues have been empty with "
                             "nothing in flight for %gs; stopping as on SIGTERM", self.seconds)
                    self.on_drained()
                    return
        finally:
            self._close()

    def _done(self) -> bool:
        # The pools before and after asking the broker: a message ready when asked may
        # have been delivered to this process by the time the answer comes.
        if not self._idle():
            return False
        try:
            if any(self._ready(name) != 0 for name in self.queues):
                return False
            if any(self._ready(name) for name in self.delay_queues):
                return False
        except BrokerError:
            self._close()  # the connection's trouble: the dispatcher deals with it
            return False
        return self._idle()

    def _idle(self) -> bool:
        """Connected, every entry consuming, and no delivery in this process."""
        dispatcher = self.dispatcher
        connection = dispatcher.connection
        if connection is None or not connection.is_open or dispatcher.broken \
                or len(dispatcher.channels) != len(dispatcher.pools):
            return False
        if any(pool.stopping.is_set() or pool.busy or pool.work.qsize()
               for pool in dispatcher.pools):
            return False
        return not any(channel.acker.unsettled() for channel in dispatcher.channels.values())

    def _ready(self, queue: str) -> int | None:
        """Messages ready in the queue; None if it does not exist."""
        connection = self.dispatcher.connection
        if self._sync is None or self._sync.close_reason is not None \
                or self._connection is not connection:
            self._close()
            self._sync = SyncChannel.open(connection)
            self._connection = connection
        sync = self._sync
        try:
            declare_ok = sync.call(sync.channel.queue_declare, queue=queue, passive=True)
        except BrokerError as exc:
            if exc.refused:  # 404: the broker closed this channel; the next call opens one
                return None
            raise
        return int(declare_ok.method.message_count)

    def _close(self) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None

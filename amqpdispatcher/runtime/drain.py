"""``--exit-when-drained SECONDS``: stop gracefully once the work is done.

The work is done when, for SECONDS without a break:

- every consumer's queue has no message ready, and neither has any delay queue of
  its retry policy (``<queue>.retry.quorum.<ms>ms``, and the classic
  ``<queue>.retry.<ms>ms`` of earlier versions while one is left: a message
  waiting for its retry is not done); a consumer's queue that is missing is not
  empty (its entry is being repaired), a missing delay queue holds nothing;
- no delivery is in this process: none waits for a slot, none is in
  ``consume`` or with the failure policy, none is settled but not yet acked;
- the dispatcher is connected and every entry consumes: while disconnected or
  repairing, nothing is known, so the work is never done; nor while a SIGHUP
  reload is in progress (a new generation starting, a replaced one draining).

DrainWatch follows the process's current generation (generations.py's
Generations), whose config says which queues to look at. It samples every
min(1 s, SECONDS / 4), asking the broker on a channel of its own (a passive
``queue.declare`` answers with the number of messages ready) between two looks
at the pools; then it calls ``Generations.stop``, the graceful stop of SIGTERM.
A message that arrives and is handled entirely between two samples goes
unseen: the stretch is then measured from a sample before it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import gevent

from ..amqp.channel import SyncChannel
from ..amqp.errors import BrokerError
from ..config import Config
from ..config.retry import delay_queue_names, legacy_delay_queue_name
from .generation import Generation
from .generations import Generations

log = logging.getLogger("amqp-dispatcher")

MAX_INTERVAL = 1.0
MIN_INTERVAL = 0.05  # for SECONDS 0: stop at the first sample that finds the work done


def watched_queues(config: Config) -> tuple[list[str], list[str], list[str]]:
    """The consumers' queues, the delay queues of their retry policies, and the classic
    delay queues earlier versions declared for the same delays."""
    consumers = config.consumers
    queues = list(dict.fromkeys(entry.queue for entry in consumers))
    delay_queues = list(dict.fromkeys(
        name for entry in consumers for name in delay_queue_names(entry)))
    legacy = list(dict.fromkeys(
        legacy_delay_queue_name(entry.queue, ms)
        for entry in consumers if entry.retry for ms in entry.retry.delays_ms()))
    return queues, delay_queues, legacy


class DrainWatch:
    def __init__(self, generations: Generations, seconds: float) -> None:
        self.generations = generations
        self.seconds = seconds
        self.interval = max(MIN_INTERVAL, min(MAX_INTERVAL, seconds / 4))
        self._sync: SyncChannel | None = None
        self._connection: Any = None
        # Earlier versions' delay queues found missing: nothing declares them any more,
        # so they are not asked about again (each ask about a missing queue costs a
        # channel, which the broker closes).
        self._legacy_gone: set[str] = set()

    def run(self) -> None:
        """The watching greenlet's body: returns once it has stopped the process."""
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
                    self.generations.stop()
                    return
        finally:
            self._close()

    def _done(self) -> bool:
        # The pools before and after asking the broker: a message ready when asked may
        # have been delivered to this process by the time the answer comes.
        dispatcher = self.generations.settled()
        if dispatcher is None or not _idle(dispatcher):
            return False
        queues, delay_queues, legacy = watched_queues(dispatcher.config)
        try:
            if any(self._ready(dispatcher, name) != 0 for name in queues):
                return False
            if any(self._ready(dispatcher, name) for name in delay_queues):
                return False
            for name in legacy:
                if name not in self._legacy_gone:
                    ready = self._ready(dispatcher, name)
                    if ready:
                        return False
                    if ready is None:
                        self._legacy_gone.add(name)
        except BrokerError:
            self._close()  # the connection's trouble: the dispatcher deals with it
            return False
        return self.generations.settled() is dispatcher and _idle(dispatcher)

    def _ready(self, dispatcher: Generation, queue: str) -> int | None:
        """Messages ready in the queue; None if it does not exist."""
        connection = dispatcher.connection
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


def _idle(dispatcher: Generation) -> bool:
    """Connected, every entry consuming, and no delivery in this generation."""
    connection = dispatcher.connection
    if connection is None or not connection.is_open or dispatcher.broken \
            or dispatcher.stopping or len(dispatcher.channels) != len(dispatcher.pools):
        return False
    if any(pool.stopping.is_set() or pool.busy or pool.work.qsize()
           for pool in dispatcher.pools):
        return False
    return not any(channel.acker.unsettled() for channel in dispatcher.channels.values())

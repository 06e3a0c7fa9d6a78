"""Per-channel acknowledgement: the one place frames that settle a delivery are sent.

Acks are coalesced, but a settled delivery never waits behind an unsettled one.
At the end of the current hub loop iteration (or at once when half the
prefetch is waiting), the acks collected since the last flush are sent:

- those below the oldest delivery still in ``consume`` go in one
  ``basic.ack multiple=True`` up to the highest of them;
- those above it (completed while a slower delivery is still running) are
  acked one by one, at once. Holding them back would keep the prefetch window
  full and the broker would stop delivering to every instance of the entry
  until the slow one finished (a head-of-line stall).

Nacks and rejects are sent at once; on a stream, which takes neither (RabbitMQ
closes the connection over them) and keeps every message anyway, they are acks.
A multiple ack only ever covers tags the broker still holds as unacknowledged,
so tags already rejected or acked singly below it are untouched.

When the channel is gone (connection lost, channel closed), the tags mean
nothing on any other channel: settling is a no-op and the broker redelivers.
pika's errors for a channel that closed under us end up the same way; they
never reach the slot greenlet that settles.

Each delivery's outcome is counted here (outcomes.OUTCOMES), as its frame is
sent: plain acks once per flush, the rest one by one; a settle that cannot be
sent counts as ``dropped`` instead.
"""

from __future__ import annotations

import logging
from collections.abc import MutableSequence
from typing import Any

import gevent
import pika.exceptions

from .outcomes import ACK, DROPPED, REJECT, REQUEUE

log = logging.getLogger("amqp-dispatcher.acks")


class Acknowledger:
    __slots__ = ("channel", "open", "stream", "outcomes", "_unsettled", "_to_ack",
                 "_flush_at", "_scheduled", "_loop")

    def __init__(self, channel: Any, prefetch_count: int, outcomes: MutableSequence[int],
                 stream: bool = False) -> None:
        self.channel = channel
        self.open = True
        self.stream = stream
        self.outcomes = outcomes  # the entry's EntryMetrics.outcomes
        # Delivered and not yet settled by the consumer; at most prefetch_count of them.
        self._unsettled: set[int] = set()
        self._to_ack: list[int] = []  # settled with an ack since the last flush
        # Flush before the broker runs out of prefetch credit, so it keeps sending.
        self._flush_at = max(1, prefetch_count // 2)
        self._scheduled = False
        self._loop = gevent.get_hub().loop

    def delivered(self, tag: int) -> None:
        self._unsettled.add(tag)

    def ack(self, tag: int) -> None:
        if not self.open:
            self.outcomes[DROPPED] += 1
            return
        self._unsettled.discard(tag)
        self._to_ack.append(tag)
        if len(self._to_ack) >= self._flush_at:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self._loop.run_callback(self.flush)

    def reject(self, tag: int, requeue: bool) -> None:
        if self.stream:  # a stream cannot requeue or drop: a reject is an ack there
            self.ack(tag)
            return
        self._send_now(self.channel.basic_reject, tag, REQUEUE if requeue else REJECT,
                       requeue=requeue)

    def ack_now(self, tag: int, outcome: int) -> None:
        """Ack at once, counted as ``outcome``: the failure policy's ack of a message it
        moved to a delay or dead-letter queue (outcomes.RETRY, outcomes.DEAD_LETTER)."""
        self._send_now(self.channel.basic_ack, tag, outcome)

    def drop(self) -> None:
        """A delivery of this closed channel that will never be settled: count it."""
        self.outcomes[DROPPED] += 1

    def _send_now(self, send: Any, tag: int, outcome: int, **kwargs: Any) -> None:
        if not self.open:
            self.outcomes[DROPPED] += 1
            return
        self._unsettled.discard(tag)
        try:
            send(delivery_tag=tag, **kwargs)
        except pika.exceptions.AMQPError:
            self._channel_gone()
            self.outcomes[DROPPED] += 1
            return
        self.outcomes[outcome] += 1

    def flush(self) -> None:
        self._scheduled = False
        if not self.open or not self._to_ack:
            return
        to_ack, self._to_ack = self._to_ack, []
        oldest = min(self._unsettled) if self._unsettled else None
        highest = max(to_ack)
        try:
            if oldest is None or highest < oldest:  # the common case: no gap
                self.channel.basic_ack(delivery_tag=highest, multiple=True)
            else:
                below = [tag for tag in to_ack if tag < oldest]
                if below:
                    self.channel.basic_ack(delivery_tag=max(below), multiple=True)
                for tag in to_ack:
                    if tag > oldest:
                        self.channel.basic_ack(delivery_tag=tag)
        except pika.exceptions.AMQPError:
            # Nothing was sent: pika refuses the frames of a closed channel, and it
            # cannot close between these calls (nothing here yields).
            self._channel_gone()
            self.outcomes[DROPPED] += len(to_ack)
            return
        self.outcomes[ACK] += len(to_ack)

    def unsettled(self) -> int:
        """Deliveries the broker still holds as unacknowledged on this channel."""
        return len(self._unsettled) + len(self._to_ack)

    def _channel_gone(self) -> None:
        # pika closed the channel before the main loop heard of it; the close
        # event is on its way and will log the count.
        self.open = False

    def close(self) -> None:
        """The channel is gone: its delivery tags can no longer be settled."""
        self.open = False
        lost = self.unsettled()
        self.outcomes[DROPPED] += len(self._to_ack)  # acked by the consumer, never sent
        self._unsettled.clear()
        self._to_ack.clear()
        if lost:
            log.warning("%d unsettled deliveries left with the closed channel; "
                        "the broker will redeliver them", lost)

"""Per-channel acknowledgement: the one place frames that settle a delivery are sent.

Acks are coalesced: a completed delivery is acked with ``multiple=True`` over
the contiguous prefix of settled delivery tags, in a callback at the end of the
current hub loop iteration (or at once when enough are pending). Nacks and
rejects are sent at once and never folded into a multiple ack: a multiple ack
only covers tags the broker still holds as unacknowledged, and a rejected tag
is no longer one of them, so an ack up to N after a reject of M < N leaves M
rejected.

When the channel is gone (connection lost, channel closed), the tags mean
nothing on any other channel: settling is a no-op and the broker redelivers.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import gevent

log = logging.getLogger("amqp-dispatcher.acks")


class Acknowledger:
    __slots__ = ("channel", "open", "_outstanding", "_settled", "_flush_at",
                 "_pending", "_scheduled", "_loop")

    def __init__(self, channel: Any, prefetch_count: int) -> None:
        self.channel = channel
        self.open = True
        self._outstanding: deque[int] = deque()  # tags in delivery order, unsettled first
        self._settled: dict[int, bool] = {}      # tag -> True (to ack) / False (rejected)
        self._pending = 0                        # settled acks not yet sent
        # Flush before the broker runs out of prefetch credit, so it keeps sending.
        self._flush_at = max(1, prefetch_count // 2)
        self._scheduled = False
        self._loop = gevent.get_hub().loop

    def delivered(self, tag: int) -> None:
        self._outstanding.append(tag)

    def ack(self, tag: int) -> None:
        if not self.open:
            return
        self._settled[tag] = True
        self._pending += 1
        if self._pending >= self._flush_at:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self._loop.run_callback(self.flush)

    def reject(self, tag: int, requeue: bool) -> None:
        if not self.open:
            return
        self.channel.basic_reject(delivery_tag=tag, requeue=requeue)
        self._settled[tag] = False
        if not self._scheduled:
            self._scheduled = True
            self._loop.run_callback(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self.open:
            return
        outstanding, settled = self._outstanding, self._settled
        ack_upto = 0
        while outstanding and outstanding[0] in settled:
            tag = outstanding.popleft()
            if settled.pop(tag):
                ack_upto = tag
        if ack_upto:
            # Acks completed past a gap (a slower delivery) stay pending.
            self._pending = sum(settled.values()) if settled else 0
            self.channel.basic_ack(delivery_tag=ack_upto, multiple=True)

    def unsettled(self) -> int:
        return len(self._outstanding)

    def close(self) -> None:
        """The channel is gone: its delivery tags can no longer be settled."""
        self.open = False
        lost = len(self._outstanding)
        self._outstanding.clear()
        self._settled.clear()
        if lost:
            log.warning("%d unsettled deliveries left with the closed channel; "
                        "the broker will redeliver them", lost)

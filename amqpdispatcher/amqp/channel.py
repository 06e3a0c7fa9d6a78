"""A channel whose requests block the calling greenlet until the broker answers, and
cancelling a consumer without pika's reject of what arrives before cancel-ok."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import gevent.lock
import pika
import pika.exceptions
import pika.spec

from .connection import (
    RPC_TIMEOUT,
    _channel_error,
    describe_close,
)
from .errors import (
    BrokerError,
    NoAnswer,
    NoFreeChannel,
)

log = logging.getLogger("amqp-dispatcher.connection")


class SyncChannel:
    """A pika channel whose RPCs block the calling greenlet until answered.

    Every failure comes out as BrokerError, with ``refused`` set when the broker
    closed the channel to refuse the request; pika's own exceptions never escape.
    Each wait lasts at most RPC_TIMEOUT, and ends at ``deadline`` (time.monotonic())
    if one is given: that of a publish, which waits so long in all.
    """

    def __init__(self, channel: Any, deadline: float | None = None) -> None:
        self.channel = channel
        self.deadline = deadline
        self.close_reason: Any = None
        self._waiting: gevent.event.AsyncResult | None = None
        channel.add_on_close_callback(self._on_close)

    @classmethod
    def open(cls, connection: Any, deadline: float | None = None) -> SyncChannel:
        result: gevent.event.AsyncResult = gevent.event.AsyncResult()
        try:
            sync = cls(connection.channel(on_open_callback=result.set), deadline)
        except pika.exceptions.NoFreeChannels:
            raise NoFreeChannel(f"cannot open a channel: the connection has the "
                                f"{connection.params.channel_max} the broker allows "
                                "(channel_max)") from None
        except pika.exceptions.AMQPError as exc:  # the connection closed meanwhile
            raise BrokerError(f"cannot open a channel: {describe_close(exc)}") from None
        sync._waiting = result
        sync._wait(result)
        return sync

    def _on_close(self, channel: Any, reason: Any) -> None:
        self.close_reason = reason
        if self._waiting is not None and not self._waiting.ready():
            self._waiting.set_exception(_channel_error(reason))

    def _wait(self, result: gevent.event.AsyncResult) -> Any:
        timeout = RPC_TIMEOUT
        if self.deadline is not None:
            timeout = max(0.0, min(timeout, self.deadline - time.monotonic()))
        try:
            return result.get(timeout=timeout)
        except BrokerError:
            raise  # the channel closed
        except BaseException as exc:
            # No answer in time, or something thrown into the waiting greenlet (a time
            # limit, a stop): the caller is gone and the answer may still come, so
            # close the channel now, or nothing ever would (the channel it was opening,
            # too: pika closes it as soon as it is open).
            self.close()
            if isinstance(exc, gevent.Timeout):
                raise NoAnswer(f"no answer from the broker within {timeout:.3g}s") from None
            raise
        finally:
            self._waiting = None

    def call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.close_reason is not None:
            raise _channel_error(self.close_reason)
        result: gevent.event.AsyncResult = gevent.event.AsyncResult()
        self._waiting = result
        try:
            method(*args, callback=result.set, **kwargs)
        except pika.exceptions.AMQPError as exc:  # the channel is closing
            self._waiting = None
            raise BrokerError(describe_close(exc)) from None
        return self._wait(result)

    def close(self) -> None:
        """Close without waiting; a channel already closing or closed is left alone."""
        if not (self.channel.is_closing or self.channel.is_closed):
            try:
                self.channel.close()
            except pika.exceptions.AMQPError:
                pass  # closed in the same read


def cancel_consumer(channel: Any, consumer_tag: str,
                    on_cancel_ok: Callable[[Any], None]) -> bool:
    """Send basic.cancel; the deliveries the broker sent before it took the cancel keep
    reaching the consumer's callback until the broker's cancel-ok, which then calls
    ``on_cancel_ok``. False if pika no longer knows the consumer (the broker cancelled
    it): no cancel-ok will come.

    pika itself rejects, with requeue, every delivery that arrives for a consumer it is
    cancelling (Channel._on_deliver checks the private set Channel._cancelled): on a
    stream RabbitMQ closes the whole connection over a reject (540 NOT_IMPLEMENTED),
    losing every other entry's acks with it, and on a queue the requeue goes uncounted.
    pika's API has no way to keep the callback until cancel-ok, so the tag is taken
    out of that set again: pika then passes those deliveries on, and forgets the consumer
    at cancel-ok as usual. (A channel closed before the cancel-ok sends a second,
    nowait, cancel, which the broker ignores.) tests/test_units.py pins this behaviour of
    pika."""
    if consumer_tag not in channel.consumer_tags:
        return False
    channel.basic_cancel(consumer_tag, callback=on_cancel_ok)
    channel._cancelled.discard(consumer_tag)
    return True



"""The exceptions of the AMQP glue: BrokerError for what the dispatcher asked of the
broker, and the public PublishError family for what ``amqp.publish`` raises into
``consume`` (also importable from ``amqpdispatcher`` and ``amqpdispatcher.publisher``)."""

from __future__ import annotations

from ..config import ExchangeConfig


class BrokerError(Exception):
    """The broker could not be reached, or did not do what was asked: one line.

    ``channel_only``: the broker closed the channel over this request; the
    connection, and whatever else uses it, is fine. ``refused``: moreover the
    broker refused the request itself (see REFUSAL_CODES). Anything else (the
    connection lost, no answer) is about the connection.
    """

    def __init__(self, message: str, refused: bool = False, channel_only: bool = False) -> None:
        super().__init__(message)
        self.refused = refused
        self.channel_only = channel_only or refused


class NoAnswer(BrokerError):
    """The broker did not answer within RPC_TIMEOUT, or by the caller's deadline."""


class NoFreeChannel(BrokerError):
    """The connection has as many channels open as the broker's channel_max allows."""


class TopologyError(BrokerError):
    """The broker refused an exchange, queue, binding or consumer that the config asks
    for. ``refused_type``: the exchange whose type the broker does not know, over which
    it closed the whole connection, not only the channel."""

    def __init__(self, message: str, refused_type: ExchangeConfig | None = None) -> None:
        super().__init__(message, refused=True)
        self.refused_type = refused_type
        self.channel_only = refused_type is None



class PublishError(Exception):
    """The broker did not take a published message, or it is not known that it did.

    Raised by ``amqp.publish`` into ``consume``, so the input message is handled
    as a failure (the entry's failure policy decides) and nothing is lost. Raised
    as such when the publishing channel or connection closed before the broker
    confirmed (a publish to a missing exchange closes the channel: 404), or the
    headers do not fit in a frame. After a close the message may still have
    reached a queue: a retry can duplicate it, never lose it.
    """



class PublishNacked(PublishError):
    """The broker answered ``basic.nack``: it did not take the message (for example,
    a queue with ``x-overflow: reject-publish`` is full)."""


class PublishReturned(PublishError):
    """Published with ``mandatory=True`` and routed to no queue: the broker returned it."""

    def __init__(self, message: str, reply_code: int, reply_text: str) -> None:
        super().__init__(message)
        self.reply_code = reply_code
        self.reply_text = reply_text


class PublishNoChannel(PublishError):
    """No channel could be opened for the publish: the publishing connection has as
    many as the broker's channel_max allows. Nothing was sent."""


class PublishTimeout(PublishError):
    """No answer within PUBLISH_TIMEOUT: no confirm, or no usable connection or channel
    (the broker blocked the connection, is unreachable, or keeps closing the channel)."""



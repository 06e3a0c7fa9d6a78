"""What ``consume(amqp, msg)`` receives: the message and the AMQP proxy."""

from __future__ import annotations

from typing import Any

from ..amqp.publishing import Publishers
from .acks import Acknowledger
from .failure import attempt_of

# The AMQP properties ``msg.properties`` holds when set (the harness records published
# messages' with them).
PROPERTY_NAMES = (
    "content_type", "content_encoding", "headers", "delivery_mode", "priority",
    "correlation_id", "reply_to", "expiration", "message_id", "timestamp", "type",
    "user_id", "app_id", "cluster_id",
)


class Message:
    """One delivery: ``body`` (bytes), ``delivery_info`` and ``properties`` (dicts), and
    ``attempt``: 1 on the first delivery, 2 on the first retry, ...

    These are built on first use: most consumers read only the body.
    """

    __slots__ = ("body", "_method", "_props", "_delivery_info", "_properties")

    def __init__(self, method: Any, props: Any, body: bytes) -> None:
        self.body = body
        self._method = method
        self._props = props
        self._delivery_info: dict[str, Any] | None = None
        self._properties: dict[str, Any] | None = None

    @property
    def delivery_info(self) -> dict[str, Any]:
        if self._delivery_info is None:
            m = self._method
            self._delivery_info = {
                "delivery_tag": m.delivery_tag,
                "redelivered": m.redelivered,
                "exchange": m.exchange,
                "routing_key": m.routing_key,
                "consumer_tag": m.consumer_tag,
            }
        return self._delivery_info

    @property
    def properties(self) -> dict[str, Any]:
        if self._properties is None:
            props = self._props
            self._properties = {
                name: value for name in PROPERTY_NAMES
                if (value := getattr(props, name, None)) is not None
            }
        return self._properties

    @property
    def attempt(self) -> int:
        return attempt_of(self._props)

    def __repr__(self) -> str:
        return f"<Message delivery_tag={self._method.delivery_tag} {len(self.body)} bytes>"


class AlreadyRespondedError(Exception):
    """The consumer settled a delivery that was already settled."""


class AMQPProxy:
    """The ``amqp`` argument of ``consume``: settle this delivery, or publish."""

    __slots__ = ("_acker", "_publisher", "tag", "_response", "_outcome")

    def __init__(self, acker: Acknowledger, publisher: Publishers, tag: int) -> None:
        self._acker = acker
        self._publisher = publisher
        self.tag = tag
        self._response: str | None = None
        # What the consumer's own answer made of the delivery (outcomes.py's names), or
        # None while it has not answered.
        self._outcome: str | None = None

    @property
    def has_responded_to_message(self) -> bool:
        return self._response is not None

    def _respond(self, how: str, outcome: str) -> None:
        if self._response is not None:
            raise AlreadyRespondedError(
                f"delivery tag {self.tag}: cannot {how}, it was already {self._response}"
            )
        self._response = {"ack": "acked", "nack": "nacked", "reject": "rejected"}[how]
        self._outcome = "ack" if self._acker.stream else outcome  # a stream only acks

    def ack(self) -> None:
        self._respond("ack", "ack")
        self._acker.ack(self.tag)

    def nack(self) -> None:
        """Negative acknowledgement: the broker requeues the message."""
        self._respond("nack", "requeue")
        self._acker.reject(self.tag, requeue=True)

    def reject(self, requeue: bool = True) -> None:
        self._respond("reject", "requeue" if requeue else "reject")
        if not requeue:
            self._response = "rejected without requeue"
        self._acker.reject(self.tag, requeue=requeue)

    def outcome(self) -> str | None:
        """The outcome of the delivery the consumer settled itself (outcomes.py's names;
        "dropped" if its channel is gone), or None while it has not."""
        if self._outcome is None:
            return None
        return self._outcome if self._acker.open else "dropped"

    def publish(self, exchange: str, routing_key: str, headers: dict[str, Any] | None,
                body: bytes | str, *, mandatory: bool = False, **properties: Any) -> None:
        """Publish on the process's publishing connection (0.4.3's four arguments, then
        optional AMQP properties by name: see amqp/arguments.py, PROPERTY_CHECKS).

        With publisher_confirms (the default) returns once the broker confirmed, and
        raises amqpdispatcher.PublishError (PublishNacked, PublishReturned with
        ``mandatory=True``, PublishTimeout) when it did not; bad arguments raise
        TypeError or ValueError. Either way, unless caught, the input message is
        handled as a failure.
        """
        publisher = self._publisher
        if publisher.tracer is None:
            publisher.publish_message(exchange, routing_key, headers, body, mandatory,
                                      properties)
            return
        from . import tracing  # a PRODUCER span, and its traceparent in the message
        with tracing.publish_span(publisher.tracer, exchange, routing_key, properties):
            if headers is None or isinstance(headers, dict):  # else the check says why
                headers = tracing.inject(dict(headers or {}))
            publisher.publish_message(exchange, routing_key, headers, body, mandatory,
                                      properties)

"""OpenTelemetry spans for consume calls and their publishes (docs/guides/tracing.md).

Only ``opentelemetry-api`` is a dependency: it does nothing until an SDK is configured,
by OpenTelemetry's launcher (``opentelemetry-instrument -- amqp-dispatcher ...``, with
the standard ``OTEL_*`` variables) or by the startup handler. ``tracer()`` is asked
once per consumer entry as it starts (after the startup handler ran): with no SDK it
answers None, and the pool, ``amqp.publish`` and the failure policy take their plain
paths, paying nothing per message.

With an SDK, each ``consume`` call is a CONSUMER span ("process QUEUE") continuing the
trace of the message's W3C ``traceparent``/``tracestate`` headers; its status is ERROR
with the exception recorded when consume raised or ran past its time limit, and
``amqp_dispatcher.outcome`` says what became of the message. Each ``amqp.publish`` is
a PRODUCER span ("send EXCHANGE"), a child of the consume span, and the published
message carries its ``traceparent``. A retry's or a dead letter's copy carries the
failed consume span's context, so the next attempt, and whoever reads the dead-letter
queue, continue the same trace. Names and attributes follow OpenTelemetry's messaging
semantic conventions for RabbitMQ.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind, Status, StatusCode

from ..config import ConsumerConfig, describe_exception

SYSTEM = "rabbitmq"
OUTCOME = "amqp_dispatcher.outcome"
ATTEMPT = "amqp_dispatcher.attempt"


def tracer() -> trace.Tracer | None:
    """The tracer to use, or None while no SDK is configured (the API's no-op)."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    try:
        version: str | None = metadata.version("amqp-dispatcher")
    except metadata.PackageNotFoundError:  # run from a checkout without installing
        version = None
    return provider.get_tracer("amqp-dispatcher", version)


class _HeaderGetter(Getter[Mapping[str, Any]]):
    """Reads W3C trace context from AMQP headers (pika gives str, or bytes when a value
    is not UTF-8)."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return list(carrier)


_GETTER = _HeaderGetter()


def extract(headers: Mapping[str, Any] | None) -> Context | None:
    """The trace context a message's headers carry (None: a new trace)."""
    if not headers:
        return None
    return propagate.extract(headers, getter=_GETTER)


def inject(headers: dict[str, Any]) -> dict[str, Any]:
    """``headers`` with the current span's ``traceparent`` (and ``tracestate``), which
    replace any the message had."""
    propagate.inject(headers)
    return headers


@contextmanager
def consume_span(tracer: trace.Tracer, entry: ConsumerConfig, method: Any,
                 properties: Any, attempt: int) -> Iterator[trace.Span]:
    """The span of one consume call, current while the call and its settling run."""
    attributes: dict[str, Any] = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": method.exchange,
        "messaging.destination.subscription.name": entry.queue,
        "messaging.rabbitmq.message.delivery_tag": method.delivery_tag,
        "messaging.consumer.group.name": entry.consumer,
        ATTEMPT: attempt,
    }
    if method.routing_key:
        attributes["messaging.rabbitmq.destination.routing_key"] = method.routing_key
    if properties.message_id:
        attributes["messaging.message.id"] = properties.message_id
    if properties.correlation_id:
        attributes["messaging.message.conversation_id"] = properties.correlation_id
    with tracer.start_as_current_span(
            f"process {entry.queue}", context=extract(properties.headers),
            kind=SpanKind.CONSUMER, attributes=attributes, record_exception=False,
            set_status_on_exception=False) as span:
        yield span


def settled(span: trace.Span, outcome: str, failure: BaseException | None) -> None:
    """What became of the message, and the failure if consume failed."""
    span.set_attribute(OUTCOME, outcome)
    if failure is not None:
        _failed(span, failure)


def _failed(span: trace.Span, exc: BaseException) -> None:
    """The span's status ERROR, with ``exc`` recorded as its exception event. The SDK's
    record_exception takes ``str(exc)``: user code's exception whose ``__str__`` raises
    gets the event without its message, rather than taking the slot's greenlet down."""
    try:
        span.record_exception(exc)
    except Exception:  # noqa: BLE001 - user code: an exception whose __str__ raises
        span.add_event("exception", {"exception.type": type(exc).__qualname__,
                                     "exception.message": describe_exception(exc)})
    span.set_attribute("error.type", type(exc).__qualname__)
    span.set_status(Status(StatusCode.ERROR, describe_exception(exc)))


@contextmanager
def publish_span(tracer: trace.Tracer, exchange: Any, routing_key: Any,
                 options: Mapping[str, Any]) -> Iterator[trace.Span]:
    """The span of one ``amqp.publish``; a failed publish (its exception propagates)
    sets the status to ERROR."""
    attributes: dict[str, Any] = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": exchange if isinstance(exchange, str) else "",
    }
    if isinstance(routing_key, str) and routing_key:
        attributes["messaging.rabbitmq.destination.routing_key"] = routing_key
    message_id = options.get("message_id")
    if isinstance(message_id, str):
        attributes["messaging.message.id"] = message_id
    name = f"send {exchange}" if isinstance(exchange, str) and exchange else "send amq.default"
    with tracer.start_as_current_span(name, kind=SpanKind.PRODUCER, attributes=attributes,
                                      record_exception=False,
                                      set_status_on_exception=False) as span:
        try:
            yield span
        except BaseException as exc:
            _failed(span, exc)
            raise

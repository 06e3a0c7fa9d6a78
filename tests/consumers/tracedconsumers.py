"""Consumers for tests/test_tracing.py, with an OpenTelemetry SDK that the startup
handler configures: spans go to the SDK's in-memory exporter, written to $SPANS_FILE
as JSON lines when the process exits."""

import atexit
import json
import os

import gevent
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from testconsumers import record

EXPORTER = InMemorySpanExporter()


def setup_tracing():
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(provider)
    atexit.register(_dump)


def _dump():
    with open(os.environ["SPANS_FILE"], "w") as handle:
        for span in EXPORTER.get_finished_spans():
            handle.write(json.dumps({
                "name": span.name,
                "kind": span.kind.name,
                "trace_id": f"{span.context.trace_id:032x}",
                "span_id": f"{span.context.span_id:016x}",
                "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
                "status": span.status.status_code.name,
                "attributes": dict(span.attributes),
                "events": [event.name for event in span.events],
            }) + "\n")


class Forwarder:
    def consume(self, amqp, msg):
        amqp.publish("", "traced.out", {"k": "v"}, msg.body)

    def shutdown(self, exception=None):
        pass


class Sink:
    def consume(self, amqp, msg):
        headers = msg.properties.get("headers") or {}
        record(f"sink:{msg.body.decode()}:{headers.get('k')}:{headers.get('traceparent')}")

    def shutdown(self, exception=None):
        pass


class Flaky:
    def consume(self, amqp, msg):
        if msg.attempt == 1:
            raise ValueError("first attempt fails")
        record(f"flaky:{msg.body.decode()}:{msg.attempt}")

    def shutdown(self, exception=None):
        pass


class Poison:
    def consume(self, amqp, msg):
        raise ValueError("always fails")

    def shutdown(self, exception=None):
        pass


class _BadStr(Exception):
    def __str__(self):
        raise RuntimeError("__str__ of this exception raises")


class BadStr:
    """Raises an exception whose __str__ raises for a body 'bad-str'; records the rest."""

    def consume(self, amqp, msg):
        if msg.body == b"bad-str":
            raise _BadStr()
        record(f"badstr:{msg.body.decode()}")

    def shutdown(self, exception=None):
        pass


class Held:
    """Records each delivery, then holds it until the file $RELEASE_FILE exists."""

    def consume(self, amqp, msg):
        record(f"held:{msg.body.decode()}:{msg.delivery_info['redelivered']}")
        while not os.path.exists(os.environ["RELEASE_FILE"]):
            gevent.sleep(0.05)

    def shutdown(self, exception=None):
        pass

"""Consumers for tests/test_harness_equivalence.py, run by the daemon (a subprocess)
and by amqpdispatcher.testing.Harness. What they do depends on the message alone
(body, msg.attempt, redelivered), never on timing or on what came before, so both
must end with the same outcomes and the same messages left in every queue."""

import gevent

from amqpdispatcher import PublishReturned


class Orders:
    """Bodies 'KIND:REGION:N'. order: publish an invoice to billing, routing key
    invoice.REGION, mandatory; a region nobody bound falls back to invoice.unknown.
    flaky: fails on attempt 1, then as order. poison: always fails. reject: rejected
    without requeue (the queue's dead-letter exchange takes it). nack: nacked when
    first delivered, then as order. strict: a mandatory publish to invoice.REGION,
    PublishReturned not caught. slow: sleeps (cooperatively) far past any time_limit."""

    def consume(self, amqp, msg):
        kind, region, _ = msg.body.decode().split(":")
        if kind == "flaky" and msg.attempt == 1:
            raise ValueError("flaky on its first attempt")
        if kind == "poison":
            raise ValueError("poison")
        if kind == "slow":
            gevent.sleep(600)
        if kind == "reject":
            amqp.reject(requeue=False)
            return
        if kind == "nack" and not msg.delivery_info["redelivered"]:
            amqp.nack()
            return
        if kind == "strict":
            amqp.publish("billing", f"invoice.{region}", None, msg.body, mandatory=True)
            return
        try:
            amqp.publish("billing", f"invoice.{region}", {"order": msg.body.decode()},
                         msg.body, mandatory=True, persistent=True)
        except PublishReturned:
            amqp.publish("billing", "invoice.unknown", None, msg.body, persistent=True)

    def shutdown(self, exception=None):
        pass


class Renderer:
    """Publishes 'rendered:BODY' to the fanout exchange audit."""

    def consume(self, amqp, msg):
        amqp.publish("audit", "", None, b"rendered:" + msg.body)

    def shutdown(self, exception=None):
        pass


class Misbehaves:
    """Bodies name a publish the daemon or the broker refuses; what it raised is
    published to the queue 'report' as 'KIND: TYPE: TEXT', and the message acked."""

    PUBLISHES = {
        "float": ("", "report", {"price": 9.99}),
        "huge": ("", "report", {"big": "x" * 200_000}),
        "cc-str": ("", "report", {"CC": "report"}),
        "internal": ("sealed", "", None),
        "missing": ("ghost", "", None),
        "amq": ("amq.nowhere", "", None),
        "mandatory": ("sealed-off", "nobody", None),
    }

    def consume(self, amqp, msg):
        kind = msg.body.decode()
        exchange, routing_key, headers = self.PUBLISHES[kind]
        try:
            amqp.publish(exchange, routing_key, headers, b"refused?", mandatory=True)
        except Exception as exc:  # noqa: BLE001 - what it raised is the point
            outcome = f"{type(exc).__name__}: {exc}"
        else:
            outcome = "published"
        amqp.publish("", "report", None, f"{kind}: {outcome}".encode())

    def shutdown(self, exception=None):
        pass

"""Testing examples/orders.py without a broker (docs/getting-started/testing.md).
The suite runs this file as a user would (tests/test_harness.py):
``pytest examples/test_orders.py``."""

import json

from amqpdispatcher.testing import Harness
from examples.orders import Orders


def order(id, country, total=10):
    return json.dumps({"id": id, "country": country, "total": total})


# One message, one consumer: no broker, no config.

def test_an_order_becomes_an_invoice():
    result = Harness.consume(Orders(), order(7, "fr", total=12))
    assert result.outcome == "ack"  # consume returned: the daemon acks
    [invoice] = result.published
    assert (invoice.exchange, invoice.routing_key) == ("billing", "invoice.fr")
    assert invoice.headers == {"order-id": 7}
    assert invoice.properties == {"content_type": "application/json", "delivery_mode": 2}
    assert json.loads(invoice.body) == {"order": 7, "total": 12}


def test_a_body_that_is_not_json_is_retried_then_dead_lettered():
    retry = {"max_attempts": 3, "delay": 1, "dead_letter_queue": "orders.failed"}
    result = Harness.consume(Orders(), b"not json", queue="orders", retry=retry)
    assert result.outcome == "retry"
    assert isinstance(result.exception, json.JSONDecodeError)
    assert result.moved.routing_key == "orders.retry.quorum.1000ms"
    result = Harness.consume(Orders(), b"not json", queue="orders", retry=retry, attempt=3)
    assert result.outcome == "dead_letter"
    assert result.moved.routing_key == "orders.failed"
    assert result.moved.headers["x-amqp-dispatcher-exception-type"] == "JSONDecodeError"


# The whole config, in memory: the amqp_harness fixture comes with the package.

def test_the_config_routes_retries_and_dead_letters(amqp_harness):
    h = amqp_harness("orders.yml")  # next to this file
    h.publish("shop", "order.new", order(1, "fr"))
    h.publish("shop", "order.new", order(2, "jp"))  # no queue for jp: invoice.other
    h.publish("shop", "order.new", b"not json")
    h.publish("shop", "refund.new", order(3, "fr"))  # nobody bound refund.*: dropped
    h.run()
    assert [json.loads(body)["order"] for body in h.messages("invoices.fr")] == [1]
    assert [json.loads(body)["order"] for body in h.messages("invoices.other")] == [2]
    assert h.messages("orders.failed") == [b"not json"]
    assert h.outcomes("orders") == {"ack": 2, "requeue": 0, "reject": 0, "retry": 2,
                                    "dead_letter": 1}

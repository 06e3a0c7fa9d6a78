"""The worked example of docs/getting-started/testing.md: an order becomes an invoice.

Run by examples/orders.yml; tested, without a broker, by examples/test_orders.py.
"""

import json

from amqpdispatcher import PublishReturned


class Orders:
    def consume(self, amqp, msg):
        order = json.loads(msg.body)  # not JSON: raises, so the entry's retry policy decides
        invoice = json.dumps({"order": order["id"], "total": order["total"]})
        headers = {"order-id": order["id"]}
        try:
            amqp.publish("billing", f"invoice.{order['country']}", headers, invoice,
                         content_type="application/json", persistent=True, mandatory=True)
        except PublishReturned:  # no queue is bound for this country
            amqp.publish("billing", "invoice.other", headers, invoice,
                         content_type="application/json", persistent=True)

    def shutdown(self, exception=None):
        pass

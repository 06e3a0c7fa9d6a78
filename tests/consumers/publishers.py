"""Consumers that publish, for tests/test_publish.py.

Each call appends one JSON line to $RECORD_FILE:
``{"id": ..., "redelivered": ..., "outcome": "ok" or "ExceptionType: message"}``.
"""

import json
import os
import time

import gevent

RECORD_FILE = os.environ.get("RECORD_FILE", "/dev/null")
GATE_DIR = os.environ.get("GATE_DIR", "")


def record(**fields):
    with open(RECORD_FILE, "a") as handle:
        handle.write(json.dumps(fields, separators=(",", ":")) + "\n")


class Publisher:
    """The body is a JSON object saying what to do:

    ``{"id": "m1", "publish": [exchange, routing_key, headers, body], "options": {...},
    "once": true, "gate": "g1", "sleep": 0.1}``

    ``publish``: the four positional arguments of amqp.publish, ``options`` its keyword
    arguments; without ``publish`` nothing is published. ``once``: publish only on
    the first delivery of this id. ``gate``: first wait until a file of that name
    exists in $GATE_DIR.
    ``sleep``: then wait this long. ``at``: then wait until this time.time().
    ``raise_once``: on the first delivery of this id, raise ValueError instead of
    publishing. A publish that raises is recorded, and the exception goes on: the
    input message is a failure.
    """

    seen = set()

    def consume(self, amqp, msg):
        order = json.loads(msg.body)
        first = order["id"] not in Publisher.seen
        Publisher.seen.add(order["id"])
        redelivered = msg.delivery_info["redelivered"]
        if order.get("gate"):
            while not os.path.exists(os.path.join(GATE_DIR, order["gate"])):
                gevent.sleep(0.02)
        if order.get("sleep"):
            gevent.sleep(order["sleep"])
        if order.get("at"):
            gevent.sleep(max(0.0, order["at"] - time.time()))
        if order.get("raise_once") and first:
            record(id=order["id"], redelivered=redelivered, outcome="raised")
            raise ValueError(f"{order['id']} fails once")
        if "publish" in order and (first or not order.get("once")):
            started = time.monotonic()
            try:
                amqp.publish(*order["publish"], **order.get("options", {}))
            except Exception as exc:
                record(id=order["id"], redelivered=redelivered,
                       outcome=f"{type(exc).__name__}: {exc}",
                       seconds=round(time.monotonic() - started, 3))
                raise
        record(id=order["id"], redelivered=redelivered, outcome="ok")

    def shutdown(self, exception=None):
        pass

"""The quickstart's consumer (docs/getting-started/quickstart.md)."""

import json
import logging

log = logging.getLogger("greeter")


class Greeter:
    def __init__(self):
        # Called once per instance (consumer_count of them): open what consume needs here.
        self.greeted = 0

    def consume(self, amqp, msg):
        person = json.loads(msg.body)  # msg.body is bytes
        if "name" not in person:
            # Raising fails the message: the entry's retry policy takes it.
            raise ValueError(f"no name in {msg.body!r}")
        self.greeted += 1
        log.info("Hello, %s! (attempt %d)", person["name"], msg.attempt)
        # Returning acks the message.

    def shutdown(self, exception=None):
        # Called when the instance stops: at the end, or after consume raised
        # (exception is then what it raised, and a fresh instance replaces this one).
        log.info("greeter stopping after %d greeting(s)", self.greeted)

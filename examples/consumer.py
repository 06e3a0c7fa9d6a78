"""The seed page's example consumer, ported to Python 3."""

import random


class Consumer:
    def __init__(self):
        self.init_msg = "I've been initialized"

    def consume(self, amqp, msg):
        print("Consuming message", msg.body)
        val = random.random()
        if val > 0.8:
            print("publishing")
            amqp.publish("test_exchange", "test_routing_key", {}, "New body!")
        if val < 0.5:
            raise ValueError()
        print("Done sleeping")

    def shutdown(self, exception=None):
        print("Shut down")

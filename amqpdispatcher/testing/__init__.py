"""Testing consumers without a broker: ``Harness`` (see docs/testing.md).

    from amqpdispatcher.testing import Harness

    result = Harness.consume(MyConsumer(), b"body")       # one consumer, one message
    with Harness("config.yml") as h:                        # a whole config, in memory
        h.publish("notify", "job.mat", b"1")
        h.run()

The pytest plugin (``plugin.py``, registered as the ``amqp_dispatcher`` pytest11 entry
point) adds the ``amqp_harness`` fixture.
"""

from .harness import MAX_DELIVERIES, MAX_REDELIVERIES, Harness, HarnessError, Published, Result

__all__ = ["MAX_DELIVERIES", "MAX_REDELIVERIES", "Harness", "HarnessError", "Published",
           "Result"]

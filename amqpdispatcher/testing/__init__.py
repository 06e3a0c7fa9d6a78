"""Testing consumers without a broker: ``Harness`` (see docs/getting-started/testing.md).

    from amqpdispatcher.testing import Harness

    result = Harness.consume(MyConsumer(), b"body")       # one consumer, one message
    with Harness("config.yml") as h:                        # a whole config, in memory
        h.publish("notify", "job.mat", b"1")
        h.run()

The pytest plugin (``plugin.py``, registered as the ``amqp_dispatcher`` pytest11 entry
point) adds the ``amqp_harness`` fixture. pytest imports that plugin at every start,
in every project where amqp-dispatcher is installed, so the names here are imported
on first use: loading the plugin loads neither gevent nor pika, and a test suite that
monkey-patches with gevent in its conftest.py still does so first.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers see; at run time, __getattr__ below
    from .harness import MAX_DELIVERIES as MAX_DELIVERIES
    from .harness import MAX_REDELIVERIES as MAX_REDELIVERIES
    from .harness import Harness as Harness
    from .harness import HarnessError as HarnessError
    from .harness import Published as Published
    from .harness import Result as Result

__all__ = ["MAX_DELIVERIES", "MAX_REDELIVERIES", "Harness", "HarnessError", "Published",
           "Result"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import harness

        return getattr(harness, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Run amqp-dispatcher 0.11.0 on Python 3.10+: alias back what it imports."""

import collections
import collections.abc
import inspect
import sys

collections.Callable = collections.abc.Callable
if not hasattr(inspect, "getargspec"):
    inspect.getargspec = inspect.getfullargspec

from amqpdispatcher.runtime.generation import main  # noqa: E402

sys.exit(main())

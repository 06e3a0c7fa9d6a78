"""Run amqp-dispatcher 0.11.0 on Python 3.10+: alias back what it imports."""

import collections
import collections.abc
import inspect
import sys

collections.Callable = collections.abc.Callable
if not hasattr(inspect, "getargspec"):
    inspect.getargspec = inspect.getfullargspec

# 0.11.0's own module (its package, installed in bench/work/ad-0.11.0), not ours.
from amqpdispatcher.dispatcher import main  # noqa: E402

sys.exit(main())

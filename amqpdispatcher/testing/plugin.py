"""The pytest plugin of amqp-dispatcher, registered by setup.py as the ``pytest11``
entry point ``amqp_dispatcher``: installing the package makes its fixture available
to every test, with no conftest.py to write.

``amqp_harness``: a factory. ``amqp_harness(config, **keywords)`` returns a
``Harness`` for ``config`` (a path or a dict, as ``Dispatcher`` takes; a relative
path is looked up next to the test file first, then in the working directory;
``keywords``: ``existing_exchanges``, ``existing_queues``), closed (every
instance's ``shutdown(None)``) when the test ends. See docs/getting-started/testing.md.

Nothing of the harness is imported until a test asks for the fixture.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def amqp_harness(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """``amqp_harness(config, **keywords)``: an amqpdispatcher.testing.Harness for the
    config (a path or a dict), closed at the end of the test."""
    from .harness import Harness

    made: list[Harness] = []

    def make(config: Any, **keywords: Any) -> Harness:
        if isinstance(config, (str, os.PathLike)) and not os.path.isabs(config):
            beside = Path(request.path).parent / config
            if beside.exists():
                config = beside
        harness = Harness(config, **keywords)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()

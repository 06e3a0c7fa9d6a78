"""The markers tests/conftest.py sets: a test needing RabbitMQ is always marked broker,
so `pytest -m "not broker"` runs where RabbitMQ is not installed."""

from __future__ import annotations

import pytest
import rabbitnode
from conftest import BROKER_FIXTURES
from helpers import run_cli


def test_every_test_using_the_node_is_marked_broker(request: pytest.FixtureRequest) -> None:
    items = request.session.items
    assert items
    unmarked = [item.nodeid for item in items
                if set(getattr(item, "fixturenames", ())) & BROKER_FIXTURES
                and item.get_closest_marker("broker") is None]
    assert unmarked == []
    assert request.node.get_closest_marker("broker") is None
    assert request.node.get_closest_marker("process") is None


def test_the_check_before_a_node_starts_fails_an_unmarked_test(
        request: pytest.FixtureRequest) -> None:
    """What Broker.start calls first: in this test, not marked broker, it fails (this test
    names no node class, or tests/conftest.py would have marked it)."""
    assert request.node.get_closest_marker("broker") is None
    assert rabbitnode.guard is not None
    with pytest.raises(pytest.fail.Exception, match="needs the 'broker' marker"):
        rabbitnode.guard("broker")


def test_running_the_console_script_marks_the_test(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("process") is not None
    assert run_cli(request.config.rootpath, "--version").returncode == 0

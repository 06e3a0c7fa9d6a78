"""Fixtures: one private RabbitMQ node for the session, a fresh vhost per test."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# The package of the checkout these tests live in, whatever else is installed (the
# subprocess tests put the same directory on PYTHONPATH).
sys.path.insert(0, str(Path(__file__).parent.parent))
sys.path.insert(0, str(Path(__file__).parent))

from helpers import BrokerHandle  # noqa: E402
from rabbitnode import Broker  # noqa: E402


@pytest.fixture(scope="session")
def rabbit() -> Iterator[Broker]:
    node = Broker()
    node.start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
def broker(rabbit: Broker) -> Iterator[BrokerHandle]:
    """A fresh vhost on the session's node, so tests never see each other's queues."""
    vhost = f"t-{uuid.uuid4().hex[:8]}"
    rabbit.ctl("add_vhost", vhost)
    rabbit.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    handle = BrokerHandle(rabbit, vhost)
    try:
        yield handle
    finally:
        handle.close()
        rabbit.ctl("delete_vhost", vhost, check=False)

"""Fixtures: one private RabbitMQ node for the session, a fresh vhost per test."""

from __future__ import annotations

import os
import signal
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


# What a test leaves changed in this process reaches every later test, and the processes
# they start (an ignored signal and the environment are inherited through exec): a
# result would then depend on what ran before. The environment, the handlers of the
# signals the dispatcher uses and the signal mask are put back, and the test fails.
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1,
            signal.SIGUSR2, signal.SIGCHLD, signal.SIGPIPE)


@pytest.fixture(autouse=True)
def _process_state_given_back() -> Iterator[None]:
    handlers = {signum: signal.getsignal(signum) for signum in _SIGNALS}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    environ = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    yield
    changed = [f"the handler of {signal.Signals(signum).name}: {before!r} -> {now!r}"
               for signum, before in handlers.items()
               if (now := signal.getsignal(signum)) != before]
    if (now_mask := signal.pthread_sigmask(signal.SIG_SETMASK, mask)) != mask:
        changed.append(f"the signal mask: {sorted(mask)} -> {sorted(now_mask)}")
    for signum, before in handlers.items():
        if before is not None:
            signal.signal(signum, before)
    for key in {*environ, *os.environ} - {"PYTEST_CURRENT_TEST"}:
        if os.environ.get(key) != environ.get(key):
            changed.append(f"${key}: {environ.get(key)!r} -> {os.environ.get(key)!r}")
            if key in environ:
                os.environ[key] = environ[key]
            else:
                del os.environ[key]
    if changed:
        pytest.fail("left changed for the tests after it (put back): " + "; ".join(changed),
                    pytrace=False)

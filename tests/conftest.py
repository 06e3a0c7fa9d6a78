"""Fixtures: one private RabbitMQ node per session (per xdist worker), a vhost of its
own per test; and the markers, set here from what each test uses (README.md,
"Development"): ``broker`` on every test that needs RabbitMQ, ``process`` on every test
that starts the console script."""

from __future__ import annotations

import os
import signal
import sys
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# The package of the checkout these tests live in, whatever else is installed (the
# subprocess tests put the same directory on PYTHONPATH).
sys.path.insert(0, str(Path(__file__).parent.parent))
sys.path.insert(0, str(Path(__file__).parent))

import rabbitnode  # noqa: E402
from helpers import BrokerHandle  # noqa: E402
from rabbitnode import Broker  # noqa: E402

TESTS = Path(__file__).parent.resolve()

# Names that, referenced by a test or by a function or fixture it uses (in tests/),
# mean the marker: a node of its own, or the console script.
MARKER_NAMES = {
    "broker": {"Broker"},
    "process": {"run_cli", "DispatcherProcess", "SCRIPT"},
}
# Fixtures that need the session's node: these and any fixture that requests them.
BROKER_FIXTURES = {"rabbit", "broker"}


# -- markers --------------------------------------------------------------------------

def _names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _in_tests(func: Any) -> bool:
    code = getattr(func, "__code__", None)
    return code is not None and Path(code.co_filename).resolve().parent == TESTS


def _referenced(func: Any, seen: set[Any]) -> set[str]:
    """Every global name the function's code uses, and those of the functions and
    classes in tests/ that it names, transitively."""
    func = getattr(func, "__func__", func)
    if func in seen or not _in_tests(func):
        return set()
    seen.add(func)
    names = _names(func.__code__)
    found = set(names)
    for name in names:
        target = func.__globals__.get(name)
        if isinstance(target, type):
            for attr in vars(target).values():
                attr = getattr(attr, "__func__", attr)
                if _in_tests(attr):
                    found |= _referenced(attr, seen)
        elif callable(target):
            found |= _referenced(target, seen)
    return found


def _markers_of(item: pytest.Item) -> set[str]:
    wanted: set[str] = set()
    fixtureinfo = getattr(item, "_fixtureinfo", None)
    funcs: list[Any] = [getattr(item, "function", None)]
    if fixtureinfo is not None:
        closure = set(fixtureinfo.names_closure)
        if closure & BROKER_FIXTURES:
            wanted.add("broker")
        for defs in fixtureinfo.name2fixturedefs.values():
            funcs += [fixturedef.func for fixturedef in defs]
    seen: set[Any] = set()
    names: set[str] = set()
    for func in funcs:
        if func is not None:
            names |= _referenced(func, seen)
    for marker, markers_names in MARKER_NAMES.items():
        if names & markers_names:
            wanted.add(marker)
    return wanted


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        have = {mark.name for mark in item.iter_markers()}
        wanted = _markers_of(item)
        if "cluster" in have:
            wanted.add("broker")
        for marker in sorted(wanted - have):
            item.add_marker(marker)


# The check at run time, for what the names above miss (a helper outside tests/, a name
# reached another way): a test starting a node or the console script without the marker
# fails, so `pytest -m "not broker"` never needs RabbitMQ.
_running: list[pytest.Item] = []


def _guard(marker: str) -> None:
    if _running and _running[-1].get_closest_marker(marker) is None:
        pytest.fail(f"{_running[-1].nodeid} needs the {marker!r} marker (tests/conftest.py "
                    f"sets it from the names a test uses: add its helper to MARKER_NAMES, "
                    f"or mark the test)", pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    _running.append(item)
    rabbitnode.guard = _guard
    try:
        yield
    finally:
        _running.pop()


# -- the session's node and its vhosts --------------------------------------------------

class VhostPool:
    """Vhosts made a batch at a time, each given to one test only: no rabbitmqctl call
    per test, and no delete (the node is thrown away at the end of the session)."""

    BATCH = 16

    def __init__(self, node: Broker) -> None:
        self.node = node
        self.free: list[str] = []

    def take(self) -> str:
        if not self.free:
            batch = [f"t-{uuid.uuid4().hex[:8]}" for _ in range(self.BATCH)]
            self.node.add_vhosts(batch)
            self.free = batch
        return self.free.pop()


@pytest.fixture(scope="session")
def rabbit() -> Iterator[Broker]:
    """Started when the first test that needs it runs: never under -m "not broker"."""
    node = Broker()
    node.start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="session")
def _vhosts(rabbit: Broker) -> VhostPool:
    return VhostPool(rabbit)


@pytest.fixture
def broker(rabbit: Broker, _vhosts: VhostPool) -> Iterator[BrokerHandle]:
    """A vhost of this test's own on the session's node, so tests never see each other's
    queues."""
    handle = BrokerHandle(rabbit, _vhosts.take())
    try:
        yield handle
    finally:
        handle.close()


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

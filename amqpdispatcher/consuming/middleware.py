"""Middleware: code of the user's own around every consume (the top-level
``middleware:`` key; docs/guides/controls.md).

A middleware is a class, named ``module:Class`` in the config, instantiated once
per process (a SIGHUP reload, which imports the code afresh, makes new ones),
with any of the four hooks of ``Middleware``::

    from amqpdispatcher import Middleware

    class Timing(Middleware):
        def before_consume(self, entry, msg):
            ...
        def after_consume(self, entry, msg, outcome, exception):
            ...

Subclassing ``Middleware`` is optional (a class with any of the hooks will do) and
gives the type checker the signatures. The hooks are called in the order of the
list for ``on_start`` and ``before_consume``, in the reverse order for
``after_consume`` and ``on_stop``: the first middleware is the outermost.

- ``on_start(config)``: once the startup handler ran and the consumer instances
  are built, before connecting. Raising fails the start as a consumer
  constructor does (exit 5; a reload's new generation does not start).
- ``before_consume(entry, msg)``: before each consume, in the slot's greenlet.
  Raising fails the message through the normal failure path (the entry's
  ``retry:``), without calling ``consume``; later hooks are not called.
- ``after_consume(entry, msg, outcome, exception)``: once the delivery is
  settled: ``outcome`` as in ``amqp_dispatcher_messages_total`` (``ack``,
  ``requeue``, ``reject``, ``retry``, ``dead_letter``, ``dropped``),
  ``exception`` what ``consume`` or a ``before_consume`` raised, or None. An
  exception raised here is logged and changes nothing.
- ``on_stop()``: once the generation stopped (after every ``shutdown``); an
  exception is logged.

With no middleware configured, nothing here runs: a consumer pool takes its
plain path (pool.ConsumerPool.handle).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import gevent

from ..config import describe_exception

if TYPE_CHECKING:
    from ..config import Config, ConsumerConfig
    from .message import Message

log = logging.getLogger("amqp-dispatcher")

HOOKS = ("on_start", "before_consume", "after_consume", "on_stop")
# A hook that keeps raising is logged once with its traceback, then once per this many
# seconds with a count.
SUMMARY_INTERVAL = 10.0


class Middleware(Protocol):
    """The hooks a middleware may have (each optional; these do nothing)."""

    def on_start(self, config: Config) -> None:
        """Once per process, before connecting; raising fails the start."""
        return None

    def before_consume(self, entry: ConsumerConfig, msg: Message) -> None:
        """Before each consume; raising fails the message (its entry's retry policy)."""
        return None

    def after_consume(self, entry: ConsumerConfig, msg: Message, outcome: str,
                      exception: BaseException | None) -> None:
        """Once the delivery is settled; an exception here is logged, nothing more."""
        return None

    def on_stop(self) -> None:
        """Once the process (or a reload's previous generation) has stopped."""
        return None


def hooks_of(cls: type) -> list[str]:
    """The hooks a middleware class has (not the no-ops it inherits from Middleware)."""
    return [name for name in HOOKS
            if getattr(cls, name, None) is not None
            and getattr(cls, name) is not getattr(Middleware, name)]


class _Errors:
    """Log lines for a hook that raises: the first with its traceback, then one per
    SUMMARY_INTERVAL with a count."""

    def __init__(self) -> None:
        self.since: dict[str, tuple[float, int]] = {}

    def failed(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        since, count = self.since.get(what, (0.0, 0))
        if now - since < SUMMARY_INTERVAL:
            self.since[what] = (since, count + 1)
            return
        if count:
            log.error("%s raised %d more time(s) in the last %.0fs", what, count, now - since)
        log.error("%s raised %s (ignored: the outcome stands)", what, describe_exception(exc),
                  exc_info=(type(exc), exc, exc.__traceback__))
        self.since[what] = (now, 0)


class Middlewares:
    """A generation's middleware instances, their hooks in calling order."""

    def __init__(self, instances: Sequence[Any]) -> None:
        def hooks(name: str, order: Sequence[Any]) -> list[tuple[str, Callable[..., Any]]]:
            return [(f"{type(m).__module__}:{type(m).__qualname__}.{name}",
                     getattr(m, name)) for m in order if name in hooks_of(type(m))]

        self._start = hooks("on_start", instances)
        self._before = [hook for _, hook in hooks("before_consume", instances)]
        self._after = hooks("after_consume", list(reversed(instances)))
        self._stop = hooks("on_stop", list(reversed(instances)))
        self._errors = _Errors()

    def around_consume(self) -> bool:
        """Whether a consume has hooks around it (else the pool's plain path runs)."""
        return bool(self._before or self._after)

    def start(self, config: Config) -> None:
        """Every on_start, in order; an exception is raised to the caller."""
        for _, hook in self._start:
            hook(config)

    def before(self, entry: ConsumerConfig, msg: Message) -> None:
        for hook in self._before:
            hook(entry, msg)

    def after(self, entry: ConsumerConfig, msg: Message, outcome: str,
              exception: BaseException | None) -> None:
        for what, hook in self._after:
            try:
                hook(entry, msg, outcome, exception)
            except BaseException as exc:  # noqa: BLE001 - user code; never changes the outcome
                self._contain(what, exc)

    def stop(self) -> None:
        for what, hook in self._stop:
            try:
                hook()
            except BaseException as exc:  # noqa: BLE001 - user code
                self._contain(what, exc)

    def _contain(self, what: str, exc: BaseException) -> None:
        """Log what a hook raised, SystemExit included (user code never stops the
        process), but let a stop of the greenlet itself through."""
        from .pool import StopNow  # pool.py imports this module

        if isinstance(exc, (StopNow, gevent.GreenletExit)):
            raise exc
        self._errors.failed(what, exc)

"""One consumer entry: ``consumer_count`` slot greenlets, each owning one instance.

This module holds the answer to "what happens to a message after ``consume``
returns or raises": see ``ConsumerPool.handle``; after a failure it asks the
entry's failure policy (``failure.FailurePolicy``).

A slot greenlet lives as long as the process: every exception from user
code and from settling is contained in ``handle``, so the number of live
slots always equals ``consumer_count`` until the dispatcher stops them.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from time import perf_counter
from typing import Any

import gevent
import gevent.event
import gevent.queue

from ..amqp.publishing import Publisher, Publishers
from ..config import ConsumerConfig, describe_exception
from .acks import Acknowledger
from .breaker import CircuitBreaker
from .failure import FailurePolicy, TimeLimit, attempt_of
from .message import AMQPProxy, Message
from .middleware import Middlewares
from .outcomes import EntryMetrics, delivery_fields
from .ratelimit import RateLimiter

log = logging.getLogger("amqp-dispatcher")

REPLACE_FIRST_DELAY = 0.5
REPLACE_MAX_DELAY = 30.0


class StopNow(BaseException):
    """Thrown into a slot greenlet to stop it at once (fast stop). Never raised by user code."""


class ConsumerPool:
    def __init__(self, entry: ConsumerConfig, cls: type, publisher: Publisher,
                 policy_publisher: Publisher, timed: bool = False,
                 no_retry_for: tuple[type[BaseException], ...] = (),
                 rate: float | None = None) -> None:
        """``rate``: this process's share of the entry's rate_limit (ratelimit.py)."""
        self.entry = entry
        self.cls = cls
        # amqp.publish's channels: one per publish waiting for its confirm (Publishers).
        self.publisher = Publishers(publisher, entry.consumer_count)
        # timed: measure each consume call's duration (only when /metrics can show it).
        self.metrics = EntryMetrics(timed)
        # The policy's moves have a channel of their own: a consume's publish that gets
        # its channel closed must not fail a move the broker already routed (the input
        # would be requeued while its copy waits in the delay queue: handled twice).
        self.policy = FailurePolicy(entry, policy_publisher, no_retry_for)
        # Unbounded: the broker's prefetch_count is what bounds it.
        self.work: gevent.queue.Queue[Any] = gevent.queue.Queue()
        # One per slot; None while a failed instance is being replaced.
        self.instances: list[Any] = []
        self.slots: list[gevent.Greenlet] = []
        self.busy = 0  # consume calls running now
        self.stopping = gevent.event.Event()
        self.tracer: Any = None  # an OpenTelemetry tracer once an SDK is configured
        # circuit_breaker: decided from self.metrics, sampled off the consume path.
        self.breaker = (CircuitBreaker(entry.circuit_breaker, self.metrics)
                        if entry.circuit_breaker is not None else None)
        # Hooks around every consume (middleware.py), set before start(); None: none.
        self.middleware: Middlewares | None = None
        self.limiter = RateLimiter(rate, self.stopping) if rate else None

    def create_instances(self) -> None:
        """Construct every instance; a failure here is raised to the caller (start-up)."""
        for _ in range(self.entry.consumer_count):
            self.instances.append(self.cls())

    def start(self) -> None:
        if _tracing_configured():  # after the startup handler, which may configure it
            from . import tracing
            self.tracer = tracing.tracer()
            self.publisher.tracer = self.policy.moves.tracer = self.tracer
        work = self._work if self.limiter is None else self._work_limited
        self.slots = [gevent.spawn(work, slot) for slot in range(len(self.instances))]
        for slot, greenlet in enumerate(self.slots):  # named in SIGUSR1's stack dump
            greenlet.name = f"{self.entry.path} {self.entry.consumer} slot {slot}"

    def on_message(self, acker: Acknowledger) -> Callable[..., None]:
        """The basic_consume callback for one channel. Runs in the I/O loop: never blocks."""
        delivered = acker.delivered
        put = self.work.put_nowait
        stopping = self.stopping.is_set

        def on_message(channel: Any, method: Any, properties: Any, body: bytes) -> None:
            delivered(method.delivery_tag)
            # Sent before the broker took the stop's cancel: give it back at once (on a
            # stream, where a reject would close the connection, the Acknowledger acks).
            if stopping():
                acker.reject(method.delivery_tag, requeue=True)
                return
            put((acker, method, properties, body))

        return on_message

    def _work(self, slot: int) -> None:
        get = self.work.get
        handle = self._handler()
        limit = TimeLimit(self.entry.time_limit) if self.entry.time_limit else None
        breaker = self.breaker
        try:
            while True:
                item = get()
                if item is None:
                    return
                if breaker is not None and breaker.is_open:  # tripped before its pause
                    item[0].reject(item[1].delivery_tag, requeue=True)  # gave it back:
                    continue  # not started (a closed channel's is counted dropped)
                handle(slot, item, limit)
        except StopNow:
            return  # a fast stop: the broker redelivers what was not settled

    def _work_limited(self, slot: int) -> None:
        """_work, each delivery waiting for its start time (rate_limit); a stop gives
        back the one waiting."""
        get = self.work.get
        handle = self._handler()
        limit = TimeLimit(self.entry.time_limit) if self.entry.time_limit else None
        limiter = self.limiter
        assert limiter is not None
        try:
            while True:
                item = get()
                if item is None:
                    return
                if not limiter.wait():
                    item[0].reject(item[1].delivery_tag, requeue=True)
                    continue
                if not item[0].open:  # its channel closed meanwhile (a circuit breaker's
                    item[0].drop()  # pause): the broker redelivers it; not consumed here
                    continue
                if self.breaker is not None and self.breaker.is_open:  # tripped meanwhile:
                    item[0].reject(item[1].delivery_tag, requeue=True)  # not started
                    continue
                handle(slot, item, limit)
        except StopNow:
            return

    def _handler(self) -> Callable[[int, tuple[Any, ...], TimeLimit | None], Any]:
        """How a slot handles a delivery, chosen once: without middleware or tracing a
        delivery pays nothing for either."""
        inner = self.handle if self.middleware is None else self._handle_middleware
        if self.tracer is None:
            return inner
        return functools.partial(self._handle_traced, inner)

    def _handle_traced(self, inner: Callable[..., tuple[str, BaseException | None]],
                       slot: int, item: tuple[Any, ...], limit: TimeLimit | None) -> None:
        """``inner`` in a span of its own (consuming/tracing.py), current while consume
        and the settling run, so that publishes and moves carry its context."""
        from . import tracing
        method, properties = item[1], item[2]
        with tracing.consume_span(self.tracer, self.entry, method, properties,
                                  attempt_of(properties)) as span:
            outcome, failure = inner(slot, item, limit)
            tracing.settled(span, outcome, failure)

    def handle(self, slot: int, item: tuple[Any, ...],
               limit: TimeLimit | None) -> tuple[str, BaseException | None]:
        """One delivery ``item`` (acker, method, properties, body) in ``slot``'s instance:
        consume, then settle it or hand it to the failure policy (amqpdispatcher.testing
        drives deliveries through this too). Returns the delivery's outcome (outcomes.py's
        names) and what consume raised."""
        acker, method, properties, body = item
        tag = method.delivery_tag
        instance = self.instances[slot]
        if instance is None:  # stopping while a replacement was pending
            acker.reject(tag, requeue=True)
            return "requeue", None
        amqp = AMQPProxy(acker, self.publisher, tag)
        durations = self.metrics.durations
        self.busy += 1  # a delivery in hand: in consume, or being settled by the policy
        if durations is not None:
            started = perf_counter()
        try:
            if limit is None:
                instance.consume(amqp, Message(method, properties, body))
            else:  # TimeLimitExceeded when consume runs past time_limit
                limit.run(instance.consume, amqp, Message(method, properties, body))
        except StopNow:
            self.busy -= 1
            raise
        except BaseException as exc:  # noqa: BLE001 - user code may raise anything
            failure: BaseException | None = exc
        else:
            failure = None
        if durations is not None:
            durations.observe(perf_counter() - started)
        responded = amqp.outcome()
        if failure is None:
            self.busy -= 1
            if responded is None:
                outcome = "ack" if acker.open else "dropped"  # as the acker counts it
                acker.ack(tag)
                return outcome, None
            return responded, None
        self.metrics.failures += 1
        try:
            if responded is not None:  # the consumer's own answer stands
                log.error("%s: consume raised %s; delivery tag %d was already settled",
                          self.entry.consumer, describe_exception(failure), tag,
                          extra=delivery_fields(self.entry, tag, None, attempt_of(properties)))
                outcome = responded
            else:  # may wait for a publisher confirm
                outcome = self.policy.failed(acker, method, properties, body, failure)
        finally:
            self.busy -= 1
        self._replace(slot, failure)
        return outcome, failure

    def _handle_middleware(self, slot: int, item: tuple[Any, ...],
                           limit: TimeLimit | None) -> tuple[str, BaseException | None]:
        """handle with the middleware's hooks around consume (middleware.py): a
        before_consume that raises fails the message through the failure policy, without
        consume (the instance is not replaced: it did not fail); after_consume is told
        the outcome."""
        acker, method, properties, body = item
        tag = method.delivery_tag
        instance = self.instances[slot]
        if instance is None:  # stopping while a replacement was pending
            acker.reject(tag, requeue=True)
            return "requeue", None
        middleware = self.middleware
        assert middleware is not None
        entry = self.entry
        msg = Message(method, properties, body)
        amqp = AMQPProxy(acker, self.publisher, tag)
        durations = self.metrics.durations
        self.busy += 1
        if durations is not None:
            started = perf_counter()
        failure: BaseException | None = None
        consumed = False
        try:
            middleware.before(entry, msg)
            consumed = True
            if limit is None:
                instance.consume(amqp, msg)
            else:
                limit.run(instance.consume, amqp, msg)
        except StopNow:
            self.busy -= 1
            raise
        except BaseException as exc:  # noqa: BLE001 - user code may raise anything
            failure = exc
        if durations is not None:
            durations.observe(perf_counter() - started)
        responded = amqp.has_responded_to_message
        if failure is None:
            self.busy -= 1
            if responded:
                outcome = amqp.outcome() or "ack"
            else:
                outcome = "ack" if acker.open else "dropped"
                acker.ack(tag)
            middleware.after(entry, msg, outcome, None)
            return outcome, None
        self.metrics.failures += 1
        try:
            if responded:
                log.error("%s: consume raised %s; delivery tag %d was already settled",
                          entry.consumer, describe_exception(failure), tag,
                          extra=delivery_fields(entry, tag, None, attempt_of(properties)))
                outcome = amqp.outcome() or "ack"
            else:
                outcome = self.policy.failed(acker, method, properties, body, failure)
        finally:
            self.busy -= 1
        middleware.after(entry, msg, outcome, failure)
        if consumed:
            self._replace(slot, failure)
        return outcome, failure

    def _replace(self, slot: int, exc: BaseException | None) -> None:
        """Shut the failed instance down and put a fresh one in its slot."""
        instance, self.instances[slot] = self.instances[slot], None
        try:
            instance.shutdown(exc)
        except StopNow:
            raise
        except BaseException as shutdown_exc:  # noqa: BLE001
            log.error("%s: shutdown raised %s", self.entry.consumer,
                      describe_exception(shutdown_exc))
        delay = REPLACE_FIRST_DELAY
        while not self.stopping.is_set():  # no replacement once stopping: nothing to run
            try:
                self.instances[slot] = self.cls()
                self.metrics.replacements += 1
                return
            except StopNow:
                raise
            except BaseException as init_exc:  # noqa: BLE001
                log.error("%s: creating a replacement instance raised %s; retrying in %.1fs",
                          self.entry.consumer, describe_exception(init_exc), delay)
            self.stopping.wait(delay)
            delay = min(delay * 2, REPLACE_MAX_DELAY)

    def requeue_waiting(self) -> int:
        """Give back deliveries that no slot has started (used when stopping)."""
        count = 0
        while True:
            try:
                item = self.work.get_nowait()
            except gevent.queue.Empty:
                return count
            if item is None:
                continue
            acker, method, _, _ = item
            acker.reject(method.delivery_tag, requeue=True)
            count += 1

    def discard_waiting(self) -> int:
        """Drop deliveries of channels that are gone: the broker redelivers them."""
        kept = []
        dropped = 0
        while True:
            try:
                item = self.work.get_nowait()
            except gevent.queue.Empty:
                break
            if item is None or item[0].open:
                kept.append(item)
            else:
                item[0].drop()
                dropped += 1
        for item in kept:
            self.work.put_nowait(item)
        return dropped

    def live_instances(self) -> int:
        """Slots with a live greenlet and an instance (not being replaced)."""
        return sum(1 for greenlet, instance in zip(self.slots, self.instances)
                   if instance is not None and not greenlet.dead)

    def stop_slots(self) -> list[gevent.Greenlet]:
        """Ask each slot greenlet to exit after its current message; return them to wait on."""
        self.stopping.set()
        for _ in self.slots:
            self.work.put_nowait(None)
        return self.slots

    def shutdown_instances(self) -> None:
        """``shutdown(None)`` on every instance, once."""
        for slot, instance in enumerate(self.instances):
            if instance is None:
                continue
            self.instances[slot] = None
            try:
                instance.shutdown(None)
            except StopNow:
                raise
            except BaseException as exc:  # noqa: BLE001
                log.error("%s: shutdown raised %s", self.entry.consumer, describe_exception(exc))


def _tracing_configured() -> bool:
    """Whether an OpenTelemetry SDK may be configured: the API is imported (by the
    launcher, the startup handler or consumer code) or told which provider to load.
    Importing it costs about 0.1 s, which a process that does not trace never pays."""
    return "opentelemetry.trace" in sys.modules or bool(
        os.environ.get("OTEL_PYTHON_TRACER_PROVIDER"))

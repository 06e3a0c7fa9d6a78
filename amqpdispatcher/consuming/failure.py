"""The failure policy: what happens to a message whose ``consume`` failed.

A failure is ``consume`` raising, or running past the entry's ``time_limit``
(TimeLimit throws TimeLimitExceeded into it). A delivery the consumer already
settled itself (``amqp.ack()``, ``nack()``, ``reject()``) never reaches the
policy. ``FailurePolicy.failed`` decides, for one failed delivery:

- no ``retry:`` on the entry: reject and requeue at once (as 0.4.3); on a
  stream, ack (a stream takes no reject, and keeps the message anyway);
- attempts left: publish the message (confirmed) to the delay queue for its
  next delay, ``<queue>.retry.quorum.<ms>ms``, whose message TTL dead-letters it
  back to the entry's queue through the default exchange; then ack the original;
- attempts exhausted: publish it (confirmed) to ``dead_letter_queue`` with
  headers saying why, then ack the original; without a dead-letter queue,
  reject it without requeue (the queue's own dead-letter exchange decides);
- an exception of a class in the entry's ``retry.no_retry_for`` (or of a
  subclass): as attempts exhausted, on its first failure; never retried.

Nothing waits in this process: the delay and the attempt count travel with the
message on the broker (ATTEMPT_HEADER), so they survive a restart and are the
same whichever process gets the message next. A publish the broker did not
confirm (``PublishError``) leaves the original unacked: it is rejected
with requeue, or left to the broker if its channel is already gone. A message can
be duplicated by a crash between the confirm and the ack, never lost.

A move is a new publish by the dispatcher's user, so it keeps only what can be
published again and means the same (``_republished``): ``user_id`` (RabbitMQ
refuses one that is not the publishing user's), ``expiration`` (it would expire
the copy in the delay or dead-letter queue) and the ``CC``/``BCC`` headers (they
would copy it to other queues again) are dropped; the first two are recorded in
headers. Each move has a channel to itself while in flight (amqp/publishing.py, Publishers): a
move the broker refuses closes its channel, and with it the moves in flight on
it, which may already be in their queue without a confirm.

Failures without a policy can repeat as fast as the broker redelivers; their
log lines are summarised (FailureLog).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import gevent
import pika.spec

from ..amqp.errors import PublishError, PublishReturned
from ..amqp.publishing import Publisher, Publishers
from ..config import Config, ConsumerConfig, describe_exception
from ..config.consumers import delay_queue_name
from .acks import Acknowledger
from .outcomes import DEAD_LETTER, RETRY, delivery_fields

log = logging.getLogger("amqp-dispatcher")

# Headers the policy reads and writes. Not x-delivery-count (a quorum queue's own
# count of redeliveries, which a retry through a delay queue resets), nor x-death.
ATTEMPT_HEADER = "x-amqp-dispatcher-attempt"  # the attempt this delivery is, from 1
FIRST_FAILURE_HEADER = "x-amqp-dispatcher-first-failure"
LAST_FAILURE_HEADER = "x-amqp-dispatcher-last-failure"
ATTEMPTS_HEADER = "x-amqp-dispatcher-attempts"  # on a dead-lettered message: attempts made
EXCEPTION_TYPE_HEADER = "x-amqp-dispatcher-exception-type"
EXCEPTION_HEADER = "x-amqp-dispatcher-exception"
QUEUE_HEADER = "x-amqp-dispatcher-queue"
EXCHANGE_HEADER = "x-amqp-dispatcher-exchange"  # as first published, kept across retries
ROUTING_KEY_HEADER = "x-amqp-dispatcher-routing-key"
CONSUMER_HEADER = "x-amqp-dispatcher-consumer"
# Properties a move cannot keep, as they were on the first move: user_id (only the
# publishing user's may be sent) and expiration (the copy must not expire).
USER_ID_HEADER = "x-amqp-dispatcher-user-id"
EXPIRATION_HEADER = "x-amqp-dispatcher-expiration"
# Sender-selected distribution: the broker routes a publish to these queues too.
ROUTING_HEADERS = ("CC", "BCC")
MAX_EXCEPTION_TEXT = 1000  # characters of the exception header

# Identical failures (same entry, exception type and place) without a policy are
# logged once with the traceback, then as one line per this many seconds.
SUMMARY_INTERVAL = 10.0
# A consume that swallows TimeLimitExceeded gets it again this often.
TIME_LIMIT_REPEAT = 1.0
# A consume running longer than this is close to RabbitMQ's default consumer_timeout
# (30 minutes), after which the broker closes the channel: --validate warns.
TIME_LIMIT_WARNING = 25 * 60.0


class TimeLimitExceeded(Exception):
    """Thrown into a consume that ran past its entry's ``time_limit``.

    An Exception, so a consumer's ``shutdown(exc)`` receives it like any failure.
    A consume that catches it and goes on gets it again every second.
    """


def attempt_of(properties: Any) -> int:
    """The attempt a delivery is (1 for the first), from its ATTEMPT_HEADER."""
    headers = getattr(properties, "headers", None)
    if not headers:
        return 1
    value = headers.get(ATTEMPT_HEADER)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return 1


def time_limit_warnings(config: Config) -> list[str]:
    """One line per entry whose consume may outlive the broker's consumer_timeout."""
    lines = []
    for entry in config.consumers:
        if entry.time_limit is None:
            lines.append(f"{config.path}: {entry.path}: warning: no time_limit: a consume that "
                         "never returns holds its delivery until RabbitMQ's consumer_timeout "
                         "(30 min by default) closes the channel; set time_limit below it")
        elif entry.time_limit > TIME_LIMIT_WARNING:
            lines.append(f"{config.path}: {entry.path}.time_limit: warning: "
                         f"{entry.time_limit:g}s is close to or past RabbitMQ's "
                         "consumer_timeout (30 min by default); keep it comfortably below")
    return lines


class TimeLimit:
    """One slot's time limit: a repeating hub timer, new for every call, that throws
    TimeLimitExceeded into the slot greenlet while ``run`` is in consume (as
    gevent.Timeout does). A consume that never yields cannot be interrupted, but
    when it returns past the limit it still counts as a failure."""

    __slots__ = ("seconds", "_loop", "_greenlet", "fired")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._loop = gevent.get_hub().loop
        self._greenlet: Any = None
        self.fired = False

    def run(self, function: Callable[..., Any], *args: Any) -> None:
        """Call ``function``; raise TimeLimitExceeded if it ran past the limit, even if
        it caught the exception and returned."""
        self.fired = False
        self._greenlet = gevent.getcurrent()
        # A fresh timer each call: a stopped libev timer restarts with what was left.
        timer = self._loop.timer(self.seconds, TIME_LIMIT_REPEAT)
        started = time.monotonic()
        timer.start(self._expire)
        try:
            function(*args)
        finally:
            timer.stop()  # before anything else can yield to the hub
            timer.close()
            self._greenlet = None
        if self.fired:
            raise TimeLimitExceeded(f"consume ran past time_limit ({self.seconds:g}s) "
                                    "and swallowed TimeLimitExceeded")
        if time.monotonic() - started > self.seconds:
            raise TimeLimitExceeded(f"consume ran past time_limit ({self.seconds:g}s) "
                                    "without yielding to be interrupted")

    def _expire(self) -> None:
        self.fired = True
        self._greenlet.throw(TimeLimitExceeded(f"consume ran past time_limit "
                                               f"({self.seconds:g}s)"))


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds")


def _location(exc: BaseException) -> str:
    tb = exc.__traceback__
    if tb is None:
        return ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}"


def retry_headers(headers: dict[str, Any] | None, attempt: int, method: Any,
                  now: float) -> dict[str, Any]:
    """The headers of a message going to wait before attempt ``attempt + 1``."""
    result = dict(headers or {})
    result[ATTEMPT_HEADER] = attempt + 1
    result.setdefault(FIRST_FAILURE_HEADER, _utc(now))
    result.setdefault(EXCHANGE_HEADER, method.exchange)
    result.setdefault(ROUTING_KEY_HEADER, method.routing_key)
    return result


def dead_letter_headers(headers: dict[str, Any] | None, exc: BaseException, attempt: int,
                        method: Any, entry: ConsumerConfig, now: float) -> dict[str, Any]:
    """The headers of a message going to the dead-letter queue after ``attempt`` failures."""
    result = dict(headers or {})
    text = describe_exception(exc)
    if len(text) > MAX_EXCEPTION_TEXT:
        text = text[:MAX_EXCEPTION_TEXT - 3] + "..."
    result.update({
        ATTEMPTS_HEADER: attempt,
        EXCEPTION_TYPE_HEADER: type(exc).__name__,
        EXCEPTION_HEADER: text,
        QUEUE_HEADER: entry.queue,
        CONSUMER_HEADER: entry.consumer,
        LAST_FAILURE_HEADER: _utc(now),
    })
    result.setdefault(FIRST_FAILURE_HEADER, _utc(now))
    result.setdefault(EXCHANGE_HEADER, method.exchange)
    result.setdefault(ROUTING_KEY_HEADER, method.routing_key)
    return result


def _republished(properties: Any, headers: dict[str, Any]) -> pika.spec.BasicProperties:
    """The properties of a move of a delivery: its own, persistent, with ``headers``
    (retry_headers or dead_letter_headers of its headers) less CC and BCC, and without
    user_id and expiration, recorded in USER_ID_HEADER and EXPIRATION_HEADER.

    A delivery that has the property is as first published (a move drops it): its
    value is recorded, over whatever the publisher put in the header itself (the
    broker validated user_id, not the header). A delivery without it keeps the header
    an earlier move recorded."""
    values = dict(vars(properties))
    headers = {name: value for name, value in headers.items()
               if name not in ROUTING_HEADERS}
    for prop, header in (("user_id", USER_ID_HEADER), ("expiration", EXPIRATION_HEADER)):
        value = values.pop(prop, None)
        if value is not None:
            headers[header] = value
    values["headers"] = headers
    values["delivery_mode"] = 2
    return pika.spec.BasicProperties(**values)


@dataclass
class _Kind:
    since: float
    count: int = 0
    last: str = ""


class FailureLog:
    """Log lines for failures that may repeat without bound: the first of a kind with
    its traceback, then at most one summary line per SUMMARY_INTERVAL with a count.
    A kind quiet for a whole interval starts over."""

    def __init__(self, consumer: str, interval: float = SUMMARY_INTERVAL) -> None:
        self.consumer = consumer
        self.interval = interval
        self._kinds: dict[tuple[str, str], _Kind] = {}

    def failed(self, exc: BaseException, what: str, fields: dict[str, Any]) -> None:
        """One failure; ``what`` says what happened to the message ("requeued");
        ``fields``: the delivery's (logs.delivery_fields), for a line that is logged."""
        key = (type(exc).__name__, _location(exc))
        kind = self._kinds.get(key)
        if kind is not None:
            kind.count += 1
            kind.last = what
            return
        self._kinds[key] = _Kind(since=time.monotonic())
        log.error("%s: consume raised %s; %s (identical failures are summarised every %gs)",
                  self.consumer, describe_exception(exc), what, self.interval,
                  exc_info=(type(exc), exc, exc.__traceback__), extra=fields)
        gevent.spawn_later(self.interval, self._summarise, key)

    def _summarise(self, key: tuple[str, str]) -> None:
        kind = self._kinds[key]
        if not kind.count:
            del self._kinds[key]
            return
        now = time.monotonic()
        log.error("%s: consume raised %s at %s %d more time(s) in the last %.0fs; last: %s",
                  self.consumer, key[0], key[1] or "?", kind.count, now - kind.since, kind.last)
        kind.since, kind.count = now, 0
        gevent.spawn_later(self.interval, self._summarise, key)


class FailurePolicy:
    """One consumer entry's answer to a failed delivery (see the module docstring)."""

    def __init__(self, entry: ConsumerConfig, publisher: Publisher,
                 no_retry_for: tuple[type[BaseException], ...] = ()) -> None:
        """``publisher``: the moves' first channel (Publishers opens more on its
        connection when moves overlap). ``no_retry_for``: the entry's
        ``retry.no_retry_for``, imported (config/imports.py)."""
        self.entry = entry
        self.retry = entry.retry
        self.no_retry_for = no_retry_for
        self.moves = Publishers(publisher, entry.consumer_count)
        self.failures = FailureLog(entry.consumer)
        # Without a retry policy; on a stream the reject is an ack (see acks.py).
        self.without_retry = ("message acked (a stream keeps it, and does not deliver it "
                              "again)" if entry.stream else "message requeued")

    def failed(self, acker: Acknowledger, method: Any, properties: Any, body: bytes,
               exc: BaseException) -> str:
        """Settle a failed delivery; return its outcome (outcomes.OUTCOMES' name)."""
        tag = method.delivery_tag
        retry = self.retry
        attempt = attempt_of(properties)
        if retry is None:
            outcome = "ack" if self.entry.stream else "requeue"
            outcome = outcome if acker.open else "dropped"
            acker.reject(tag, requeue=True)
            self.failures.failed(exc, self.without_retry,
                                 self._fields(acker, tag, outcome, attempt))
            return outcome
        if not acker.open:  # its channel is gone: the broker redelivers it
            acker.drop()
            log.warning("%s: consume raised %s; its channel closed meanwhile: the broker "
                        "redelivers the message", self.entry.consumer, describe_exception(exc),
                        extra=self._fields(acker, tag, "dropped", attempt))
            return "dropped"
        now = time.time()
        final = self.no_retry_for and isinstance(exc, self.no_retry_for)
        # How the giving-up line says why: attempts exhausted, or an exception not retried.
        why = (f"attempt {attempt}, {type(exc).__name__} is in no_retry_for" if final
               else f"attempt {attempt} of {retry.max_attempts}")
        if attempt < retry.max_attempts and not final:
            delay_ms = retry.delay_ms(attempt)
            queue = delay_queue_name(self.entry.queue, delay_ms)
            headers = self._traced(retry_headers(properties.headers, attempt, method, now))
            if self._move(acker, tag, attempt, exc, queue, body,
                          _republished(properties, headers), RETRY):
                log.info("%s: consume raised %s; attempt %d of %d, retrying in %gs",
                         self.entry.consumer, describe_exception(exc), attempt,
                         retry.max_attempts, delay_ms / 1000,
                         extra=self._fields(acker, tag, "retry", attempt))
                return "retry"
            return "requeue" if acker.open else "dropped"
        if retry.dead_letter_queue is None:
            outcome = "ack" if self.entry.stream else "reject"
            acker.reject(tag, requeue=False)
            log.warning("%s: consume raised %s; %s, giving up: rejected without "
                        "requeue (the queue's dead-letter exchange, if any, receives it)",
                        self.entry.consumer, describe_exception(exc), why,
                        extra=self._fields(acker, tag, "reject", attempt))
            return outcome if acker.open else "dropped"
        headers = self._traced(dead_letter_headers(properties.headers, exc, attempt, method,
                                                   self.entry, now))
        if self._move(acker, tag, attempt, exc, retry.dead_letter_queue, body,
                      _republished(properties, headers), DEAD_LETTER):
            log.warning("%s: consume raised %s; %s, giving up: moved to %s",
                        self.entry.consumer, describe_exception(exc), why,
                        retry.dead_letter_queue,
                        extra=self._fields(acker, tag, "dead_letter", attempt))
            return "dead_letter"
        return "requeue" if acker.open else "dropped"

    def _traced(self, headers: dict[str, Any]) -> dict[str, Any]:
        """With tracing on, a move carries the failed consume's span context: the next
        attempt, or the dead letter's reader, continues the same trace."""
        if self.moves.tracer is None:
            return headers
        from . import tracing
        return tracing.inject(headers)

    def _fields(self, acker: Acknowledger, tag: int, outcome: str,
                attempt: int) -> dict[str, Any]:
        """The log line's delivery fields; the outcome is "dropped" if the settle could
        not be sent."""
        return delivery_fields(self.entry, tag, outcome if acker.open else "dropped", attempt)

    def _move(self, acker: Acknowledger, tag: int, attempt: int, exc: BaseException, queue: str,
              body: bytes, properties: pika.spec.BasicProperties, outcome: int) -> bool:
        """Publish to ``queue`` and ack the original once confirmed, counted as ``outcome``
        (outcomes.RETRY or DEAD_LETTER); else requeue it."""
        try:
            self.moves.publish("", queue, body, properties, mandatory=True)
        except PublishError as not_moved:
            acker.reject(tag, requeue=True)  # a no-op if its channel closed meanwhile
            hint = " (was the queue deleted?)" if isinstance(not_moved, PublishReturned) else ""
            self.failures.failed(exc, f"could not move the message to {queue}: "
                                      f"{not_moved}{hint}; requeued",
                                 self._fields(acker, tag, "requeue", attempt))
            return False
        acker.ack_now(tag, outcome)
        return True

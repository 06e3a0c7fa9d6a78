"""The ``consumers:`` section: each entry's keys, defaults and checks, and its
``retry:`` policy (RETRY_KEYS; the policy itself runs in amqpdispatcher/consuming/failure.py)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any

from .keys import _MAX_LONG, _MIN_LONG, _Checker, _Key, timestamp_problem
from .queues import QueueConfig


@dataclass(frozen=True)
class RetryConfig:
    """A consumer entry's ``retry:`` mapping; see RETRY_KEYS."""

    max_attempts: int = 5
    delay: float = 1.0
    backoff: float = 2.0
    max_delay: float = 300.0
    dead_letter_queue: str | None = None
    # Exception classes, 'module:Name', whose failures are never retried.
    no_retry_for: tuple[str, ...] = ()

    def delay_ms(self, attempt: int) -> int:
        """Milliseconds a message waits after its ``attempt``-th consume failed (from 1)."""
        try:
            seconds = min(self.delay * self.backoff ** (attempt - 1), self.max_delay)
        except OverflowError:  # thousands of attempts: long past max_delay
            seconds = self.max_delay
        return max(1, round(seconds * 1000))

    def delays_ms(self) -> list[int]:
        """Every distinct delay, in the order the attempts use them: one queue each
        (at most MAX_DELAY_QUEUES + 1: validation refuses a policy that needs more)."""
        delays: list[int] = []
        for attempt in range(1, self.max_attempts):
            ms = self.delay_ms(attempt)
            if ms not in delays:
                delays.append(ms)
            if ms >= round(self.max_delay * 1000) or self.backoff == 1 \
                    or len(delays) > MAX_DELAY_QUEUES:
                break  # every later attempt waits the same
        return delays


MAX_DELAY_QUEUES = 64


def delay_queue_name(queue: str, delay_ms: int) -> str:
    """The broker queue where messages of ``queue`` wait ``delay_ms`` before a retry (a
    quorum queue: retry.retry_queues). Earlier versions declared classic queues named
    ``<queue>.retry.<ms>ms`` (retry.legacy_delay_queue_name): a new name, as an existing
    queue's type cannot change."""
    return f"{queue}.retry.quorum.{delay_ms}ms"


@dataclass(frozen=True)
class CircuitBreakerConfig:
    """A consumer entry's ``circuit_breaker:`` mapping; see CIRCUIT_BREAKER_KEYS."""

    failure_ratio: float = 0.5
    min_calls: int = 20
    window: float = 30.0
    open_for: float = 60.0


@dataclass(frozen=True)
class ConsumerConfig:
    consumer: str
    queue: str
    consumer_count: int = 1
    prefetch_count: int = 1
    time_limit: float | None = None
    retry: RetryConfig | None = None
    priority: int | None = None
    exclusive: bool = False
    stream_offset: str | int | date | None = None
    # The queue is a stream: declared so in the config, or stream_offset is set.
    stream: bool = False
    circuit_breaker: CircuitBreakerConfig | None = None
    rate_limit: float | None = None
    path: str = "consumers[?]"

    def consume_arguments(self) -> dict[str, Any]:
        """basic.consume's arguments: x-priority and x-stream-offset, where set."""
        arguments: dict[str, Any] = {}
        if self.priority is not None:
            arguments["x-priority"] = self.priority
        offset = self.stream_offset
        if isinstance(offset, date) and not isinstance(offset, datetime):
            # A YAML date: its midnight, UTC (pika sends a datetime as an AMQP timestamp).
            offset = datetime(offset.year, offset.month, offset.day, tzinfo=timezone.utc)
        if offset is not None:
            arguments["x-stream-offset"] = offset
        return arguments


# x-message-ttl is an unsigned 32-bit number of milliseconds.
_MAX_DELAY_SECONDS = 4294967

RETRY_KEYS: dict[str, _Key] = {
    "max_attempts": _Key((int,), default=5, nullable=False, positive=True,
                         doc="consume attempts per message, the first included"),
    "delay": _Key((float, int), default=1, nullable=False, positive=True,
                  maximum=_MAX_DELAY_SECONDS, doc="seconds before the second attempt"),
    "backoff": _Key((float, int), default=2, nullable=False, minimum=1,
                    doc="each further delay is multiplied by this"),
    "max_delay": _Key((float, int), default=300, nullable=False, positive=True,
                      maximum=_MAX_DELAY_SECONDS, doc="cap on one delay (>= delay)"),
    "dead_letter_queue": _Key((str,), non_empty=True,
                              doc="where exhausted messages go (declared durable); "
                                  "null: reject without requeue"),
    "no_retry_for": _Key((list,), non_empty=True, import_path="module:Name",
                         doc="exception classes, each module:Name: a failure raising one of "
                             "them (or of a subclass) is never retried: it goes straight to "
                             "dead_letter_queue (without one, rejected without requeue)"),
}

CIRCUIT_BREAKER_KEYS: dict[str, _Key] = {
    "failure_ratio": _Key((float, int), default=0.5, nullable=False, positive=True, maximum=1,
                          doc="trips when at least this share of the calls finished in the "
                              "window failed (0 < ratio <= 1)"),
    "min_calls": _Key((int,), default=20, nullable=False, positive=True,
                      doc="... and at least this many calls finished in the window"),
    "window": _Key((float, int), default=30, nullable=False, positive=True,
                   doc="seconds: the calls that count are those finished this recently"),
    "open_for": _Key((float, int), default=60, nullable=False, positive=True,
                     doc="seconds without consuming once it trips, before consuming again"),
}

CONSUMER_KEYS: dict[str, _Key] = {
    "consumer": _Key((str,), required=True, nullable=False, import_path="module:Class",
                     doc="the consumer class, module:Class"),
    "queue": _Key((str,), required=True, nullable=False, non_empty=True, name=True,
                  doc="the queue to consume (declared in queues, or existing on the broker)"),
    "consumer_count": _Key((int,), default=1, nullable=False, positive=True,
                           doc="instances of the class, each handling one message at a time"),
    # basic.qos carries prefetch_count in 16 bits.
    "prefetch_count": _Key((int,), default=1, nullable=False, positive=True, maximum=65535,
                           doc="deliveries the broker sends ahead, unacked, to this entry"),
    # Beyond 0.4.3: failure handling (amqpdispatcher/consuming/failure.py).
    "time_limit": _Key((float, int), positive=True,
                       doc="seconds a consume may run before TimeLimitExceeded is thrown into it"),
    "retry": _Key((dict,), entries=RETRY_KEYS,
                  doc="retry policy (the keys below); absent: reject and requeue at once"),
    # Beyond 0.4.3: consume arguments. x-priority is a signed integer.
    "priority": _Key((int,), minimum=_MIN_LONG, maximum=_MAX_LONG,
                     doc="consumer priority (x-priority): deliveries go to the highest "
                         "priority consumer with prefetch room"),
    "exclusive": _Key((bool,), default=False, nullable=False,
                      doc="exclusive consume: no other consumer on the queue"),
    "stream_offset": _Key((str, int, date), maximum=_MAX_LONG,
                          choices=("first", "last", "next"),
                          expected="first, last, next, an offset (an integer) or a timestamp",
                          doc="where a stream consumer starts (x-stream-offset)"),
    # Beyond 0.4.3: controls (docs/guides/controls.md).
    "rate_limit": _Key((float, int), positive=True,
                       doc="consume calls started per second, at most, for the whole entry "
                           "(all processes together: each of --processes N takes 1/N); "
                           "null: no limit"),
    "circuit_breaker": _Key((dict,), entries=CIRCUIT_BREAKER_KEYS,
                            doc="stop consuming for open_for seconds when too many calls "
                                "fail (its keys: failure_ratio, min_calls, window, open_for); "
                                "absent: never"),
}


def parse_consumers(checker: _Checker, entries: list[Any],
                    queues: list[QueueConfig]) -> list[ConsumerConfig]:
    """The ``consumers:`` entries without problems; problems go to ``checker``."""
    consumers: list[ConsumerConfig] = []
    for i, entry in enumerate(entries):
        key_path = f"consumers[{i}]"
        checked = checker.mapping(entry, key_path, CONSUMER_KEYS)
        if checked is None or "consumer" not in checked or "queue" not in checked:
            continue
        retry = None
        if "retry" in checked:
            retry = _parse_retry(checker, checked.pop("retry"), f"{key_path}.retry")
            if retry is None:
                continue
        if "circuit_breaker" in checked:
            breaker = checker.mapping(checked.pop("circuit_breaker"),
                                      f"{key_path}.circuit_breaker", CIRCUIT_BREAKER_KEYS)
            if breaker is None:
                continue
            checked["circuit_breaker"] = CircuitBreakerConfig(**breaker)
        offset = checked.get("stream_offset")
        if isinstance(offset, date) and timestamp_problem(offset):
            checker.problem(f"{key_path}.stream_offset", str(timestamp_problem(offset)))
            continue
        declared = next((q for q in queues if q.queue == checked["queue"]), None)
        stream = "stream_offset" in checked or (
            declared is not None and declared.x_queue_type == "stream")
        consumers.append(ConsumerConfig(**checked, retry=retry, stream=stream, path=key_path))
        _check_retry_names(checker, queues, consumers[-1])
        _check_consume(checker, declared, consumers)
    return consumers


def _check_consume(checker: _Checker, declared: QueueConfig | None,
                   consumers: list[ConsumerConfig]) -> None:
    """The last entry's consume arguments: what RabbitMQ refuses (3.10), what a stream
    cannot do, and an exclusive consumer sharing its queue with another entry."""
    entry = consumers[-1]
    if entry.stream_offset is not None and declared is not None:
        # A passive entry without x_queue_type says nothing of the queue's type.
        queue_type = declared.x_queue_type or (None if declared.passive else "classic")
        if queue_type not in (None, "stream"):
            checker.problem(f"{entry.path}.stream_offset", f"queue {entry.queue!r} is declared "
                            f"in {declared.path} as a {queue_type} queue: only a stream takes "
                            "an offset")
    if entry.stream and entry.priority is not None:
        checker.problem(f"{entry.path}.priority", "a stream consumer cannot have a priority: "
                        "RabbitMQ refuses it")
    if entry.stream and entry.retry is not None:
        checker.problem(f"{entry.path}.retry", "not for a stream: a stream keeps every message "
                        "for every reader, so a retry would append a copy of a failed message "
                        "to it (a failed message is acked; see docs/guides/topology.md, Streams)")
    if entry.stream and entry.circuit_breaker is not None:
        # A stream keeps no position for its consumer: subscribing again after open_for
        # starts at stream_offset, skipping what came meanwhile (next) or reading it all
        # again (first), and what was given back at the trip is acked (skipped).
        checker.problem(f"{entry.path}.circuit_breaker", "not for a stream: subscribing "
                        "again after open_for starts at stream_offset, so the messages "
                        "appended while it was open would be skipped or read again")
    for other in consumers[:-1]:
        if other.queue == entry.queue and (entry.exclusive or other.exclusive):
            exclusive, shared = (entry, other) if entry.exclusive else (other, entry)
            checker.problem(f"{exclusive.path}.exclusive", f"{shared.path} consumes queue "
                            f"{entry.queue!r} too: an exclusive consumer must be the queue's "
                            "only one")


def _parse_retry(checker: _Checker, raw: Any, key_path: str) -> RetryConfig | None:
    before = len(checker.problems)
    checked = checker.mapping(raw, key_path, RETRY_KEYS)
    if checked is None or len(checker.problems) > before:
        return None
    checked["no_retry_for"] = checker.import_paths(checked.get("no_retry_for", []),
                                                   f"{key_path}.no_retry_for",
                                                   "an exception class")
    if len(checker.problems) > before:
        return None
    if checked["max_delay"] < checked["delay"]:
        checker.problem(f"{key_path}.max_delay", f"expected at least delay "
                        f"({checked['delay']}), got {checked['max_delay']}")
        # The config is refused; the policy is kept, as the delay, only so that its
        # names are checked too (_check_retry_names) and every problem found at once.
        return RetryConfig(**{**checked, "max_delay": checked["delay"]})
    retry = RetryConfig(**checked)
    if len(retry.delays_ms()) > MAX_DELAY_QUEUES:
        checker.problem(key_path, f"needs more than {MAX_DELAY_QUEUES} delay queues (one per "
                        "distinct delay): raise backoff or lower max_delay")
    return retry


def _check_retry_names(checker: _Checker, config_queues: list[QueueConfig],
                       entry: ConsumerConfig) -> None:
    """The queues a retry policy adds must not collide with the entry's own queue or a
    queue of the config, and must fit in an AMQP name."""
    retry = entry.retry
    if retry is None:
        return
    key_path = f"{entry.path}.retry"
    if retry.dead_letter_queue == entry.queue:
        checker.problem(f"{key_path}.dead_letter_queue", f"{entry.queue!r} is the entry's own "
                        "queue: a message that keeps failing would come straight back")
    longest = delay_queue_name(entry.queue, round(retry.max_delay * 1000))
    if len(longest.encode("utf-8")) > 255:
        checker.problem(f"{entry.path}.queue", "too long for a retry policy: its delay "
                        "queues are named '<queue>.retry.quorum.<ms>ms', over 255 bytes")
    taken = {q.queue: q.path for q in config_queues}
    prefix = f"{entry.queue}.retry."
    for name, path in taken.items():
        if name.startswith(prefix) and name.endswith("ms"):
            checker.problem(f"{path}.queue", f"{name!r} is a delay queue of {key_path}: "
                            "the dispatcher declares it with its own TTL; use another name")



"""Property-based tests of the failure policy's decisions (retry.FailurePolicy.failed),
against a model written from the README: retry, dead-letter or reject; the delay queue;
the attempt header of the move; what a move keeps and drops. Pure logic: a fake
publisher and a fake acknowledger stand for the broker."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pika
from hypothesis import given, settings
from hypothesis import strategies as st

from amqpdispatcher.amqp.errors import PublishError, PublishNacked, PublishReturned
from amqpdispatcher.config import MAX_DELAY_QUEUES, ConsumerConfig, RetryConfig
from amqpdispatcher.config.retry import delay_queue_names
from amqpdispatcher.consuming.failure import ATTEMPT_HEADER, FailurePolicy
from amqpdispatcher.consuming.outcomes import DEAD_LETTER, RETRY

POLICY_PREFIX = "x-amqp-dispatcher-"
# Kept as they are by every move.
KEPT = ("content_type", "content_encoding", "priority", "correlation_id", "reply_to",
        "message_id", "timestamp", "type", "app_id", "cluster_id")


@dataclass
class FakeAcker:
    """What the policy did to the delivery, in order."""

    open: bool = True
    calls: list[tuple[str, Any]] = field(default_factory=list)

    def reject(self, tag: int, requeue: bool) -> None:
        self.calls.append(("reject", requeue))

    def ack_now(self, tag: int, outcome: int) -> None:
        self.calls.append(("ack", outcome))

    def drop(self) -> None:
        self.calls.append(("drop", None))


class FakePublishing:
    def __init__(self, outcome: Exception | None) -> None:
        self.outcome = outcome
        self.published: list[tuple[str, str, bytes, Any, bool]] = []

    def publisher(self, name: str) -> FakePublisher:
        return FakePublisher(self, name)


class FakePublisher:
    """A Publisher: records each publish, then confirms it or raises ``outcome``."""

    def __init__(self, publishing: FakePublishing, name: str) -> None:
        self.publishing = publishing
        self.name = name

    def publish(self, exchange: str, routing_key: str, body: bytes, properties: Any,
                mandatory: bool = True, confirm: bool = True) -> None:
        self.publishing.published.append((exchange, routing_key, body, properties, mandatory))
        if self.publishing.outcome is not None:
            raise self.publishing.outcome


class Method:
    exchange = "shop"
    routing_key = "order.created"
    delivery_tag = 7


def valid_retry(max_attempts: int, delay: float, backoff: float, max_delay: float,
                dead_letter_queue: str | None) -> RetryConfig | None:
    """The policy, or None where --validate refuses it."""
    if max_delay < delay:
        return None
    retry = RetryConfig(max_attempts, delay, backoff, max_delay, dead_letter_queue)
    return retry if len(retry.delays_ms()) <= MAX_DELAY_QUEUES else None


retries = st.builds(
    valid_retry,
    max_attempts=st.integers(1, 12) | st.integers(1, 10**6),
    delay=st.floats(0.0001, 100, allow_nan=False),
    backoff=st.sampled_from([1, 1.5, 2, 3]) | st.floats(1, 10, allow_nan=False),
    max_delay=st.floats(0.001, 4294967, allow_nan=False),
    dead_letter_queue=st.none() | st.just("orders.failed"),
).filter(lambda retry: retry is not None)

# What the attempt header may hold, sent by anyone: a count, or garbage.
attempt_values = (st.integers(-3, 20) | st.integers(-2**63, 2**63 - 1) | st.none()
                  | st.booleans() | st.text(max_size=5) | st.binary(max_size=5)
                  | st.floats(allow_nan=False) | st.lists(st.integers(), max_size=2))
header_values = st.text(max_size=10) | st.integers(-10, 10) | st.lists(st.text(max_size=5),
                                                                       max_size=2)
header_names = st.sampled_from(["CC", "BCC", "x-app", "x-death", "trace",
                                "x-amqp-dispatcher-user-id", "x-amqp-dispatcher-expiration",
                                "x-amqp-dispatcher-first-failure"]) | st.text(max_size=8)
headers = st.none() | st.dictionaries(header_names, header_values, max_size=5)
short = st.none() | st.text(max_size=12)
properties = st.builds(
    pika.BasicProperties,
    content_type=short, content_encoding=short, headers=headers,
    delivery_mode=st.none() | st.sampled_from([1, 2]), priority=st.none() | st.integers(0, 9),
    correlation_id=short, reply_to=short, expiration=st.none() | st.sampled_from(["0", "500"]),
    message_id=short, timestamp=st.none() | st.integers(0, 2**40), type=short,
    user_id=st.none() | st.sampled_from(["guest", "other"]), app_id=short,
    cluster_id=short)
outcomes = st.none() | st.sampled_from([PublishError("closed"), PublishNacked("nacked"),
                                        PublishReturned("returned", 312, "NO_ROUTE")])


def model_attempt(props: Any) -> int:
    value = (props.headers or {}).get(ATTEMPT_HEADER)
    if type(value) is int and value >= 1:
        return value
    return 1


@settings(max_examples=400, deadline=None)
@given(retry=st.none() | retries, stream=st.booleans(), props=properties, outcome=outcomes,
       channel_open=st.booleans(), with_attempt=st.booleans(), attempt_value=attempt_values)
def test_failure_policy_against_the_model(retry: RetryConfig | None, stream: bool, props: Any,
                                          outcome: Exception | None, channel_open: bool,
                                          with_attempt: bool, attempt_value: Any) -> None:
    if retry is not None:
        stream = False  # --validate refuses retry on a stream entry
    if with_attempt:
        props.headers = {**(props.headers or {}), ATTEMPT_HEADER: attempt_value}
    original = {name: getattr(props, name) for name in vars(props)}
    original_headers = dict(props.headers or {})
    entry = ConsumerConfig("m:C", "orders", consumer_count=3, retry=retry, stream=stream)
    publishing = FakePublishing(outcome)
    acker = FakeAcker(open=channel_open)
    policy = FailurePolicy(entry, publishing.publisher("moves"))  # type: ignore[arg-type]
    policy.failed(acker, Method(), props, b"body", ValueError("boom"))  # type: ignore[arg-type]

    # The delivery's own properties are never changed: a move is a copy.
    assert {name: getattr(props, name) for name in vars(props)} == original
    attempt = model_attempt(props)
    if retry is None:  # reject and requeue at once (an ack on a stream: the acker's job)
        assert acker.calls == [("reject", True)] and publishing.published == []
        return
    if not channel_open:  # nothing can be settled: the broker redelivers it
        assert acker.calls == [("drop", None)] and publishing.published == []
        return
    if attempt < retry.max_attempts:
        destination, settled = retry.delay_ms(attempt), ("ack", RETRY)
    elif retry.dead_letter_queue is not None:
        destination, settled = None, ("ack", DEAD_LETTER)
    else:  # the queue's own dead-letter exchange decides
        assert acker.calls == [("reject", False)] and publishing.published == []
        return
    assert len(publishing.published) == 1
    exchange, queue, body, moved, mandatory = publishing.published[0]
    assert (exchange, body, mandatory) == ("", b"body", True)
    if destination is None:
        assert queue == retry.dead_letter_queue
        # As it arrived on the last attempt (garbage included).
        assert moved.headers.get(ATTEMPT_HEADER) == original_headers.get(ATTEMPT_HEADER)
        assert moved.headers[POLICY_PREFIX + "attempts"] == attempt
    else:
        # The delay queue for the attempt's delay, always one the dispatcher declares.
        assert queue == f"orders.retry.quorum.{destination}ms"
        assert queue in delay_queue_names(entry)
        assert moved.headers[ATTEMPT_HEADER] == attempt + 1
    assert acker.calls == ([settled] if outcome is None else [("reject", True)])

    # What a move keeps and drops.
    for name in KEPT:
        assert getattr(moved, name) == original[name], name
    assert moved.delivery_mode == 2
    assert moved.user_id is None and moved.expiration is None
    assert "CC" not in moved.headers and "BCC" not in moved.headers
    for name, value in original_headers.items():
        if name not in ("CC", "BCC") and not name.startswith(POLICY_PREFIX):
            assert moved.headers[name] == value, name
    for prop in ("user_id", "expiration"):
        header = POLICY_PREFIX + prop.replace("_", "-")
        # Recorded by the first move, from the property (over a header the publisher
        # set: the broker validated user_id, not the header); a later move (no
        # property any more) keeps what the first recorded.
        expected = (original[prop] if original[prop] is not None
                    else original_headers.get(header))
        assert moved.headers.get(header) == expected, prop


@settings(max_examples=200, deadline=None)
@given(retry=retries, attempt=st.integers(1, 2**62))
def test_every_attempt_waits_in_a_declared_delay_queue(retry: RetryConfig,
                                                       attempt: int) -> None:
    """Whatever attempt a message says it is, its delay queue is one the dispatcher
    declared: a publish to any other would come back unroutable, again and again."""
    entry = ConsumerConfig("m:C", "orders", retry=retry)
    declared = delay_queue_names(entry)
    if attempt < retry.max_attempts:
        assert f"orders.retry.quorum.{retry.delay_ms(attempt)}ms" in declared

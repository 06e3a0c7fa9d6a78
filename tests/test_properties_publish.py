"""Property-based tests (hypothesis) of two state machines against models of the broker:
a confirm-mode channel's matching of confirms and returns to publishes
(publisher.ConfirmChannel), and ack coalescing (acks.Acknowledger). Pure logic: fake
pika channels, the broker's frames delivered by the test."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import gevent
import pika
import pika.exceptions
import pika.spec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amqpdispatcher.amqp.confirms import ConfirmChannel
from amqpdispatcher.amqp.errors import PublishError, PublishNacked, PublishReturned, PublishTimeout
from amqpdispatcher.consuming.acks import Acknowledger
from amqpdispatcher.consuming.outcomes import ACK, OUTCOMES, RETRY

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# -- confirms and returns ------------------------------------------------------------

# Messages that differ in little or nothing (all to exchange "x", routing key "k"):
# two bodies, headers that differ in a value or in its type (or with a BCC, which
# the broker removes), a property.
CONTENTS = [(body, headers, message_id)
            for body in (b"", b"b")
            for headers in (None, {"t": 1}, {"t": 2}, {"t": "1"}, {"t": 3, "BCC": ["q"]})
            for message_id in (None, "m")]


@dataclass
class Publish:
    content: int  # index in CONTENTS
    mandatory: bool
    # "waited"; "unwaited" (publisher_confirms: false); "timeout": the waiter gives up
    # before the broker answers; "late": its time ran out before it could be sent.
    kind: str


class FakeConfirmChannel:
    def __init__(self) -> None:
        self.published: list[tuple[str, str, bytes, Any, bool]] = []

    def add_on_close_callback(self, callback: object) -> None:
        pass

    def add_on_return_callback(self, callback: object) -> None:
        pass

    def basic_publish(self, exchange: str, routing_key: str, body: bytes, properties: Any,
                      mandatory: bool) -> None:
        self.published.append((exchange, routing_key, body, properties, mandatory))


def _frame(method: Any) -> Any:
    return type("Frame", (), {"method": method})()


@dataclass
class BrokerChannel:
    """RabbitMQ's side of one confirm-mode channel (rabbit_channel): it handles the
    publishes in order; one no queue takes is returned at once if mandatory, and its
    ack is ready; a routed one waits for its queue, which confirms or rejects it. The
    ready confirms are sent in any legal grouping and at any time: a single frame per
    tag, or a multiple one with a ready tag, covering every tag up to it not settled
    yet, all of which must be ready with the same answer."""

    routed: frozenset[int]  # the contents some queue takes: routing is by content
    handled: int = 0
    waiting: dict[int, bool] = field(default_factory=dict)  # tag -> the queue will ack
    ready: dict[int, bool] = field(default_factory=dict)  # tag -> ack (True) or nack
    returned: set[int] = field(default_factory=set)
    settled: dict[int, str] = field(default_factory=dict)  # tag -> what the client learns

    def legal_frames(self) -> list[tuple[bool, int, bool]]:
        """(ack, delivery tag, multiple) of every frame the broker may send now."""
        frames = []
        unsettled = sorted(set(self.waiting) | set(self.ready))
        for tag, ack in self.ready.items():
            frames.append((ack, tag, False))
            if all(self.ready.get(t) is ack for t in unsettled if t <= tag):
                frames.append((ack, tag, True))
        return sorted(frames)

    def send(self, ack: bool, tag: int, multiple: bool) -> None:
        covered = [t for t in sorted(self.ready) if t == tag or (multiple and t < tag)]
        for t in covered:
            del self.ready[t]
            self.settled[t] = ("returned" if t in self.returned else "confirmed") if ack \
                else "nacked"


def _returned_properties(properties: pika.spec.BasicProperties) -> Any:
    """The properties of a returned message as pika hands them over: decoded from what
    was sent, less the BCC header, which the broker removes."""
    decoded = pika.spec.BasicProperties()
    decoded.decode(b"".join(properties.encode()))
    if decoded.headers:
        decoded.headers.pop("BCC", None)
    return decoded


@SETTINGS
@given(publishes=st.lists(st.builds(Publish, st.integers(0, len(CONTENTS) - 1),
                                    st.booleans(),
                                    st.sampled_from(["waited"] * 4
                                                    + ["unwaited", "timeout", "late"])),
                          min_size=1, max_size=12),
       routed=st.frozensets(st.integers(0, len(CONTENTS) - 1)),
       closes=st.booleans(), data=st.data())
def test_each_publish_gets_what_the_broker_said_of_it(publishes: list[Publish],
                                                      routed: frozenset[int], closes: bool,
                                                      data: st.DataObject) -> None:
    fake = FakeConfirmChannel()
    unclaimed: list[Any] = []
    confirms = ConfirmChannel(fake, 131072, unclaimed.append)
    broker = BrokerChannel(routed)
    far = time.monotonic() + 3600
    outcomes: dict[int, Any] = {}  # publish index -> a greenlet, or what publish did
    sent_before_close: list[int] = []  # publish index of each tag - 1
    after_close: set[int] = set()  # publish indexes
    expected_unclaimed: list[int] = []  # tags returned with nobody waiting
    closed = False
    next_publish = 0

    def publish(index: int) -> None:
        body, headers, message_id = CONTENTS[publishes[index].content]
        properties = pika.BasicProperties(headers=headers, message_id=message_id)
        kind = publishes[index].kind
        args = ("x", "k", body, properties, publishes[index].mandatory,
                kind != "unwaited")
        if kind in ("unwaited", "late"):
            try:
                confirms.publish(*args, far if kind == "unwaited" else time.monotonic())
                outcomes[index] = None
            except PublishError as exc:
                outcomes[index] = type(exc)
        elif kind == "timeout":  # gives up before the broker says anything
            outcomes[index] = greenlet = gevent.spawn(
                lambda: confirms.publish(*args, time.monotonic() + 0.005))
            greenlet.join()
        else:
            outcomes[index] = gevent.spawn(confirms.publish, *args, far)
            gevent.sleep(0)  # sent, and waiting
        if closed:
            after_close.add(index)
        elif kind != "late":
            sent_before_close.append(index)

    while True:
        actions = []
        if next_publish < len(publishes):
            actions.append("publish")
        if not closed:
            if broker.handled < len(sent_before_close):
                actions.append("handle")
            if broker.waiting:
                actions.append("queue")
            if broker.ready:
                actions.append("confirm")
            if closes:
                actions.append("close")
        if not actions:
            break
        action = data.draw(st.sampled_from(actions))
        if action == "publish":
            publish(next_publish)
            next_publish += 1
        elif action == "handle":
            broker.handled += 1
            tag = broker.handled
            index = sent_before_close[tag - 1]
            if publishes[index].content in routed:
                broker.waiting[tag] = data.draw(st.booleans())
            else:
                broker.ready[tag] = True
                if publishes[index].mandatory:
                    broker.returned.add(tag)
                    exchange, routing_key, body, properties, _ = fake.published[tag - 1]
                    method = pika.spec.Basic.Return(312, "NO_ROUTE", exchange, routing_key)
                    confirms._on_return(None, method, _returned_properties(properties), body)
                    if publishes[index].kind == "unwaited":
                        expected_unclaimed.append(tag)
        elif action == "queue":
            tag = data.draw(st.sampled_from(sorted(broker.waiting)))
            broker.ready[tag] = broker.waiting.pop(tag)
        elif action == "confirm":
            ack, tag, multiple = data.draw(st.sampled_from(broker.legal_frames()))
            broker.send(ack, tag, multiple)
            method = pika.spec.Basic.Ack(tag, multiple) if ack \
                else pika.spec.Basic.Nack(tag, multiple)
            confirms._on_confirm(_frame(method))
        else:
            closed = True
            confirms._on_close(None, pika.exceptions.ChannelClosedByBroker(406, "closed"))

    answers = {"confirmed": None, "returned": PublishReturned, "nacked": PublishNacked}
    for index, publish_ in enumerate(publishes):
        outcome = outcomes[index]
        if isinstance(outcome, gevent.Greenlet):
            outcome.join(timeout=1)
            assert outcome.ready()
            outcome = None if outcome.successful() else type(outcome.exception)
        if index in after_close:
            expected: Any = PublishError  # the channel had closed: nothing sent
        elif publish_.kind == "unwaited":
            expected = None
        elif publish_.kind in ("timeout", "late"):
            expected = PublishTimeout
        else:
            tag = sent_before_close.index(index) + 1
            expected = answers[broker.settled[tag]] if tag in broker.settled else PublishError
        assert outcome is expected, (index, publish_, outcome, expected)
    assert [(m.exchange, m.routing_key) for m in unclaimed] == \
        [fake.published[tag - 1][:2] for tag in expected_unclaimed]
    if not closed:
        assert confirms._pending == {}  # nothing left once the broker settled it all


# -- ack coalescing ------------------------------------------------------------------

class BrokerUnacked:
    """RabbitMQ's unacknowledged deliveries of one channel, as the frames the
    Acknowledger sends change them: an ack or reject of a tag it does not hold closes
    the channel (406 unknown delivery tag), and so would a multiple ack whose tag it
    does not hold; a multiple ack settles every tag held up to its own."""

    def __init__(self) -> None:
        self.held: set[int] = set()
        self.acked: list[int] = []
        self.rejected: list[int] = []
        self.gone = False  # closed under the Acknowledger: pika refuses every frame

    def _check(self, tag: int) -> None:
        if self.gone:
            raise pika.exceptions.ChannelWrongStateError("Channel is closed.")
        assert tag in self.held, f"unknown delivery tag {tag}"

    def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self._check(delivery_tag)
        covered = sorted(t for t in self.held if t <= delivery_tag) if multiple \
            else [delivery_tag]
        self.held -= set(covered)
        self.acked += covered

    def basic_reject(self, delivery_tag: int, requeue: bool) -> None:
        self._check(delivery_tag)
        self.held.discard(delivery_tag)
        self.rejected.append(delivery_tag)


@SETTINGS
@given(prefetch=st.integers(1, 8), stream=st.booleans(), data=st.data())
def test_acks_settle_each_delivery_once_and_never_ahead_of_the_consumer(
        prefetch: int, stream: bool, data: st.DataObject) -> None:
    broker = BrokerUnacked()
    outcomes = [0] * len(OUTCOMES)
    acker = Acknowledger(broker, prefetch, outcomes, stream=stream)
    delivered = 0
    unsettled: set[int] = set()  # delivered, the consumer has not answered
    acked: set[int] = set()  # the consumer acked (or rejected, on a stream)
    rejected: set[int] = set()
    answers = 0
    open_ = True  # the Acknowledger was not told of a close yet

    def check_sent() -> None:
        assert not set(broker.acked) & rejected  # never acks what the consumer rejected
        assert set(broker.acked) <= acked  # never acks ahead of the consumer
        assert len(broker.acked) == len(set(broker.acked))  # never twice

    for _ in range(data.draw(st.integers(1, 60))):
        actions = ["loop"]
        if open_:
            actions.append("close")
            if not broker.gone:
                actions.append("lost")
                if len(broker.held) < prefetch:
                    actions.append("deliver")
        if unsettled:
            actions += ["ack", "ack", "reject", "nack", "policy_ack"]
        action = data.draw(st.sampled_from(actions))
        if action == "deliver":
            delivered += 1
            unsettled.add(delivered)
            broker.held.add(delivered)
            acker.delivered(delivered)
        elif action in ("ack", "reject", "nack", "policy_ack"):
            tag = data.draw(st.sampled_from(sorted(unsettled)))
            unsettled.discard(tag)
            answers += 1
            if action == "ack":
                acker.ack(tag)
                acked.add(tag)
            elif action == "policy_ack":
                acker.ack_now(tag, RETRY)
                acked.add(tag)
            else:  # amqp.nack() is a reject with requeue
                requeue = action == "nack" or data.draw(st.booleans())
                acker.reject(tag, requeue)
                (acked if stream else rejected).add(tag)
        elif action == "loop":
            gevent.sleep(0)  # one hub loop iteration: the scheduled flush runs
            if not broker.gone:
                # A settled delivery waits at most until the end of the iteration.
                assert acked <= set(broker.acked), "an ack held back behind the loop"
        elif action == "lost":
            broker.gone = True  # the broker closed the channel; pika knows, we not yet
        else:  # the close event: the broker requeues what it held
            broker.gone = True
            acker.close()
            open_ = False
        check_sent()
    gevent.sleep(0)
    acker.flush()
    check_sent()
    if not broker.gone:  # each answer reached the broker, once
        assert sorted(broker.acked) == sorted(acked)
        assert sorted(broker.rejected) == sorted(rejected)
        assert broker.held == unsettled
        assert outcomes[ACK] + outcomes[RETRY] == len(acked)
    assert sum(outcomes) == answers  # each answer counted once: as what it was, or dropped


def test_a_return_whose_properties_the_broker_changed_still_finds_its_publish() -> None:
    """A plugin may add to a message's properties (rabbitmq_message_timestamp): no
    publish has the returned ones, and the oldest with the same exchange, routing key
    and body is taken rather than none (which would report it confirmed)."""
    fake = FakeConfirmChannel()
    unclaimed: list[Any] = []
    confirms = ConfirmChannel(fake, 131072, unclaimed.append)
    far = time.monotonic() + 3600
    publishes = [gevent.spawn(confirms.publish, "x", "k", b"", pika.BasicProperties(
        headers={"n": n}), True, True, far) for n in (1, 2)]
    gevent.sleep(0)
    stamped = pika.BasicProperties(headers={"n": 1, "timestamp_in_ms": 1700000000000},
                                   timestamp=1700000000)
    confirms._on_return(None, pika.spec.Basic.Return(312, "NO_ROUTE", "x", "k"), stamped, b"")
    confirms._on_confirm(_frame(pika.spec.Basic.Ack(2, True)))
    gevent.joinall(publishes, timeout=1)
    assert [type(p.exception) for p in publishes] == [PublishReturned, type(None)]
    assert unclaimed == []

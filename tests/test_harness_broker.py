"""The harness's broker model (amqpdispatcher/testing/broker.py) against RabbitMQ, case
by case: the same topology is declared on the test's vhost and given to a Harness,
the same messages are published to both, and where each copy lands, with what
headers, must be the same. These are the corners test_harness_equivalence.py's
scenario does not reach: topic keys with empty words, headers bindings on typed
values, the alternate exchange of an exchange reached through a binding, ``CC`` and
``BCC`` (of a wrong type too), what dead-lettering does with them, a repeated death,
a dead-letter cycle, header types as they come back from the wire, a quorum
queue's ``x-delivery-count``."""

from __future__ import annotations

import datetime
import decimal
from typing import Any

import pika
import pika.exceptions
import pytest
from helpers import BrokerHandle, wait_until

from amqpdispatcher import PublishError
from amqpdispatcher.amqp.errors import TopologyError
from amqpdispatcher.config import Config, load_config_dict
from amqpdispatcher.testing import Harness

ME = __name__


class Sink:
    def consume(self, amqp: Any, msg: Any) -> None:
        pass

    def shutdown(self, exception: BaseException | None = None) -> None:
        pass


class Rejecter(Sink):
    """Rejects every message without requeue (its queue's dead-letter exchange takes it)."""

    def consume(self, amqp: Any, msg: Any) -> None:
        amqp.reject(requeue=False)


class Bouncer(Sink):
    """Sends a dead-lettered message back to ``s`` through the exchange its body names
    in turn, until it died three times; then forwards it to ``final``."""

    def consume(self, amqp: Any, msg: Any) -> None:
        headers = msg.properties["headers"]
        count = headers["x-death"][0]["count"]
        if count < 3:
            amqp.publish(BOUNCES[count], "s", headers, msg.body)
        else:
            amqp.publish("", "final", headers, msg.body)


BOUNCES = {1: "X2", 2: "X"}


class Recorder(Sink):
    """Keeps what each delivery carried; nacks while the body says so."""

    seen: list[tuple[bool, dict[str, Any]]] = []

    def consume(self, amqp: Any, msg: Any) -> None:
        Recorder.seen.append((msg.delivery_info["redelivered"], msg.properties))
        if msg.body == b"nack-twice" and len(Recorder.seen) < 3:
            amqp.nack()


def entry(queue: str, consumer: str = "Sink", **keys: Any) -> dict[str, Any]:
    return {"consumer": f"{ME}:{consumer}", "queue": queue, **keys}


def bound(exchange: str, key: str = "", **arguments: Any) -> dict[str, Any]:
    binding: dict[str, Any] = {"exchange": exchange, "routing_key": key}
    if arguments:
        binding["arguments"] = arguments
    return binding


def declare(channel: Any, config: Config) -> None:
    """The config's topology on the broker, as amqp/topology.py declares it."""
    for exchange in config.exchanges:
        channel.exchange_declare(exchange.exchange, exchange.type, internal=exchange.internal,
                                 arguments=exchange.arguments or None)
    for exchange in config.exchanges:
        for binding in exchange.bindings:
            channel.exchange_bind(exchange.exchange, binding.exchange, binding.routing_key,
                                  arguments=binding.arguments or None)
    for queue in config.queues:
        channel.queue_declare(queue.queue, durable=queue.durable,
                              arguments=queue.arguments() or None)
        for binding in queue.bindings:
            channel.queue_bind(queue.queue, binding.exchange, binding.routing_key,
                               arguments=binding.arguments or None)


class Both:
    """One topology on the broker (a vhost of its own) and in a Harness."""

    def __init__(self, broker: BrokerHandle, config: dict[str, Any]) -> None:
        self.broker = broker
        self.harness = Harness(config)
        self.queues = [queue["queue"] for queue in config["queues"]]
        declare(broker.channel, load_config_dict(config)[0])
        self.channel = broker.channel.connection.channel()
        self.channel.confirm_delivery()  # a publish returns once routed

    def close(self) -> None:
        self.harness.close()

    def real(self, exchange: str, key: str, body: bytes, **properties: Any) -> list[str]:
        """Publish to the broker; the queues that got it (each holds it alone)."""
        self.channel.basic_publish(exchange, key, body, pika.BasicProperties(**properties))
        return sorted(queue for queue in self.queues if self.broker.get_all(queue))

    def routes(self, exchange: str, key: str, headers: dict[str, Any] | None = None,
               **properties: Any) -> tuple[list[str], list[str]]:
        """(the harness's queues, the broker's) for one message."""
        body = f"{exchange}/{key}/{headers}".encode()
        modelled = sorted(self.harness.publish(exchange, key, body, headers, **properties))
        for queue in self.queues:  # each case starts from empty queues
            self.harness.broker.queues[queue].messages.clear()
        return modelled, self.real(exchange, key, body, headers=headers, **properties)


@pytest.fixture
def both(broker: BrokerHandle) -> Any:
    made: list[Both] = []

    def make(config: dict[str, Any]) -> Both:
        made.append(Both(broker, config))
        return made[-1]

    yield make
    for one in made:
        one.close()


TOPIC_PATTERNS = ["#", "*", "a.#", "#.b", "a.#.b", "a.*.b", "*.*", "", "a..b", "#.#",
                  "a.#.#.b", "*.#", "#.*", "a.*", ".", "a.", ".b"]
TOPIC_KEYS = ["", "a", "a.b", "a..b", "a.x.b", "a.x.y.b", ".", "a.", ".b", "b", "a.b.c"]


def test_topic_keys_with_empty_words_and_hashes_in_the_middle(both: Any) -> None:
    b = both({"exchanges": [{"exchange": "T", "type": "topic"}],
              "queues": [{"queue": f"t{i}", "bindings": [bound("T", pattern)]}
                         for i, pattern in enumerate(TOPIC_PATTERNS)],
              "consumers": [entry("t0")]})
    for key in TOPIC_KEYS:
        modelled, real = b.routes("T", key)
        assert modelled == real, key


HEADER_BINDINGS = [
    {"x-match": "all", "v": 1}, {"x-match": "any", "v": 1, "w": "x"}, {"x-match": "all"},
    {"x-match": "any"}, {"x-match": "all", "p": None}, {"x-match": "all", "v": True},
    {"x-match": "all", "v": "1"},
    {"x-match": "all", "v": 2**40}, {"x-match": "any-with-x", "x-v": 1},
    {"x-match": "all", "v": datetime.datetime(1970, 1, 1, 0, 0, 1)},
    {"x-match": "all", "v": {"a": 1, "b": 2}}, {"x-match": "all", "v": [1, "x"]},
]
HEADER_MESSAGES = [
    {"v": 1}, {"v": True}, {"v": "1"}, {"v": decimal.Decimal(1)}, {"p": "any"}, {"p": None},
    {}, None, {"w": "x"}, {"v": 2**40}, {"v": 1, "x-v": 1}, {"v": b"1"},
    {"v": datetime.datetime(1970, 1, 1, 0, 0, 1, 500)}, {"v": {"b": 2, "a": 1}},
    {"v": {"a": 1, "b": 2}}, {"v": [1, b"x"]}, {"v": decimal.Decimal("1.0")},
]


def test_headers_bindings_match_values_of_the_same_amqp_type_only(both: Any) -> None:
    b = both({"exchanges": [{"exchange": "H", "type": "headers"}],
              "queues": [{"queue": f"h{i}", "bindings": [bound("H", **arguments)]}
                         for i, arguments in enumerate(HEADER_BINDINGS)],
              "consumers": [entry("h0")]})
    for headers in HEADER_MESSAGES:
        modelled, real = b.routes("H", "", headers)
        assert modelled == real, headers


def test_alternate_exchanges_and_sender_selected_distribution(both: Any) -> None:
    b = both({
        "exchanges": [
            {"exchange": "alt", "type": "fanout"},
            {"exchange": "X", "type": "direct", "arguments": {"alternate-exchange": "alt"}},
            # Bound to X: routes nothing itself (then X's own alternate is not used).
            {"exchange": "Y", "type": "direct", "bindings": [bound("X", "to-y")]},
            # An alternate exchange of its own, reached through a binding.
            {"exchange": "P", "type": "direct"},
            {"exchange": "M", "type": "direct", "arguments": {"alternate-exchange": "alt"},
             "bindings": [bound("P", "m")]},
            # Alternates of each other: routing ends.
            {"exchange": "C1", "type": "direct", "arguments": {"alternate-exchange": "C2"}},
            {"exchange": "C2", "type": "direct", "arguments": {"alternate-exchange": "C1"}},
            # An exchange-to-exchange cycle.
            {"exchange": "E1", "type": "fanout", "bindings": [bound("E2")]},
            {"exchange": "E2", "type": "fanout", "bindings": [bound("E1")]},
        ],
        "queues": [
            {"queue": "altq", "bindings": [bound("alt")]},
            {"queue": "qa", "bindings": [bound("X", "a"), bound("C2", "c")]},
            {"queue": "qb", "bindings": [bound("X", "b"), bound("E2")]},
        ],
        "consumers": [entry("qa")],
    })
    for exchange, key, headers in [
        ("X", "a", None), ("X", "nothing", None), ("X", "to-y", None),
        ("X", "a", {"CC": ["nothing"]}), ("X", "nothing", {"CC": ["b"]}),
        ("X", "a", {"BCC": ["b", 5]}), ("P", "m", None), ("C1", "c", None),
        ("C1", "none", None), ("E1", "", None), ("", "qa", {"CC": ["qb", "no-such-queue"]}),
        ("", "", {"BCC": ["altq"]}),
    ]:
        modelled, real = b.routes(exchange, key, headers)
        assert modelled == real, (exchange, key, headers)


@pytest.mark.parametrize("header,value,amqp_type", [
    ("CC", "q", "longstr"), ("BCC", 5, "signedint"), ("CC", None, "void"),
    ("CC", {"q": 1}, "table"),
])
def test_a_cc_header_that_is_not_a_list_closes_the_channel(
        both: Any, header: str, value: Any, amqp_type: str) -> None:
    b = both({"queues": [{"queue": "q"}], "consumers": [entry("q")]})
    text = f'invalid message: {{unacceptable_type_in_header,"{header}",{amqp_type}}}'
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
        b.real("", "q", b"m", headers={header: value})
    assert (refused.value.reply_code, refused.value.reply_text) == (
        406, f"PRECONDITION_FAILED - {text}")
    with pytest.raises(PublishError, match=f"406 PRECONDITION_FAILED - {text}"):
        b.harness.publish("", "q", b"m", {header: value})
    assert b.harness.messages("q") == []


def without_times(headers: dict[str, Any] | None) -> dict[str, Any]:
    headers = dict(headers or {})
    if "x-death" in headers:
        headers["x-death"] = [{k: v for k, v in death.items() if k != "time"}
                              for death in headers["x-death"]]
    return headers


def left(broker: BrokerHandle, queues: list[str]) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for queue in queues:
        found[queue] = []
        while True:
            method, properties, body = broker.channel.basic_get(queue, auto_ack=True)
            if method is None:
                break
            found[queue].append((body, method.routing_key, without_times(properties.headers)))
    return found


DEAD_LETTERING = {
    "exchanges": [{"exchange": "X", "type": "direct"}, {"exchange": "X2", "type": "direct"},
                  {"exchange": "dlx", "type": "direct"}],
    "queues": [
        # Rejected without a dead-letter routing key: routed again with the message's
        # own keys (CC's and BCC's too); with one: with it alone, CC removed.
        {"queue": "s1", "x_dead_letter_exchange": "dlx", "bindings": [bound("X", "s1")]},
        {"queue": "s2", "x_dead_letter_exchange": "dlx", "x_dead_letter_routing_key": "fixed",
         "bindings": [bound("X", "s2")]},
        {"queue": "cc", "bindings": [bound("dlx", "cck")]},
        {"queue": "bcc", "bindings": [bound("dlx", "bcck")]},
        {"queue": "dl", "bindings": [bound("dlx", "s1")]},
        {"queue": "other", "bindings": [bound("dlx", "fixed")]},
    ],
    "consumers": [entry("s1", "Rejecter"), entry("s2", "Rejecter")],
}
LEFT = ["cc", "bcc", "dl", "other"]


def test_dead_lettering_keeps_the_routing_keys_and_records_them_as_rabbitmq(
        both: Any, broker: BrokerHandle) -> None:
    b = both(DEAD_LETTERING)
    headers = {"CC": ["cck"], "BCC": ["bcck"]}
    for queue in ("s1", "s2"):
        b.harness.publish("X", queue, b"m", headers, expiration="60000")
        b.channel.basic_publish("X", queue, b"m",
                                pika.BasicProperties(headers=headers, expiration="60000"))
        method, _, _ = broker.channel.basic_get(queue)
        broker.channel.basic_reject(method.delivery_tag, requeue=False)
    wait_until(lambda: sum(broker.ready(queue) for queue in LEFT) == 4, timeout=10,
               what="the dead-lettered copies")
    b.harness.run()
    modelled = {queue: [(m.body, m.routing_key, without_times(m.properties.headers))
                        for m in b.harness.stored(queue)] for queue in LEFT}
    assert modelled == left(broker, LEFT)
    assert modelled["other"][0][2]["x-death"] == [{
        "count": 1, "reason": "rejected", "queue": "s2", "exchange": "X",
        "routing-keys": ["s2", "cck"], "original-expiration": "60000"}]


def test_a_repeated_death_counts_in_the_first_entry(both: Any, broker: BrokerHandle) -> None:
    b = both({
        "exchanges": [{"exchange": "X", "type": "direct"}, {"exchange": "X2", "type": "direct"},
                      {"exchange": "dlx", "type": "fanout"}],
        "queues": [{"queue": "s", "x_dead_letter_exchange": "dlx",
                    "bindings": [bound("X", "s"), bound("X2", "s")]},
                   {"queue": "dlq", "bindings": [bound("dlx")]}, {"queue": "final"}],
        "consumers": [entry("s", "Rejecter"), entry("dlq", "Bouncer")],
    })
    b.harness.publish("X", "s", b"m", {"CC": ["elsewhere"]})
    b.harness.run()
    # The daemon's consumers, by hand: reject from s, bounce from dlq.
    b.channel.basic_publish("X", "s", b"m", pika.BasicProperties(headers={"CC": ["elsewhere"]}))
    for count in (1, 2, 3):
        method, _, _ = broker.channel.basic_get("s")
        broker.channel.basic_reject(method.delivery_tag, requeue=False)
        wait_until(lambda: broker.ready("dlq") == 1, timeout=10, what="the dead-lettered copy")
        method, properties, body = broker.channel.basic_get("dlq", auto_ack=True)
        b.channel.basic_publish(BOUNCES.get(count, ""), "s" if count < 3 else "final", body,
                                properties)
    modelled = [without_times(m.properties.headers) for m in b.harness.stored("final")]
    assert modelled == [headers for _, _, headers in left(broker, ["final"])["final"]]
    assert modelled[0]["x-death"] == [{"count": 3, "reason": "rejected", "queue": "s",
                                       "exchange": "X", "routing-keys": ["s", "elsewhere"]}]


def test_a_dead_letter_cycle_without_a_reject_drops_the_message(
        both: Any, broker: BrokerHandle) -> None:
    b = both({
        "exchanges": [{"exchange": "toA", "type": "fanout"},
                      {"exchange": "toB", "type": "fanout"}],
        "queues": [
            {"queue": "A", "x_message_ttl": 50, "x_dead_letter_exchange": "toB",
             "bindings": [bound("toA")]},
            {"queue": "B", "x_message_ttl": 50, "x_dead_letter_exchange": "toA",
             "bindings": [bound("toB")]},
            {"queue": "witness", "bindings": [bound("toA")]},  # sees each pass through toA
        ],
        "consumers": [entry("witness")],
    })
    b.harness.publish("toA", "", b"m")
    b.harness.run()  # returns: the copy coming back to A is dropped, as on the broker
    assert [b.harness.messages(queue) for queue in ("A", "B")] == [[], []]
    assert b.harness.outcomes("witness")["ack"] == 2
    b.channel.basic_publish("toA", "", b"m")
    wait_until(lambda: broker.ready("witness") == 2 and broker.ready("A") == 0
               and broker.ready("B") == 0, timeout=10, what="the cycle to end")


def test_headers_come_back_as_the_wire_gives_them(both: Any, broker: BrokerHandle) -> None:
    b = both({"queues": [{"queue": "q"}], "consumers": [entry("q", "Recorder")]})
    when = datetime.datetime(2024, 1, 2, 3, 4, 5, 678000)  # naive, with microseconds
    headers = {"bytes": b"by", "int": 5, "long": 2**40, "bool": True,
               "decimal": decimal.Decimal("1.5"), "when": when, "none": None,
               "nested": {"a": [1, "x", b"y", {"deep": when}]}, "str": "s"}
    Recorder.seen = []
    b.harness.publish("", "q", b"m", headers, timestamp=1700000000, priority=3)
    b.harness.run()
    b.channel.basic_publish("", "q", b"m", pika.BasicProperties(
        headers=headers, timestamp=1700000000, priority=3))
    _, properties, _ = broker.channel.basic_get("q", auto_ack=True)
    modelled = Recorder.seen[0][1]
    assert modelled["headers"] == properties.headers
    assert modelled["headers"]["when"].tzinfo is not None  # as pika decodes a timestamp
    assert {name: type(value) for name, value in modelled["headers"].items()} == {
        name: type(value) for name, value in properties.headers.items()}
    assert (modelled["timestamp"], modelled["priority"]) == (properties.timestamp, 3)


def test_a_quorum_queue_counts_deliveries_in_a_header(both: Any, broker: BrokerHandle) -> None:
    b = both({"queues": [{"queue": "qq", "x_queue_type": "quorum"}],
              "consumers": [entry("qq", "Recorder")]})
    Recorder.seen = []
    b.harness.publish("", "qq", b"nack-twice")
    b.harness.run()
    modelled = [(redelivered, props["headers"]) for redelivered, props in Recorder.seen]
    b.channel.basic_publish("", "qq", b"nack-twice")
    real = []
    for attempt in range(3):
        wait_until(lambda: broker.ready("qq") == 1, timeout=10, what="the message back")
        method, properties, _ = broker.channel.basic_get("qq")
        real.append((method.redelivered, properties.headers))
        if attempt < 2:
            broker.channel.basic_nack(method.delivery_tag, requeue=True)
        else:
            broker.channel.basic_ack(method.delivery_tag)
    assert modelled == real == [(False, {"x-delivery-count": 0}),
                                (True, {"x-delivery-count": 1}),
                                (True, {"x-delivery-count": 2})]


@pytest.mark.parametrize("match", ["some", 1, None, True])
def test_a_bad_x_match_is_refused_with_the_brokers_words(
        broker: BrokerHandle, match: Any) -> None:
    config = {"exchanges": [{"exchange": "H", "type": "headers"}],
              "queues": [{"queue": "q", "bindings": [bound("H", **{"x-match": match})]}],
              "consumers": [entry("q")]}
    broker.channel.exchange_declare("H", "headers")
    broker.channel.queue_declare("q")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
        broker.channel.queue_bind("q", "H", "", arguments={"x-match": match})
    with pytest.raises(TopologyError) as modelled:
        Harness(config)
    assert str(modelled.value) == (
        f"<dict>: queues[0].bindings[0]: cannot bind queue 'q' to exchange 'H': broker said "
        f"{refused.value.reply_code} {refused.value.reply_text}")


def test_a_per_message_expiration_dead_letters_from_the_head_only(
        both: Any, broker: BrokerHandle) -> None:
    """A message's own expiration in a queue with a dead-letter exchange (a delay of
    the publisher's choosing): it expires when it reaches the head of the queue, so
    one behind a message without an expiration waits."""
    b = both({"exchanges": [{"exchange": "back", "type": "fanout"}],
              "queues": [{"queue": "wait", "x_dead_letter_exchange": "back"},
                         {"queue": "again", "bindings": [bound("back")]}],
              "consumers": [entry("again")]})
    for body, expiration in ((b"first", "50"), (b"stays", None), (b"behind", "50")):
        b.harness.publish("", "wait", body, expiration=expiration)
        b.channel.basic_publish("", "wait", body, pika.BasicProperties(expiration=expiration))
    b.harness.run()
    assert b.harness.messages("wait") == [b"stays", b"behind"]
    assert b.harness.outcomes("again")["ack"] == 1
    # On the broker: the first one moves on; the one behind "stays" does not expire.
    wait_until(lambda: broker.ready("again") == 1, timeout=10, what="the first to expire")
    assert broker.get_all("again") == [b"first"]
    assert broker.ready("wait") == 2  # taking them would let "behind" expire

"""An in-memory model of what RabbitMQ does with a published message: exchanges
(direct, fanout, topic, headers, the default exchange), bindings to queues and to
other exchanges, the ``alternate-exchange`` argument, sender-selected distribution
(``CC``, ``BCC``), dead-lettering (reject without requeue, a quorum queue's
``x-delivery-limit``, a message TTL running out; the ``x-death`` header; cycles
dropped) and queues holding messages in order. What it does was checked against
RabbitMQ 3.10, case by case, in tests/test_harness_broker.py.

It knows nothing of consumers: harness.py delivers from its queues. No gevent, no
pika connection; pika's BasicProperties only, as the broker's message properties.
"""

from __future__ import annotations

import calendar
import collections
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pika.spec
from pika.compat import long

from ..config import QueueConfig

BUILT_IN_TYPES = ("direct", "fanout", "topic", "headers")
# What every vhost of RabbitMQ has, by name and type; the default exchange "" aside.
PREDECLARED = {"amq.direct": "direct", "amq.fanout": "fanout", "amq.topic": "topic",
               "amq.headers": "headers", "amq.match": "headers"}
X_MATCH = ("all", "any", "all-with-x", "any-with-x")


class UnknownExchange(LookupError):
    """A publish named an exchange the broker does not have (it would close the channel:
    404 NOT_FOUND)."""


class RefusedMessage(ValueError):
    """A message the broker refuses, closing the publishing channel: ``reply`` is its
    reply code and text (a ``CC`` or ``BCC`` header that is not a list: 406)."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


@dataclass
class Stored:
    """A message in a queue, as the broker holds it."""

    body: bytes
    properties: pika.spec.BasicProperties
    exchange: str
    routing_key: str
    redelivered: bool = False
    requeues: int = 0  # how often a consumer gave it back (reject or nack with requeue)
    # The keys it was routed with, the CC and BCC ones too: a dead-lettered copy is
    # routed with them again (when its queue has no x-dead-letter-routing-key).
    routing_keys: tuple[str, ...] = ()


@dataclass
class BindingTo:
    destination: str
    to_queue: bool  # else to an exchange
    routing_key: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass
class Exchange:
    name: str
    type: str
    internal: bool = False
    arguments: dict[str, Any] = field(default_factory=dict)
    bindings: list[BindingTo] = field(default_factory=list)


@dataclass
class Queue:
    name: str
    config: QueueConfig | None = None  # None: the test created it (existing_queues)
    messages: collections.deque[Stored] = field(default_factory=collections.deque)

    def argument(self, name: str) -> Any:
        return self.config.arguments().get(name) if self.config is not None else None


def _words(key: str) -> list[str]:
    return key.split(".") if key else []


def topic_matches(pattern: str, routing_key: str) -> bool:
    """A topic exchange's binding key against a routing key: ``*`` is one word, ``#``
    zero or more (words separated by dots)."""
    p, k = _words(pattern), _words(routing_key)
    # matched[j]: the pattern so far matches the first j words of the key.
    matched = [True] + [False] * len(k)
    for word in p:
        if word == "#":
            for j in range(1, len(k) + 1):
                matched[j] = matched[j] or matched[j - 1]
        else:
            matched = [False] + [matched[j - 1] and (word == "*" or word == k[j - 1])
                                 for j in range(1, len(k) + 1)]
    return matched[len(k)]


def amqp_type(value: Any) -> str:
    """The AMQP field type RabbitMQ sees for a value as pika encodes it (the names of
    RabbitMQ's messages: longstr, signedint, long, ...)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, long) or isinstance(value, int) and not -2**31 <= value < 2**31:
        return "long"
    if isinstance(value, int):
        return "signedint"
    for kind, name in ((str, "longstr"), (bytes, "binary"), (Decimal, "decimal"),
                       (datetime, "timestamp"), (dict, "table"), (list, "array")):
        if isinstance(value, kind):
            return name
    return "void" if value is None else type(value).__name__


def _erlang(value: Any) -> Any:
    """What RabbitMQ 3.10 compares when it matches a headers binding: the value alone,
    whatever its AMQP type, as Erlang holds it. So a str and the same bytes are equal, a
    timestamp and its seconds since the epoch too; a boolean is no integer, a decimal
    neither. In a table or an array each value comes with its type, which must be the
    same too; a table's fields compare in order (as pika encodes a dict)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, datetime):
        return ("int", calendar.timegm(value.utctimetuple()))  # as pika encodes it
    if isinstance(value, str):
        return ("binary", value.encode("utf-8"))
    if isinstance(value, bytes):
        return ("binary", value)
    if isinstance(value, Decimal):
        return ("decimal", value.normalize())
    if isinstance(value, dict):
        return ("table", tuple((name, amqp_type(item), _erlang(item))
                               for name, item in value.items()))
    if isinstance(value, list):
        return ("array", tuple((amqp_type(item), _erlang(item)) for item in value))
    return ("other", value)


def _same(a: Any, b: Any) -> bool:
    return bool(_erlang(a) == _erlang(b))


def headers_match(arguments: dict[str, Any], headers: dict[str, Any] | None) -> bool:
    """A headers exchange's binding arguments against a message's headers, as RabbitMQ
    matches them: ``x-match`` all (the default) or any; binding arguments whose name
    starts with ``x-`` are ignored (but with all-with-x or any-with-x); a binding
    argument without a value (None) asks only that the header be there, the others
    that it have the same value (``_erlang``). ``all`` with nothing to match matches
    every message, ``any`` none."""
    headers = headers or {}
    mode = arguments.get("x-match", "all")
    with_x = mode.endswith("-with-x")
    pairs = [(name, value) for name, value in arguments.items()
             if name != "x-match" and (with_x or not name.startswith("x-"))]
    results = (name in headers and (value is None or _same(headers[name], value))
               for name, value in pairs)
    return all(results) if mode.startswith("all") else any(results)


class Broker:
    """One vhost: exchanges, queues, bindings, and messages in queues."""

    def __init__(self) -> None:
        self.exchanges: dict[str, Exchange] = {
            name: Exchange(name, kind) for name, kind in PREDECLARED.items()}
        self.queues: dict[str, Queue] = {}

    # -- topology -------------------------------------------------------------------

    def declare_exchange(self, name: str, kind: str, internal: bool = False,
                         arguments: dict[str, Any] | None = None) -> str | None:
        """Declare it; or, if it exists, the type it has when that is not ``kind``
        (the broker refuses: 406), else None. One that the test created (known by its
        type alone) takes the declaration's arguments: the broker would refuse
        different ones, so a config that starts has the same."""
        exchange = self.exchanges.get(name)
        if exchange is None:
            self.exchanges[name] = Exchange(name, kind, internal, dict(arguments or {}))
        elif exchange.type != kind:
            return exchange.type
        else:
            exchange.internal, exchange.arguments = internal, dict(arguments or {})
        return None

    def declare_queue(self, name: str, config: QueueConfig | None = None) -> None:
        queue = self.queues.get(name)
        if queue is None:
            self.queues[name] = Queue(name, config)
        elif queue.config is None:  # the test's, arguments unknown: as declared (above)
            queue.config = config

    def bind(self, destination: str, to_queue: bool, source: str, routing_key: str,
             arguments: dict[str, Any] | None = None) -> None:
        binding = BindingTo(destination, to_queue, routing_key, dict(arguments or {}))
        bindings = self.exchanges[source].bindings
        if binding not in bindings:  # binding twice is binding once
            bindings.append(binding)

    # -- routing --------------------------------------------------------------------

    def route(self, exchange: str, routing_keys: list[str],
              headers: dict[str, Any] | None) -> list[str]:
        """The queues a message published to ``exchange`` with these routing keys reaches
        (each once), in the order found; [] when it is unroutable.

        As RabbitMQ (rabbit_exchange:route): the exchanges reached are visited once
        each (a cycle of bindings ends); each one matches every routing key against its
        bindings, and one whose bindings take the message nowhere (no queue, no other
        exchange) hands it to its ``alternate-exchange``, if that exists."""
        if exchange == "":  # the default exchange: the queues named by the routing keys
            return [key for key in dict.fromkeys(routing_keys) if key in self.queues]
        if exchange not in self.exchanges:
            raise UnknownExchange(exchange)
        queues: list[str] = []
        seen = {exchange}
        work = collections.deque([exchange])
        while work:
            source = self.exchanges[work.popleft()]
            destinations = [binding for binding in source.bindings
                            if any(self._matches(source.type, binding, key, headers)
                                   for key in routing_keys)]
            alternate = source.arguments.get("alternate-exchange")
            if not destinations and isinstance(alternate, str) and alternate not in seen \
                    and alternate in self.exchanges:
                seen.add(alternate)
                work.append(alternate)
            for binding in destinations:
                if binding.to_queue:
                    if binding.destination not in queues:
                        queues.append(binding.destination)
                elif binding.destination not in seen and binding.destination in self.exchanges:
                    seen.add(binding.destination)
                    work.append(binding.destination)
        return queues

    @staticmethod
    def _matches(kind: str, binding: BindingTo, routing_key: str,
                 headers: dict[str, Any] | None) -> bool:
        if kind == "fanout":
            return True
        if kind == "direct":
            return binding.routing_key == routing_key
        if kind == "topic":
            return topic_matches(binding.routing_key, routing_key)
        if kind == "headers":
            return headers_match(binding.arguments, headers)
        return False  # a plugin's type: not modelled (harness.py refuses such a config)

    def publish(self, exchange: str, routing_key: str, body: bytes,
                properties: pika.spec.BasicProperties) -> list[str]:
        """Route and enqueue; the queues reached ([]: the broker dropped it). The broker
        removes the ``BCC`` header from what it enqueues. RefusedMessage for a ``CC``
        or ``BCC`` header that is not a list."""
        keys = (routing_key, *sender_selected(properties.headers))
        return self._enqueue(exchange, keys, body, properties)

    def _enqueue(self, exchange: str, keys: tuple[str, ...], body: bytes,
                 properties: pika.spec.BasicProperties) -> list[str]:
        queues = self.route(exchange, list(keys), properties.headers)
        if queues and properties.headers and "BCC" in properties.headers:
            properties = _with_headers(properties, {
                k: v for k, v in properties.headers.items() if k != "BCC"})
        for queue in queues:
            self.queues[queue].messages.append(Stored(body, properties, exchange, keys[0],
                                                      routing_keys=keys))
        return queues

    # -- dead-lettering ---------------------------------------------------------------

    def dead_letter(self, queue: Queue, message: Stored, reason: str) -> list[str]:
        """What the broker does with a message leaving ``queue`` for ``reason``
        (``rejected``, ``expired``, ``delivery_limit``): republished to the queue's
        dead-letter exchange with its ``x-death`` header, or dropped without one.

        As RabbitMQ 3.10 (rabbit_dead_letter): without ``x-dead-letter-routing-key`` the
        copy is routed with the message's own routing keys (its CC's and BCC's too),
        with one with that key alone and without the CC header; the ``expiration``
        property goes, recorded in x-death; and a copy that would come back to a queue
        it already died in with no reject on the way (a cycle of TTLs) is not
        delivered there."""
        exchange = queue.argument("x-dead-letter-exchange")
        if exchange is None or (exchange != "" and exchange not in self.exchanges):
            return []
        headers = _with_death(message, queue.name, reason)
        routing_key = queue.argument("x-dead-letter-routing-key")
        if routing_key is None:
            keys = message.routing_keys or (message.routing_key,)
        else:
            keys = (routing_key,)
            headers.pop("CC", None)
        values = dict(vars(message.properties))
        values.pop("expiration", None)
        values["headers"] = headers
        properties = decoded(pika.spec.BasicProperties(**values))
        queues = self.route(exchange, list(keys), headers)
        if reason != "rejected":
            queues = [name for name in queues if not _is_cycle(name, headers["x-death"])]
        for name in queues:
            self.queues[name].messages.append(Stored(message.body, properties, exchange,
                                                     keys[0], routing_keys=keys))
        return queues


def sender_selected(headers: dict[str, Any] | None) -> list[str]:
    """The routing keys of the ``CC`` and ``BCC`` headers (their str items); a header
    that is not a list is refused, as RabbitMQ refuses it."""
    keys: list[str] = []
    for header in ("CC", "BCC"):
        if not headers or header not in headers:
            continue
        value = headers[header]
        if not isinstance(value, list):
            raise RefusedMessage(f"406 PRECONDITION_FAILED - invalid message: "
                                 f'{{unacceptable_type_in_header,"{header}",'
                                 f"{amqp_type(value)}}}")
        keys += [key for key in value if isinstance(key, str)]
    return keys


def decoded(properties: pika.spec.BasicProperties) -> pika.spec.BasicProperties:
    """The properties as a consumer receives them: encoded as pika sends them and
    decoded as pika reads them (a timestamp loses its microseconds and comes back in
    UTC; an int may come back as pika's long; nothing is shared with the sender's
    objects). Raises what pika's encoder raises for a value AMQP cannot carry."""
    received = pika.spec.BasicProperties()
    received.decode(b"".join(properties.encode()))
    return received


def _with_headers(properties: pika.spec.BasicProperties,
                  headers: dict[str, Any]) -> pika.spec.BasicProperties:
    values = dict(vars(properties))
    values["headers"] = headers
    return pika.spec.BasicProperties(**values)


def _is_cycle(queue: str, deaths: list[Any]) -> bool:
    """Whether a dead-lettered copy reaching ``queue`` closes a cycle without a reject:
    ``queue`` is in its x-death (most recent first), and no death since, nor that one,
    was a reject."""
    for i, death in enumerate(deaths):
        if isinstance(death, dict) and death.get("queue") == queue:
            return all(isinstance(d, dict) and d.get("reason") != "rejected"
                       for d in deaths[:i + 1])
    return False


def _with_death(message: Stored, queue: str, reason: str) -> dict[str, Any]:
    """The message's headers with the ``x-death`` entry RabbitMQ 3.10 adds, latest
    first: a new one (count 1, the time, the exchange the message was published to,
    its routing key and CC keys, and its ``original-expiration`` if it had one), or
    the entry of an earlier death in the same queue for the same reason, moved
    first, its count increased and the rest as it was; and, on a first death, the
    ``x-first-death-*`` headers."""
    headers = dict(message.properties.headers or {})
    deaths = [dict(death) for death in headers.get("x-death", []) if isinstance(death, dict)]
    first = "x-death" not in headers
    for death in deaths:
        if death.get("queue") == queue and death.get("reason") == reason:
            deaths.remove(death)
            death["count"] = long(int(death.get("count", 0)) + 1)
            break
    else:
        cc = headers.get("CC")
        death = {"count": long(1), "reason": reason, "queue": queue,
                 "time": datetime.now(timezone.utc).replace(microsecond=0),
                 "exchange": message.exchange,
                 "routing-keys": [message.routing_key,
                                  *(key for key in (cc if isinstance(cc, list) else [])
                                    if isinstance(key, str))]}
        if message.properties.expiration is not None:
            death["original-expiration"] = message.properties.expiration
    headers["x-death"] = [death, *deaths]
    if first:
        headers["x-first-death-reason"] = reason
        headers["x-first-death-queue"] = queue
        headers["x-first-death-exchange"] = message.exchange
    return headers

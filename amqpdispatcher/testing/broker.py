"""An in-memory model of what RabbitMQ does with a published message: exchanges
(direct, fanout, topic, headers, the default exchange), bindings to queues and to
other exchanges, the ``alternate-exchange`` argument, sender-selected distribution
(``CC``, ``BCC``), dead-lettering (reject without requeue, a quorum queue's
``x-delivery-limit``, a message TTL running out) and queues holding messages in order.

It knows nothing of consumers: harness.py delivers from its queues. No gevent, no
pika connection; pika's BasicProperties only, as the broker's message properties.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pika.spec

from ..config import QueueConfig

BUILT_IN_TYPES = ("direct", "fanout", "topic", "headers")
# What every vhost of RabbitMQ has, by name and type; the default exchange "" aside.
PREDECLARED = {"amq.direct": "direct", "amq.fanout": "fanout", "amq.topic": "topic",
               "amq.headers": "headers", "amq.match": "headers"}
X_MATCH = ("all", "any", "all-with-x", "any-with-x")


class UnknownExchange(LookupError):
    """A publish named an exchange the broker does not have (it would close the channel:
    404 NOT_FOUND)."""


@dataclass
class Stored:
    """A message in a queue, as the broker holds it."""

    body: bytes
    properties: pika.spec.BasicProperties
    exchange: str
    routing_key: str
    redelivered: bool = False
    requeues: int = 0  # how often a consumer gave it back (reject or nack with requeue)


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


def _same(a: Any, b: Any) -> bool:
    # AMQP booleans are not the integers 0 and 1.
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def headers_match(arguments: dict[str, Any], headers: dict[str, Any] | None) -> bool:
    """A headers exchange's binding arguments against a message's headers, as RabbitMQ
    matches them: ``x-match`` all (the default) or any; binding arguments whose name
    starts with ``x-`` are ignored (but with all-with-x or any-with-x); a binding
    argument without a value (None) asks only that the header be there. ``all`` with
    nothing to match matches every message, ``any`` none."""
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
                         arguments: dict[str, Any] | None = None) -> None:
        if name not in self.exchanges:
            self.exchanges[name] = Exchange(name, kind, internal, dict(arguments or {}))

    def declare_queue(self, name: str, config: QueueConfig | None = None) -> None:
        if name not in self.queues:
            self.queues[name] = Queue(name, config)

    def bind(self, destination: str, to_queue: bool, source: str, routing_key: str,
             arguments: dict[str, Any] | None = None) -> None:
        binding = BindingTo(destination, to_queue, routing_key, dict(arguments or {}))
        bindings = self.exchanges[source].bindings
        if binding not in bindings:  # binding twice is binding once
            bindings.append(binding)

    # -- routing --------------------------------------------------------------------

    def route(self, exchange: str, routing_key: str,
              headers: dict[str, Any] | None) -> list[str]:
        """The queues a message published to ``exchange`` reaches (each once), in the
        order of their bindings; [] when it is unroutable. ``CC`` and ``BCC`` headers
        (lists of routing keys) route it as more routing keys would."""
        if exchange not in self.exchanges and exchange != "":
            raise UnknownExchange(exchange)
        keys = [routing_key]
        for header in ("CC", "BCC"):
            extra = (headers or {}).get(header)
            if isinstance(extra, list):
                keys += [key for key in extra if isinstance(key, str)]
        queues: list[str] = []
        for key in keys:
            for queue in self._route_key(exchange, key, headers):
                if queue not in queues:
                    queues.append(queue)
        return queues

    def _route_key(self, exchange: str, routing_key: str,
                   headers: dict[str, Any] | None) -> list[str]:
        if exchange == "":  # the default exchange: the queue named by the routing key
            return [routing_key] if routing_key in self.queues else []
        queues: list[str] = []
        seen: set[str] = set()

        def visit(name: str) -> None:
            if name in seen:  # exchange-to-exchange cycles end here, as on the broker
                return
            seen.add(name)
            source = self.exchanges[name]
            for binding in source.bindings:
                if not self._matches(source.type, binding, routing_key, headers):
                    continue
                if not binding.to_queue:
                    visit(binding.destination)
                elif binding.destination not in queues:
                    queues.append(binding.destination)

        visit(exchange)
        alternate = self.exchanges[exchange].arguments.get("alternate-exchange")
        if not queues and isinstance(alternate, str) and alternate in self.exchanges:
            return self._route_key(alternate, routing_key, headers)
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
        removes the ``BCC`` header from what it enqueues."""
        queues = self.route(exchange, routing_key, properties.headers)
        if queues and properties.headers and "BCC" in properties.headers:
            values = dict(vars(properties))
            values["headers"] = {k: v for k, v in properties.headers.items() if k != "BCC"}
            properties = pika.spec.BasicProperties(**values)
        for queue in queues:
            self.queues[queue].messages.append(Stored(body, properties, exchange, routing_key))
        return queues

    # -- dead-lettering ---------------------------------------------------------------

    def dead_letter(self, queue: Queue, message: Stored, reason: str) -> list[str]:
        """What the broker does with a message leaving ``queue`` for ``reason``
        (``rejected``, ``expired``, ``delivery_limit``): republished to the queue's
        dead-letter exchange with its ``x-death`` header, or dropped without one."""
        exchange = queue.argument("x-dead-letter-exchange")
        if exchange is None or (exchange != "" and exchange not in self.exchanges):
            return []
        routing_key = queue.argument("x-dead-letter-routing-key")
        if routing_key is None:
            routing_key = message.routing_key
        values = dict(vars(message.properties))
        values.pop("expiration", None)  # the broker drops it from a dead-lettered copy
        values["headers"] = _with_death(message, queue.name, reason)
        return self.publish(exchange, routing_key, message.body,
                            pika.spec.BasicProperties(**values))


def _with_death(message: Stored, queue: str, reason: str) -> dict[str, Any]:
    """The message's headers with the ``x-death`` entry RabbitMQ adds (counted per
    queue and reason, the latest first) and the ``x-first-death-*`` headers."""
    headers = dict(message.properties.headers or {})
    deaths = [dict(death) for death in headers.get("x-death", []) if isinstance(death, dict)]
    count = 1
    for death in deaths:
        if death.get("queue") == queue and death.get("reason") == reason:
            count = int(death.get("count", 0)) + 1
            deaths.remove(death)
            break
    deaths.insert(0, {"count": count, "reason": reason, "queue": queue,
                      "time": datetime.now(timezone.utc).replace(microsecond=0),
                      "exchange": message.exchange, "routing-keys": [message.routing_key]})
    headers["x-death"] = deaths
    headers.setdefault("x-first-death-reason", reason)
    headers.setdefault("x-first-death-queue", queue)
    headers.setdefault("x-first-death-exchange", message.exchange)
    return headers

"""``Harness``: a consumer, or a whole config, run without a broker.

Every rule is the daemon's own code, driven over recording fakes of the two things
that need a live connection:

- a delivery is handled by the real ``ConsumerPool.handle`` (consuming/pool.py):
  the real ``Message`` and ``AMQPProxy``, auto-ack on return, the failure policy on
  a raise (consuming/failure.py, ``FailurePolicy``, with its headers and delay queue
  names), ``time_limit`` (``TimeLimit``), ``shutdown(exc)`` and a fresh instance
  after a failure;
- its settles go through the real ``Acknowledger`` (consuming/acks.py), which counts
  each delivery's outcome (consuming/outcomes.py) as the daemon's metrics do, over a
  channel that hands them to the in-memory broker (broker.py);
- ``amqp.publish`` goes through the real ``Publishers`` and its argument checks
  (amqp/arguments.py, ``build_message``) to a publisher that routes in memory;
- the config is read by ``load_config`` (a ConfigError is the daemon's), the retry
  policy's queues come from config/retry.py, and start-up user code runs as the
  daemon runs it (runtime/generation.py).

Nothing here needs gevent's monkey-patching: deliveries are handled one at a time in
the calling greenlet (a plain test's main greenlet), so ``time_limit`` interrupts a
``consume`` where it yields to gevent (``gevent.sleep``), as in the daemon.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Union, cast

import pika.spec
from pika.compat import long

from ..amqp.confirms import check_headers
from ..amqp.errors import PublishError, PublishReturned, TopologyError
from ..amqp.publishing import Publisher
from ..amqp.topology import describe_inequivalent
from ..config import (
    Config,
    ConfigError,
    ConsumerConfig,
    describe_exception,
    load_config,
    load_config_dict,
)
from ..config.imports import _exception_classes
from ..config.keys import _Checker
from ..config.retry import retry_queues
from ..config.top_level import parse_data
from ..consuming.acks import Acknowledger
from ..consuming.failure import ATTEMPT_HEADER, TimeLimit
from ..consuming.message import PROPERTY_NAMES
from ..consuming.middleware import Middlewares
from ..consuming.outcomes import DROPPED, OUTCOMES
from ..consuming.pool import ConsumerPool, StopNow
from ..runtime.generation import _append_instance, run_user_code
from .broker import (
    BUILT_IN_TYPES,
    X_MATCH,
    Broker,
    Queue,
    RefusedMessage,
    Stored,
    amqp_type,
    decoded,
)

ConfigSource = Union[str, "os.PathLike[str]", Mapping[str, Any]]

# The outcomes a delivery can have here (the metrics' names; "dropped" needs a
# channel that closes, which the harness never does).
OUTCOME_NAMES = tuple(name for name in OUTCOMES if name != OUTCOMES[DROPPED])
MAX_REDELIVERIES = 100  # run(): requeues of one message before it is called runaway
MAX_DELIVERIES = 100_000  # run(): deliveries in one call before it stops


class HarnessError(Exception):
    """What the harness cannot or will not run: a message redelivered without end, a
    replacement instance that cannot be built, a config it does not model."""


@dataclass(frozen=True)
class Published:
    """A message published by a consumer (``amqp.publish``) or by the failure policy
    (a move to a delay or dead-letter queue). ``properties``: the AMQP properties that
    are set, but ``headers``; ``queues``: where the broker model put it ([] when
    unroutable; always [] from ``Harness.consume``, which has no broker)."""

    exchange: str
    routing_key: str
    headers: dict[str, Any] | None
    body: bytes
    properties: dict[str, Any]
    mandatory: bool = False
    queues: tuple[str, ...] = ()


@dataclass
class Result:
    """What ``Harness.consume`` did with one message: ``outcome`` (the metrics' name:
    ack, requeue, reject, retry, dead_letter), what ``consume`` published, what it
    raised (None if it returned), and the failure policy's move (the copy sent to a
    delay or dead-letter queue, with its headers), if any."""

    outcome: str
    published: list[Published] = field(default_factory=list)
    exception: BaseException | None = None
    moved: Published | None = None


def _producer_message(exchange: str, routing_key: str, headers: Any, body: Any,
                      properties: dict[str, Any]) -> tuple[bytes, pika.spec.BasicProperties]:
    """A producer's message, checked as ``amqp.publish`` checks its arguments, with a
    ``user_id`` too (which amqp.publish does not take: RabbitMQ takes only the
    publishing user's, which the harness does not check)."""
    from ..amqp.arguments import PROPERTY_CHECKS, build_message

    user_id = properties.pop("user_id", None)
    data, props = build_message(exchange, routing_key, headers, body, False, properties)
    if user_id is not None:
        props.user_id = PROPERTY_CHECKS["app_id"]("user_id", user_id)  # a short str
    return data, props


def _sent(properties: pika.spec.BasicProperties) -> pika.spec.BasicProperties:
    """What the daemon's publish checks before sending (confirms.check_headers: a
    TypeError naming a header AMQP cannot carry, a PublishError for headers over a
    frame), then the properties as they travel: encoded and decoded by pika."""
    if properties.headers:
        check_headers(properties, pika.spec.FRAME_MAX_SIZE)
    return decoded(properties)


def _record(exchange: str, routing_key: str, body: bytes,
            properties: pika.spec.BasicProperties, mandatory: bool,
            queues: Iterable[str] = ()) -> Published:
    values = {name: value for name in PROPERTY_NAMES
              if name != "headers" and (value := getattr(properties, name, None)) is not None}
    return Published(exchange, routing_key, properties.headers, body, values, mandatory,
                     tuple(queues))


Send = Callable[[str, str, bytes, pika.spec.BasicProperties, bool, bool], None]


class _Publishing:
    """Stands for amqp/publishing.py's PublishingConnection: ``confirms`` and the
    publishers; a publish is handed to ``send``."""

    def __init__(self, confirms: bool, send: Send) -> None:
        self.confirms = confirms
        self.send = send

    def publisher(self, name: str) -> _Publisher:
        return _Publisher(self, name)


class _Publisher:
    """Stands for one publishing channel (amqp/publishing.py, Publisher)."""

    def __init__(self, publishing: _Publishing, name: str) -> None:
        self.publishing = publishing
        self.name = name

    def publish(self, exchange: str, routing_key: str, body: bytes,
                properties: pika.spec.BasicProperties, mandatory: bool = True,
                confirm: bool = True) -> None:
        self.publishing.send(exchange, routing_key, body, properties, mandatory, confirm)


class _Channel:
    """The frames the Acknowledger sends, handed to ``settle(tag, how, multiple)``."""

    def __init__(self, settle: Callable[[int, str, bool], None]) -> None:
        self._settle = settle

    def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self._settle(delivery_tag, "ack", multiple)

    def basic_reject(self, delivery_tag: int, requeue: bool = True) -> None:
        self._settle(delivery_tag, "requeue" if requeue else "reject", False)


class _Entry:
    """One consumer entry: the daemon's ConsumerPool and Acknowledger, delivering one
    message at a time, its slots in turn."""

    def __init__(self, entry: ConsumerConfig, factory: Callable[[], Any], confirms: bool,
                 publish: Send, move: Send,
                 no_retry_for: tuple[type[BaseException], ...] = ()) -> None:
        self.entry = entry
        self.started = False  # instances built: a failing factory is now a replacement's
        self.replacement_failed: BaseException | None = None

        def build() -> Any:
            try:
                return factory()
            except BaseException as exc:  # noqa: BLE001 - user code
                if not self.started:  # at start: the daemon's UserCodeError (start())
                    raise
                # A replacement: the daemon retries with backoff for ever; a test
                # learns it at once.
                self.replacement_failed = exc
                raise StopNow() from exc

        # The pool calls ``cls()`` for an instance: any callable will do.
        self.pool = ConsumerPool(
            entry, cast(type, build),
            cast(Publisher, _Publishing(confirms, publish).publisher(entry.path)),
            cast(Publisher, _Publishing(True, move).publisher(f"{entry.path} retry policy")),
            no_retry_for=no_retry_for)
        # The settled deliveries: tag -> how (ack, requeue, reject).
        self.settled: dict[int, str] = {}
        # prefetch 1: every ack is sent at once, never left to a hub callback.
        self.acker = Acknowledger(_Channel(self._settle), 1, self.pool.metrics.outcomes)
        self.limits: list[TimeLimit | None] = []
        self._tag = 0
        self._slot = 0

    def _settle(self, tag: int, how: str, multiple: bool) -> None:
        # One delivery at a time: a multiple ack covers ``tag`` alone.
        self.settled[tag] = how

    def start(self, instances: list[Any] | None = None) -> None:
        if instances is None:
            self.pool.create_instances()
        else:
            self.pool.instances = instances
        self.limits = [TimeLimit(self.entry.time_limit) if self.entry.time_limit else None
                       for _ in self.pool.instances]
        self.started = True

    def deliver(self, body: bytes, properties: pika.spec.BasicProperties, exchange: str,
                routing_key: str, redelivered: bool) -> tuple[int, str]:
        """Hand one delivery to the next slot; its tag and how it was settled."""
        self._tag += 1
        tag = self._tag
        method = pika.spec.Basic.Deliver(consumer_tag=f"harness.{self.entry.path}",
                                         delivery_tag=tag, redelivered=redelivered,
                                         exchange=exchange, routing_key=routing_key)
        slot, self._slot = self._slot, (self._slot + 1) % len(self.pool.instances)
        self.acker.delivered(tag)
        try:
            handle = self.pool.handle if self.pool.middleware is None \
                else self.pool._handle_middleware
            handle(slot, (self.acker, method, properties, body), self.limits[slot])
        except StopNow:
            exc = self.replacement_failed
            raise HarnessError(f"{self.entry.path}: creating a replacement instance of "
                               f"{self.entry.consumer} raised "
                               f"{describe_exception(exc) if exc else 'StopNow'} (the daemon "
                               "would retry it with backoff, delivering nothing to that "
                               "instance meanwhile)") from exc
        self.acker.flush()
        return tag, self.settled.pop(tag)


class Harness:
    """A config's exchanges, queues, bindings and consumers, in memory.

        with Harness("config.yml") as h:          # or a dict, as Dispatcher takes
            h.publish("notify", "job.mat", b"1")
            h.run()
            h.messages("notify_mat_job.failed")   # bodies left in a queue
            h.outcomes("notify_mat_job")          # {"ack": 1, "requeue": 0, ...}

    ``existing_exchanges`` (name -> type) and ``existing_queues``: what the broker
    already has before the config is declared (what a ``passive: true`` entry
    checks, and a consumer entry's queue the config does not declare).

    The start is the daemon's: the config is loaded and checked (``ConfigError``),
    the startup handler is called and the consumer instances built
    (``UserCodeError``), then the topology is declared (``TopologyError``, with the
    daemon's line, for a passive exchange or queue that does not exist, a binding to
    a missing exchange, a consumer's missing queue). ``close()`` (or leaving the
    ``with``) calls every instance's ``shutdown(None)``; so does a start that fails,
    for the instances already built.
    """

    def __init__(self, config: ConfigSource, *,
                 existing_exchanges: Mapping[str, str] | None = None,
                 existing_queues: Iterable[str] = ()) -> None:
        if isinstance(config, Mapping):
            self.config, resolved = load_config_dict(config)
        else:
            self.config, resolved = load_config(os.fspath(config))
        self._refuse_what_is_not_modelled(self.config)
        self.broker = Broker()
        for name, kind in (existing_exchanges or {}).items():
            if kind not in BUILT_IN_TYPES:
                raise HarnessError(f"existing_exchanges: {name!r}: the harness routes "
                                   f"direct, fanout, topic and headers exchanges, not {kind!r}")
            self.broker.declare_exchange(name, kind)
        if isinstance(existing_queues, (str, bytes)):  # not a name per character
            raise TypeError(f"existing_queues: expected a list of queue names, got "
                            f"{existing_queues!r}")
        for name in existing_queues:
            self.broker.declare_queue(name)
        self.published: list[Published] = []  # by consumers (amqp.publish), in order
        self.entries = [_Entry(entry, resolved.consumer_classes[entry.consumer],
                               self.config.publisher_confirms, self._publish_from_consume,
                               self._move, resolved.no_retry_for.get(entry.path, ()))
                        for entry in self.config.consumers]
        self._next_entry: dict[str, int] = {}
        self._closed = False
        path = self.config.path
        self.middleware: Middlewares | None = None
        try:
            if resolved.startup_handler is not None:
                run_user_code(resolved.startup_handler,
                              f"{path}: startup_handler: {self.config.startup_handler}")
            for state in self.entries:
                run_user_code(state.start, f"{path}: {state.entry.path}.consumer: "
                                           f"{state.entry.consumer}()")
            if resolved.middleware:  # as the daemon's generation does
                instances: list[Any] = []
                for i, cls in enumerate(resolved.middleware):
                    run_user_code(partial(_append_instance, instances, cls),
                                  f"{path}: middleware[{i}]: {self.config.middleware[i]}()")
                self.middleware = middleware = Middlewares(instances)
                run_user_code(lambda: middleware.start(self.config),
                              f"{path}: middleware: on_start")
                if middleware.around_consume():
                    for state in self.entries:
                        state.pool.middleware = middleware
            self._declare()
        except BaseException:
            self.close()  # a start that fails still shuts down what it built, as the daemon
            raise

    @staticmethod
    def _refuse_what_is_not_modelled(config: Config) -> None:
        for exchange in config.exchanges:
            if exchange.type is not None and exchange.type not in BUILT_IN_TYPES:
                raise HarnessError(f"{config.path}: {exchange.path}.type: the harness routes "
                                   f"direct, fanout, topic and headers exchanges, not "
                                   f"{exchange.type!r}")
        for entry in config.consumers:
            if entry.stream:
                raise HarnessError(f"{config.path}: {entry.path}: the harness does not model "
                                   "streams (offsets, messages kept after an ack)")

    # -- the start ---------------------------------------------------------------------

    def _declare(self) -> None:
        """As amqp/topology.py's declare_topology: the exchanges, their bindings to
        other exchanges, then the queues (the retry policies' too) and their bindings;
        then each entry's queue must exist."""
        config, broker, path = self.config, self.broker, self.config.path
        for exchange in config.exchanges:
            if exchange.passive:
                if exchange.exchange not in broker.exchanges:
                    raise TopologyError(
                        f"{path}: {exchange.path}: exchange {exchange.exchange!r} does not "
                        f"exist (passive: true only checks it): broker said "
                        f"{_no('exchange', exchange.exchange)}")
            else:
                kind = exchange.type or "direct"
                current = broker.declare_exchange(exchange.exchange, kind, exchange.internal,
                                                  exchange.arguments)
                if current is not None:  # the daemon's line for the broker's 406
                    reply = (f"406 PRECONDITION_FAILED - inequivalent arg 'type' for exchange "
                             f"{exchange.exchange!r} in vhost '/': received {kind!r} but "
                             f"current is {current!r}")
                    raise TopologyError(describe_inequivalent(path, exchange, reply)
                                        or f"{path}: {exchange.path}: broker said {reply}")
        for exchange in config.exchanges:
            for i, binding in enumerate(exchange.bindings):
                self._bind(f"{path}: {exchange.path}.bindings[{i}]: cannot bind exchange "
                           f"{exchange.exchange!r} to exchange {binding.exchange!r}",
                           binding.exchange, binding.arguments)
                broker.bind(exchange.exchange, False, binding.exchange, binding.routing_key,
                            binding.arguments)
        for queue in config.queues + retry_queues(config):
            if queue.passive:
                if queue.queue not in broker.queues:
                    raise TopologyError(
                        f"{path}: {queue.path}: queue {queue.queue!r} does not exist or "
                        f"differs (passive: true only checks it): broker said "
                        f"{_no('queue', queue.queue)}")
            else:
                broker.declare_queue(queue.queue, queue)
            for i, binding in enumerate(queue.bindings):
                self._bind(f"{path}: {queue.path}.bindings[{i}]: cannot bind queue "
                           f"{queue.queue!r} to exchange {binding.exchange!r}",
                           binding.exchange, binding.arguments)
                broker.bind(queue.queue, True, binding.exchange, binding.routing_key,
                            binding.arguments)
        for entry in config.consumers:
            if entry.queue not in broker.queues:
                raise TopologyError(f"{path}: {entry.path}: cannot consume from queue "
                                    f"{entry.queue!r}: broker said {_no('queue', entry.queue)}")

    def _bind(self, what: str, source: str, arguments: Mapping[str, Any]) -> None:
        exchange = self.broker.exchanges.get(source)
        if exchange is None:
            raise TopologyError(f"{what}: broker said {_no('exchange', source)}")
        match = arguments.get("x-match", "all")
        if exchange.type != "headers" or match in X_MATCH:
            return
        if isinstance(match, str):  # RabbitMQ's words (rabbit_exchange_type_headers)
            problem = (f"Invalid x-match field value <<{json.dumps(match)}>>; expected all, "
                       "any, all-with-x, or any-with-x")
        else:
            value = ("undefined" if match is None else str(match).lower()
                     if isinstance(match, bool) else match)
            problem = (f"Invalid x-match field type {amqp_type(match)} (value {value}); "
                       "expected longstr")
        raise TopologyError(f"{what}: broker said 406 PRECONDITION_FAILED - {problem}")

    # -- publishing ----------------------------------------------------------------------

    def publish(self, exchange: str, routing_key: str, body: bytes | str,
                headers: dict[str, Any] | None = None, **properties: Any) -> list[str]:
        """Publish as a producer would: routed as RabbitMQ routes it; the queues it
        reached ([]: unroutable, dropped). Properties by name as ``amqp.publish``
        takes them (the same checks), and ``user_id``. PublishError for a missing or
        internal exchange."""
        data, props = _producer_message(exchange, routing_key, headers, body, properties)
        self._exists(exchange)
        return self._route(exchange, routing_key, data, _sent(props))

    def _exists(self, exchange: str) -> None:
        """The daemon checks that an exchange exists before it sends to it (whatever
        publisher_confirms): PublishError. Not one named amq.*, taken to be the
        broker's own (the broker refuses one that is not, in ``_route``)."""
        if exchange != "" and not exchange.startswith("amq.") \
                and exchange not in self.broker.exchanges:
            raise PublishError(f"exchange {exchange!r} does not exist (the broker said "
                               f"{_no('exchange', exchange)}); nothing was sent")

    def _route(self, exchange: str, routing_key: str, body: bytes,
               properties: pika.spec.BasicProperties, confirm: bool = True) -> list[str]:
        """Hand a sent message (``_sent``) to the broker, which may refuse it (an
        internal exchange, a CC or BCC header that is not a list), closing the
        channel: PublishError when the publish waits for its confirm, else the message
        is lost without a word, as in the daemon."""
        target = self.broker.exchanges.get(exchange)
        try:
            if exchange and target is None:
                raise RefusedMessage(f"404 NOT_FOUND - no exchange {exchange!r} in vhost '/'")
            if target is not None and target.internal:
                raise RefusedMessage(f"403 ACCESS_REFUSED - cannot publish to internal "
                                     f"exchange {exchange!r} in vhost '/'")
            return self.broker.publish(exchange, routing_key, body, properties)
        except RefusedMessage as refused:
            if not confirm:
                return []
            raise PublishError(f"the broker closed the publishing channel: {refused.reply}; "
                               f"the message to exchange {exchange!r} may or may not have "
                               "been taken") from None

    def _publish_from_consume(self, exchange: str, routing_key: str, body: bytes,
                              properties: pika.spec.BasicProperties, mandatory: bool,
                              confirm: bool) -> None:
        self._exists(exchange)
        sent = _sent(properties)
        queues = self._route(exchange, routing_key, body, sent, confirm)
        self.published.append(_record(exchange, routing_key, body, sent, mandatory, queues))
        if not queues and mandatory and confirm:
            raise _returned(exchange, routing_key)

    def _move(self, exchange: str, routing_key: str, body: bytes,
              properties: pika.spec.BasicProperties, mandatory: bool, confirm: bool) -> None:
        if not self._route(exchange, routing_key, body, _sent(properties)) and mandatory:
            raise _returned(exchange, routing_key)

    # -- consuming -----------------------------------------------------------------------

    def run(self, *, max_redeliveries: int = MAX_REDELIVERIES,
            max_deliveries: int = MAX_DELIVERIES) -> int:
        """Deliver until no message is left that a consumer takes; the number of
        deliveries. The queues are served in turn, one message each; a queue with
        several entries (or instances) gives its messages to them in turn. When none
        is left, time passes at once: the messages of queues with a message TTL and
        a dead-letter exchange (the retry policies' delay queues) are dead-lettered
        as if their TTL ran out, and delivering goes on.

        Never hangs: HarnessError when one message has been requeued
        ``max_redeliveries`` times (a consume that always fails, without a retry
        policy: the broker would redeliver it for ever), or after ``max_deliveries``
        deliveries (consumers feeding each other without end); both name the queue
        and the message."""
        if self._closed:  # its instances are shut down: nothing could take a message
            raise HarnessError("run() after close(): the consumer instances were shut down")
        consumed = {state.entry.queue for state in self.entries}
        delivered = 0
        while True:
            progressed = False
            for name in sorted(consumed):
                queue = self.broker.queues[name]
                if not queue.messages:
                    continue
                if delivered >= max_deliveries:
                    raise HarnessError(f"run() stopped after {max_deliveries} deliveries: "
                                       f"queue {name!r} still has {len(queue.messages)} "
                                       f"message(s), the next {_describe(queue.messages[0])}"
                                       "; do consumers feed each other without end?")
                self._deliver_one(queue, max_redeliveries)
                delivered += 1
                progressed = True
            if not progressed and not self._let_time_pass():
                return delivered

    def _deliver_one(self, queue: Queue, max_redeliveries: int) -> None:
        message = queue.messages.popleft()
        states = [state for state in self.entries if state.entry.queue == queue.name]
        turn = self._next_entry.get(queue.name, 0)
        self._next_entry[queue.name] = (turn + 1) % len(states)
        properties = message.properties
        if queue.argument("x-queue-type") == "quorum":  # its count of earlier returns
            properties = decoded(properties)
            properties.headers = {**(properties.headers or {}),
                                  "x-delivery-count": long(message.requeues)}
        state = states[turn % len(states)]
        failures = state.pool.metrics.failures
        _, how = state.deliver(message.body, properties, message.exchange,
                               message.routing_key, message.redelivered)
        if how == "ack":
            return
        if how == "reject":
            self.broker.dead_letter(queue, message, "rejected")
            return
        message.redelivered = True
        message.requeues += 1
        limit = queue.argument("x-delivery-limit")
        if queue.argument("x-queue-type") == "quorum" and isinstance(limit, int) \
                and message.requeues > limit:
            self.broker.dead_letter(queue, message, "delivery_limit")
            return
        if message.requeues >= max_redeliveries:
            queue.messages.appendleft(message)
            if state.pool.metrics.failures == failures:
                why = ("its consume keeps giving it back: amqp.nack() or "
                       "amqp.reject(requeue=True)")
            elif state.entry.retry is None:
                why = "its consume keeps failing, and the entry has no retry policy"
            else:
                why = "its consume keeps failing, and the retry policy could not move it"
            if queue.argument("x-dead-letter-exchange") is not None and (
                    queue.argument("x-message-ttl") is not None
                    or message.properties.expiration is not None):
                why += ("; its TTL would end that on the broker, after as many deliveries "
                        "as fit in it: time the harness does not model")
            raise HarnessError(f"queue {queue.name!r}: the {_describe(message)} was requeued "
                               f"{message.requeues} times: the broker would redeliver it for "
                               f"ever ({why}); it is left at the head of the queue")
        queue.messages.appendleft(message)  # back where it was, as RabbitMQ requeues

    def _let_time_pass(self) -> bool:
        """Dead-letter what waits in queues with a dead-letter exchange, as if the
        time had passed: from the head of each queue, while the message there has a
        TTL (the queue's ``x-message-ttl``, or its own ``expiration``, which RabbitMQ
        applies at the head only), shortest TTL first; whether anything moved."""
        def ttl(queue: Queue) -> int | None:
            ttls = [int(value) for value in (queue.argument("x-message-ttl"),
                                             queue.messages[0].properties.expiration)
                    if value is not None]
            return min(ttls) if ttls else None

        waiting = [queue for queue in self.broker.queues.values() if queue.messages
                   and queue.argument("x-dead-letter-exchange") is not None
                   and ttl(queue) is not None]
        waiting.sort(key=lambda queue: (ttl(queue), queue.name))
        for queue in waiting:
            while queue.messages and ttl(queue) is not None:
                self.broker.dead_letter(queue, queue.messages.popleft(), "expired")
        return bool(waiting)

    # -- looking -------------------------------------------------------------------------

    def messages(self, queue: str) -> list[bytes]:
        """The bodies left in ``queue``, in order (KeyError: no such queue)."""
        return [message.body for message in self.broker.queues[queue].messages]

    def stored(self, queue: str) -> list[Stored]:
        """The messages left in ``queue``, with properties and headers."""
        return list(self.broker.queues[queue].messages)

    def outcomes(self, queue: str) -> dict[str, int]:
        """How the deliveries from ``queue`` ended, summed over the entries consuming
        it: {"ack": n, "requeue": n, "reject": n, "retry": n, "dead_letter": n}."""
        counts = dict.fromkeys(OUTCOME_NAMES, 0)
        for state in self.entries:
            if state.entry.queue == queue:
                for name, count in zip(OUTCOMES, state.pool.metrics.outcomes):
                    if name in counts:
                        counts[name] += count
        return counts

    def close(self) -> None:
        """``shutdown(None)`` on every consumer instance, as the daemon's stop does."""
        self._closed = True
        for state in self.entries:
            state.pool.shutdown_instances()
        middleware, self.middleware = getattr(self, "middleware", None), None
        if middleware is not None:
            middleware.stop()

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one consumer, one message -------------------------------------------------------

    @staticmethod
    def consume(consumer: Any, body: bytes | str, headers: dict[str, Any] | None = None, *,
                exchange: str = "", routing_key: str = "", redelivered: bool = False,
                attempt: int = 1, properties: Mapping[str, Any] | None = None,
                queue: str = "harness", retry: Mapping[str, Any] | None = None,
                time_limit: float | None = None) -> Result:
        """Give ``consumer.consume`` one message as the daemon would, and say what became
        of it. No broker and no config: what ``consume`` publishes is recorded, never
        routed (so never returned as unroutable).

        ``attempt`` above 1 is carried as the daemon's attempt header; ``properties``:
        AMQP properties by name, as ``amqp.publish`` takes them, and ``user_id``.
        ``queue``, ``retry`` (the ``retry:`` keys of a consumer entry, ``no_retry_for``
        imported as the daemon imports it) and
        ``time_limit`` are the entry's, checked as the daemon checks a config
        (ConfigError). After a failure the
        instance's ``shutdown(exc)`` is called, as the daemon does."""
        spec: dict[str, Any] = {"consumer": "harness:Consumer", "queue": queue}
        if retry is not None:
            spec["retry"] = dict(retry)
        if time_limit is not None:
            spec["time_limit"] = time_limit
        config, problems = parse_data({"consumers": [spec]}, "<Harness.consume>")
        if problems:
            raise ConfigError(problems)
        # retry.no_retry_for, imported and checked as the daemon does (config/imports.py).
        checker = _Checker("<Harness.consume>")
        retry_policy = config.consumers[0].retry
        no_retry_for = _exception_classes(checker, "consumers[0].retry.no_retry_for",
                                          retry_policy.no_retry_for) if retry_policy else ()
        if checker.problems:
            raise ConfigError(checker.problems)
        if isinstance(consumer, type):
            raise TypeError(f"Harness.consume: pass an instance of {consumer.__qualname__} "
                            f"(as the daemon makes one), not the class")
        cls = type(consumer)
        path = f"{cls.__module__}:{cls.__qualname__}"
        missing = [m for m in ("consume", "shutdown") if not callable(getattr(cls, m, None))]
        if missing:  # as config/imports.py refuses the class
            raise ConfigError([f"<Harness.consume>: consumers[0].consumer: {path!r} has no "
                               f"{' and no '.join(missing)} method"])
        entry = ConsumerConfig(**{**vars(config.consumers[0]),
                                  "consumer": path})
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            raise ValueError(f"Harness.consume: attempt: expected an int from 1 (the first "
                             f"delivery), got {attempt!r}")
        if attempt != 1:
            headers = {**(headers or {}), ATTEMPT_HEADER: attempt}
        data, props = _producer_message(exchange, routing_key, headers, body,
                                        dict(properties or {}))
        props = _sent(props)  # as a delivery carries it
        published: list[Published] = []
        moves: list[Published] = []

        def publish(exchange: str, routing_key: str, body: bytes,
                    properties: pika.spec.BasicProperties, mandatory: bool,
                    confirm: bool) -> None:
            published.append(_record(exchange, routing_key, body, _sent(properties),
                                     mandatory))

        def move(exchange: str, routing_key: str, body: bytes,
                 properties: pika.spec.BasicProperties, mandatory: bool,
                 confirm: bool) -> None:
            moves.append(_record(exchange, routing_key, body, _sent(properties), mandatory,
                                 [routing_key]))

        recording = _Recording(consumer)
        state = _Entry(entry, lambda: recording, True, publish, move, no_retry_for)
        state.start([recording])
        state.deliver(data, props, exchange, routing_key, redelivered)
        counts = state.pool.metrics.outcomes
        outcome = next(name for name, count in zip(OUTCOMES, counts) if count)
        return Result(outcome, published, recording.failure, moves[0] if moves else None)


class _Recording:
    """The consumer as the pool sees it: ``shutdown(exc)`` is how the pool tells it
    what the failed call raised (a TimeLimitExceeded too), which the Result keeps."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self.consume = consumer.consume
        self.failure: BaseException | None = None

    def shutdown(self, exception: BaseException | None = None) -> Any:
        if exception is not None and self.failure is None:
            self.failure = exception
        return self.consumer.shutdown(exception)


def _no(kind: str, name: str) -> str:
    return f"404 NOT_FOUND - no {kind} {name!r} in vhost '/'"


def _returned(exchange: str, routing_key: str) -> PublishReturned:
    # As amqp/confirms.py words the broker's basic.return.
    return PublishReturned(f"the broker returned the message to exchange {exchange!r} "
                           f"routing key {routing_key!r} as unroutable (mandatory): 312 "
                           "NO_ROUTE", 312, "NO_ROUTE")


def _describe(message: Stored) -> str:
    body = message.body if len(message.body) <= 60 else message.body[:57] + b"..."
    return (f"message {body!r} (exchange {message.exchange!r}, routing key "
            f"{message.routing_key!r})")

"""Declaring the config's topology (exchanges, queues, bindings), and telling the
broker's refusals as the config keys they concern."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import Any, Union

import pika
import pika.exceptions
import pika.spec

from ..config import EXCHANGE_KEYS, QUEUE_KEYS, Config, ExchangeConfig, QueueConfig
from .channel import SyncChannel
from .errors import (
    BrokerError,
    TopologyError,
)

log = logging.getLogger("amqp-dispatcher.connection")

# What declare_topology declares: each has the ``path`` of its config entry.
Declared = Union[ExchangeConfig, QueueConfig]
# 503 COMMAND_INVALID, closing the connection: "unknown exchange type 'x'" for a type
# the node never knew, "invalid exchange type 'x'" once its plugin was disabled.
_REFUSED_TYPE = re.compile(r"(unknown|invalid) exchange type")


def declare_topology(connection: Any, config: Config, exchanges: Iterable[ExchangeConfig],
                     queues: Iterable[QueueConfig]) -> list[tuple[Declared, BrokerError]]:
    """Declare these exchanges of the config, then their bindings to other exchanges,
    then these queues and their bindings.

    Returns, per exchange or queue the broker would not declare or bind, why: a
    TopologyError where it refused the config, a BrokerError where something
    passing failed on its side (a queue whose node is down). Either closes only
    that channel; the next one gets a new channel. Raises BrokerError when the
    connection itself fails: lost, no answer, or closed by the broker over an
    exchange type it does not know (a TopologyError then).
    """
    failed: list[tuple[Declared, BrokerError]] = []
    sync: SyncChannel | None = None
    # Every exchange exists before any binding names it as its source.
    steps: list[tuple[Declared, Callable[[SyncChannel, Config, Any], None]]] = []
    steps += [(exchange, _declare_exchange) for exchange in exchanges]
    steps += [(exchange, _bind_exchange) for exchange in exchanges if exchange.bindings]
    steps += [(queue, _declare_queue) for queue in queues]
    for item, step in steps:
        if any(item is other for other, _ in failed):
            continue  # an exchange that was not declared is not bound
        if sync is None:
            sync = SyncChannel.open(connection)
        try:
            step(sync, config, item)
        except BrokerError as exc:
            if not exc.channel_only:
                raise
            failed.append((item, exc))
            sync = None
    if sync is not None:
        sync.close()
    return failed


def _declare_exchange(sync: SyncChannel, config: Config, exchange: ExchangeConfig) -> None:
    what = (f"exchange {exchange.exchange!r} does not exist (passive: true only checks it)"
            if exchange.passive else
            f"cannot declare exchange {exchange.exchange!r} of type {exchange.type!r}")
    try:
        sync.call(sync.channel.exchange_declare, exchange=exchange.exchange,
                  exchange_type=exchange.type or "direct", passive=exchange.passive,
                  durable=exchange.durable, auto_delete=exchange.auto_delete,
                  internal=exchange.internal, arguments=exchange.arguments or None)
    except BrokerError as exc:
        if is_refused_exchange_type(sync.close_reason):
            # The broker closes the whole connection over it; a config error all the same.
            raise TopologyError(f"{config.path}: {exchange.path}.type: {what}: broker said "
                                f"{exc} (is the plugin that provides it enabled?)",
                                refused_type=exchange) from None
        raise config_error(exc, f"{config.path}: {exchange.path}: {what}",
                           config.path, exchange) from None
    log.info("declared exchange %s (%s)", exchange.exchange, exchange.type or "passive")


def is_refused_exchange_type(reason: Any) -> bool:
    """Whether the broker closed the connection over an exchange type it does not know
    (a plugin's, never enabled or disabled since)."""
    return (isinstance(reason, pika.exceptions.ConnectionClosedByBroker)
            and reason.reply_code == 503 and bool(_REFUSED_TYPE.search(reason.reply_text)))


def _bind_exchange(sync: SyncChannel, config: Config, exchange: ExchangeConfig) -> None:
    for i, binding in enumerate(exchange.bindings):
        try:
            sync.call(sync.channel.exchange_bind, destination=exchange.exchange,
                      source=binding.exchange, routing_key=binding.routing_key,
                      arguments=binding.arguments or None)
        except BrokerError as exc:
            raise config_error(exc, f"{config.path}: {exchange.path}.bindings[{i}]: cannot bind "
                                    f"exchange {exchange.exchange!r} to exchange "
                                    f"{binding.exchange!r}") from None


def _declare_queue(sync: SyncChannel, config: Config, queue: QueueConfig) -> None:
    what = (f"queue {queue.queue!r} does not exist or differs (passive: true only checks it)"
            if queue.passive else f"cannot declare queue {queue.queue!r}")
    try:
        sync.call(sync.channel.queue_declare, queue=queue.queue, passive=queue.passive,
                  durable=queue.durable, exclusive=queue.exclusive,
                  auto_delete=queue.auto_delete, arguments=queue.arguments() or None)
    except BrokerError as exc:
        raise config_error(exc, f"{config.path}: {queue.path}: {what}", config.path,
                           queue) from None
    for i, binding in enumerate(queue.bindings):
        try:
            sync.call(sync.channel.queue_bind, queue=queue.queue,
                      exchange=binding.exchange, routing_key=binding.routing_key,
                      arguments=binding.arguments or None)
        except BrokerError as exc:
            raise config_error(exc, f"{config.path}: {queue.path}.bindings[{i}]: cannot bind "
                                    f"queue {queue.queue!r} to exchange {binding.exchange!r}") \
                from None
    log.info("declared queue %s with %d binding(s)", queue.queue, len(queue.bindings))


# RabbitMQ's text for a declaration that differs from what exists, e.g.
# "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'q' in vhost 'v':
# received '20' but current is '10'". A value is none, 'V', or the value 'V' of type 'T'.
_VALUE = r"(none|(?:the value )?'(?:.*?)'(?: of type '[\w-]+')?)"
_INEQUIVALENT = re.compile(r"inequivalent arg '(?P<arg>[^']*)' for (?P<kind>queue|exchange) "
                           rf"'.*' in vhost '.*': received {_VALUE} but current is {_VALUE}$")


def _value(text: str) -> str | None:
    if text == "none":
        return None
    value = text.removeprefix("the value ").split("' of type '")[0].strip("'")
    return value or "''"


def describe_inequivalent(config_path: str, item: Declared, reply_text: str) -> str | None:
    """The one line for the broker's 406 "inequivalent arg" refusal of a queue or exchange
    of the config (a queue's or exchange's arguments and flags cannot change once it
    exists), naming the config key and both values; None for any other reply."""
    match = _INEQUIVALENT.search(reply_text)
    if match is None:
        return None
    arg, kind = match.group("arg"), match.group("kind")
    asked, current = _value(match.group(3)), _value(match.group(4))
    name = item.queue if isinstance(item, QueueConfig) else item.exchange
    key = arg.replace("-", "_")
    if isinstance(item, QueueConfig) and key not in QUEUE_KEYS:
        key = f"arguments.{arg}"
    elif isinstance(item, ExchangeConfig) and key not in EXCHANGE_KEYS:
        key = f"arguments.{arg}"
    # An entry of the config's own lists ("queues[0]") gets the key; a queue the
    # dispatcher derives (a retry policy's delay queue) is named by its entry alone.
    where = f"{item.path}.{key}" if item.path.endswith("]") else item.path
    exists = f"{kind} {name!r} already exists " + (
        f"with {arg} {current}" if current is not None else f"without {arg}")
    wants = (f"the config asks for {asked}" if asked is not None
             else "the config does not set it")
    fixed = "a queue's arguments" if kind == "queue" else "an exchange's type and arguments"
    return (f"{config_path}: {where}: {exists}, {wants} ({fixed} cannot change: delete it or "
            "change the config)")


def config_error(exc: BrokerError, what: str, config_path: str = "",
                 item: Declared | None = None) -> BrokerError:
    """The same failure, told as what the config asked for (file and key path first);
    for a queue or exchange that exists with other arguments, the line of
    describe_inequivalent."""
    if exc.refused:
        inequivalent = item and describe_inequivalent(config_path, item, str(exc))
        return TopologyError(inequivalent or f"{what}: broker said {exc}")
    if exc.channel_only:
        return BrokerError(f"{what}: broker said {exc}", channel_only=True)
    return exc

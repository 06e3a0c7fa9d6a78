"""The ``queues:`` section: each queue's keys, defaults and checks, and its bindings.

Beyond the type and range of each key, ``check_queue_type`` refuses what RabbitMQ
refuses to declare for the queue's type (checked against RabbitMQ 3.10), so that
``--validate`` says it instead of the broker at start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .keys import _MAX_LONG, _Checker, _Key


@dataclass(frozen=True)
class Binding:
    """A binding to the source ``exchange``; ``arguments`` matter to a headers exchange."""

    exchange: str
    routing_key: str
    arguments: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class QueueConfig:
    queue: str
    durable: bool = True
    auto_delete: bool = False
    exclusive: bool = False
    passive: bool = False
    x_dead_letter_exchange: str | None = None
    x_dead_letter_routing_key: str | None = None
    x_max_length: int | None = None
    x_expires: int | None = None
    x_message_ttl: int | None = None
    x_queue_type: str | None = None
    x_max_length_bytes: int | None = None
    x_overflow: str | None = None
    x_max_priority: int | None = None
    x_single_active_consumer: bool | None = None
    x_delivery_limit: int | None = None
    x_queue_mode: str | None = None
    x_queue_leader_locator: str | None = None
    extra_arguments: dict[str, Any] = field(default_factory=dict, hash=False)  # `arguments:`
    bindings: tuple[Binding, ...] = ()
    path: str = "queues[?]"

    def arguments(self) -> dict[str, Any]:
        """The x- queue arguments that are set, with the types RabbitMQ wants: the named
        keys (x_max_length is sent as x-max-length), then the ``arguments`` map."""
        named = {argument_name(key): getattr(self, key) for key in NAMED_ARGUMENTS}
        result = {k: v for k, v in named.items() if v is not None}
        result.update(self.extra_arguments)
        return result


BINDING_KEYS: dict[str, _Key] = {
    "exchange": _Key((str,), required=True, nullable=False, non_empty=True, name=True,
                     empty_hint="the default exchange cannot be bound",
                     doc="the source exchange: what it routes with routing_key reaches this queue "
                         "or exchange"),
    "routing_key": _Key((str,), required=True, nullable=False, name=True,
                        doc="the binding key (may be ''; a topic exchange's may hold * and #)"),
    "arguments": _Key((dict,), doc="binding arguments (a headers exchange matches on them)"),
}

# Queue arguments travel as signed 64-bit integers at most.
QUEUE_KEYS: dict[str, _Key] = {
    "queue": _Key((str,), required=True, nullable=False, non_empty=True, name=True,
                  doc="queue name"),
    "durable": _Key((bool,), default=True, nullable=False,
                    doc="survives a broker restart (quorum queues and streams must be durable)"),
    "auto_delete": _Key((bool,), default=False, nullable=False,
                        doc="deleted by the broker once its last consumer is gone"),
    "exclusive": _Key((bool,), default=False, nullable=False,
                      doc="belongs to this connection alone, and deleted with it"),
    "passive": _Key((bool,), default=False, nullable=False,
                    doc="only check that the queue exists"),
    "x_dead_letter_exchange": _Key((str,), name=True,
                                   doc="x-dead-letter-exchange: where rejected and expired "
                                       "messages go"),
    "x_dead_letter_routing_key": _Key((str,), name=True,
                                      doc="x-dead-letter-routing-key: the routing key they go "
                                          "with (default: their own)"),
    "x_max_length": _Key((int,), maximum=_MAX_LONG,
                         doc="x-max-length: at most this many messages ready (see x_overflow)"),
    "x_expires": _Key((int,), positive=True, maximum=_MAX_LONG,
                      doc="x-expires: milliseconds unused before the broker deletes the queue"),
    "x_message_ttl": _Key((int,), maximum=_MAX_LONG,
                          doc="x-message-ttl: milliseconds a message may wait in the queue"),
    # Beyond 0.4.3: the arguments current RabbitMQ queues are declared with.
    "x_queue_type": _Key((str,), choices=("classic", "quorum", "stream"),
                         doc="x-queue-type: classic (the broker's default), quorum or stream"),
    "x_max_length_bytes": _Key((int,), maximum=_MAX_LONG,
                               doc="x-max-length-bytes: at most this many bytes of bodies ready "
                                   "(a stream's retention)"),
    "x_overflow": _Key((str,), choices=("drop-head", "reject-publish", "reject-publish-dlx"),
                       doc="x-overflow: what a full queue does with a new message"),
    "x_max_priority": _Key((int,), maximum=255,
                           doc="x-max-priority: a classic priority queue, priorities 0 to this"),
    "x_single_active_consumer": _Key((bool,),
                                     doc="x-single-active-consumer: one consumer at a time "
                                         "receives"),
    "x_delivery_limit": _Key((int,), maximum=_MAX_LONG,
                             doc="x-delivery-limit: redeliveries before a quorum queue "
                                 "dead-letters a message (quorum queues only)"),
    # RabbitMQ's values: "classic" is a queue type, not a mode (the broker refuses it).
    "x_queue_mode": _Key((str,), choices=("default", "lazy"),
                         doc="x-queue-mode: lazy keeps a classic queue's messages on disk"),
    "x_queue_leader_locator": _Key((str,), choices=("client-local", "balanced"),
                                   doc="x-queue-leader-locator: where a quorum queue's or "
                                       "stream's leader is placed"),
    "arguments": _Key((dict,), doc="any other queue arguments, sent as they are"),
    "bindings": _Key((list,), default=[], entries=BINDING_KEYS,
                     doc="exchanges the queue is bound to"),
}

# The keys sent as queue arguments: x_max_length is x-max-length.
NAMED_ARGUMENTS = tuple(key for key in QUEUE_KEYS if key.startswith("x_"))


def argument_name(key: str) -> str:
    """The queue argument a named key sets: ``x_max_length`` -> ``x-max-length``."""
    return key.replace("_", "-")


# What RabbitMQ refuses to declare, per queue type (RabbitMQ 3.10): keys that must
# not be set (true, for the exclusive and auto_delete flags; even false for
# x_single_active_consumer, whose argument the broker refuses whatever its value).
# Later versions take x_queue_leader_locator on a classic queue: the broker is left
# to say so.
_REFUSED: dict[str, tuple[str, ...]] = {
    "classic": ("x_delivery_limit",),
    "quorum": ("exclusive", "auto_delete", "x_max_priority", "x_queue_mode"),
    "stream": ("exclusive", "auto_delete", "x_max_priority", "x_queue_mode", "x_overflow",
               "x_max_length", "x_message_ttl", "x_expires", "x_dead_letter_exchange",
               "x_dead_letter_routing_key", "x_single_active_consumer", "x_delivery_limit"),
}
_REPLACEMENT = {
    "x_max_length": " (a stream's retention is x_max_length_bytes, or x-max-age in arguments)",
    "x_delivery_limit": " (quorum queues only)",
}


def parse_queues(checker: _Checker, entries: list[Any]) -> list[QueueConfig]:
    """The ``queues:`` entries without problems; problems go to ``checker``."""
    queues: list[QueueConfig] = []
    for i, entry in enumerate(entries):
        key_path = f"queues[{i}]"
        checked = checker.mapping(entry, key_path, QUEUE_KEYS)
        if checked is None or "queue" not in checked:
            continue
        bindings = parse_bindings(checker, checked.pop("bindings", []), key_path)
        extra = checked.pop("arguments", {})
        checker.table(extra, f"{key_path}.arguments", broker_names=True)
        _reserved_name(checker, checked, "queue", key_path)
        _check_named_twice(checker, checked, extra, key_path)
        check_queue_type(checker, checked, key_path)
        queues.append(QueueConfig(**checked, extra_arguments=extra, bindings=tuple(bindings),
                                  path=key_path))
    return queues


def parse_bindings(checker: _Checker, entries: list[Any], key_path: str) -> list[Binding]:
    """A queue's or an exchange's ``bindings:``; problems go to ``checker``."""
    bindings: list[Binding] = []
    for j, raw in enumerate(entries):
        path = f"{key_path}.bindings[{j}]"
        binding = checker.mapping(raw, path, BINDING_KEYS)
        if binding is None or "exchange" not in binding or "routing_key" not in binding:
            continue
        if not checker.table(binding.get("arguments", {}), f"{path}.arguments"):
            bindings.append(Binding(**binding))
    return bindings


def _reserved_name(checker: _Checker, checked: dict[str, Any], kind: str, key_path: str) -> None:
    """RabbitMQ refuses to declare a queue or exchange named amq.* (403); only checking
    that one exists (passive) is allowed."""
    name = checked[kind]
    if name.startswith("amq.") and not checked.get("passive"):
        checker.problem(f"{key_path}.{kind}", f"{name!r}: RabbitMQ reserves the amq. prefix "
                        "and refuses to declare it: set passive: true to only check that it "
                        "exists, or choose another name")


def _check_named_twice(checker: _Checker, checked: dict[str, Any], extra: dict[str, Any],
                       key_path: str) -> None:
    """An argument that has a key of its own is set with that key (where it is checked)."""
    for name in extra:
        key = name.replace("-", "_")
        if key not in NAMED_ARGUMENTS:
            continue
        if key in checked:
            checker.problem(f"{key_path}.arguments.{name}", f"set twice: also as "
                            f"{key_path}.{key}; keep {key} only")
        else:
            checker.problem(f"{key_path}.arguments.{name}", f"has a key of its own, which is "
                            f"checked: write {key_path}.{key} instead")


def check_queue_type(checker: _Checker, checked: dict[str, Any], key_path: str) -> None:
    """What RabbitMQ would refuse to declare for this queue type."""
    queue_type = checked.get("x_queue_type") or "classic"
    for key in _REFUSED[queue_type]:
        value = checked.get(key)
        if value is None or value is False and key in ("exclusive", "auto_delete"):
            continue
        if key in ("exclusive", "auto_delete"):
            what = f"a {queue_type} queue cannot be {key.replace('_', '-')}"
        else:
            what = f"not for a {queue_type} queue{_REPLACEMENT.get(key, '')}"
        checker.problem(f"{key_path}.{key}", f"{what}: RabbitMQ refuses to declare the queue")
    if queue_type != "classic" and checked.get("durable") is False:
        checker.problem(f"{key_path}.durable", f"a {queue_type} queue is always durable: "
                        "RabbitMQ refuses to declare it with durable: false")
    if queue_type == "quorum" and checked.get("x_overflow") == "reject-publish-dlx":
        # Verified on RabbitMQ 3.10: declared without complaint, then behaves as drop-head.
        checker.problem(f"{key_path}.x_overflow", "quorum queues do not support "
                        "reject-publish-dlx (RabbitMQ accepts it, then drops the oldest "
                        "message instead): use reject-publish or drop-head")

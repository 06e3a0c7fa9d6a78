"""The ``queues:`` section: each queue's keys, defaults and checks, and its bindings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .keys import _Checker, _Key


@dataclass(frozen=True)
class Binding:
    exchange: str
    routing_key: str


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
    bindings: tuple[Binding, ...] = ()
    path: str = "queues[?]"

    def arguments(self) -> dict[str, Any]:
        """The x- queue arguments that are set, with the types RabbitMQ wants."""
        candidates = {
            "x-dead-letter-exchange": self.x_dead_letter_exchange,
            "x-dead-letter-routing-key": self.x_dead_letter_routing_key,
            "x-max-length": self.x_max_length,
            "x-expires": self.x_expires,
            "x-message-ttl": self.x_message_ttl,
        }
        return {k: v for k, v in candidates.items() if v is not None}


BINDING_KEYS: dict[str, _Key] = {
    "exchange": _Key((str,), required=True, nullable=False, non_empty=True, name=True,
                     empty_hint="the default exchange cannot be bound"),
    "routing_key": _Key((str,), required=True, nullable=False, name=True),
}

QUEUE_KEYS: dict[str, _Key] = {
    "queue": _Key((str,), required=True, nullable=False, non_empty=True, name=True,
                  doc="queue name"),
    "durable": _Key((bool,), default=True, nullable=False),
    "auto_delete": _Key((bool,), default=False, nullable=False),
    "exclusive": _Key((bool,), default=False, nullable=False),
    "passive": _Key((bool,), default=False, nullable=False,
                    doc="only check that the queue exists"),
    "x_dead_letter_exchange": _Key((str,), name=True),
    "x_dead_letter_routing_key": _Key((str,), name=True),
    # Queue arguments travel as signed 64-bit integers at most.
    "x_max_length": _Key((int,), positive=False, maximum=2**63 - 1),
    "x_expires": _Key((int,), positive=True, maximum=2**63 - 1),
    "x_message_ttl": _Key((int,), maximum=2**63 - 1),
    "bindings": _Key((list,), default=[], entries=BINDING_KEYS,
                     doc="exchanges the queue is bound to"),
}


def parse_queues(checker: _Checker, entries: list[Any]) -> list[QueueConfig]:
    """The ``queues:`` entries without problems; problems go to ``checker``."""
    queues: list[QueueConfig] = []
    for i, entry in enumerate(entries):
        key_path = f"queues[{i}]"
        checked = checker.mapping(entry, key_path, QUEUE_KEYS)
        if checked is None or "queue" not in checked:
            continue
        bindings: list[Binding] = []
        for j, raw in enumerate(checked.pop("bindings", [])):
            binding = checker.mapping(raw, f"{key_path}.bindings[{j}]", BINDING_KEYS)
            if binding is not None and len(binding) == 2:
                bindings.append(Binding(**binding))
        queues.append(QueueConfig(**checked, bindings=tuple(bindings), path=key_path))
    return queues

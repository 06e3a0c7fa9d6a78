"""The ``exchanges:`` section: exchanges declared before the queues, and the
exchange-to-exchange bindings among them."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from .keys import _Checker, _Key
from .queues import BINDING_KEYS, Binding, _reserved_name, parse_bindings

BUILT_IN_TYPES = ("direct", "topic", "fanout", "headers")


@dataclass(frozen=True)
class ExchangeConfig:
    exchange: str
    type: str | None = None  # None only with passive, which does not look at it
    durable: bool = True
    auto_delete: bool = False
    internal: bool = False
    passive: bool = False
    arguments: dict[str, Any] = field(default_factory=dict, hash=False)
    # This exchange is bound (as the destination) to each binding's exchange.
    bindings: tuple[Binding, ...] = ()
    path: str = "exchanges[?]"


EXCHANGE_KEYS: dict[str, _Key] = {
    "exchange": _Key((str,), required=True, nullable=False, non_empty=True, name=True,
                     empty_hint="the default exchange cannot be declared", doc="exchange name"),
    "type": _Key((str,), non_empty=True, doc="direct, topic, fanout, headers, or a plugin's "
                 "type (x-...); required unless passive"),
    "durable": _Key((bool,), default=True, nullable=False,
                    doc="survives a broker restart"),
    "auto_delete": _Key((bool,), default=False, nullable=False,
                        doc="deleted by the broker once its last binding is removed"),
    "internal": _Key((bool,), default=False, nullable=False,
                     doc="only other exchanges may publish to it"),
    "passive": _Key((bool,), default=False, nullable=False,
                    doc="only check that the exchange exists"),
    "arguments": _Key((dict,), doc="exchange arguments (alternate-exchange, x-delayed-type...)"),
    "bindings": _Key((list,), default=[], entries=BINDING_KEYS,
                     doc="exchanges this one receives from (exchange-to-exchange bindings)"),
}


def parse_exchanges(checker: _Checker, entries: list[Any]) -> list[ExchangeConfig]:
    """The ``exchanges:`` entries without problems; problems go to ``checker``."""
    exchanges: list[ExchangeConfig] = []
    for i, entry in enumerate(entries):
        key_path = f"exchanges[{i}]"
        checked = checker.mapping(entry, key_path, EXCHANGE_KEYS)
        if checked is None or "exchange" not in checked:
            continue
        bindings = parse_bindings(checker, checked.pop("bindings", []), key_path)
        arguments = checked.pop("arguments", {})
        checker.table(arguments, f"{key_path}.arguments", broker_names=True)
        _reserved_name(checker, checked, "exchange", key_path)
        _check_type(checker, checked, key_path)
        exchanges.append(ExchangeConfig(**checked, arguments=arguments,
                                        bindings=tuple(bindings), path=key_path))
    seen: dict[str, str] = {}
    for exchange in exchanges:
        if exchange.exchange in seen:
            checker.problem(f"{exchange.path}.exchange", f"{exchange.exchange!r} is declared "
                            f"in {seen[exchange.exchange]} already")
        seen.setdefault(exchange.exchange, exchange.path)
    return exchanges


def _check_type(checker: _Checker, checked: dict[str, Any], key_path: str) -> None:
    """A built-in type, or a plugin's (their names start with x-, as x-delayed-message)."""
    exchange_type = checked.get("type")
    if exchange_type is None:
        if not checked.get("passive"):
            checker.problem(f"{key_path}.type", "required key is missing (direct, topic, "
                            "fanout, headers or a plugin's type), unless passive: true")
        return
    if exchange_type in BUILT_IN_TYPES or exchange_type.startswith("x-"):
        return
    close = difflib.get_close_matches(exchange_type, BUILT_IN_TYPES, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    checker.problem(f"{key_path}.type", f"expected one of {', '.join(BUILT_IN_TYPES)} or a "
                    f"plugin's type (x-...), got {exchange_type!r}{hint}")

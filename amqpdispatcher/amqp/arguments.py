"""What ``amqp.publish`` accepts: the checks that turn its arguments into a pika
publish (``build_message``), each failure a PublishError naming the argument."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Any

import pika
import pika.exceptions
import pika.spec


def header_problem(value: Any, where: str = "") -> str | None:
    """Where in this AMQP header value pika cannot encode it, and why ("['a'][1]: ..."),
    or None. Mirrors pika.data.encode_value."""
    if value is None or isinstance(value, (str, bytes, bool, Decimal)):
        return None
    if isinstance(value, int):
        return None if -2**63 <= value < 2**63 else f"{where}: {value} does not fit in 64 bits"
    if isinstance(value, datetime):
        if value.timestamp() < 0:  # AMQP timestamps are unsigned
            return f"{where}: a datetime before 1970 ({value.isoformat()})"
        return None
    if isinstance(value, float):
        return (f"{where}: a float cannot be sent in AMQP headers: use an int, a str or a "
                "decimal.Decimal")
    if isinstance(value, list):
        for i, item in enumerate(value):
            problem = header_problem(item, f"{where}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or len(key.encode("utf-8")) > 255:
                return f"{where}[{key!r}]: a header name must be a str of at most 255 bytes"
            problem = header_problem(item, f"{where}[{key!r}]")
            if problem:
                return problem
        return None
    return (f"{where}: a {type(value).__name__} cannot be sent in AMQP headers (str, bytes, "
            "int, bool, Decimal, datetime, list, dict or None)")



def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"amqp.publish: {name}: expected a str, got {type(value).__name__}")
    if len(value.encode("utf-8")) > 255:  # an AMQP short string
        raise ValueError(f"amqp.publish: {name}: at most 255 bytes, got "
                         f"{len(value.encode('utf-8'))}")
    return value


def _integer(name: str, value: Any, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"amqp.publish: {name}: expected {what}, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"amqp.publish: {name}: expected {what}, got {value}")
    return value


def _delivery_mode(name: str, value: Any) -> int:
    if isinstance(value, pika.DeliveryMode):
        return int(value.value)
    return _integer(name, value, 1, 2, "1 (transient) or 2 (persistent)")


def _persistent(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"amqp.publish: {name}: expected True or False, got "
                        f"{type(value).__name__}")
    return value


def _priority(name: str, value: Any) -> int:
    return _integer(name, value, 0, 255, "an int from 0 to 255")


_DIGITS = re.compile(r"[0-9]{1,20}")


def _expiration(name: str, value: Any) -> str:
    if isinstance(value, str):
        if not _DIGITS.fullmatch(value):
            raise ValueError(f"amqp.publish: {name}: expected milliseconds as digits, "
                             f"got {value[:40]!r}")
        return value
    return str(_integer(name, value, 0, 2**63 - 1, "milliseconds (an int >= 0 or a str "
                                                   "of digits)"))


def _timestamp(name: str, value: Any) -> int:
    if isinstance(value, datetime):  # a naive datetime is local time, as datetime says
        value = int(value.timestamp())
    return _integer(name, value, 0, 2**63 - 1, "seconds since the epoch (an int >= 0) "
                                               "or a datetime")


# amqp.publish's keyword arguments, each with its check; all but ``persistent`` are
# AMQP properties of the same name.
PROPERTY_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "content_type": _text,
    "content_encoding": _text,
    "delivery_mode": _delivery_mode,
    "persistent": _persistent,  # True: delivery_mode 2; False: 1
    "priority": _priority,
    "correlation_id": _text,
    "reply_to": _text,
    "expiration": _expiration,
    "message_id": _text,
    "timestamp": _timestamp,
    "type": _text,
    "app_id": _text,
}


def build_message(exchange: Any, routing_key: Any, headers: Any, body: Any, mandatory: Any,
                  options: dict[str, Any]) -> tuple[bytes, pika.spec.BasicProperties]:
    """Check ``amqp.publish``'s arguments: the body as bytes and the properties, or a
    TypeError or ValueError with a one-line message. A property given as None is
    not set."""
    _text("exchange", exchange)
    _text("routing_key", routing_key)
    if isinstance(body, str):
        body = body.encode("utf-8")
    elif isinstance(body, (bytearray, memoryview)):
        body = bytes(body)
    elif not isinstance(body, bytes):
        raise TypeError(f"amqp.publish: body: expected bytes or str, got {type(body).__name__}")
    if headers is not None and not isinstance(headers, dict):
        raise TypeError(f"amqp.publish: headers: expected a dict or None, got "
                        f"{type(headers).__name__}")
    if not isinstance(mandatory, bool):
        raise TypeError(f"amqp.publish: mandatory: expected True or False, got "
                        f"{type(mandatory).__name__}")
    values: dict[str, Any] = {}
    for name, value in options.items():
        check = PROPERTY_CHECKS.get(name)
        if check is None:
            raise TypeError(f"amqp.publish() got an unexpected keyword argument {name!r}")
        if value is not None:
            values[name] = check(name, value)
    persistent = values.pop("persistent", None)
    if persistent is not None:
        mode = 2 if persistent else 1
        if values.setdefault("delivery_mode", mode) != mode:
            raise ValueError(f"amqp.publish: persistent={persistent} contradicts "
                             f"delivery_mode={values['delivery_mode']}")
    return body, pika.spec.BasicProperties(headers=headers or None, **values)



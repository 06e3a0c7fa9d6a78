"""The ``http:`` section: where /metrics, /healthz and /readyz listen (HTTP_KEYS)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .keys import _Checker, _Key


@dataclass(frozen=True)
class HttpConfig:
    address: str = "127.0.0.1"
    port: int = 9800


HTTP_KEYS: dict[str, _Key] = {
    "address": _Key((str,), default="127.0.0.1", nullable=False, non_empty=True,
                    doc="address to listen on"),
    "port": _Key((int,), default=9800, nullable=False, positive=True, maximum=65535,
                 doc="TCP port to listen on"),
}


def parse_http(checker: _Checker, raw: Any) -> HttpConfig | None:
    checked = checker.mapping(raw, "http", HTTP_KEYS)
    return HttpConfig(**checked) if checked is not None else None

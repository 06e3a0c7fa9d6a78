"""The ``http:`` section: where /metrics, /healthz and /readyz listen, and how often the
consumed queues' depth is read for them (HTTP_KEYS)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .keys import _Checker, _Key


@dataclass(frozen=True)
class HttpConfig:
    address: str = "127.0.0.1"
    port: int = 9800
    queue_depth_interval: float = 5.0


# The shortest queue_depth_interval but 0 (off): a passive declare per consumed queue
# each time, on the consuming connection.
MIN_QUEUE_DEPTH_INTERVAL = 1.0


HTTP_KEYS: dict[str, _Key] = {
    "address": _Key((str,), default="127.0.0.1", nullable=False, non_empty=True,
                    doc="address to listen on"),
    "port": _Key((int,), default=9800, nullable=False, positive=True, maximum=65535,
                 doc="TCP port to listen on"),
    "queue_depth_interval": _Key(
        (float, int), default=5, nullable=False,
        doc=f"seconds between reads of each consumed queue's depth (a passive declare) for "
            f"amqp_dispatcher_queue_messages_ready and amqp_dispatcher_queue_consumers (at "
            f"least {MIN_QUEUE_DEPTH_INTERVAL:g}); 0: not read"),
}


def parse_http(checker: _Checker, raw: Any) -> HttpConfig | None:
    checked = checker.mapping(raw, "http", HTTP_KEYS)
    if checked is None:
        return None
    interval = float(checked["queue_depth_interval"])
    if 0 < interval < MIN_QUEUE_DEPTH_INTERVAL:
        checker.problem("http.queue_depth_interval", f"expected 0 (not read) or at least "
                        f"{MIN_QUEUE_DEPTH_INTERVAL:g}, got {raw['queue_depth_interval']!r}")
        interval = 0.0
    return HttpConfig(**{**checked, "queue_depth_interval": interval})

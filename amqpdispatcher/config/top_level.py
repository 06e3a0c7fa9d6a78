"""The file as a whole: the top-level keys (TOP_LEVEL_KEYS), ``Config``, and
``load_config``, which reads the file and checks every section (``read_http``: the
``http`` section alone, without importing anything)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .consumers import CONSUMER_KEYS, ConsumerConfig, parse_consumers
from .exchanges import EXCHANGE_KEYS, ExchangeConfig, parse_exchanges
from .http import HTTP_KEYS, HttpConfig, parse_http
from .imports import Resolved, check_imports
from .keys import ConfigError, _Checker, _Key, _read_yaml
from .queues import QUEUE_KEYS, QueueConfig, parse_queues

# The shortest stats_interval but 0 (none): a tiny one (0.000001, milliseconds meant as
# seconds) would log the line as fast as the hub loops, thousands a second.
MIN_STATS_INTERVAL = 0.1
# The shortest blocking_warning but 0 (off): gevent's monitor thread checks the hub
# twice per blocking_warning (observability/blocking.py), and would spin on a tiny one.
MIN_BLOCKING_WARNING = 0.1


@dataclass(frozen=True)
class Config:
    path: str
    startup_handler: str | None = None
    exchanges: tuple[ExchangeConfig, ...] = ()
    queues: tuple[QueueConfig, ...] = ()
    consumers: tuple[ConsumerConfig, ...] = ()
    drain_timeout: float = 30.0
    reconnect: bool = True
    reconnect_give_up_after: float | None = None
    publisher_confirms: bool = True
    http: HttpConfig | None = None
    stats_interval: float = 60.0
    blocking_warning: float = 1.0
    middleware: tuple[str, ...] = ()  # module:Class each
    recycle_after_messages: int | None = None
    recycle_above_memory_mb: float | None = None
    # --only: the queues named (None: every entry runs), and the entries it left out,
    # whose retry queues are declared all the same (select).
    only: tuple[str, ...] | None = None
    unselected: tuple[ConsumerConfig, ...] = ()


TOP_LEVEL_KEYS: dict[str, _Key] = {
    "startup_handler": _Key((str,), import_path="module:function",
                            doc="module:function called once before connecting"),
    "exchanges": _Key((list,), default=[], entries=EXCHANGE_KEYS,
                      doc="exchanges to declare before the queues"),
    "queues": _Key((list,), default=[], entries=QUEUE_KEYS, doc="queues to declare and bind"),
    "consumers": _Key((list,), required=True, nullable=False, non_empty=True,
                      entries=CONSUMER_KEYS, doc="consumer classes to run"),
    # Beyond 0.4.3: process lifecycle.
    "drain_timeout": _Key((float, int), default=30, nullable=False, positive=True,
                          doc="seconds SIGTERM waits for consume calls in progress"),
    "reconnect": _Key((bool,), default=True, nullable=False,
                      doc="reconnect on connection loss (false: exit 3, as 0.4.3)"),
    "reconnect_give_up_after": _Key((float, int), positive=True,
                                    doc="seconds of failed reconnecting before exit 3; "
                                        "null: never give up"),
    # Beyond 0.4.3: publishing.
    "publisher_confirms": _Key((bool,), default=True, nullable=False,
                               doc="amqp.publish waits for the broker's confirm and raises "
                                   "if it does not take the message"),
    # Beyond 0.4.3: observability (amqpdispatcher/observability/).
    "http": _Key((dict,), entries=HTTP_KEYS,
                 doc="HTTP endpoint for /metrics, /healthz, /readyz (the keys below); "
                     "absent: no port opened"),
    # Beyond 0.4.3: controls (docs/guides/controls.md).
    "middleware": _Key((list,), non_empty=True, import_path="module:Class",
                       doc="classes, each module:Class, instantiated once per process, "
                           "whose hooks (on_start, before_consume, after_consume, on_stop) "
                           "are called in order around every consume; see "
                           "amqpdispatcher.Middleware"),
    "recycle_after_messages": _Key((int,), positive=True,
                                   doc="replace the process (or the worker of --processes) "
                                       "after about this many messages handled, +-10% "
                                       "jitter: it drains and exits 7, or the arbiter starts "
                                       "its replacement first; null: never"),
    "recycle_above_memory_mb": _Key((float, int), positive=True,
                                    doc="... or when its resident memory exceeds this many "
                                        "MiB, checked every few seconds; null: never"),
    "stats_interval": _Key((float, int), default=60, nullable=False,
                           doc=f"seconds between the INFO stats lines (at least "
                               f"{MIN_STATS_INTERVAL:g}); 0: none"),
    "blocking_warning": _Key((float, int), default=1, nullable=False,
                             doc=f"seconds the gevent hub may be blocked by code that does "
                                 f"not yield (time.sleep, unpatched I/O, a CPU loop) before "
                                 f"a WARNING with its stack, and "
                                 f"amqp_dispatcher_hub_blocked_seconds_total (at least "
                                 f"{MIN_BLOCKING_WARNING:g}); 0: not watched"),
}


def load_config(path: str) -> tuple[Config, Resolved]:
    """Read, check and import everything the config names; raise ConfigError listing
    every problem found (shape, types and imports together)."""
    return _load(*_parse(path))


def load_config_dict(data: Mapping[str, Any], name: str = "<dict>") -> tuple[Config, Resolved]:
    """``load_config`` for a config given as a dict (what ``yaml.safe_load`` returns for
    the file); problem lines name ``name`` where they would name the file."""
    return _load(*parse_data(dict(data), name))


def _load(config: Config, problems: list[str]) -> tuple[Config, Resolved]:
    try:
        resolved = check_imports(config)
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return config, resolved


def select(config: Config, queues: tuple[str, ...]) -> Config:
    """``--only``: the config with only the consumer entries consuming these queues;
    the others are kept in ``unselected`` (the topology is declared as without
    ``--only``). ConfigError, one line, for a name no entry consumes."""
    consumed = list(dict.fromkeys(entry.queue for entry in config.consumers))
    unknown = [name for name in queues if name not in consumed]
    if unknown:
        raise ConfigError([f"{config.path}: --only: no consumer entry consumes "
                           f"{', '.join(repr(name) for name in unknown)} (the entries "
                           f"consume: {', '.join(consumed)})"])
    return replace(config, only=queues,
                   consumers=tuple(e for e in config.consumers if e.queue in queues),
                   unselected=tuple(e for e in config.consumers if e.queue not in queues))


def read_http(path: str) -> HttpConfig | None:
    """The ``http`` section alone, importing nothing: for the arbiter of --processes,
    which never imports user code. ConfigError if the file has a problem."""
    config, problems = _parse(path)
    if problems:
        raise ConfigError(problems)
    return config.http


def _parse(path: str) -> tuple[Config, list[str]]:
    """Check the config file's shape; entries with problems are left out of the result."""
    data = _read_yaml(path)
    if data is None:  # empty, or only comments
        raise ConfigError([f"{path}: the file has no keys (it is empty or only comments); "
                           "at least one consumer entry is required"])
    return parse_data(data, path)


def parse_data(data: Any, path: str) -> tuple[Config, list[str]]:
    """Check a config given as data (what ``yaml.safe_load`` returns), importing nothing:
    the Config of the entries without problems, and the problems, each naming ``path``."""
    checker = _Checker(path)
    top = checker.mapping(data, "", TOP_LEVEL_KEYS)
    if top is None:
        raise ConfigError(checker.problems)

    exchanges = parse_exchanges(checker, top.get("exchanges", []))
    queues = parse_queues(checker, top.get("queues", []))
    consumers = parse_consumers(checker, top.get("consumers", []), queues)

    stats_interval = float(top.get("stats_interval", 60))
    if 0 < stats_interval < MIN_STATS_INTERVAL:
        checker.problem("stats_interval", f"expected 0 (no stats line) or at least "
                        f"{MIN_STATS_INTERVAL:g}, got {top['stats_interval']!r}")
        stats_interval = 0.0
    blocking_warning = float(top.get("blocking_warning", 1))
    if 0 < blocking_warning < MIN_BLOCKING_WARNING:
        checker.problem("blocking_warning", f"expected 0 (not watched) or at least "
                        f"{MIN_BLOCKING_WARNING:g}, got {top['blocking_warning']!r}")
        blocking_warning = 0.0

    config = Config(path=path, startup_handler=top.get("startup_handler"),
                    exchanges=tuple(exchanges), queues=tuple(queues),
                    consumers=tuple(consumers),
                    drain_timeout=float(top.get("drain_timeout", 30)),
                    reconnect=top.get("reconnect", True),
                    reconnect_give_up_after=top.get("reconnect_give_up_after"),
                    publisher_confirms=top.get("publisher_confirms", True),
                    http=parse_http(checker, top["http"]) if "http" in top else None,
                    stats_interval=stats_interval, blocking_warning=blocking_warning,
                    recycle_after_messages=top.get("recycle_after_messages"),
                    recycle_above_memory_mb=top.get("recycle_above_memory_mb"),
                    middleware=checker.import_paths(top.get("middleware", []), "middleware",
                                                    "a class"))
    return config, checker.problems

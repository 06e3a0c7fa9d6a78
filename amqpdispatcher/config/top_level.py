"""The file as a whole: the top-level keys (TOP_LEVEL_KEYS), ``Config``, and
``load_config``, which reads the file and checks every section."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .consumers import CONSUMER_KEYS, ConsumerConfig, parse_consumers
from .imports import Resolved, check_imports
from .keys import ConfigError, _Checker, _Key, _read_yaml
from .queues import QUEUE_KEYS, QueueConfig, parse_queues


@dataclass(frozen=True)
class Config:
    path: str
    startup_handler: str | None = None
    queues: tuple[QueueConfig, ...] = ()
    consumers: tuple[ConsumerConfig, ...] = ()
    drain_timeout: float = 30.0
    reconnect: bool = True
    reconnect_give_up_after: float | None = None


TOP_LEVEL_KEYS: dict[str, _Key] = {
    "startup_handler": _Key((str,), import_path="module:function",
                            doc="module:function called once before connecting"),
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
}


def load_config(path: str) -> tuple[Config, Resolved]:
    """Read, check and import everything the config names; raise ConfigError listing
    every problem found (shape, types and imports together)."""
    return _load(*_parse(path))


def load_config_dict(data: Mapping[str, Any], name: str = "<dict>") -> tuple[Config, Resolved]:
    """``load_config`` for a config given as a dict (what ``yaml.safe_load`` returns for
    the file); problem lines name ``name`` where they would name the file."""
    return _load(*_parse_data(dict(data), name))


def _load(config: Config, problems: list[str]) -> tuple[Config, Resolved]:
    try:
        resolved = check_imports(config)
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return config, resolved


def _parse(path: str) -> tuple[Config, list[str]]:
    """Check the config file's shape; entries with problems are left out of the result."""
    data = _read_yaml(path)
    if data is None:  # empty, or only comments
        raise ConfigError([f"{path}: the file has no keys (it is empty or only comments); "
                           "at least one consumer entry is required"])
    return _parse_data(data, path)


def _parse_data(data: Any, path: str) -> tuple[Config, list[str]]:
    checker = _Checker(path)
    top = checker.mapping(data, "", TOP_LEVEL_KEYS)
    if top is None:
        raise ConfigError(checker.problems)

    queues = parse_queues(checker, top.get("queues", []))
    consumers = parse_consumers(checker, top.get("consumers", []), queues)

    config = Config(path=path, startup_handler=top.get("startup_handler"),
                    queues=tuple(queues), consumers=tuple(consumers),
                    drain_timeout=float(top.get("drain_timeout", 30)),
                    reconnect=top.get("reconnect", True),
                    reconnect_give_up_after=top.get("reconnect_give_up_after"))
    return config, checker.problems

"""The YAML config file: every key, its default and its checks, in one place.

A config is read in two steps, both of which report problems as one line each,
naming the file and the key path (``config.yml: consumers[1].prefetch_count:
...``):

1. ``load_config`` parses the YAML and checks the shape and types of every key.
2. ``check_imports`` imports the startup handler and consumer classes and
   checks that they are what the daemon needs.

Neither step connects to a broker; ``--validate`` runs both and stops there.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(Exception):
    """Bad input: a list of one-line problems, each ready to print."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


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


@dataclass(frozen=True)
class RetryConfig:
    """A consumer entry's ``retry:`` mapping; see RETRY_KEYS."""

    max_attempts: int = 5
    delay: float = 1.0
    backoff: float = 2.0
    max_delay: float = 300.0
    dead_letter_queue: str | None = None

    def delay_ms(self, attempt: int) -> int:
        """Milliseconds a message waits after its ``attempt``-th consume failed (from 1)."""
        try:
            seconds = min(self.delay * self.backoff ** (attempt - 1), self.max_delay)
        except OverflowError:  # thousands of attempts: long past max_delay
            seconds = self.max_delay
        return max(1, round(seconds * 1000))

    def delays_ms(self) -> list[int]:
        """Every distinct delay, in the order the attempts use them: one queue each
        (at most MAX_DELAY_QUEUES + 1: validation refuses a policy that needs more)."""
        delays: list[int] = []
        for attempt in range(1, self.max_attempts):
            ms = self.delay_ms(attempt)
            if ms not in delays:
                delays.append(ms)
            if ms >= round(self.max_delay * 1000) or self.backoff == 1 \
                    or len(delays) > MAX_DELAY_QUEUES:
                break  # every later attempt waits the same
        return delays


MAX_DELAY_QUEUES = 64


@dataclass(frozen=True)
class ConsumerConfig:
    consumer: str
    queue: str
    consumer_count: int = 1
    prefetch_count: int = 1
    time_limit: float | None = None
    retry: RetryConfig | None = None
    path: str = "consumers[?]"


@dataclass(frozen=True)
class Config:
    path: str
    startup_handler: str | None = None
    queues: tuple[QueueConfig, ...] = ()
    consumers: tuple[ConsumerConfig, ...] = ()
    drain_timeout: float = 30.0
    reconnect: bool = True
    reconnect_give_up_after: float | None = None
    publisher_confirms: bool = True


@dataclass
class _Key:
    """One config key: the types it accepts, its default and its bounds.

    Numbers are never negative, NaN or infinite. ``positive``: more than 0 (so at
    least 1 for an integer). ``minimum``, ``maximum``: the smallest and largest value
    accepted. ``non_empty``: a string or list must not be empty (``empty_hint`` says
    why, if set). ``name``: a queue, exchange or routing key, which AMQP carries in at
    most 255 bytes.
    """

    types: tuple[type, ...]
    default: Any = None
    required: bool = False
    nullable: bool = True
    positive: bool = False
    minimum: float | None = None
    maximum: int | None = None
    non_empty: bool = False
    empty_hint: str = ""
    name: bool = False
    doc: str = ""


TOP_LEVEL_KEYS: dict[str, _Key] = {
    "startup_handler": _Key((str,), doc="module:function called once before connecting"),
    "queues": _Key((list,), default=[], doc="queues to declare and bind"),
    "consumers": _Key((list,), required=True, nullable=False, non_empty=True,
                      doc="consumer classes to run"),
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
    "bindings": _Key((list,), default=[]),
}

BINDING_KEYS: dict[str, _Key] = {
    "exchange": _Key((str,), required=True, nullable=False, non_empty=True, name=True,
                     empty_hint="the default exchange cannot be bound"),
    "routing_key": _Key((str,), required=True, nullable=False, name=True),
}

CONSUMER_KEYS: dict[str, _Key] = {
    "consumer": _Key((str,), required=True, nullable=False, doc="module:Class"),
    "queue": _Key((str,), required=True, nullable=False, non_empty=True, name=True),
    "consumer_count": _Key((int,), default=1, nullable=False, positive=True),
    # basic.qos carries prefetch_count in 16 bits.
    "prefetch_count": _Key((int,), default=1, nullable=False, positive=True, maximum=65535),
    # Beyond 0.4.3: failure handling (amqpdispatcher/retry.py).
    "time_limit": _Key((float, int), positive=True,
                       doc="seconds a consume may run before TimeLimitExceeded is thrown into it"),
    "retry": _Key((dict,), doc="retry policy (RETRY_KEYS); absent: reject and requeue at once"),
}

# x-message-ttl is an unsigned 32-bit number of milliseconds.
_MAX_DELAY_SECONDS = 4294967

RETRY_KEYS: dict[str, _Key] = {
    "max_attempts": _Key((int,), default=5, nullable=False, positive=True,
                         doc="consume attempts per message, the first included"),
    "delay": _Key((float, int), default=1, nullable=False, positive=True,
                  maximum=_MAX_DELAY_SECONDS, doc="seconds before the second attempt"),
    "backoff": _Key((float, int), default=2, nullable=False, minimum=1,
                    doc="each further delay is multiplied by this"),
    "max_delay": _Key((float, int), default=300, nullable=False, positive=True,
                      maximum=_MAX_DELAY_SECONDS, doc="cap on one delay (>= delay)"),
    "dead_letter_queue": _Key((str,), non_empty=True,
                              doc="where exhausted messages go (declared durable); "
                                  "null: reject without requeue"),
}

_TYPE_NAMES = {str: "a string", bool: "true or false", int: "an integer", float: "a number",
               list: "a list", dict: "a mapping"}


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        if not value:
            return f"an empty {'list' if isinstance(value, list) else 'mapping'}"
        return f"a {'list' if isinstance(value, list) else 'mapping'}"
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")  # YAML's
    return repr(value)


class _Checker:
    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[str] = []

    def problem(self, key_path: str, message: str) -> None:
        where = f"{self.path}: {key_path}: " if key_path else f"{self.path}: "
        self.problems.append(where + message)

    def mapping(self, value: Any, key_path: str, keys: dict[str, _Key]) -> dict[str, Any] | None:
        """Check a mapping against its key table; return it with defaults filled."""
        if not isinstance(value, dict):
            self.problem(key_path, f"expected a mapping, got {_describe(value)}")
            return None
        prefix = f"{key_path}." if key_path else ""
        result: dict[str, Any] = {}
        for name, raw in value.items():
            if not isinstance(name, str) or name not in keys:
                close = difflib.get_close_matches(str(name), list(keys), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                known = ", ".join(keys)
                self.problem(f"{prefix}{name}", f"unknown key{hint}; known keys: {known}")
                continue
            spec = keys[name]
            problem = self._check_value(spec, raw)
            if problem:
                self.problem(f"{prefix}{name}", problem)
            elif raw is not None:
                result[name] = raw
        for name, spec in keys.items():
            if spec.required and name not in value:
                more = " (at least one entry is required)" if spec.non_empty else ""
                self.problem(f"{prefix}{name}", f"required key is missing{more}")
            elif name not in result and spec.default is not None:
                result.setdefault(name, spec.default)
        return result

    @staticmethod
    def _check_value(spec: _Key, raw: Any) -> str | None:
        """The problem with one key's value, or None (null is fine where nullable)."""
        expected = _TYPE_NAMES[spec.types[0]]
        if raw is None:
            if spec.non_empty and list in spec.types:
                return "at least one entry is required, got null"
            return None if spec.nullable else f"expected {expected}, got null"
        # bool is a subclass of int in Python; YAML's `true` is not a count.
        wrong_bool = isinstance(raw, bool) and bool not in spec.types
        if wrong_bool or not isinstance(raw, spec.types):
            return f"expected {expected}, got {_describe(raw)}"
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            if not math.isfinite(raw):
                return f"expected a finite number, got {_describe(raw)}"
            if spec.positive and not raw > 0:
                kind = "number" if float in spec.types else "integer"
                return f"expected a positive {kind}, got {raw}"
            if spec.minimum is not None and raw < spec.minimum:
                return f"expected at least {spec.minimum:g}, got {raw}"
            if raw < 0:
                return f"expected zero or more, got {raw}"
            if spec.maximum is not None and raw > spec.maximum:
                return f"expected at most {spec.maximum}, got {raw}"
        if spec.name and isinstance(raw, str) and len(raw.encode("utf-8")) > 255:
            return f"expected at most 255 bytes (an AMQP name), got {len(raw.encode('utf-8'))}"
        if spec.non_empty and isinstance(raw, list) and not raw:
            return "at least one entry is required, got an empty list"
        if spec.non_empty and isinstance(raw, str) and not raw:
            hint = f" ({spec.empty_hint})" if spec.empty_hint else ""
            return f"expected a non-empty string, got ''{hint}"
        return None


class _DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, line: int) -> None:
        super().__init__(f"line {line}: duplicate key {key!r}")
        self.key = key
        self.line = line


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice in one mapping is an
    error instead of silently replacing the first (keys brought in by a ``<<`` merge
    may still be overridden, as YAML intends)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._checked: set[int] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Every mapping passes here before merges are expanded into it, and a
        # mapping merged elsewhere may pass before its own construction: check
        # each node's own keys once, on the first visit.
        if id(node) not in self._checked:
            self._checked.add(id(node))
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag in ("tag:yaml.org,2002:merge", "tag:yaml.org,2002:value"):
                    continue
                key = self.construct_object(key_node)
                try:
                    duplicate = key in seen
                except TypeError:
                    continue  # unhashable: construct_mapping reports it
                if duplicate:
                    raise _DuplicateKeyError(key, key_node.start_mark.line + 1)
                seen.add(key)
        super().flatten_mapping(node)


def _read_yaml(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory, expected a YAML file"]) from None
    except PermissionError:
        raise ConfigError([f"{path}: permission denied"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKeyError as exc:
        raise ConfigError([f"{path}: line {exc.line}: duplicate key {exc.key!r}"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"{path}: YAML syntax error: {where}{reason}"]) from None


def load_config(path: str) -> tuple[Config, Resolved]:
    """Read, check and import everything the config names; raise ConfigError listing
    every problem found (shape, types and imports together)."""
    config, problems = _parse(path)
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
    checker = _Checker(path)
    if data is None:  # empty, or only comments
        raise ConfigError([f"{path}: the file has no keys (it is empty or only comments); "
                           "at least one consumer entry is required"])
    top = checker.mapping(data, "", TOP_LEVEL_KEYS)
    if top is None:
        raise ConfigError(checker.problems)

    queues: list[QueueConfig] = []
    for i, entry in enumerate(top.get("queues", [])):
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

    consumers: list[ConsumerConfig] = []
    for i, entry in enumerate(top.get("consumers", [])):
        key_path = f"consumers[{i}]"
        checked = checker.mapping(entry, key_path, CONSUMER_KEYS)
        if checked is None or "consumer" not in checked or "queue" not in checked:
            continue
        if not _is_import_path(checked["consumer"]):
            checker.problem(f"{key_path}.consumer",
                            f"expected 'module:Class', got {checked['consumer']!r}")
            continue
        retry = None
        if "retry" in checked:
            retry = _parse_retry(checker, checked.pop("retry"), f"{key_path}.retry")
            if retry is None:
                continue
        consumers.append(ConsumerConfig(**checked, retry=retry, path=key_path))
        _check_retry_names(checker, queues, consumers[-1])

    handler = top.get("startup_handler")
    if handler is not None and not _is_import_path(handler):
        checker.problem("startup_handler", f"expected 'module:function', got {handler!r}")
        handler = None

    config = Config(path=path, startup_handler=handler, queues=tuple(queues),
                    consumers=tuple(consumers),
                    drain_timeout=float(top.get("drain_timeout", 30)),
                    reconnect=top.get("reconnect", True),
                    reconnect_give_up_after=top.get("reconnect_give_up_after"),
                    publisher_confirms=top.get("publisher_confirms", True))
    return config, checker.problems


def _parse_retry(checker: _Checker, raw: Any, key_path: str) -> RetryConfig | None:
    before = len(checker.problems)
    checked = checker.mapping(raw, key_path, RETRY_KEYS)
    if checked is None or len(checker.problems) > before:
        return None
    if checked["max_delay"] < checked["delay"]:
        checker.problem(f"{key_path}.max_delay", f"expected at least delay "
                        f"({checked['delay']}), got {checked['max_delay']}")
        return None
    retry = RetryConfig(**checked)
    if len(retry.delays_ms()) > MAX_DELAY_QUEUES:
        checker.problem(key_path, f"needs more than {MAX_DELAY_QUEUES} delay queues (one per "
                        "distinct delay): raise backoff or lower max_delay")
        return None
    return retry


def _check_retry_names(checker: _Checker, config_queues: list[QueueConfig],
                       entry: ConsumerConfig) -> None:
    """The queues a retry policy adds must not collide with the entry's own queue or a
    queue of the config, and must fit in an AMQP name."""
    retry = entry.retry
    if retry is None:
        return
    key_path = f"{entry.path}.retry"
    if retry.dead_letter_queue == entry.queue:
        checker.problem(f"{key_path}.dead_letter_queue", f"{entry.queue!r} is the entry's own "
                        "queue: a message that keeps failing would come straight back")
    # The name delay queues get (retry.delay_queue_name, kept in step).
    longest = f"{entry.queue}.retry.{round(retry.max_delay * 1000)}ms"
    if len(longest.encode("utf-8")) > 255:
        checker.problem(f"{entry.path}.queue", "too long for a retry policy: its delay "
                        "queues are named '<queue>.retry.<ms>ms', over 255 bytes")
    taken = {q.queue: q.path for q in config_queues}
    prefix = f"{entry.queue}.retry."
    for name, path in taken.items():
        if name.startswith(prefix) and name.endswith("ms"):
            checker.problem(f"{path}.queue", f"{name!r} is a delay queue of {key_path}: "
                            "the dispatcher declares it with its own TTL; use another name")


def _is_import_path(value: str) -> bool:
    module, sep, attr = value.partition(":")
    return bool(sep and module and attr)


def import_object(spec: str) -> Any:
    """Import 'module:attr' (attr may be dotted). Raises ImportError or AttributeError."""
    module_name, _, attr_path = spec.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    return obj


def describe_exception(exc: BaseException) -> str:
    """One line: the exception and where in user code it was raised."""
    tb = exc.__traceback__
    where = ""
    while tb is not None:
        name = os.path.basename(tb.tb_frame.f_code.co_filename)
        # The last frame not in gevent: an exception thrown into a waiting greenlet
        # (TimeLimitExceeded) "happens" inside gevent's switch.
        if "gevent" not in name and "gevent" not in tb.tb_frame.f_globals.get("__name__", ""):
            where = f" (at {name}:{tb.tb_lineno})"
        tb = tb.tb_next
    try:
        message = " ".join(str(exc).split())  # one line, whatever the text holds
    except Exception:  # noqa: BLE001 - user code: an exception whose __str__ raises
        message = "<str() of the exception raised>"
    return f"{type(exc).__name__}{': ' + message if message else ''}{where}"


def _import(checker: _Checker, key_path: str, spec: str) -> Any:
    try:
        return import_object(spec)
    except ModuleNotFoundError as exc:
        checker.problem(key_path, f"cannot import {spec!r}: no module named {exc.name!r}"
                        " (is it on PYTHONPATH?)")
    except AttributeError:
        module_name, _, attr = spec.partition(":")
        checker.problem(key_path, f"cannot import {spec!r}: module {module_name!r} has no {attr!r}")
    except Exception as exc:  # noqa: BLE001 - user code ran at import time and failed
        checker.problem(key_path, f"importing {spec!r} raised {describe_exception(exc)}")
    return None


@dataclass
class Resolved:
    """The imported objects a config names."""

    startup_handler: Callable[[], Any] | None = None
    consumer_classes: dict[str, type] = field(default_factory=dict)


def check_imports(config: Config) -> Resolved:
    """Import the startup handler and consumer classes; raise ConfigError on problems."""
    checker = _Checker(config.path)
    resolved = Resolved()
    if config.startup_handler:
        handler = _import(checker, "startup_handler", config.startup_handler)
        if handler is not None and not callable(handler):
            checker.problem("startup_handler", f"{config.startup_handler!r} is not callable")
        elif handler is not None:
            resolved.startup_handler = handler
    for entry in config.consumers:
        cls = _import(checker, f"{entry.path}.consumer", entry.consumer)
        if cls is None:
            continue
        if not inspect.isclass(cls):
            checker.problem(f"{entry.path}.consumer", f"{entry.consumer!r} is not a class")
            continue
        missing = [m for m in ("consume", "shutdown") if not callable(getattr(cls, m, None))]
        if missing:
            checker.problem(f"{entry.path}.consumer",
                            f"{entry.consumer!r} has no {' and no '.join(missing)} method")
            continue
        resolved.consumer_classes[entry.consumer] = cls
    if checker.problems:
        raise ConfigError(checker.problems)
    return resolved

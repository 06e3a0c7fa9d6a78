"""The machinery every config section shares: a key's spec (``_Key``), the checker
that applies a key table to a mapping and collects one-line problems
(``_Checker``), and reading the YAML file (``_read_yaml``).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any

import yaml


class ConfigError(Exception):
    """Bad input: a list of one-line problems, each ready to print."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class _Key:
    """One config key: the types it accepts, its default and its bounds.

    Numbers are never NaN or infinite, nor negative unless ``minimum`` allows it.
    ``positive``: more than 0 (so at least 1 for an integer). ``minimum``,
    ``maximum``: the smallest and largest value accepted. ``non_empty``: a string or
    list must not be empty (``empty_hint`` says why, if set). ``name``: a queue,
    exchange or routing key, which AMQP carries in at most 255 bytes. ``choices``:
    the strings accepted, where a string is given. ``expected``: what the problem
    line says is expected, when the first type's name would not say it.
    ``import_path``: the form of a 'module:attr' value, as the problem line shows it
    ('module:Class'); of a list, the form of each of its strings (checked by the
    section that reads it). ``entries``: the key table of a mapping, or of each entry of a
    list (the JSON Schema, config/schema.py, describes what is inside from it; a list
    or mapping without one is free-form there).
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
    choices: tuple[str, ...] = ()
    expected: str = ""
    import_path: str = ""
    entries: dict[str, _Key] | None = None
    doc: str = ""


def _is_import_path(value: str) -> bool:
    module, sep, attr = value.partition(":")
    return bool(sep and module and attr)


_TYPE_NAMES = {str: "a string", bool: "true or false", int: "an integer", float: "a number",
               list: "a list", dict: "a mapping"}

# AMQP table values (queue, exchange, binding and consume arguments): a signed 64-bit
# integer at most, and the types pika can encode (pika/data.py encode_value: no float).
_MIN_LONG, _MAX_LONG = -2**63, 2**63 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def timestamp_problem(value: date) -> str | None:
    """What keeps a YAML date or date-time from being sent as an AMQP timestamp, an
    unsigned number of seconds since 1970 (pika's encoder fails on an earlier one),
    or None. A date is its midnight, and a date-time without a zone is UTC."""
    if not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    try:
        utc = value.astimezone(timezone.utc) if value.tzinfo else value.replace(
            tzinfo=timezone.utc)
    except OverflowError:
        utc = None
    if utc is None or utc < _EPOCH:
        return f"expected a timestamp from 1970-01-01 on (AMQP's), got {value.isoformat()}"
    return None


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
                more = " (at least one entry is required)" if list in spec.types else ""
                self.problem(f"{prefix}{name}", f"required key is missing{more}")
            elif name not in result and spec.default is not None:
                result.setdefault(name, spec.default)
        return result

    @staticmethod
    def _check_value(spec: _Key, raw: Any) -> str | None:
        """The problem with one key's value, or None (null is fine where nullable)."""
        expected = spec.expected or _TYPE_NAMES[spec.types[0]]
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
                return f"expected at least {spec.minimum}, got {raw}"
            if spec.minimum is None and raw < 0:
                return f"expected zero or more, got {raw}"
            if spec.maximum is not None and raw > spec.maximum:
                return f"expected at most {spec.maximum}, got {raw}"
        if spec.import_path and isinstance(raw, str) and not _is_import_path(raw):
            return f"expected {spec.import_path!r}, got {raw!r}"
        if spec.name and isinstance(raw, str) and len(raw.encode("utf-8")) > 255:
            return f"expected at most 255 bytes (an AMQP name), got {len(raw.encode('utf-8'))}"
        if spec.choices and isinstance(raw, str) and raw not in spec.choices:
            close = difflib.get_close_matches(raw, spec.choices, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            return f"expected one of {', '.join(spec.choices)}, got {raw!r}{hint}"
        if spec.non_empty and isinstance(raw, list) and not raw:
            return "at least one entry is required, got an empty list"
        if spec.non_empty and isinstance(raw, str) and not raw:
            hint = f" ({spec.empty_hint})" if spec.empty_hint else ""
            return f"expected a non-empty string, got ''{hint}"
        return None


    def import_paths(self, value: list[Any], key_path: str, form: str) -> tuple[str, ...]:
        """A list of 'module:attr' strings (``form``: what each names, as the problem
        line says it), each checked; the problems go to this checker, and a list with
        any is returned empty (nothing of it is imported)."""
        bad = False
        for i, item in enumerate(value):
            if not isinstance(item, str) or not _is_import_path(item):
                self.problem(f"{key_path}[{i}]", f"expected 'module:Name' ({form}), got "
                             f"{_describe(item)}")
                bad = True
        return () if bad else tuple(value)

    def table(self, value: dict[Any, Any], key_path: str, broker_names: bool = False) -> bool:
        """Check an ``arguments`` mapping, sent as an AMQP table: every key a string,
        every value one that AMQP carries. ``broker_names``: a queue's or exchange's
        arguments, read by the broker, whose names are lower case (it ignores
        ``X-Max-Length``); a binding's may match headers of any case. Whether any
        problem was found."""
        before = len(self.problems)
        for name, item in value.items():
            if not isinstance(name, str) or not name:
                self.problem(f"{key_path}.{name}", "expected a non-empty string as an "
                             f"argument name, got {_describe(name)}")
            elif len(name.encode("utf-8")) > 255:
                self.problem(f"{key_path}.{name[:20]}...", "expected an argument name of at "
                             "most 255 bytes")
            elif broker_names and name != name.lower() and (
                    name.lower().startswith("x-") or name.lower() == "alternate-exchange"):
                self.problem(f"{key_path}.{name}", "RabbitMQ's argument names are lower case "
                             f"and it would ignore this one: write {name.lower()!r}")
            else:
                self._table_value(item, f"{key_path}.{name}")
        return len(self.problems) > before

    def _table_value(self, value: Any, key_path: str) -> None:
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return
        if isinstance(value, datetime):
            problem = timestamp_problem(value)
            if problem:
                self.problem(key_path, problem)
        elif isinstance(value, int):
            if not _MIN_LONG <= value <= _MAX_LONG:
                self.problem(key_path, f"expected a 64-bit signed integer, got {value}")
        elif isinstance(value, float):
            self.problem(key_path, "expected an integer or a string, got "
                         f"{_describe(value)} (AMQP arguments carry no fractional numbers "
                         "here: give whole units, as milliseconds, or a string)")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                self._table_value(item, f"{key_path}[{i}]")
        elif isinstance(value, dict):
            self.table(value, key_path)
        else:  # a YAML date without a time, a set, binary ...
            self.problem(key_path, "expected a string, integer, true or false, timestamp, "
                         f"list or mapping (an AMQP table value), got {value!r}")


class _DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, line: int) -> None:
        super().__init__(f"line {line}: duplicate key {key!r}")
        self.key = key
        self.line = line


class _BadTimestamp(yaml.YAMLError):
    def __init__(self, value: str, reason: str, line: int) -> None:
        super().__init__(f"line {line}: {value!r} is not a valid date: {reason}")
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

    def construct_yaml_timestamp(self, node: yaml.ScalarNode) -> Any:
        # PyYAML matches 2024-02-30 or a +25:00 zone as a timestamp, then datetime
        # raises ValueError, which is no YAMLError: make it one, with its line.
        try:
            return super().construct_yaml_timestamp(node)
        except (ValueError, OverflowError) as exc:
            reason = ("a zone offset of 24 hours or more" if "offset" in str(exc)
                      else str(exc))
            raise _BadTimestamp(node.value, reason, node.start_mark.line + 1) from None


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:timestamp",
                                 _UniqueKeyLoader.construct_yaml_timestamp)


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
    except _BadTimestamp as exc:
        raise ConfigError([f"{path}: {exc}"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"{path}: YAML syntax error: {where}{reason}"]) from None

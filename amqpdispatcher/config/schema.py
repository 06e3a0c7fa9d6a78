"""The JSON Schema of the config file, made from the key tables (``--print-schema``).

Every key's type, default, bounds, allowed values and description come from its
``_Key`` in the tables the validator applies, starting at TOP_LEVEL_KEYS and
following each list's or mapping's ``entries``: a key added to a table is in the
schema, and ``amqpdispatcher/config-schema.json`` (shipped in the package) is
this function's output, kept equal to it by a test.

A schema says less than ``--validate`` (docs/reference/config.md, "Config schema", lists what it
cannot say): imports, checks across keys, names longer than 255 bytes of UTF-8
but not 255 characters, and NaN or infinity (YAML only) are the validator's.
"""

from __future__ import annotations

import json
from datetime import date, datetime
from typing import Any

from .keys import _Key
from .top_level import TOP_LEVEL_KEYS

DRAFT = "http://json-schema.org/draft-07/schema#"

# What YAML 1.1 reads as a date or a timestamp (PyYAML's resolver, in the regex dialect
# of JSON Schema): 2024-05-01, 2024-05-01T00:00:00Z, 2024-05-01 10:30:00.5 +02:00.
YAML_TIMESTAMP = ("^[0-9]{4}-[0-9]{2}-[0-9]{2}$|^[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}"
                  "(?:[Tt]|[ \\t]+)[0-9]{1,2}:[0-9]{2}:[0-9]{2}(?:\\.[0-9]*)?"
                  "(?:[ \\t]*(?:Z|[-+][0-9]{1,2}(?::[0-9]{2})?))?$")

# A YAML timestamp or date is a string to a YAML language server.
_JSON_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number",
               list: "array", dict: "object", date: "string", datetime: "string"}


def config_schema() -> dict[str, Any]:
    """The JSON Schema (draft 7) of the config file."""
    return {
        "$schema": DRAFT,
        "title": "amqp-dispatcher config",
        "description": "The YAML file amqp-dispatcher --config reads. Made by "
                       "amqp-dispatcher --print-schema; amqp-dispatcher --validate checks more.",
        **_mapping(TOP_LEVEL_KEYS),
    }


def schema_text() -> str:
    """The schema as ``--print-schema`` prints it and config-schema.json holds it."""
    return json.dumps(config_schema(), indent=2, ensure_ascii=False) + "\n"


def _mapping(keys: dict[str, _Key]) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {name: _key(spec) for name, spec in keys.items()},
        "additionalProperties": False,
    }
    required = [name for name, spec in keys.items() if spec.required]
    if required:
        schema["required"] = required
    return schema


def _key(spec: _Key) -> dict[str, Any]:
    schema: dict[str, Any] = {}
    if spec.doc:
        schema["description"] = spec.doc
    types = [_JSON_TYPES[t] for t in spec.types if t in _JSON_TYPES]
    if "number" in types:
        types = [t for t in types if t != "integer"]  # a number may be whole
    types = list(dict.fromkeys(types))
    if spec.nullable and not (spec.non_empty and "array" in types):
        types.append("null")
    schema["type"] = types[0] if len(types) == 1 else types
    if spec.default is not None:
        schema["default"] = spec.default
    # Keywords about numbers, strings, arrays or objects leave other types alone.
    if {"integer", "number"} & set(types):
        if spec.positive:
            schema["exclusiveMinimum"] = 0
        if spec.minimum is not None:
            schema["minimum"] = spec.minimum
        elif not spec.positive:  # never negative, unless the key says how low it goes
            schema["minimum"] = 0
        if spec.maximum is not None:
            schema["maximum"] = spec.maximum
    if "string" in types:
        if spec.non_empty:
            schema["minLength"] = 1
        if spec.name:
            schema["maxLength"] = 255  # bytes, to AMQP: the validator counts those
        if spec.import_path:
            schema["pattern"] = "^[^:]+:[\\s\\S]+$"
    if "array" in types:
        if spec.non_empty:
            schema["minItems"] = 1
        if spec.entries is not None:
            schema["items"] = _mapping(spec.entries)
        elif spec.import_path:  # a list of 'module:attr' strings
            schema["items"] = {"type": "string", "pattern": "^[^:]+:[\\s\\S]+$"}
    if "object" in types and spec.entries is not None:
        schema.update({k: v for k, v in _mapping(spec.entries).items() if k != "type"})
    _choices(schema, spec, types)
    return schema


def _choices(schema: dict[str, Any], spec: _Key, types: list[str]) -> None:
    """A key whose strings are a fixed set (``choices``), or that takes a YAML date or
    timestamp (a string to a YAML language server): each kind of string becomes an
    alternative of its own."""
    dates = any(t in (date, datetime) for t in spec.types)
    if not spec.choices and not dates:
        return
    others = [t for t in types if t != "string"]
    if not dates and others in ([], ["null"]):
        schema["enum"] = [*spec.choices, *([None] if others else [])]
        return
    strings: list[dict[str, Any]] = []
    if spec.choices:
        strings.append({"type": "string", "enum": list(spec.choices)})
    if dates:
        strings.append({"type": "string", "pattern": YAML_TIMESTAMP,
                        "description": "a date or a date and time (UTC without a zone)"})
    schema.pop("type")
    schema["anyOf"] = [*strings, *({"type": t} for t in others)]

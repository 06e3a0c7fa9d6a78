"""Importing what a config names (the startup handler and consumer classes) and
describing what user code raised, in one line."""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .keys import ConfigError, _Checker

if TYPE_CHECKING:
    from .top_level import Config


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


def _exception_classes(checker: _Checker, key_path: str,
                       specs: tuple[str, ...]) -> tuple[type[BaseException], ...]:
    """The exception classes named 'module:Name'; a problem for any that is not one."""
    classes = []
    for i, spec in enumerate(specs):
        before = len(checker.problems)
        obj = _import(checker, f"{key_path}[{i}]", spec)
        if len(checker.problems) > before:
            continue
        if not inspect.isclass(obj):
            checker.problem(f"{key_path}[{i}]", f"{spec!r} is not a class")
        elif not issubclass(obj, BaseException):
            checker.problem(f"{key_path}[{i}]", f"{spec!r} is not an exception class")
        else:
            classes.append(obj)
    return tuple(classes)


# The hooks of a middleware (consuming/middleware.py, which the config cannot import).
MIDDLEWARE_HOOKS = ("on_start", "before_consume", "after_consume", "on_stop")


def _middleware_problem(cls: Any) -> str | None:
    """What keeps ``cls`` from being a middleware, or None."""
    if not inspect.isclass(cls):
        return "is not a class"
    hooks = [name for name in MIDDLEWARE_HOOKS if getattr(cls, name, None) is not None]
    if not hooks:
        return f"has none of the hooks {', '.join(MIDDLEWARE_HOOKS)}"
    not_callable = [name for name in hooks if not callable(getattr(cls, name))]
    if not_callable:
        return f"has {' and '.join(not_callable)} but not as a method"
    return None


@dataclass
class Resolved:
    """The imported objects a config names."""

    startup_handler: Callable[[], Any] | None = None
    consumer_classes: dict[str, type] = field(default_factory=dict)
    middleware: tuple[type, ...] = ()
    # Each entry's retry.no_retry_for, imported, by the entry's path (consumers[0]).
    no_retry_for: dict[str, tuple[type[BaseException], ...]] = field(default_factory=dict)


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
    middleware = []
    for i, spec in enumerate(config.middleware):
        cls = _import(checker, f"middleware[{i}]", spec)
        if cls is None:
            continue
        problem = _middleware_problem(cls)
        if problem:
            checker.problem(f"middleware[{i}]", f"{spec!r} {problem}")
        else:
            middleware.append(cls)
    resolved.middleware = tuple(middleware)
    for entry in config.consumers:
        if entry.retry is not None and entry.retry.no_retry_for:
            resolved.no_retry_for[entry.path] = _exception_classes(
                checker, f"{entry.path}.retry.no_retry_for", entry.retry.no_retry_for)
    if checker.problems:
        raise ConfigError(checker.problems)
    return resolved

"""Logging set-up: LOGGING_FILE_CONFIG, or a default text or JSON format (LOG_FORMAT);
the fields of lines about a delivery; password redaction.

With JSON, what would otherwise reach stderr as plain text goes through it too:
Python's warnings (as in text), a record that cannot be formatted (logging's "---
Logging error ---" report) and an exception no greenlet caught (gevent's hub)."""

from __future__ import annotations

import configparser
import copy
import json
import logging
import logging.config
import logging.handlers
import os
import re
import sys
import traceback
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from ..config.settings import SettingsError
from ..consuming.outcomes import DELIVERY_FIELDS

if TYPE_CHECKING:
    pass

DEFAULT_FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s: %(message)s"
LOG_FORMATS = ("text", "json")

class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, pid, the
    delivery fields where the record has them, and the traceback or stack if any.
    Strings are redacted before they are JSON-encoded: an escaped password (a quote, a
    backslash, a non-ASCII letter in it) would no longer match in the encoded line."""

    def format(self, record: logging.LogRecord) -> str:
        line = _json_line(record, record.levelname, record.getMessage())
        for name in DELIVERY_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = redact(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = redact(record.exc_text)
        if record.stack_info:
            line["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(line, default=str)


def _json_line(record: logging.LogRecord, level: str, message: str) -> dict[str, Any]:
    return {"time": datetime.fromtimestamp(record.created, timezone.utc)
                            .isoformat(timespec="milliseconds"),
            "level": level, "logger": record.name, "message": redact(message),
            "pid": record.process}


class JsonHandler(logging.StreamHandler):
    """stderr with JsonFormatter; a record that cannot be formatted (a consumer's
    ``log.info("%s %s", one)``) is reported as one JSON line too, at ERROR, rather than
    logging's "--- Logging error ---" and its traceback over several lines."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if not logging.raiseExceptions or self.stream is None:
            return  # as logging does
        kind, exc, tb = sys.exc_info()
        # Redacted before repr, which would escape a quote or a backslash in a password.
        args = record.args
        if isinstance(args, tuple):
            args = tuple(redact(arg) if isinstance(arg, str) else arg for arg in args)
        try:
            line = _json_line(record, "ERROR", f"logging error: {kind and kind.__name__}: "
                              f"{exc}; message {redact(record.msg)!r}, arguments {args!r}, "
                              f"logged at {record.pathname}:{record.lineno}")
            line["exception"] = redact("".join(traceback.format_exception(kind, exc, tb)))
            self.stream.write(json.dumps(line, default=str) + self.terminator)
            self.flush()
        except Exception:  # noqa: BLE001 - a repr that raises: logging's own report
            super().handleError(record)
        finally:
            del tb


def _log_hub_errors() -> None:
    """An exception no greenlet caught: gevent's hub prints it on stderr itself; with
    JSON logs, it goes through logging instead (logger ``gevent.hub``, ERROR)."""
    from gevent.hub import Hub

    def print_exception(hub: Hub, context: Any, kind: Any, exc: Any, tb: Any) -> None:
        if context is not None and not isinstance(context, str):
            try:
                context = hub.format_context(context)
            except Exception:  # noqa: BLE001 - as gevent: a context that cannot say itself
                context = repr(context)
        name = getattr(kind, "__name__", "exception")
        logging.getLogger("gevent.hub").error(
            "%s failed with %s", context or "the hub", name,
            exc_info=(kind, exc, tb) if isinstance(exc, BaseException) else None)

    Hub.print_exception = print_exception


def setup_logging(environ: Mapping[str, str] = os.environ) -> None:
    path = environ.get("LOGGING_FILE_CONFIG")
    if not path:
        log_format = environ.get("LOG_FORMAT", "").strip().lower() or "text"
        if log_format not in LOG_FORMATS:
            raise SettingsError(f"LOG_FORMAT: expected 'text' or 'json', got "
                                f"{environ['LOG_FORMAT']!r}")
        if log_format == "json":
            handler: logging.Handler = JsonHandler()
            _log_hub_errors()
        else:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter(DEFAULT_FORMAT))
        logging.basicConfig(level=logging.INFO, handlers=[handler])
        # warnings.warn: a line of the log's format, rather than Python's own on stderr.
        logging.captureWarnings(True)
        # pika narrates every connection step, and logs each failure it reports to us
        # at ERROR; the amqp-dispatcher loggers say what matters, once.
        logging.getLogger("pika").setLevel(logging.CRITICAL)
        return
    if not os.path.isfile(path):
        raise SettingsError(f"LOGGING_FILE_CONFIG: {path}: no such file")
    try:
        logging.config.fileConfig(path, disable_existing_loggers=False)
    except (configparser.Error, KeyError, ValueError, ImportError, OSError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SettingsError(f"LOGGING_FILE_CONFIG: {path}: not a valid logging config: "
                            f"{detail}") from None


# Password redaction.
#
# Redaction happens where a handler turns a record into output, never when the record
# is made: a record whose message cannot be formatted fails inside Handler.emit, which
# reports it through handleError ("--- Logging error ---") as plain logging does, and
# the code that logged carries on.
#
# Rules (README.md, "Environment variables"): a password shorter than MIN_SECRET_LENGTH
# characters, or one of NOT_SECRET, is not redacted: it is no secret, and replacing it
# would garble ordinary text ("a", "guest" in every "guest" user name). Any other password
# is replaced by "***" as a whole token: not where a letter or digit continues it on
# either side ("hunter2" is left alone inside "hunter22"), so a password that is also a
# word only disappears where it stands alone. A backslash escape before it (the repr of
# b"\x00user\x00password") ends a token. Its percent-encoded form, and the forms repr()
# and JSON give it (a backslash or quote escaped), are replaced too.

MIN_SECRET_LENGTH = 4
NOT_SECRET = frozenset({"guest"})
MASK = "***"

_passwords: tuple[str, ...] = ()
_pattern: re.Pattern[str] | None = None

_BEFORE = r"(?:(?<![^\W_])|(?<=\\x[0-9a-fA-F]{2})|(?<=\\[abfnrtv]))"
_AFTER = r"(?![^\W_])"


def _token_pattern(text: str) -> str:
    before = _BEFORE if text[0].isalnum() else ""
    after = _AFTER if text[-1].isalnum() else ""
    return before + re.escape(text) + after


def _escaped_forms(password: str) -> set[str]:
    """The ways the password appears when a str or bytes holding it is printed: as is,
    percent-encoded (a URL), inside repr() or ascii() of a str or bytes (either quote;
    a backslash doubled), and inside JSON (a backslash or quote escaped, non-ASCII as
    \\uXXXX or not). Logging ``{"RABBITMQ_URL": url}`` prints the repr."""
    plain = {password, quote(password, safe=""), quote(password)}
    escaped = set()
    for text in plain:
        escaped.add(repr(text)[1:-1])
        escaped.add(ascii(text)[1:-1])
        escaped.add(repr(text.encode("utf-8"))[2:-1])
        escaped.add(json.dumps(text)[1:-1])
        escaped.add(json.dumps(text, ensure_ascii=False)[1:-1])
        backslashed = text.replace("\\", "\\\\")
        escaped.add(backslashed.replace("'", "\\'"))  # repr's form with the other quote
        escaped.add(backslashed.replace('"', '\\"'))
    return plain | escaped


def _compile(passwords: tuple[str, ...]) -> re.Pattern[str] | None:
    forms = {form for password in passwords for form in _escaped_forms(password)}
    if not forms:
        return None
    # Longest first, so a form that contains another is replaced whole.
    ordered = sorted(forms, key=lambda form: (-len(form), form))
    return re.compile("|".join(_token_pattern(form) for form in ordered))


def is_redacted(password: str) -> bool:
    """Whether redact_password(password) would hide it (see the rules above)."""
    return len(password) >= MIN_SECRET_LENGTH and password not in NOT_SECRET


def redact(text: str) -> str:
    """text with every password registered by redact_password replaced by MASK."""
    pattern = _pattern
    if pattern is None or not isinstance(text, str):
        return text
    return pattern.sub(MASK, text)


def redact_password(password: str) -> None:
    """Keep the broker password out of what every logging handler writes, whoever logs it
    and whichever handler writes it, including handlers configured later."""
    global _passwords, _pattern
    if not is_redacted(password) or password in _passwords:
        return
    _install()
    _passwords = (*_passwords, password)
    _pattern = _compile(_passwords)


class _RedactingStream:
    """Stands in for sys.stderr while logging reports an error in a handler."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(redact(text))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _redacted_record(handler: logging.Handler, record: logging.LogRecord) -> logging.LogRecord:
    """A copy of record with the message, exception and stack text formatted and redacted,
    for handlers that send the record's fields rather than formatted text."""
    record = copy.copy(record)
    record.msg = redact(record.getMessage())
    record.args = None
    if record.exc_info and not record.exc_text:
        formatter = handler.formatter or logging.Formatter()
        record.exc_text = formatter.formatException(record.exc_info)
    record.exc_info = None
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    if isinstance(getattr(record, "message", None), str):
        record.message = record.msg
    return record


_MARK = "_amqpdispatcher_redacts"


def _wrap(cls: type, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    original = cls.__dict__[name]
    if getattr(original, _MARK, False):
        return
    wrapper = make(original)
    setattr(wrapper, _MARK, True)
    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    wrapper.__name__ = original.__name__
    wrapper.__doc__ = original.__doc__
    setattr(cls, name, wrapper)


def _install() -> None:
    """Wrap, once, the points where logging handlers produce output."""

    def format_(original: Callable[..., Any]) -> Callable[..., Any]:
        def format(self: logging.Handler, record: logging.LogRecord) -> Any:
            return redact(original(self, record))
        return format

    def handle_error(original: Callable[..., Any]) -> Callable[..., Any]:
        def handleError(self: logging.Handler, record: logging.LogRecord) -> None:
            stderr = sys.stderr
            if _pattern is None or stderr is None:
                original(self, record)
                return
            proxy = _RedactingStream(stderr)
            sys.stderr = proxy
            try:
                original(self, record)
            finally:
                if sys.stderr is proxy:
                    sys.stderr = stderr
        return handleError

    def fields(original: Callable[..., Any]) -> Callable[..., Any]:
        def method(self: logging.Handler, record: logging.LogRecord) -> Any:
            if _pattern is None:
                return original(self, record)
            return original(self, _redacted_record(self, record))
        return method

    _wrap(logging.Handler, "format", format_)
    _wrap(logging.Handler, "handleError", handle_error)
    _wrap(logging.handlers.SocketHandler, "makePickle", fields)
    _wrap(logging.handlers.HTTPHandler, "mapLogRecord", fields)

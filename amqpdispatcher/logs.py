"""Logging set-up: LOGGING_FILE_CONFIG, or a default format; password redaction."""

from __future__ import annotations

import configparser
import logging
import logging.config
import os
from collections.abc import Mapping
from typing import Any

from .settings import SettingsError

DEFAULT_FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s: %(message)s"


def setup_logging(environ: Mapping[str, str] = os.environ) -> None:
    path = environ.get("LOGGING_FILE_CONFIG")
    if not path:
        logging.basicConfig(level=logging.INFO, format=DEFAULT_FORMAT)
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


def redact_password(password: str) -> None:
    """Keep the broker password out of every log record, whoever logs it."""
    if not password:
        return
    make_record = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        message = record.getMessage()
        if password in message:
            record.msg = message.replace(password, "***")
            record.args = None
        return record

    logging.setLogRecordFactory(factory)

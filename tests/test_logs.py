"""Password redaction: where logging formats output, never where a record is made; in
the text format and in JSON logs (LOG_FORMAT=json)."""

from __future__ import annotations

import io
import json
import logging
import logging.handlers
import os
import pickle
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from helpers import BrokerHandle, DispatcherProcess, run_cli, wait_until

from amqpdispatcher.observability import logs

SECRET = "pw-Zq81xK"


@pytest.fixture(autouse=True)
def pristine_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts with no password registered and logging's own methods, and
    whatever redact_password wraps is put back afterwards."""
    monkeypatch.setattr(logs, "_passwords", ())
    monkeypatch.setattr(logs, "_pattern", None)
    for cls, name in ((logging.Handler, "format"), (logging.Handler, "handleError"),
                      (logging.handlers.SocketHandler, "makePickle"),
                      (logging.handlers.HTTPHandler, "mapLogRecord")):
        monkeypatch.setattr(cls, name, cls.__dict__[name])


@pytest.fixture
def logger() -> logging.Logger:
    """A logger of the test's own, outside the logger tree (so pytest's capturing
    handlers, which raise on a logging error, are not attached to it)."""
    return logging.Logger("test-logs.redaction", logging.DEBUG)


def capture(log: logging.Logger, fmt: str = "%(levelname)s %(message)s") -> io.StringIO:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(fmt))
    log.addHandler(handler)
    return stream


def test_password_in_message_and_arguments_is_redacted(logger: logging.Logger) -> None:
    logs.redact_password(SECRET)
    out = capture(logger)
    logger.info("connecting with %s", SECRET)
    logger.info(f"literal {SECRET}, in a url amqp://u:{SECRET}@h/")
    logger.info("%(pw)s as a mapping", {"pw": SECRET})
    assert SECRET not in out.getvalue()
    assert out.getvalue().splitlines() == [
        "INFO connecting with ***",
        "INFO literal ***, in a url amqp://u:***@h/",
        "INFO *** as a mapping",
    ]


def test_password_in_exception_and_stack_text_is_redacted(logger: logging.Logger) -> None:
    logs.redact_password(SECRET)
    out = capture(logger)
    try:
        raise ValueError(f"login refused for {SECRET}")
    except ValueError:
        logger.exception("failed")
    logger.info("here", stack_info=True)
    text = out.getvalue()
    assert "Traceback (most recent call last)" in text
    assert "ValueError: login refused for ***" in text
    assert "Stack (most recent call last)" in text
    assert SECRET not in text


def test_handler_added_after_setup_is_redacted(logger: logging.Logger) -> None:
    logs.redact_password(SECRET)
    # Added later, as a startup handler or LOGGING_FILE_CONFIG would, with its own format
    # and a handler class of its own.

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(self.format(record))

    collect = Collect()
    collect.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
    logger.addHandler(collect)
    out = capture(logger, "%(message)s")
    logger.warning("password is %s", SECRET)
    assert collect.lines == ["[test-logs.redaction] password is ***"]
    assert out.getvalue() == "password is ***\n"


def test_short_and_common_passwords_are_never_searched(logger: logging.Logger) -> None:
    original_format = logging.Handler.format
    for password in ("a", "ab", "abc", "guest", ""):
        logs.redact_password(password)
        assert not logs.is_redacted(password)
    assert logs._pattern is None
    assert logging.Handler.format is original_format  # nothing wrapped for them
    out = capture(logger)
    text = "a message for the guest user in a guesthouse, abc"
    logger.info(text)
    assert out.getvalue() == f"INFO {text}\n"


def test_password_inside_a_longer_word_is_left_alone(logger: logging.Logger) -> None:
    logs.redact_password("rabbit")
    assert logs.is_redacted("rabbit")
    out = capture(logger, "%(message)s")
    logger.info("rabbitmq rabbits xrabbit rabbit2 _rabbit_ (rabbit) rabbit-x rabbit")
    assert out.getvalue() == "rabbitmq rabbits xrabbit rabbit2 _***_ (***) ***-x ***\n"


def test_edges_that_are_not_letters_or_digits(logger: logging.Logger) -> None:
    # A password that begins or ends with punctuation has no word edge to respect there.
    logs.redact_password("-s3cret!")
    out = capture(logger, "%(message)s")
    logger.info("x-s3cret! -s3cret!y")
    assert out.getvalue() == "x*** ***y\n"


def test_escaped_and_percent_encoded_forms_are_redacted(logger: logging.Logger) -> None:
    password = "p@ss/w0rd"
    logs.redact_password(password)
    out = capture(logger, "%(message)s")
    logger.info("%r", b"\x00user\x00" + password.encode())
    logger.info("amqp://user:p%40ss%2Fw0rd@host/ and p%40ss/w0rd")
    text = out.getvalue()
    assert text == "b'\\x00user\\x00***'\namqp://user:***@host/ and ***\n"


@pytest.mark.parametrize("password", ["back\\slash-pw", "quo'te\"pw\\", "unicodé-pw\\x", "tab\tpw"])
def test_repr_and_json_forms_of_a_password_are_redacted(logger: logging.Logger,
                                                           password: str) -> None:
    """A backslash, a quote or a non-ASCII letter is escaped by repr() and by JSON, so
    the password's own text no longer appears where a dict or bytes holding it is logged."""
    logs.redact_password(password)
    url = f"amqp://user:{password}@host/"
    out = capture(logger, "%(message)s")
    logger.info("%r", {"RABBITMQ_URL": url})
    logger.info("%s", ascii(url))
    logger.info("%r", url.encode("utf-8"))
    logger.info("%s", json.dumps({"url": url}))
    logger.info("%s", json.dumps({"url": url}, ensure_ascii=False))
    text = out.getvalue()
    assert text.count("***") == 5, text
    assert "user:***@host" in text


def test_redact_password_is_idempotent(logger: logging.Logger) -> None:
    logs.redact_password(SECRET)
    wrapped = logging.Handler.format
    logs.redact_password(SECRET)
    logs.redact_password("another-one")
    assert logging.Handler.format is wrapped
    assert not hasattr(logging.Handler.format.__wrapped__, "__wrapped__")  # wrapped once
    out = capture(logger, "%(message)s")
    logger.info("%s %s", SECRET, "another-one")
    assert out.getvalue() == "*** ***\n"


def test_bad_format_reports_like_logging_and_never_raises(
        logger: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    logs.redact_password(SECRET)
    out = capture(logger, "%(message)s")
    logger.info("%s %s", SECRET)  # must not raise into the caller
    logger.info("after")
    assert out.getvalue() == "after\n"
    err = capsys.readouterr().err
    assert "--- Logging error ---" in err
    assert "TypeError: not enough arguments for format string" in err
    assert "Arguments: ('***',)" in err
    assert SECRET not in err


def test_bad_format_without_a_password_is_plain_logging(
        logger: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    logs.redact_password("guest")
    capture(logger)
    logger.info("%s %s", "only-one")
    err = capsys.readouterr().err
    assert "--- Logging error ---" in err
    assert "Arguments: ('only-one',)" in err


def test_record_shipping_handlers_are_redacted(logger: logging.Logger) -> None:
    logs.redact_password(SECRET)
    try:
        raise RuntimeError(f"boom {SECRET}")
    except RuntimeError:
        record = logger.makeRecord(logger.name, logging.ERROR, __file__, 1,
                                   "with %s", (SECRET,), sys.exc_info())
    sent = logging.handlers.SocketHandler("127.0.0.1", None).makePickle(record)
    fields = pickle.loads(sent[4:])
    assert fields["msg"] == "with ***"
    assert "RuntimeError: boom ***" in fields["exc_text"]
    assert SECRET not in repr(fields)
    mapped = logging.handlers.HTTPHandler("127.0.0.1", "/log").mapLogRecord(record)
    assert mapped["msg"] == "with ***" and SECRET not in repr(mapped)
    # The record itself is untouched, for the other handlers.
    assert record.args == (SECRET,)


# The dispatcher as users run it.


def test_bad_log_format_in_consume_is_reported_not_raised(broker: BrokerHandle,
                                                          tmp_path: Path) -> None:
    user = f"logs-{broker.vhost}"  # users are node-wide; the vhost name is unique
    broker.node.ctl("add_user", user, SECRET)
    broker.node.ctl("set_permissions", "-p", broker.vhost, user, ".*", ".*", ".*")
    broker.declare("q")
    url = broker.url.replace("guest:guest", f"{user}:{SECRET}")
    config = "consumers:\n  - consumer: testconsumers:BadLogFormat\n    queue: q\n"
    proc = DispatcherProcess(tmp_path, config, url)
    try:
        proc.wait_consuming()
        broker.publish("q", "plain")
        broker.publish("q", SECRET)
        wait_until(lambda: proc.records() == ["plain", SECRET], what="both messages handled")
        wait_until(lambda: broker.drained("q"), what="both messages acked")
        output = proc.output
        assert output.count("--- Logging error ---") == 4, output
        assert "Arguments: ('only-one',)" in output
        assert "Arguments: ('plain',)" in output
        assert f"x[{proc.process.pid}] INFO: consumed body plain" in output
        assert f"x[{proc.process.pid}] INFO: consumed body ***" in output
        assert "consume raised" not in output
        assert "shutdown" not in proc.records()  # the instance was never replaced
    finally:
        assert proc.stop() == 0
        broker.node.ctl("delete_user", user, check=False)
    assert SECRET not in proc.output


def test_password_as_written_in_the_url_is_redacted_too(logger: logging.Logger) -> None:
    """Any percent-encoding of it (lower-case hex, needless escapes) stays hidden."""
    from amqpdispatcher.config.settings import parse_url

    url = "amqp://u:p%c3%a4ssw%c3%b6rd%65@h/"
    settings = parse_url(url)
    assert settings.password == "pässwörde"
    assert settings.password_as_written == "p%c3%a4ssw%c3%b6rd%65"
    logs.redact_password(settings.password)
    logs.redact_password(settings.password_as_written)
    out = capture(logger)
    logger.info("url=%s password=%s", url, settings.password)
    assert out.getvalue() == "INFO url=amqp://u:***@h/ password=***\n"


# JSON logs (LOG_FORMAT=json).

JSON_SECRET = 'pw"Zq\\ü81xK'  # a quote, a backslash and a non-ASCII letter: JSON escapes them


def test_json_lines_carry_the_fields_and_hide_the_password(logger: logging.Logger) -> None:
    logs.redact_password(JSON_SECRET)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger.addHandler(handler)
    logger.info("plain line")
    try:
        raise ValueError(f"refused {JSON_SECRET}")
    except ValueError:
        logger.error("consume raised %s", JSON_SECRET, exc_info=True, extra={
            "queue": "q", "consumer": "m:C", "delivery_tag": 7, "outcome": "requeue",
            "attempt": 2})
    logger.info("here", stack_info=True)
    text = stream.getvalue()
    for form in (JSON_SECRET, json.dumps(JSON_SECRET)[1:-1],
                 json.dumps(JSON_SECRET, ensure_ascii=False)[1:-1]):
        assert form not in text
    plain, failure, stacked = (json.loads(line) for line in text.splitlines())
    assert set(plain) == {"time", "level", "logger", "message", "pid"}
    assert plain["level"] == "INFO" and plain["logger"] == "test-logs.redaction"
    assert plain["message"] == "plain line" and plain["pid"] == os.getpid()
    assert plain["time"].endswith("+00:00")
    assert {k: failure[k] for k in ("message", "queue", "consumer", "delivery_tag", "outcome",
                                    "attempt")} == {
        "message": "consume raised ***", "queue": "q", "consumer": "m:C", "delivery_tag": 7,
        "outcome": "requeue", "attempt": 2}
    assert "Traceback (most recent call last)" in failure["exception"]
    assert failure["exception"].endswith("ValueError: refused ***")
    assert stacked["stack"].startswith("Stack (most recent call last)")


def test_dispatcher_json_logs_parse_and_name_the_delivery(broker: BrokerHandle,
                                                           tmp_path: Path) -> None:
    user = f"json-{broker.vhost}"
    broker.node.ctl("add_user", user, JSON_SECRET)
    broker.node.ctl("set_permissions", "-p", broker.vhost, user, ".*", ".*", ".*")
    broker.declare("q")
    url = broker.url.replace("guest:guest", f"{user}:{quote(JSON_SECRET, safe='')}")
    config = "consumers:\n  - consumer: testconsumers:LogsBody\n    queue: q\n"
    proc = DispatcherProcess(tmp_path, config, url, env={"LOG_FORMAT": "json"})
    try:
        proc.wait_consuming()
        broker.publish("q", "hello")
        broker.publish("q", f"fail-{JSON_SECRET}")
        wait_until(lambda: proc.records() == ["hello", f"fail-{JSON_SECRET}"],
                   what="both messages handled, one after a failure")
    finally:
        assert proc.stop() == 0
        broker.node.ctl("delete_user", user, check=False)
    lines = [json.loads(line) for line in proc.output.splitlines()]
    assert all(line["pid"] == proc.process.pid for line in lines)
    assert any(line["logger"] == "x" and line["message"] == "consumed body hello"
               for line in lines)
    assert sum(line["message"] == "consumed body fail-***" for line in lines) == 2
    failures = [line for line in lines if "consume raised" in line["message"]]
    assert len(failures) == 1
    failure = failures[0]
    assert failure["level"] == "ERROR" and failure["logger"] == "amqp-dispatcher"
    assert failure["message"].startswith("testconsumers:LogsBody: consume raised ValueError: "
                                         "failing fail-***")
    assert (failure["queue"], failure["consumer"], failure["outcome"], failure["attempt"]) \
        == ("q", "testconsumers:LogsBody", "requeue", 1)
    assert isinstance(failure["delivery_tag"], int)
    assert "Traceback" in failure["exception"]
    for form in (JSON_SECRET, json.dumps(JSON_SECRET)[1:-1], quote(JSON_SECRET, safe="")):
        assert form not in proc.output


def test_every_stderr_line_is_json_and_redacted(broker: BrokerHandle, tmp_path: Path) -> None:
    # A log call whose arguments do not fill its format, a greenlet that raises and
    # warnings.warn once printed plain text over several lines, whatever LOG_FORMAT.
    user = f"stray-{broker.vhost}"
    broker.node.ctl("add_user", user, JSON_SECRET)
    broker.node.ctl("set_permissions", "-p", broker.vhost, user, ".*", ".*", ".*")
    broker.declare("q")
    url = broker.url.replace("guest:guest", f"{user}:{quote(JSON_SECRET, safe='')}")
    config = "consumers:\n  - consumer: testconsumers:StrayOutput\n    queue: q\n"
    proc = DispatcherProcess(tmp_path, config, url, env={"LOG_FORMAT": "json"})
    bodies = [f"{kind}-{JSON_SECRET}" for kind in ("badformat", "greenlet", "warning")]
    try:
        proc.wait_consuming()
        for body in bodies:
            broker.publish("q", body)
        wait_until(lambda: proc.records() == bodies, what="the three messages handled")
    finally:
        assert proc.stop() == 0
        broker.node.ctl("delete_user", user, check=False)
    lines = [json.loads(line) for line in proc.output.splitlines()]  # each one JSON
    by_logger = {line["logger"]: line for line in lines}
    bad_format = by_logger["x"]
    assert bad_format["level"] == "ERROR"
    assert bad_format["message"].startswith("logging error: TypeError: not enough arguments")
    assert "arguments ('badformat-***',)" in bad_format["message"]
    greenlet = by_logger["gevent.hub"]
    assert greenlet["level"] == "ERROR" and "failed with ValueError" in greenlet["message"]
    assert greenlet["exception"].endswith("ValueError: greenlet-***")
    warning = by_logger["py.warnings"]
    assert warning["level"] == "WARNING" and "UserWarning: warning-***" in warning["message"]
    for form in (JSON_SECRET, json.dumps(JSON_SECRET)[1:-1], quote(JSON_SECRET, safe="")):
        assert form not in proc.output


def test_log_format_is_checked_unless_a_logging_file_config_decides(tmp_path: Path) -> None:
    config = "consumers:\n  - consumer: testconsumers:Recorder\n    queue: q\n"
    bad = run_cli(tmp_path, "--config", "config.yml", "--validate", config=config,
                  env={"LOG_FORMAT": "xml"})
    assert bad.returncode == 1
    assert bad.stderr == "LOG_FORMAT: expected 'text' or 'json', got 'xml'\n"
    logging_config = tmp_path / "logging.ini"
    logging_config.write_text("[loggers]\nkeys=root\n[handlers]\nkeys=\n[formatters]\nkeys=\n"
                              "[logger_root]\nlevel=INFO\nhandlers=\n")
    ignored = run_cli(tmp_path, "--config", "config.yml", "--validate", config=config,
                      env={"LOG_FORMAT": "xml", "LOGGING_FILE_CONFIG": str(logging_config)})
    assert ignored.returncode == 0, ignored.stderr

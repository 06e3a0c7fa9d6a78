"""--validate and start-up checks: one line per problem, naming file and key; no traceback."""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

import pytest
from helpers import TESTS, BrokerHandle, DispatcherProcess, run_cli, wait_until

from amqpdispatcher import cli
from amqpdispatcher.config import ConfigError, load_config
from amqpdispatcher.config.settings import settings_from_env
from amqpdispatcher.observability import logs

GOOD = """
startup_handler: testconsumers:startup
queues:
  - queue: a
    durable: true
    auto_delete: false
    passive: false
    exclusive: false
    x_dead_letter_exchange: null
    x_dead_letter_routing_key: null
    x_max_length: null
    x_expires: null
    x_message_ttl: null
    bindings:
      - exchange: notify
        routing_key: transaction.*
  - queue: b
consumers:
  - consumer: testconsumers:Recorder
    consumer_count: 1
    queue: a
    prefetch_count: 2
  - consumer: testconsumers:Sleeper
    queue: b
"""

CONSUMER = "consumers:\n  - consumer: testconsumers:Recorder\n    queue: a\n"

# (config text, the problem line expected after "config.yml: ")
BAD = [
    ("- just\n- a list\n", "expected a mapping, got a list"),
    ("queues: [\n", "YAML syntax error: line 2, column 1"),
    ("consumer:\n  - consumer: testconsumers:Recorder\n",
     "consumer: unknown key (did you mean 'consumers'?)"),
    ("consumers:\n  - consumer: testconsumers:Recorder\n    queue: a\n    prefetch_count: ten\n",
     "consumers[0].prefetch_count: expected an integer, got 'ten'"),
    ("consumers:\n  - consumer: testconsumers:Recorder\n    queue: a\n    consumer_count: 0\n",
     "consumers[0].consumer_count: expected a positive integer, got 0"),
    ("consumers:\n  - consumer: testconsumers:Recorder\n    queue: a\n    consumer_count: true\n",
     "consumers[0].consumer_count: expected an integer, got true"),
    ("consumers:\n  - consumer: testconsumers:Recorder\n", "consumers[0].queue: required key"),
    ("consumers:\n  - queue: a\n", "consumers[0].consumer: required key is missing"),
    ("consumers:\n  - consumer: testconsumers\n    queue: a\n",
     "consumers[0].consumer: expected 'module:Class', got 'testconsumers'"),
    ("consumers:\n  - consumer: nosuchmodule:C\n    queue: a\n",
     "consumers[0].consumer: cannot import 'nosuchmodule:C': no module named 'nosuchmodule'"),
    ("consumers:\n  - consumer: testconsumers:Nope\n    queue: a\n",
     "consumers[0].consumer: cannot import 'testconsumers:Nope': module 'testconsumers' has no"),
    ("consumers:\n  - consumer: testconsumers:not_a_class\n    queue: a\n",
     "consumers[0].consumer: 'testconsumers:not_a_class' is not a class"),
    ("consumers:\n  - consumer: testconsumers:NoShutdown\n    queue: a\n",
     "consumers[0].consumer: 'testconsumers:NoShutdown' has no shutdown method"),
    ("consumers:\n  - consumer: brokenimport:C\n    queue: a\n",
     "consumers[0].consumer: importing 'brokenimport:C' raised RuntimeError: "
     "this module fails at import"),
    ("startup_handler: testconsumers:not_a_class\n",
     "startup_handler: 'testconsumers:not_a_class' is not callable"),
    ("startup_handler: nosuch:thing\n", "startup_handler: cannot import 'nosuch:thing'"),
    ("queues:\n  - durable: true\n", "queues[0].queue: required key is missing"),
    ("queues:\n  - queue: a\n    durable: yes please\n",
     "queues[0].durable: expected true or false, got 'yes please'"),
    ("queues:\n  - queue: a\n    x_max_length: -1\n",
     "queues[0].x_max_length: expected zero or more, got -1"),
    ("queues:\n  - queue: a\n    x_expires: 0\n",
     "queues[0].x_expires: expected a positive integer, got 0"),
    ("queues:\n  - queue: a\n    durabel: true\n",
     "queues[0].durabel: unknown key (did you mean 'durable'?)"),
    ("queues:\n  - queue: a\n    bindings:\n      - exchange: x\n",
     "queues[0].bindings[0].routing_key: required key is missing"),
    ("queues:\n  - queue: a\n    bindings: notalist\n",
     "queues[0].bindings: expected a list, got 'notalist'"),
    ("queues: 3\n", "queues: expected a list, got 3"),
    # No consumers: the daemon would run doing nothing.
    ("", "the file has no keys (it is empty or only comments); at least one consumer entry"),
    ("# only a comment\n\n", "the file has no keys (it is empty or only comments)"),
    ("queues:\n  - queue: a\n",
     "consumers: required key is missing (at least one entry is required)"),
    ("consumers:\n", "consumers: at least one entry is required, got null"),
    ("consumers: []\n", "consumers: at least one entry is required, got an empty list"),
    # Empty names: a server-named queue, the channel's last queue, the default exchange.
    (CONSUMER + "queues:\n  - queue: ''\n", "queues[0].queue: expected a non-empty string, got ''"),
    ("consumers:\n  - consumer: testconsumers:Recorder\n    queue: \"\"\n",
     "consumers[0].queue: expected a non-empty string, got ''"),
    (CONSUMER + "queues:\n  - queue: a\n    bindings:\n      - exchange: ''\n"
     "        routing_key: k\n",
     "queues[0].bindings[0].exchange: expected a non-empty string, got '' "
     "(the default exchange cannot be bound)"),
    # NaN and infinity are YAML floats, never a number of seconds.
    (CONSUMER + "drain_timeout: .nan\n", "drain_timeout: expected a finite number, got .nan"),
    (CONSUMER + "drain_timeout: .inf\n", "drain_timeout: expected a finite number, got .inf"),
    (CONSUMER + "reconnect_give_up_after: .inf\n",
     "reconnect_give_up_after: expected a finite number, got .inf"),
    (CONSUMER + "reconnect_give_up_after: -.inf\n",
     "reconnect_give_up_after: expected a finite number, got -.inf"),
    (CONSUMER + "drain_timeout: 0.0\n", "drain_timeout: expected a positive number, got 0.0"),
    # A key given twice would silently replace the first.
    (CONSUMER + "    prefetch_count: 2\n    prefetch_count: 3\n",
     "line 5: duplicate key 'prefetch_count'"),
    (CONSUMER + "drain_timeout: 5\n" + CONSUMER, "line 5: duplicate key 'consumers'"),
    (CONSUMER + "queues:\n  - queue: a\n    bindings:\n      - exchange: x\n"
     "        routing_key: k\n        exchange: y\n", "line 9: duplicate key 'exchange'"),
    # basic.qos carries prefetch_count in 16 bits.
    (CONSUMER + "    prefetch_count: 65536\n",
     "consumers[0].prefetch_count: expected at most 65535, got 65536"),
    (CONSUMER + "    consumer_count: 1.5\n",
     "consumers[0].consumer_count: expected an integer, got 1.5"),
    # Names travel as AMQP short strings; queue arguments as 64-bit integers at most.
    (CONSUMER.replace("queue: a", "queue: " + "q" * 256),
     "consumers[0].queue: expected at most 255 bytes (an AMQP name), got 256"),
    (CONSUMER + "queues:\n  - queue: a\n    bindings:\n      - exchange: x\n"
     "        routing_key: " + "é" * 128 + "\n",
     "queues[0].bindings[0].routing_key: expected at most 255 bytes (an AMQP name), got 256"),
    (CONSUMER + "queues:\n  - queue: a\n    x_message_ttl: 99999999999999999999999\n",
     "queues[0].x_message_ttl: expected at most 9223372036854775807"),
    # Failure handling: time_limit and the retry policy.
    (CONSUMER + "    time_limit: 0\n",
     "consumers[0].time_limit: expected a positive number, got 0"),
    (CONSUMER + "    time_limit: 30s\n", "consumers[0].time_limit: expected a number, got '30s'"),
    (CONSUMER + "    time_limt: 30\n",
     "consumers[0].time_limt: unknown key (did you mean 'time_limit'?)"),
    (CONSUMER + "    retry: 3\n", "consumers[0].retry: expected a mapping, got 3"),
    (CONSUMER + "    retry:\n      max_attempts: 0\n",
     "consumers[0].retry.max_attempts: expected a positive integer, got 0"),
    (CONSUMER + "    retry:\n      max_attempts: 2.5\n",
     "consumers[0].retry.max_attempts: expected an integer, got 2.5"),
    (CONSUMER + "    retry:\n      delay: 0\n",
     "consumers[0].retry.delay: expected a positive number, got 0"),
    (CONSUMER + "    retry:\n      delay: .inf\n",
     "consumers[0].retry.delay: expected a finite number, got .inf"),
    (CONSUMER + "    retry:\n      backoff: 0.5\n",
     "consumers[0].retry.backoff: expected at least 1, got 0.5"),
    (CONSUMER + "    retry:\n      delay: 10\n      max_delay: 5\n",
     "consumers[0].retry.max_delay: expected at least delay (10), got 5"),
    (CONSUMER + "    retry:\n      max_delay: 5000000\n",
     "consumers[0].retry.max_delay: expected at most 4294967, got 5000000"),
    (CONSUMER + "    retry:\n      max_attempt: 3\n",
     "consumers[0].retry.max_attempt: unknown key (did you mean 'max_attempts'?)"),
    (CONSUMER + "    retry:\n      dead_letter_queue: ''\n",
     "consumers[0].retry.dead_letter_queue: expected a non-empty string, got ''"),
    (CONSUMER + "    retry:\n      delay: 1\n      delay: 2\n", "line 6: duplicate key 'delay'"),
    # Names a retry policy would collide with, or make too long.
    (CONSUMER + "    retry:\n      dead_letter_queue: a\n",
     "consumers[0].retry.dead_letter_queue: 'a' is the entry's own queue"),
    (CONSUMER + "    retry: {}\nqueues:\n  - queue: a.retry.1000ms\n",
     "queues[0].queue: 'a.retry.1000ms' is a delay queue of consumers[0].retry"),
    (CONSUMER.replace("queue: a", "queue: " + "q" * 245) + "    retry: {}\n",
     "consumers[0].queue: too long for a retry policy"),
    (CONSUMER + "    retry:\n      max_attempts: 1000\n      delay: 0.001\n      backoff: 1.01\n"
     "      max_delay: 4000000\n", "consumers[0].retry: needs more than 64 delay queues"),
    # Exchanges.
    (CONSUMER + "exchanges:\n  - exchange: e\n    type: topc\n",
     "exchanges[0].type: expected one of direct, topic, fanout, headers or a plugin's type "
     "(x-...), got 'topc' (did you mean 'topic'?)"),
    (CONSUMER + "exchanges:\n  - exchange: e\n",
     "exchanges[0].type: required key is missing (direct, topic, fanout, headers or a "
     "plugin's type), unless passive: true"),
    (CONSUMER + "exchanges:\n  - exchange: ''\n    type: topic\n",
     "exchanges[0].exchange: expected a non-empty string, got '' (the default exchange "
     "cannot be declared)"),
    (CONSUMER + "exchanges:\n  - exchange: e\n    type: topic\n    durabel: true\n",
     "exchanges[0].durabel: unknown key (did you mean 'durable'?)"),
    (CONSUMER + "exchanges:\n  - exchange: e\n    type: topic\n    internal: 1\n",
     "exchanges[0].internal: expected true or false, got 1"),
    (CONSUMER + "exchanges:\n  - exchange: e\n    type: topic\n"
     "  - exchange: e\n    type: topic\n", "exchanges[1].exchange: 'e' is declared in "
     "exchanges[0] already"),
    (CONSUMER + "exchanges:\n  - exchange: e\n    type: topic\n    arguments: [1]\n",
     "exchanges[0].arguments: expected a mapping, got a list"),
    (CONSUMER + "exchanges:\n  - exchange: e\n    type: topic\n    bindings:\n"
     "      - exchange: f\n", "exchanges[0].bindings[0].routing_key: required key is missing"),
    (CONSUMER + "exchanges: {}\n", "exchanges: expected a list, got an empty mapping"),
    (CONSUMER + "queues:\n  - queue: a\n    bindings:\n      - exchange: h\n"
     "        routing_key: ''\n        arguments: {x-match: all, day: 2024-01-01}\n",
     "queues[0].bindings[0].arguments.day: expected a string, integer, true or false, "
     "timestamp, list or mapping (an AMQP table value), got datetime.date(2024, 1, 1)"),
    # Queue arguments: types, ranges and allowed values.
    (CONSUMER + "queues:\n  - queue: a\n    x_queue_type: quorom\n",
     "queues[0].x_queue_type: expected one of classic, quorum, stream, got 'quorom' "
     "(did you mean 'quorum'?)"),
    (CONSUMER + "queues:\n  - queue: a\n    x_overflow: reject\n",
     "queues[0].x_overflow: expected one of drop-head, reject-publish, reject-publish-dlx, "
     "got 'reject'"),
    (CONSUMER + "queues:\n  - queue: a\n    x_max_priority: 256\n",
     "queues[0].x_max_priority: expected at most 255, got 256"),
    (CONSUMER + "queues:\n  - queue: a\n    x_max_length_bytes: 1MB\n",
     "queues[0].x_max_length_bytes: expected an integer, got '1MB'"),
    (CONSUMER + "queues:\n  - queue: a\n    x_single_active_consumer: 'true'\n",
     "queues[0].x_single_active_consumer: expected true or false, got 'true'"),
    (CONSUMER + "queues:\n  - queue: a\n    x_queue_type: quorum\n    x_delivery_limit: -1\n",
     "queues[0].x_delivery_limit: expected zero or more, got -1"),
    (CONSUMER + "queues:\n  - queue: a\n    x_queue_mode: classic\n",
     "queues[0].x_queue_mode: expected one of default, lazy, got 'classic'"),
    (CONSUMER + "queues:\n  - queue: a\n    x_queue_leader_locator: client_local\n",
     "queues[0].x_queue_leader_locator: expected one of client-local, balanced, got "
     "'client_local' (did you mean 'client-local'?)"),
    (CONSUMER + "queues:\n  - queue: a\n    x_max_length: 5\n"
     "    arguments: {x-max-length: 6}\n",
     "queues[0].arguments.x-max-length: set twice: also as queues[0].x_max_length; keep "
     "x_max_length only"),
    (CONSUMER + "queues:\n  - queue: a\n    arguments: {x-queue-type: quorum}\n",
     "queues[0].arguments.x-queue-type: has a key of its own, which is checked: write "
     "queues[0].x_queue_type instead"),
    (CONSUMER + "queues:\n  - queue: a\n    arguments: {x-max-age: .nan}\n",
     "queues[0].arguments.x-max-age: expected an integer or a string, got .nan"),
    # pika cannot encode a float in an AMQP table (the daemon would exit 3 at declare).
    (CONSUMER + "queues:\n  - queue: a\n    arguments: {x-weight: 1.5}\n",
     "queues[0].arguments.x-weight: expected an integer or a string, got 1.5 (AMQP "
     "arguments carry no fractional numbers here: give whole units, as milliseconds, or a "
     "string)"),
    (CONSUMER + "exchanges:\n  - exchange: e\n    type: topic\n    arguments: {x-w: [0.5]}\n",
     "exchanges[0].arguments.x-w[0]: expected an integer or a string, got 0.5"),
    (CONSUMER + "queues:\n  - queue: a\n    bindings:\n      - exchange: h\n"
     "        routing_key: ''\n        arguments: {x-match: all, ratio: 0.25}\n",
     "queues[0].bindings[0].arguments.ratio: expected an integer or a string, got 0.25"),
    # Timestamps AMQP cannot carry (unsigned seconds since 1970): pika's encoder fails.
    (CONSUMER + "    stream_offset: 1960-01-01\n", "consumers[0].stream_offset: expected a "
     "timestamp from 1970-01-01 on (AMQP's), got 1960-01-01T00:00:00"),
    (CONSUMER + "    stream_offset: 1970-01-01T00:30:00+01:00\n",
     "consumers[0].stream_offset: expected a timestamp from 1970-01-01 on"),
    (CONSUMER + "queues:\n  - queue: a\n    arguments: {x-since: 1960-01-01T00:00:00Z}\n",
     "queues[0].arguments.x-since: expected a timestamp from 1970-01-01 on (AMQP's), got "
     "1960-01-01T00:00:00+00:00"),
    # A date PyYAML recognises but cannot build, anywhere in the file.
    (CONSUMER + "    stream_offset: 2024-02-30\n",
     "line 4: '2024-02-30' is not a valid date: day is out of range for month"),
    (CONSUMER + "    stream_offset: 2024-05-01T00:00:00+25:00\n",
     "line 4: '2024-05-01T00:00:00+25:00' is not a valid date: a zone offset of 24 hours or "
     "more"),
    (CONSUMER + "queues:\n  - queue: a\n    arguments: {x-since: 2023-13-01}\n",
     "line 6: '2023-13-01' is not a valid date: month must be in 1..12"),
    # RabbitMQ ignores an argument whose name is not lower case.
    (CONSUMER + "queues:\n  - queue: a\n    arguments: {X-Max-Length: 5}\n",
     "queues[0].arguments.X-Max-Length: RabbitMQ's argument names are lower case and it "
     "would ignore this one: write 'x-max-length'"),
    (CONSUMER + "exchanges:\n  - exchange: e\n    type: topic\n"
     "    arguments: {Alternate-Exchange: u}\n",
     "exchanges[0].arguments.Alternate-Exchange: RabbitMQ's argument names are lower case"),
    # RabbitMQ refuses to declare amq.* names (403); passive: true only checks.
    (CONSUMER + "exchanges:\n  - exchange: amq.events\n    type: topic\n",
     "exchanges[0].exchange: 'amq.events': RabbitMQ reserves the amq. prefix and refuses to "
     "declare it: set passive: true to only check that it exists, or choose another name"),
    (CONSUMER + "queues:\n  - queue: amq.work\n",
     "queues[0].queue: 'amq.work': RabbitMQ reserves the amq. prefix"),
    # What RabbitMQ refuses to declare (checked against 3.10).
    (CONSUMER + "queues:\n  - queue: a\n    x_queue_type: quorum\n    exclusive: true\n",
     "queues[0].exclusive: a quorum queue cannot be exclusive: RabbitMQ refuses to declare "
     "the queue"),
    (CONSUMER + "queues:\n  - queue: a\n    x_queue_type: stream\n    auto_delete: true\n",
     "queues[0].auto_delete: a stream queue cannot be auto-delete: RabbitMQ refuses"),
    (CONSUMER + "queues:\n  - queue: a\n    x_queue_type: quorum\n    x_max_priority: 5\n",
     "queues[0].x_max_priority: not for a quorum queue: RabbitMQ refuses"),
    (CONSUMER + "queues:\n  - queue: a\n    x_delivery_limit: 5\n",
     "queues[0].x_delivery_limit: not for a classic queue (quorum queues only)"),
    (CONSUMER + "queues:\n  - queue: a\n    x_queue_type: stream\n    x_delivery_limit: 5\n",
     "queues[0].x_delivery_limit: not for a stream queue (quorum queues only)"),
    (CONSUMER + "queues:\n  - queue: a\n    x_queue_type: quorum\n    x_queue_mode: lazy\n",
     "queues[0].x_queue_mode: not for a quorum queue"),
    (CONSUMER + "queues:\n  - queue: a\n    x_queue_type: stream\n    x_queue_mode: lazy\n",
     "queues[0].x_queue_mode: not for a stream queue"),
    (CONSUMER + "queues:\n  - queue: a\n    x_queue_type: stream\n    durable: false\n",
     "queues[0].durable: a stream queue is always durable"),
    (CONSUMER + "queues:\n  - queue: a\n    x_queue_type: stream\n    x_max_length: 10\n",
     "queues[0].x_max_length: not for a stream queue (a stream's retention is "
     "x_max_length_bytes, or x-max-age in arguments)"),
    (CONSUMER + "queues:\n  - queue: a\n    x_queue_type: stream\n"
     "    x_single_active_consumer: false\n",
     "queues[0].x_single_active_consumer: not for a stream queue"),
    (CONSUMER + "queues:\n  - queue: a\n    x_queue_type: quorum\n"
     "    x_overflow: reject-publish-dlx\n",
     "queues[0].x_overflow: quorum queues do not support reject-publish-dlx"),
    # Consume arguments.
    (CONSUMER + "    priority: high\n", "consumers[0].priority: expected an integer, got 'high'"),
    (CONSUMER + "    exclusive: yes please\n",
     "consumers[0].exclusive: expected true or false, got 'yes please'"),
    (CONSUMER + "    stream_offset: frist\n",
     "consumers[0].stream_offset: expected one of first, last, next, got 'frist' "
     "(did you mean 'first'?)"),
    (CONSUMER + "    stream_offset: -1\n", "consumers[0].stream_offset: expected zero or more"),
    (CONSUMER + "    stream_offset: 1.5\n", "consumers[0].stream_offset: expected first, last, "
     "next, an offset (an integer) or a timestamp, got 1.5"),
    (CONSUMER + "    stream_offset: first\nqueues:\n  - queue: a\n    x_queue_type: quorum\n",
     "consumers[0].stream_offset: queue 'a' is declared in queues[0] as a quorum queue: "
     "only a stream takes an offset"),
    (CONSUMER + "    stream_offset: first\nqueues:\n  - queue: a\n",
     "consumers[0].stream_offset: queue 'a' is declared in queues[0] as a classic queue"),
    (CONSUMER + "    stream_offset: first\n    priority: 1\n",
     "consumers[0].priority: a stream consumer cannot have a priority"),
    (CONSUMER + "    retry: {}\nqueues:\n  - queue: a\n    x_queue_type: stream\n",
     "consumers[0].retry: not for a stream"),
    (CONSUMER + CONSUMER[len("consumers:\n"):] + "    exclusive: true\n",
     "consumers[1].exclusive: consumers[0] consumes queue 'a' too: an exclusive consumer "
     "must be the queue's only one"),
]


def test_good_config_validates(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "--validate", "--config", "config.yml", config=GOOD)
    assert result.returncode == 0, result.stderr
    assert "config.yml: OK" in result.stdout
    assert "startup" not in (tmp_path / "record").name  # validate never calls the handler


def test_example_config_validates(tmp_path: Path) -> None:
    repo = Path(__file__).parent.parent
    result = run_cli(tmp_path, "--validate", "--config",
                     str(repo / "amqp-dispatcher-config.yml"))
    assert result.returncode == 0, result.stderr


# The daemon must refuse before connecting: this URL reaches nothing, and its password is
# never printed.
BAD_URL = "amqp://u:s3cretpw@127.0.0.1:1/"


def check_problem_lines(stdout: str, stderr: str, expected: str) -> None:
    lines = stderr.strip().splitlines()
    assert any(line.startswith(f"config.yml: {expected}") for line in lines), lines
    assert all(line.startswith("config.yml: ") for line in lines), lines
    assert "Traceback" not in stderr + stdout
    assert "s3cretpw" not in stderr + stdout


@pytest.fixture
def like_the_console_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process set up as the console script's is in these tests: the consumer
    modules importable, the config's directory the working directory, no password
    registered for redaction; all put back afterwards (as in test_logs.py)."""
    monkeypatch.syspath_prepend(str(TESTS / "consumers"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(logs, "_passwords", ())
    monkeypatch.setattr(logs, "_pattern", None)
    for cls, name in ((logging.Handler, "format"), (logging.Handler, "handleError"),
                      (logging.handlers.SocketHandler, "makePickle"),
                      (logging.handlers.HTTPHandler, "mapLogRecord")):
        monkeypatch.setattr(cls, name, cls.__dict__[name])
    return tmp_path


@pytest.mark.parametrize("text, expected", BAD, ids=[e for _, e in BAD])
@pytest.mark.parametrize("mode", ["validate", "daemon"])
def test_bad_config(like_the_console_script: Path, capsys: pytest.CaptureFixture[str],
                    monkeypatch: pytest.MonkeyPatch, mode: str, text: str,
                    expected: str) -> None:
    """In this process: the problems load_config finds, printed by the function the
    console script prints them with (cli.fail). Both modes load the config before
    anything differs (cli._main), the daemon once it has registered its URL's password
    for redaction; test_bad_config_from_the_console_script runs some of them as users
    do."""
    args = cli.parse_args(["--config", "config.yml"] + (["--validate"] if mode == "validate"
                                                         else []))
    assert args.validate == (mode == "validate")
    (like_the_console_script / args.config).write_text(text)
    if mode == "daemon":
        monkeypatch.setenv("RABBITMQ_URL", BAD_URL)
        logs.redact_password(settings_from_env().password)
    with pytest.raises(ConfigError) as raised:
        load_config(args.config)
    capsys.readouterr()
    assert cli.fail(raised.value.problems) == 1  # the exit status
    printed = capsys.readouterr()
    assert printed.out == ""
    assert printed.err.strip().splitlines() == raised.value.problems
    check_problem_lines(printed.out, printed.err, expected)


# Each kind of problem once, through the console script: a shape, YAML syntax, an import
# that fails, and consumer code raising at import.
CONSOLE_BAD = [BAD[0], BAD[1], BAD[9], BAD[13]]


@pytest.mark.parametrize("text, expected", CONSOLE_BAD, ids=[e for _, e in CONSOLE_BAD])
@pytest.mark.parametrize("mode", ["validate", "daemon"])
def test_bad_config_from_the_console_script(tmp_path: Path, mode: str, text: str,
                                            expected: str) -> None:
    args = ["--config", "config.yml"] + (["--validate"] if mode == "validate" else [])
    result = run_cli(tmp_path, *args, config=text, env={"RABBITMQ_URL": BAD_URL})
    assert result.returncode == 1, result
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    check_problem_lines(result.stdout, result.stderr, expected)


def test_topology_keys_validate(tmp_path: Path) -> None:
    """Every new key at once, with values RabbitMQ takes (test_topology.py declares them)."""
    text = """
exchanges:
  - exchange: events
    type: topic
    durable: true
    auto_delete: false
    internal: false
    passive: false
    arguments: {alternate-exchange: unrouted}
    bindings:
      - exchange: upstream
        routing_key: "#"
        arguments: null
  - exchange: upstream
    passive: true
  - exchange: amq.topic
    passive: true
  - exchange: later
    type: x-delayed-message
    arguments: {x-delayed-type: direct}
queues:
  - queue: a
    x_queue_type: quorum
    x_max_length_bytes: 1048576
    x_overflow: reject-publish
    x_single_active_consumer: true
    x_delivery_limit: 0
    x_queue_leader_locator: client-local
    arguments: {x-quorum-initial-group-size: 3, x-tags: [a, 1, {b: "2.5"}]}
    bindings:
      - exchange: events
        routing_key: ""
        arguments: {x-match: any, format: pdf, when: 2024-01-01T00:00:00Z}
  - queue: b
    x_max_priority: 255
    x_queue_mode: lazy
    x_overflow: reject-publish-dlx
  - queue: log
    x_queue_type: stream
    x_max_length_bytes: 100000000
    x_queue_leader_locator: balanced
  - queue: theirs
    passive: true
  - queue: amq.gen-theirs
    passive: true
consumers:
  - consumer: testconsumers:Recorder
    queue: a
    priority: -9223372036854775808
    exclusive: true
  - consumer: testconsumers:Recorder
    queue: log
    stream_offset: 2024-05-01T12:00:00Z
  - consumer: testconsumers:Recorder
    queue: log
    stream_offset: 12345
  - consumer: testconsumers:Recorder
    queue: other-stream
    stream_offset: next
  - consumer: testconsumers:Recorder
    queue: theirs
    stream_offset: 2024-05-01
"""
    result = run_cli(tmp_path, "--validate", "--config", "config.yml", config=text)
    assert result.returncode == 0, result.stderr
    assert "config.yml: OK (4 exchange(s), 5 queue(s), 5 consumer(s))" in result.stdout


def test_missing_name_is_only_missing(tmp_path: Path) -> None:
    """A name is not a list: no "(at least one entry is required)" after it."""
    text = (CONSUMER + "exchanges:\n  - type: topic\nqueues:\n  - durable: true\n"
            "  - queue: b\n    bindings:\n      - routing_key: k\n")
    result = run_cli(tmp_path, "--validate", "--config", "config.yml", config=text)
    assert result.returncode == 1
    assert sorted(result.stderr.splitlines()) == [
        "config.yml: exchanges[0].exchange: required key is missing",
        "config.yml: queues[0].queue: required key is missing",
        "config.yml: queues[1].bindings[0].exchange: required key is missing"]


def test_retry_policy_validates_and_time_limits_warn(tmp_path: Path) -> None:
    text = (CONSUMER + "    time_limit: 0.5\n    retry:\n      max_attempts: 1\n"
            "      delay: 0.1\n      backoff: 1\n      max_delay: 0.1\n"
            "      dead_letter_queue: a.failed\n"
            "  - consumer: testconsumers:Recorder\n    queue: b\n    retry: null\n"
            "  - consumer: testconsumers:Recorder\n    queue: c\n    time_limit: 1800\n")
    result = run_cli(tmp_path, "--validate", "--config", "config.yml", config=text)
    assert result.returncode == 0, result.stderr
    assert "config.yml: OK" in result.stdout
    # Warnings, not problems: a consume may outlive RabbitMQ's consumer_timeout.
    assert result.stderr.splitlines() == [
        "config.yml: consumers[1]: warning: no time_limit: a consume that never returns "
        "holds its delivery until RabbitMQ's consumer_timeout (30 min by default) closes "
        "the channel; set time_limit below it",
        "config.yml: consumers[2].time_limit: warning: 1800s is close to or past RabbitMQ's "
        "consumer_timeout (30 min by default); keep it comfortably below",
    ]


def test_fractions_of_a_second_and_large_counts_validate(tmp_path: Path) -> None:
    text = (CONSUMER + "    consumer_count: 100000\n    prefetch_count: 65535\n"
            "drain_timeout: 0.5\nreconnect_give_up_after: 0.25\n")
    result = run_cli(tmp_path, "--validate", "--config", "config.yml", config=text)
    assert result.returncode == 0, result.stderr


def test_yaml_merge_keys_may_still_override(tmp_path: Path) -> None:
    """Only keys written twice in one mapping are duplicates, not keys from a `<<` merge."""
    text = ("consumers:\n  - &base\n    consumer: testconsumers:Recorder\n    queue: a\n"
            "  - <<: *base\n    queue: b\n")
    result = run_cli(tmp_path, "--validate", "--config", "config.yml", config=text)
    assert result.returncode == 0, result.stderr
    assert "2 consumer(s)" in result.stdout


def test_every_problem_is_reported(tmp_path: Path) -> None:
    text = ("consumers:\n  - consumer: nosuch:C\n    queue: a\n"
            "  - consumer: testconsumers:Recorder\n    queue: a\n    prefetch_count: x\n")
    result = run_cli(tmp_path, "--validate", "--config", "config.yml", config=text)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 2, result.stderr


def test_a_retry_policy_with_a_bad_delay_still_has_its_names_checked(
        tmp_path: Path) -> None:
    """Found by a new user: one run showed max_delay's problem, the next the
    dead-letter queue's. Every problem of the policy is reported at once."""
    (tmp_path / "config.yml").write_text(
        "consumers:\n  - consumer: testconsumers:Recorder\n    queue: q\n"
        "    retry: {delay: 5, max_delay: 1, dead_letter_queue: q}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(str(tmp_path / "config.yml"))
    assert [line.split(": ", 2)[1] for line in refused.value.problems] == [
        "consumers[0].retry.max_delay", "consumers[0].retry.dead_letter_queue"]


@pytest.mark.parametrize("setup, expected", [
    (lambda p: None, "missing.yml: no such file"),
    (lambda p: (p / "missing.yml").mkdir(), "missing.yml: is a directory"),
    (lambda p: (p / "missing.yml").write_bytes(b"\xff\xfe\x00bad"), "missing.yml: not UTF-8"),
])
def test_unreadable_file(tmp_path: Path, setup, expected: str) -> None:
    setup(tmp_path)
    result = run_cli(tmp_path, "--validate", "--config", "missing.yml")
    assert result.returncode == 1
    assert result.stderr.strip() == expected or result.stderr.startswith(expected), result.stderr
    assert "Traceback" not in result.stderr


def test_default_config_file_is_config_yml(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "--validate")
    assert result.returncode == 1
    assert result.stderr.strip() == "config.yml: no such file"


@pytest.mark.parametrize("url, expected", [
    ("http://u:s3cretpw@h/", "RABBITMQ_URL: expected amqp://"),
    ("amqp://u:s3cretpw@h:notaport/", "RABBITMQ_URL: a port in the host list is not a number"),
    ("amqp://u:s3cr/etpw@h/v", "RABBITMQ_URL: a '/' comes before an '@'"),
    ("amqp://u:s3cretpw@/v", "RABBITMQ_URL: no host given"),
    ("amqp://u:s3cretpw@h/?heartbeat=often", "RABBITMQ_URL: heartbeat: expected a whole"),
    # Each of these used to be read some other way and fail only at connecting (status 3).
    ("amqp://u:12?s3cretpw@127.0.0.1:1/", "RABBITMQ_URL: a '?' comes before an '@'"),
    ("amqp://u:s3cr#etpw@127.0.0.1:1/", "RABBITMQ_URL: a '#' cannot be parsed unambiguously"),
    ("amqp://u:s3cret pw@127.0.0.1:1/", "RABBITMQ_URL: contains whitespace or a control"),
    ("amqp://u:s3cretpw@127.0.0.1:1/?hearbeat=5",
     "RABBITMQ_URL: unknown query parameter 'hearbeat'; known: heartbeat"),
    ("amqp://u:s3cretpw@127.0.0.1:1/?heartbeat=70000",
     "RABBITMQ_URL: heartbeat: expected at most 65535 seconds"),
])
def test_malformed_url(tmp_path: Path, url: str, expected: str) -> None:
    result = run_cli(tmp_path, "--config", "config.yml", config=GOOD, env={"RABBITMQ_URL": url})
    assert result.returncode == 1, result
    assert result.stderr.startswith(expected), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "s3cr" not in result.stderr
    assert "Traceback" not in result.stderr
    if "before an '@'" in expected or "'#'" in expected:
        assert "percent-encode" in result.stderr


def test_trailing_newline_in_url_is_ignored(broker: BrokerHandle, tmp_path: Path) -> None:
    """A URL read from a secret file keeps its newline; it is not part of the vhost."""
    broker.declare("a")
    proc = DispatcherProcess(tmp_path, CONSUMER, broker.url + "\n")
    try:
        proc.wait_consuming()
        broker.publish("a", "hello")
        wait_until(lambda: proc.records() == ["hello"], what="message consumed")
    finally:
        assert proc.stop() == 0


def test_bad_heartbeat_variable(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "--validate", "--config", "config.yml", config=GOOD,
                     env={"RABBITMQ_HEARTBEAT": "soon"})
    assert result.returncode == 1
    assert result.stderr.startswith("RABBITMQ_HEARTBEAT: expected a whole number")


@pytest.mark.parametrize("value", ["70000", "-1", "1.5"])
def test_heartbeat_variable_out_of_range(tmp_path: Path, value: str) -> None:
    result = run_cli(tmp_path, "--validate", "--config", "config.yml", config=GOOD,
                     env={"RABBITMQ_HEARTBEAT": value})
    assert result.returncode == 1, result
    assert result.stderr.startswith("RABBITMQ_HEARTBEAT: expected"), result.stderr


def test_bad_logging_config(tmp_path: Path) -> None:
    (tmp_path / "logging.ini").write_text("[loggers]\nkeys=root\n")
    result = run_cli(tmp_path, "--validate", "--config", "config.yml", config=GOOD,
                     env={"LOGGING_FILE_CONFIG": "logging.ini"})
    assert result.returncode == 1
    assert result.stderr.startswith("LOGGING_FILE_CONFIG: logging.ini: not a valid logging")
    assert "Traceback" not in result.stderr


def test_help_and_version(tmp_path: Path) -> None:
    assert "--validate" in run_cli(tmp_path, "--help").stdout
    version = run_cli(tmp_path, "--version")
    assert version.returncode == 0 and version.stdout.startswith("amqp-dispatcher ")
    unknown = run_cli(tmp_path, "--bogus")
    assert unknown.returncode == 2

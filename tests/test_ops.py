"""Operations: --exit-when-drained, the library API, --print-schema and --check."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
import yaml
from faultproxy import FaultProxy
from helpers import REPO, TESTS, BrokerHandle, DispatcherProcess, run_cli, wait_until
from rabbitnode import free_port
from test_metrics import get
from test_validate import BAD, GOOD

from amqpdispatcher.config import TOP_LEVEL_KEYS, ConfigError, _Key, _parse, config_schema

# For --check: seed() puts on the broker what it needs.
CHECK_CONFIG = """
queues:
  - queue: existing
    x_max_length: 10
    bindings:
      - exchange: events
        routing_key: order.*
  - queue: fresh
    x_dead_letter_exchange: dlx
    exclusive: false
    bindings:
      - exchange: events
        routing_key: fresh.*
  - queue: outside
    passive: true
consumers:
  - consumer: testconsumers:Recorder
    queue: existing
    retry:
      max_attempts: 2
      delay: 1
  - consumer: testconsumers:Recorder
    queue: undeclared
  - consumer: testconsumers:Recorder
    queue: fresh
"""

# -- --exit-when-drained ------------------------------------------------------------


def test_exit_when_drained_exits_0_with_the_queue_empty(broker: BrokerHandle,
                                                         tmp_path: Path) -> None:
    broker.declare("jobs", durable=True)
    for i in range(50):
        broker.publish("jobs", f"m{i}")
    config = ("queues:\n  - queue: jobs\nconsumers:\n  - consumer: testconsumers:Recorder\n"
              "    queue: jobs\n    consumer_count: 4\n    prefetch_count: 8\n")
    proc = DispatcherProcess(tmp_path, config, broker.url, args=("--exit-when-drained", "0.5"))
    assert proc.wait() == 0, proc.output
    assert sorted(proc.records()) == sorted(f"m{i}" for i in range(50))
    assert broker.drained("jobs")
    assert "exit-when-drained: the consumers' queues have been empty" in proc.output


def test_exit_when_drained_waits_for_a_consume_in_progress(broker: BrokerHandle,
                                                           tmp_path: Path) -> None:
    broker.declare("slow", durable=True)
    broker.publish("slow", "long-one")
    config = ("queues:\n  - queue: slow\nconsumers:\n  - consumer: testconsumers:LoggedSleeper\n"
              "    queue: slow\n")
    proc = DispatcherProcess(tmp_path, config, broker.url, env={"SLEEP": "2"},
                             args=("--exit-when-drained", "0.3"))
    assert proc.wait() == 0, proc.output
    output = proc.output
    # The queue was empty all along; the message in consume was not done until it returned.
    assert output.index("consume done: long-one") < output.index("exit-when-drained:"), output
    assert broker.drained("slow")


def test_exit_when_drained_waits_for_messages_in_a_retry_delay_queue(
        broker: BrokerHandle, tmp_path: Path) -> None:
    broker.declare("q", durable=True)
    broker.publish("q", "twice-x")
    config = ("queues:\n  - queue: q\nconsumers:\n  - consumer: testconsumers:Retried\n"
              "    queue: q\n    retry:\n      max_attempts: 5\n      delay: 1\n"
              "      backoff: 1\n      max_delay: 1\n")
    proc = DispatcherProcess(tmp_path, config, broker.url, args=("--exit-when-drained", "0.3"))
    assert proc.wait() == 0, proc.output
    # Failed twice, waited 1 s in q.retry.quorum.1000ms each time, then done.
    records = proc.records()
    assert [line.split(":")[2] for line in records if line.startswith("attempt:")] \
        == ["1", "2", "3"], records
    assert "done:twice-x" in records
    # A passive declare: rabbitmqctl's counts of a quorum queue lag by seconds.
    delay_queue = broker.channel.queue_declare("q.retry.quorum.1000ms", passive=True)
    assert broker.drained("q") and delay_queue.method.message_count == 0


def test_exit_when_drained_never_while_the_queue_is_missing(broker: BrokerHandle,
                                                            tmp_path: Path) -> None:
    """A consumer queue that does not exist is not empty: its entry is being repaired."""
    broker.declare("here")
    config = ("consumers:\n  - consumer: testconsumers:Recorder\n    queue: here\n"
              "  - consumer: testconsumers:Recorder\n    queue: later\n")
    broker.declare("later")
    proc = DispatcherProcess(tmp_path, config, broker.url, args=("--exit-when-drained", "0.5"))
    try:
        proc.wait_consuming()
        broker.channel.queue_delete("later")
        proc.wait_for_log(r"cancelled the consumer of consumers\[1\]")
        # The repair's second try comes a second or more later: twice the drain time.
        proc.wait_for_log(r"queue 'later'.*retrying in 2s")
        assert proc.process.poll() is None, proc.output
        broker.declare("later")
        broker.publish("later", "finally")
        assert proc.wait() == 0, proc.output
        assert proc.records() == ["finally"]
    finally:
        proc.stop()


def test_exit_when_drained_never_while_disconnected(broker: BrokerHandle,
                                                    tmp_path: Path) -> None:
    broker.declare("q", durable=True)
    config = ("queues:\n  - queue: q\nconsumers:\n  - consumer: testconsumers:LoggedSleeper\n"
              "    queue: q\n")
    with FaultProxy("127.0.0.1", broker.node.port) as proxy:
        proc = DispatcherProcess(tmp_path, config, proxy.rewrite_url(broker.url),
                                 env={"SLEEP": "2"}, args=("--exit-when-drained", "0.3"))
        try:
            proc.wait_consuming()
            broker.publish("q", "m1")
            proc.wait_for_log("consume started: m1")
            proxy.refuse(True)
            proxy.drop_all()
            # The consume ends, with nothing else to do, while reconnecting fails: the
            # third failed attempt comes 1.75 s or more after the loss.
            proc.wait_for_log("consume done: m1")
            proc.wait_for_log("reconnect attempt 3 failed")
            assert proc.process.poll() is None, proc.output
            proxy.refuse(False)
            assert proc.wait() == 0, proc.output  # m1 redelivered, consumed, then done
            assert broker.drained("q")
            assert "reconnected after" in proc.output
        finally:
            proc.stop()


def test_exit_when_drained_follows_the_generation_a_reload_starts(broker: BrokerHandle,
                                                                  tmp_path: Path) -> None:
    """Not done while the replaced generation finishes its message; then done on the
    queues of the new config; the HTTP endpoint serves throughout."""
    broker.declare("old", durable=True)
    broker.declare("new", durable=True)
    broker.publish("old", "hold-1")
    for i in range(5):
        broker.publish("new", f"n{i}")
    port = free_port()
    top = f"http:\n  port: {port}\nstats_interval: 0.2\n"
    entry = "consumers:\n  - consumer: testconsumers:Outcomes\n    queue: {}\n"
    release = tmp_path / "release"
    proc = DispatcherProcess(tmp_path, top + entry.format("old"), broker.url,
                             env={"RELEASE_FILE": str(release)},
                             args=("--exit-when-drained", "0.3"))
    try:
        wait_until(lambda: broker.has_counts("old", 0, 1), what="hold-1 in consume")
        proc.config_path.write_text(top + entry.format("new"))
        proc.signal(signal.SIGHUP)
        proc.wait_for_log("reloaded: the new generation consumes")
        wait_until(lambda: broker.drained("new"), what="the new config's queue done")
        assert get(port, "/readyz")[0] == 200
        # Five stats lines later (a second or more: over three times SECONDS), the
        # replaced generation still holds hold-1, so the work is not done.
        stats = proc.output.count("stats (last")
        wait_until(lambda: proc.output.count("stats (last") >= stats + 5, what="stats lines")
        assert proc.process.poll() is None, proc.output
        release.touch()
        assert proc.wait() == 0, proc.output
    finally:
        proc.stop()
    assert set(proc.records()) == {"old:hold-1:1:returned",
                                   *(f"new:n{i}:1:returned" for i in range(5))}
    output = proc.output
    assert output.index("the previous generation stopped") < output.index("exit-when-drained:")
    assert broker.drained("old") and broker.drained("new")


def test_exit_when_drained_with_processes(broker: BrokerHandle, tmp_path: Path) -> None:
    """Each worker exits 0 once drained; none is replaced; the arbiter then exits 0."""
    broker.declare("jobs", durable=True)
    for i in range(200):
        broker.publish("jobs", f"m{i}")
    config = ("queues:\n  - queue: jobs\nconsumers:\n  - consumer: testconsumers:Recorder\n"
              "    queue: jobs\n    consumer_count: 4\n    prefetch_count: 8\n")
    proc = DispatcherProcess(tmp_path, config, broker.url,
                             args=("--processes", "2", "--exit-when-drained", "0.5"))
    assert proc.wait(60) == 0, proc.output
    assert sorted(proc.records()) == sorted(f"m{i}" for i in range(200))
    assert broker.drained("jobs")
    output = proc.output
    assert len(re.findall(r"worker [12]/2 \(pid \d+\) drained and exited 0: not replaced",
                          output)) == 2, output
    assert "starting a new one" not in output
    assert "every worker drained: stopping" in output


@pytest.mark.parametrize("value", ["-1", "soon", "nan", "inf"])
def test_exit_when_drained_takes_seconds(tmp_path: Path, value: str) -> None:
    result = run_cli(tmp_path, "--exit-when-drained", value, config=GOOD)
    assert result.returncode == 2
    assert "--exit-when-drained: expected zero or more seconds" in result.stderr


# -- the library API ----------------------------------------------------------------

API_SCRIPT = """
import logging, os, sys
import gevent
from amqpdispatcher import Dispatcher

logging.basicConfig(level=logging.INFO)
config = {
    "queues": [{"queue": "api"}],
    "consumers": [{"consumer": "testconsumers:Recorder", "queue": "api",
                   "consumer_count": 2}],
}
dispatcher = Dispatcher(config, url=sys.argv[1])

def stop_after(count):
    path = os.environ["RECORD_FILE"]
    while not os.path.exists(path) or len(open(path).read().split()) < count:
        gevent.sleep(0.05)
    dispatcher.stop()

gevent.spawn(stop_after, 10)
status = dispatcher.run(handle_signals=False)
print("run returned", status)
sys.exit(status)
"""

API_DRAINED_SCRIPT = """
import sys
from amqpdispatcher import Dispatcher

dispatcher = Dispatcher(sys.argv[2], url=sys.argv[1], exit_when_drained=0.2)
sys.exit(dispatcher.run())
"""


def run_script(tmp_path: Path, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "script.py").write_text(text)
    env = dict(os.environ, RECORD_FILE=str(tmp_path / "record.txt"),
               PYTHONPATH=os.pathsep.join([str(TESTS / "consumers"), str(REPO)]))
    env.pop("RABBITMQ_URL", None)
    return subprocess.run([sys.executable, "script.py", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)


def test_library_api_from_a_dict_stopped_from_another_greenlet(broker: BrokerHandle,
                                                               tmp_path: Path) -> None:
    broker.declare("api", durable=True)
    for i in range(25):
        broker.publish("api", f"m{i}")
    result = run_script(tmp_path, API_SCRIPT, broker.url)
    assert result.returncode == 0, result.stderr
    assert "run returned 0" in result.stdout
    assert "stop() called" in result.stderr
    handled = (tmp_path / "record.txt").read_text().split()
    assert len(handled) >= 10
    # Graceful: what was not handled is back in the queue, nothing unacked or lost.
    wait_until(lambda: broker.has_counts("api", 25 - len(handled), 0), what="the rest back")


def test_library_api_from_a_path_exits_when_drained(broker: BrokerHandle,
                                                    tmp_path: Path) -> None:
    broker.declare("jobs", durable=True)
    broker.publish("jobs", "one")
    (tmp_path / "config.yml").write_text(
        "consumers:\n  - consumer: testconsumers:Recorder\n    queue: jobs\n")
    result = run_script(tmp_path, API_DRAINED_SCRIPT, broker.url, "config.yml")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "record.txt").read_text().split() == ["one"]
    assert broker.drained("jobs")


API_SIGNALS_SCRIPT = """
import logging, signal, sys
import yaml
from amqpdispatcher import Dispatcher

logging.basicConfig(level=logging.INFO)
config = sys.argv[2] if sys.argv[3] == "path" else yaml.safe_load(open(sys.argv[2]))
# Compared with what the program had before, not with Python's defaults: a program
# started in the background by a non-interactive shell starts with SIGINT and SIGQUIT
# ignored.
handled = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1,
           signal.SIGUSR2)
before = [signal.getsignal(signum) for signum in handled]
print("ignored at start:", [signal.Signals(signum).name for signum, handler
                            in zip(handled, before) if handler == signal.SIG_IGN])
status = Dispatcher(config, url=sys.argv[1]).run()
print("run returned", status)
print("handlers given back:", [signal.getsignal(signum) for signum in handled] == before)
sys.exit(status)
"""

# How the script starts: the dispositions it inherits, whatever those of the process
# running the tests. With Python's defaults; and as `cmd &` in a non-interactive shell
# (a script, a CI step) starts it, with SIGINT and SIGQUIT ignored. The test once
# inherited the latter when the whole suite ran in the background, and failed there
# only (issue 16): it compared with the defaults, and passed when run on its own.
STARTS = {"by default": (), "in the background": (signal.SIGINT, signal.SIGQUIT)}


def start_with_ignored(ignored: tuple[int, ...]) -> Callable[[], None]:
    def preexec() -> None:
        for signum in (signal.SIGINT, signal.SIGQUIT):
            signal.signal(signum, signal.SIG_IGN if signum in ignored else signal.SIG_DFL)
    return preexec


@pytest.mark.parametrize("given, start", [("path", "by default"), ("dict", "by default"),
                                          ("path", "in the background"),
                                          ("dict", "in the background")])
def test_library_api_acts_on_signals_and_serves_http(broker: BrokerHandle, tmp_path: Path,
                                                     given: str, start: str) -> None:
    """SIGHUP reloads a config given as a path (one given as a dict has no file to read
    again); the http endpoint serves; SIGTERM stops; the signals are given back as they
    were, to a program started with Python's defaults and to one started in the
    background, whichever way the tests themselves were started."""
    broker.declare("api", durable=True)
    port = free_port()
    (tmp_path / "config.yml").write_text(
        f"http:\n  port: {port}\n"
        "consumers:\n  - consumer: testconsumers:Recorder\n    queue: api\n")
    (tmp_path / "script.py").write_text(API_SIGNALS_SCRIPT)
    env = dict(os.environ, RECORD_FILE=str(tmp_path / "record.txt"),
               PYTHONPATH=os.pathsep.join([str(TESTS / "consumers"), str(REPO)]))
    log = tmp_path / "script.log"
    with open(log, "w") as output:
        process = subprocess.Popen(
            [sys.executable, "script.py", broker.url, "config.yml", given], cwd=tmp_path,
            env=env, stdout=output, stderr=subprocess.STDOUT,
            preexec_fn=start_with_ignored(STARTS[start]))
    try:
        wait_until(lambda: "consuming from api" in log.read_text(), what="consuming")
        assert get(port, "/readyz")[0] == 200
        process.send_signal(signal.SIGHUP)
        expected = ("reloaded: the new generation consumes" if given == "path" else
                    "received SIGHUP: the config was given as a dict, with no file to read "
                    "again: ignored")
        wait_until(lambda: expected in log.read_text(), what=expected)
        broker.publish("api", "after-hup")
        wait_until(lambda: (tmp_path / "record.txt").exists(), what="the message handled")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    ignored = [signal.Signals(signum).name for signum in STARTS[start]]
    assert f"ignored at start: {ignored}" in text, text
    assert "run returned 0" in text and "handlers given back: True" in text, text
    assert (tmp_path / "record.txt").read_text().split() == ["after-hup"]


def test_library_api_reports_config_problems_naming_the_dict() -> None:
    from amqpdispatcher import Dispatcher, SettingsError

    with pytest.raises(ConfigError) as raised:
        Dispatcher({"consumers": [{"consumer": "nocolon", "queue": ""}]},
                   url="amqp://u:pw@127.0.0.1:1/")
    assert raised.value.problems == [
        "<dict>: consumers[0].consumer: expected 'module:Class', got 'nocolon'",
        "<dict>: consumers[0].queue: expected a non-empty string, got ''",
    ]
    with pytest.raises(SettingsError):
        Dispatcher({"consumers": []}, url="http://nowhere/")


# -- --print-schema -----------------------------------------------------------------

# The malformed configs of test_validate.py that the schema cannot refuse (README,
# "Config schema", says which kinds): each expected problem line, as there.
BEYOND_SCHEMA = {
    # YAML itself: a language server reports these on its own.
    "YAML syntax error: line 2, column 1",
    "line 5: duplicate key 'prefetch_count'",
    "line 5: duplicate key 'consumers'",
    "line 9: duplicate key 'exchange'",
    "line 6: duplicate key 'delay'",
    # Imports.
    "consumers[0].consumer: cannot import 'nosuchmodule:C': no module named 'nosuchmodule'",
    "consumers[0].consumer: cannot import 'testconsumers:Nope': module 'testconsumers' has no",
    "consumers[0].consumer: 'testconsumers:not_a_class' is not a class",
    "consumers[0].consumer: 'testconsumers:NoShutdown' has no shutdown method",
    "consumers[0].consumer: importing 'brokenimport:C' raised RuntimeError: "
    "this module fails at import",
    "startup_handler: 'testconsumers:not_a_class' is not callable",
    "startup_handler: cannot import 'nosuch:thing'",
    # NaN and infinity (YAML's .nan and .inf; JSON has neither).
    "drain_timeout: expected a finite number, got .nan",
    "drain_timeout: expected a finite number, got .inf",
    "reconnect_give_up_after: expected a finite number, got .inf",
    # Inside free-form arguments tables, YAML dates, and AMQP's own limits (fix9).
    'queues[0].bindings[0].arguments.day: expected a string, integer, true or false, '
    'timestamp, list or mapping (an AMQP table value), got datetime.date(2024, 1, 1)',
    'queues[0].arguments.x-max-age: expected an integer or a string, got .nan',
    'queues[0].arguments.x-weight: expected an integer or a string, got 1.5 (AMQP arg'
    'uments carry no fractional numbers here: give whole units, as milliseconds, or a'
    ' string)',
    'exchanges[0].arguments.x-w[0]: expected an integer or a string, got 0.5',
    'queues[0].bindings[0].arguments.ratio: expected an integer or a string, got 0.25',
    "consumers[0].stream_offset: expected a timestamp from 1970-01-01 on (AMQP's), go"
    't 1960-01-01T00:00:00',
    'consumers[0].stream_offset: expected a timestamp from 1970-01-01 on',
    "queues[0].arguments.x-since: expected a timestamp from 1970-01-01 on (AMQP's), g"
    'ot 1960-01-01T00:00:00+00:00',
    "line 4: '2024-02-30' is not a valid date: day is out of range for month",
    "line 4: '2024-05-01T00:00:00+25:00' is not a valid date: a zone offset of 24 hours or more",
    "line 6: '2023-13-01' is not a valid date: month must be in 1..12",
    "queues[0].arguments.X-Max-Length: RabbitMQ's argument names are lower case and i"
    "t would ignore this one: write 'x-max-length'",
    "exchanges[0].arguments.Alternate-Exchange: RabbitMQ's argument names are lower case",
    "exchanges[0].exchange: 'amq.events': RabbitMQ reserves the amq. prefix and refus"
    'es to declare it: set passive: true to only check that it exists, or choose anot'
    'her name',
    "queues[0].queue: 'amq.work': RabbitMQ reserves the amq. prefix",
    # 128 characters, but 256 bytes of UTF-8.
    "queues[0].bindings[0].routing_key: expected at most 255 bytes (an AMQP name), got 256",
    # Across keys and entries.
    "consumers[0].retry.max_delay: expected at least delay (10), got 5",
    "consumers[0].retry.dead_letter_queue: 'a' is the entry's own queue",
    "queues[0].queue: 'a.retry.1000ms' is a delay queue of consumers[0].retry",
    "consumers[0].queue: too long for a retry policy",
    "consumers[0].retry: needs more than 64 delay queues",
    "exchanges[0].type: required key is missing (direct, topic, fanout, headers or a plugin's "
    "type), unless passive: true",
    "exchanges[1].exchange: 'e' is declared in exchanges[0] already",
    "queues[0].arguments.x-max-length: set twice: also as queues[0].x_max_length; keep "
    "x_max_length only",
    "queues[0].arguments.x-queue-type: has a key of its own, which is checked: write "
    "queues[0].x_queue_type instead",
    # What RabbitMQ refuses for a queue type, or on a stream.
    "queues[0].exclusive: a quorum queue cannot be exclusive: RabbitMQ refuses to declare the "
    "queue",
    "queues[0].auto_delete: a stream queue cannot be auto-delete: RabbitMQ refuses",
    "queues[0].x_max_priority: not for a quorum queue: RabbitMQ refuses",
    "queues[0].x_delivery_limit: not for a classic queue (quorum queues only)",
    "queues[0].x_delivery_limit: not for a stream queue (quorum queues only)",
    "queues[0].x_queue_mode: not for a quorum queue",
    "queues[0].x_queue_mode: not for a stream queue",
    "queues[0].durable: a stream queue is always durable",
    "queues[0].x_max_length: not for a stream queue (a stream's retention is "
    "x_max_length_bytes, or x-max-age in arguments)",
    "queues[0].x_single_active_consumer: not for a stream queue",
    "queues[0].x_overflow: quorum queues do not support reject-publish-dlx",
    "consumers[0].stream_offset: queue 'a' is declared in queues[0] as a quorum queue: only a "
    "stream takes an offset",
    "consumers[0].stream_offset: queue 'a' is declared in queues[0] as a classic queue",
    "consumers[0].priority: a stream consumer cannot have a priority",
    "consumers[0].retry: not for a stream",
    "consumers[1].exclusive: consumers[0] consumes queue 'a' too: an exclusive consumer must "
    "be the queue's only one",
    # A plugin's exchange type is any name starting with x-: the schema takes any string.
    "exchanges[0].type: expected one of direct, topic, fanout, headers or a plugin's type "
    "(x-...), got 'topc' (did you mean 'topic'?)",
    # The values of an arguments map are free-form to the schema (a YAML date is a string
    # to a language server; AMQP has no date without a time).
    "queues[0].bindings[0].arguments.day: expected a string, number, true or false, "
    "timestamp, list or mapping (an AMQP table value), got datetime.date(2024, 1, 1)",
}


class LanguageServerLoader(yaml.SafeLoader):
    """yaml.safe_load, except that dates and timestamps stay strings, as a YAML language
    server hands them to a JSON Schema."""


LanguageServerLoader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def schema_errors(text: str) -> list[str] | None:
    """The key paths the schema finds fault with in a config text, written as the
    validator writes them ("" for the file as a whole); None if it is not YAML."""
    try:
        data = yaml.load(text, Loader=LanguageServerLoader)
    except yaml.YAMLError:
        return None
    paths = []
    for error in jsonschema.Draft7Validator(config_schema()).iter_errors(data):
        path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}"
                       for part in error.absolute_path).lstrip(".")
        # Unknown and missing keys are faults of the mapping that holds them.
        if error.validator == "additionalProperties":
            names = set(error.instance) - set(error.schema["properties"])
        elif error.validator == "required":
            names = set(error.validator_value) - set(error.instance)
        else:
            names = {""}
        paths += [f"{path}.{name}".strip(".") for name in sorted(names)]
    return paths


def key_path(problem: str) -> str:
    """The key path a problem line of the validator names ("" for the whole file)."""
    head = problem.partition(": ")[0]
    return head if re.fullmatch(r"[a-z_]+(\[\d+\])?(\.[a-z_]+(\[\d+\])?)*", head) else ""


def test_print_schema_prints_the_shipped_schema(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "--print-schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    jsonschema.Draft7Validator.check_schema(schema)
    shipped = REPO / "amqpdispatcher" / "config-schema.json"
    assert result.stdout == shipped.read_text(), (
        "amqpdispatcher/config-schema.json is out of date: run "
        "amqp-dispatcher --print-schema > amqpdispatcher/config-schema.json")


# Every kind of value each key takes (the validator accepts it too).
EVERY_KIND = """
exchanges:
  - exchange: events
    type: topic
    arguments: {alternate-exchange: unrouted}
  - exchange: documents
    type: x-consistent-hash
    auto_delete: true
    internal: true
    bindings:
      - {exchange: events, routing_key: "order.*", arguments: {x-match: all, n: 1}}
  - exchange: outside
    passive: true
queues:
  - queue: orders
    x_queue_type: quorum
    x_delivery_limit: 5
    x_overflow: reject-publish
    x_queue_leader_locator: balanced
    x_dead_letter_exchange: events
    x_dead_letter_routing_key: dead
    x_single_active_consumer: true
    arguments: {x-max-in-memory-length: 10, since: 2024-05-01T00:00:00Z, tags: [a, 1]}
    bindings:
      - {exchange: events, routing_key: "order.*"}
  - queue: audit
    x_queue_type: stream
    x_max_length_bytes: 1000000
  - queue: lazy
    x_queue_mode: lazy
    x_max_priority: 10
    x_max_length: 100
    x_expires: 60000
    x_message_ttl: 0
    exclusive: true
consumers:
  - {consumer: testconsumers:Recorder, queue: orders, priority: -5, time_limit: 0.5,
     retry: {max_attempts: 3, delay: 0.5, backoff: 1.5, max_delay: 2,
             dead_letter_queue: orders.failed, no_retry_for: [json:JSONDecodeError]}}
  - {consumer: testconsumers:Recorder, queue: orders, rate_limit: 0.5,
     circuit_breaker: {failure_ratio: 1,
     min_calls: 5, window: 0.5, open_for: 10}}
  - {consumer: testconsumers:Recorder, queue: audit, stream_offset: first}
  - {consumer: testconsumers:Recorder, queue: audit, stream_offset: 1234}
  - {consumer: testconsumers:Recorder, queue: audit, stream_offset: 2024-05-01}
  - {consumer: testconsumers:Recorder, queue: audit, stream_offset: 2024-05-01T10:30:00+02:00}
  - {consumer: testconsumers:Recorder, queue: lazy, exclusive: true, prefetch_count: 65535}
drain_timeout: 0.5
middleware: [testconsumers:FirstMiddleware]
recycle_after_messages: 100000
recycle_above_memory_mb: 512.5
reconnect: false
reconnect_give_up_after: 60
publisher_confirms: false
http: {address: 0.0.0.0, port: 9801, queue_depth_interval: 2.5}
stats_interval: 0
blocking_warning: 2.5
"""


@pytest.mark.parametrize("name, text", [
    ("amqp-dispatcher-config.yml", (REPO / "amqp-dispatcher-config.yml").read_text()),
    ("examples/quickstart/config.yml", (REPO / "examples/quickstart/config.yml").read_text()),
    ("examples/orders.yml", (REPO / "examples/orders.yml").read_text()),
    ("test_validate.GOOD", GOOD),
    ("test_ops.CHECK_CONFIG", CHECK_CONFIG),
    ("test_ops.EVERY_KIND", EVERY_KIND),
    ("examples/kubernetes.yaml ConfigMap", next(
        document["data"]["config.yml"]
        for document in yaml.safe_load_all((REPO / "examples" / "kubernetes.yaml").read_text())
        if document["kind"] == "ConfigMap")),
])
def test_schema_accepts_the_example_configs(name: str, text: str) -> None:
    assert schema_errors(text) == []


def test_every_kind_of_value_is_valid(tmp_path: Path) -> None:
    (tmp_path / "config.yml").write_text(EVERY_KIND)
    assert _parse(str(tmp_path / "config.yml"))[1] == []


@pytest.mark.parametrize("key, value", [
    ("stream_offset", "firts"), ("stream_offset", "2024-05-01T10:30"), ("stream_offset", -1),
    ("priority", 2**63), ("priority", "high"),
])
def test_schema_refuses_what_a_consumer_key_does_not_take(key: str, value: object) -> None:
    text = yaml.safe_dump({"consumers": [{"consumer": "m:C", "queue": "q", key: value}]})
    assert schema_errors(text) == [f"consumers[0].{key}"]


@pytest.mark.parametrize("text, expected", BAD, ids=[e for _, e in BAD])
def test_schema_rejects_the_malformed_configs(text: str, expected: str) -> None:
    """The schema finds fault where the validator does, save what is beyond it."""
    found = schema_errors(text) or []
    if expected in BEYOND_SCHEMA:
        assert key_path(expected) not in found, \
            f"the schema finds this now: take it out of BEYOND_SCHEMA ({found})"
    else:
        assert key_path(expected) in found, found


# Lists and mappings whose contents are free (an arguments table), by key path.
FREE_FORM = {"exchanges.arguments", "exchanges.bindings.arguments", "queues.arguments",
             "queues.bindings.arguments"}


def test_every_list_and_mapping_key_describes_its_entries() -> None:
    """Else the schema cannot say what is inside: give the _Key its ``entries``, or, if
    anything goes inside, list it in FREE_FORM."""
    def walk(keys: dict[str, _Key], path: str) -> list[str]:
        missing = []
        for name, spec in keys.items():
            if list in spec.types or dict in spec.types:
                if spec.entries is not None:
                    missing += walk(spec.entries, f"{path}{name}.")
                elif list in spec.types and spec.import_path:
                    continue  # a list of 'module:attr' strings
                elif f"{path}{name}" not in FREE_FORM:
                    missing.append(f"{path}{name}")
        return missing

    assert walk(TOP_LEVEL_KEYS, "") == []


# -- --check ------------------------------------------------------------------------



def seed(broker: BrokerHandle) -> None:
    """What CHECK_CONFIG expects on the broker, and a message waiting in a queue."""
    broker.channel.exchange_declare("events", "topic")
    broker.channel.exchange_declare("dlx", "fanout")
    broker.declare("existing", durable=True, arguments={"x-max-length": 10})
    broker.declare("outside")
    broker.declare("undeclared")
    broker.publish("existing", "waiting")


def broker_state(broker: BrokerHandle) -> dict[str, list[str]]:
    def listing(*args: str) -> list[str]:
        out = broker.node.ctl(*args, "-p", broker.vhost, "-q", "--no-table-headers")
        return sorted(out.splitlines())

    return {
        "queues": listing("list_queues", "name", "durable", "auto_delete", "exclusive",
                          "arguments", "messages_ready", "messages_unacknowledged",
                          "consumers"),
        "exchanges": listing("list_exchanges", "name", "type", "durable", "auto_delete",
                             "arguments"),
        "bindings": listing("list_bindings", "source_name", "destination_name",
                            "routing_key", "arguments"),
    }


def check(tmp_path: Path, url: str, config: str) -> subprocess.CompletedProcess[str]:
    return run_cli(tmp_path, "--check", "--config", "config.yml", config=config,
                   env={"RABBITMQ_URL": url})


def test_check_passes_a_good_config_and_changes_nothing(broker: BrokerHandle,
                                                        tmp_path: Path) -> None:
    seed(broker)
    before = broker_state(broker)
    result = check(tmp_path, broker.url, CHECK_CONFIG)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout == (f"config.yml: OK: amqp://guest:***@127.0.0.1:{broker.node.port}/"
                             f"{broker.vhost} has what the config needs (3 queue(s), "
                             "2 binding(s), 3 consumer(s))\n")
    assert broker_state(broker) == before
    method, _, body = broker.channel.basic_get("existing", auto_ack=True)
    assert body == b"waiting" and not method.redelivered  # never delivered to --check


def test_check_reports_an_argument_mismatch_and_a_missing_exchange(broker: BrokerHandle,
                                                                   tmp_path: Path) -> None:
    seed(broker)
    config = (CHECK_CONFIG.replace("x_max_length: 10", "x_max_length: 20")
              .replace("exchange: events\n        routing_key: fresh.*",
                       "exchange: nope\n        routing_key: fresh.*"))
    before = broker_state(broker)
    result = check(tmp_path, broker.url, config)
    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    assert lines == [
        "config.yml: queues[0].x_max_length: queue 'existing' already exists with x-max-length "
        "10, the config asks for 20 (a queue's arguments cannot change: delete it or change "
        "the config)",
        "config.yml: queues[1].bindings[0]: exchange 'nope' does not exist, and the config "
        "does not declare it in exchanges",
    ]
    assert result.stdout == ""
    assert broker_state(broker) == before


def test_check_reports_missing_queues(broker: BrokerHandle, tmp_path: Path) -> None:
    seed(broker)
    broker.channel.queue_delete("outside")
    broker.channel.queue_delete("undeclared")
    result = check(tmp_path, broker.url, CHECK_CONFIG)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "config.yml: queues[2]: queue 'outside' does not exist (passive: true only checks "
        "that it does)",
        "config.yml: consumers[1].queue: queue 'undeclared' does not exist, and the config "
        "does not declare it",
    ]


def test_check_reports_missing_permissions_without_the_password(broker: BrokerHandle,
                                                                tmp_path: Path) -> None:
    seed(broker)
    user, password = f"u{uuid.uuid4().hex[:8]}", "s3cret-pass"
    broker.node.ctl("add_user", user, password)
    # May declare and read only 'existing' and its delay queue; may write anywhere.
    mine = "^existing(\\.retry\\..*)?$"
    broker.node.ctl("set_permissions", "-p", broker.vhost, user, mine, ".*", mine)
    url = broker.url.replace("guest:guest", f"{user}:{password}")
    before = broker_state(broker)
    try:
        result = check(tmp_path, url, CHECK_CONFIG)
    finally:
        broker.node.ctl("delete_user", user)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    expected = [
        "config.yml: queues[1]: the user may not declare queue 'fresh' (it needs configure",
        f"config.yml: queues[0].bindings[0]: the user '{user}' may not bind queue 'existing' "
        "to exchange 'events' (it needs write on the queue and read on the exchange)",
        f"config.yml: queues[1].bindings[0]: the user '{user}' may not bind queue 'fresh'",
        f"config.yml: consumers[1]: the user '{user}' may not consume from queue 'undeclared'",
        f"config.yml: consumers[2]: the user '{user}' may not consume from queue 'fresh'",
    ]
    assert len(lines) == len(expected), lines
    for line, start in zip(lines, expected):
        assert line.startswith(start), (start, lines)
        assert "403 ACCESS_REFUSED" in line, line
    assert password not in result.stdout + result.stderr
    assert broker_state(broker) == before


def test_check_without_permission_to_publish_retries(broker: BrokerHandle,
                                                     tmp_path: Path) -> None:
    broker.declare("q", durable=True)
    user = f"u{uuid.uuid4().hex[:8]}"
    broker.node.ctl("add_user", user, "pw-for-test")
    broker.node.ctl("set_permissions", "-p", broker.vhost, user, ".*", "^q$", ".*")
    url = broker.url.replace("guest:guest", f"{user}:pw-for-test")
    try:
        result = check(tmp_path, url, "consumers:\n  - consumer: testconsumers:Recorder\n"
                       "    queue: q\n    retry: {}\n")
    finally:
        broker.node.ctl("delete_user", user)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith(
        f"config.yml: consumers[0].retry: the user '{user}' may not publish to the default "
        "exchange, as a retry policy does (it needs write on amq.default): broker said 403")


EXCHANGE_CONFIG = """
exchanges:
  - exchange: events
    type: topic
  - exchange: fresh
    type: fanout
    bindings:
      - {exchange: events, routing_key: "order.#"}
  - exchange: upstream
    passive: true
queues:
  - queue: q
    bindings:
      - {exchange: fresh, routing_key: ""}
consumers:
  - consumer: testconsumers:Recorder
    queue: q
"""


def test_check_exchanges_changing_nothing(broker: BrokerHandle, tmp_path: Path) -> None:
    broker.channel.exchange_declare("events", "topic", durable=True)
    broker.channel.exchange_declare("upstream", "direct")
    before = broker_state(broker)
    result = check(tmp_path, broker.url, EXCHANGE_CONFIG)
    assert result.returncode == 0, result
    assert result.stdout.endswith("has what the config needs (3 exchange(s), 1 queue(s), "
                                  "2 binding(s), 1 consumer(s))\n"), result.stdout
    assert broker_state(broker) == before  # 'fresh' and 'q' are created by the start only

    broker.channel.exchange_delete("upstream")
    bad = (EXCHANGE_CONFIG.replace("type: topic", "type: fanout")
           .replace("type: fanout\n    bindings:\n      - {exchange: events",
                    "type: x-nope\n    bindings:\n      - {exchange: nowhere"))
    before = broker_state(broker)
    result = check(tmp_path, broker.url, bad)
    assert result.returncode == 1, result
    assert result.stderr.splitlines() == [
        "config.yml: exchanges[0].type: exchange 'events' already exists with type topic, the "
        "config asks for fanout (an exchange's type and arguments cannot change: delete it or "
        "change the config)",
        "config.yml: exchanges[1].type: exchange type 'x-nope' is unknown to the broker (is the "
        "plugin that provides it enabled?): broker said 503 COMMAND_INVALID - unknown exchange "
        "type 'x-nope'",
        "config.yml: exchanges[2]: exchange 'upstream' does not exist (passive: true only "
        "checks that it does)",
        "config.yml: exchanges[1].bindings[0]: exchange 'nowhere' does not exist, and the "
        "config does not declare it in exchanges",
    ]
    assert broker_state(broker) == before


def test_check_exchange_permissions(broker: BrokerHandle, tmp_path: Path) -> None:
    broker.channel.exchange_declare("events", "topic", durable=True)
    broker.channel.exchange_declare("upstream", "direct")
    user = f"u{uuid.uuid4().hex[:8]}"
    broker.node.ctl("add_user", user, "pw-for-test")
    broker.node.ctl("set_permissions", "-p", broker.vhost, user, "^q$", ".*", ".*")
    url = broker.url.replace("guest:guest", f"{user}:pw-for-test")
    before = broker_state(broker)
    try:
        result = check(tmp_path, url, EXCHANGE_CONFIG)
    finally:
        broker.node.ctl("delete_user", user)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert [line.partition(": broker said 403 ACCESS_REFUSED")[0] for line in lines] == [
        f"config.yml: exchanges[0]: the user '{user}' may not declare exchange 'events' (it "
        "needs configure on the exchange)",
        f"config.yml: exchanges[1]: the user '{user}' may not declare exchange 'fresh' (it "
        "needs configure on the exchange)",
    ], lines
    assert broker_state(broker) == before


def test_check_with_no_broker_is_one_line(tmp_path: Path) -> None:
    result = check(tmp_path, "amqp://u:s3cretpw@127.0.0.1:1/", GOOD)
    assert result.returncode == 1
    assert result.stderr.startswith("config.yml: cannot check: no broker accepted a connection at "
                                    "amqp://u:***@127.0.0.1:1/%2F"), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "s3cretpw" not in result.stdout + result.stderr


def test_check_reports_config_problems_first(tmp_path: Path) -> None:
    result = check(tmp_path, "amqp://u:s3cretpw@127.0.0.1:1/",
                   "consumers:\n  - consumer: testconsumers:Recorder\n    queue: ''\n")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "config.yml: consumers[0].queue: expected a non-empty string, got ''"]


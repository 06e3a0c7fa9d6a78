"""Concurrency, connecting, start-up failures, logging: the daemon as users run it."""

from __future__ import annotations

import time
from pathlib import Path

from helpers import REPO, BrokerHandle, DispatcherProcess, run_cli, wait_until
from rabbitnode import free_port


def test_consumers_run_side_by_side(broker: BrokerHandle, tmp_path: Path) -> None:
    """20 messages x 0.5 s on 10 consumers: about 1 s, far under the 10 s of one at a time."""
    broker.declare("slow")
    config = ("consumers:\n  - consumer: testconsumers:Sleeper\n    queue: slow\n"
              "    consumer_count: 10\n    prefetch_count: 10\n")
    proc = DispatcherProcess(tmp_path, config, broker.url, env={"SLEEP": "0.5"})
    try:
        proc.wait_consuming()
        start = time.monotonic()
        for i in range(20):
            broker.publish("slow", f"m{i}")
        wait_until(lambda: len(proc.records()) == 20, what="20 messages")
        elapsed = time.monotonic() - start
        assert elapsed < 5, f"20 x 0.5 s on 10 consumers took {elapsed:.1f}s"
    finally:
        assert proc.stop() == 0


def test_slow_entry_does_not_slow_another(broker: BrokerHandle, tmp_path: Path) -> None:
    broker.declare("slow")
    broker.declare("fast")
    config = """
consumers:
  - consumer: testconsumers:Sleeper
    queue: slow
  - consumer: testconsumers:Recorder
    queue: fast
    prefetch_count: 10
"""
    proc = DispatcherProcess(tmp_path, config, broker.url, env={"SLEEP": "30"})
    try:
        proc.wait_consuming()
        wait_until(lambda: proc.output.count("consuming from") == 2, what="both entries")
        broker.publish("slow", "slow-1")
        wait_until(lambda: broker.counts("slow")[1] == 1, what="slow message in progress")
        for i in range(50):
            broker.publish("fast", f"f{i}")
        wait_until(lambda: len(proc.records()) == 50, timeout=10, what="fast messages")
        assert "slow-1" not in proc.records()
    finally:
        proc.stop()


def test_first_host_dead_connects_through_live_one(broker: BrokerHandle,
                                                    tmp_path: Path) -> None:
    dead = free_port()
    vhost = broker.url.rsplit("/", 1)[1]
    url = (f"amqp://guest:guest@127.0.0.1:{dead},127.0.0.1:{dead},127.0.0.1:{dead},"
           f"127.0.0.1:{broker.node.port}/{vhost}")
    broker.declare("q")
    config = "consumers:\n  - consumer: testconsumers:Recorder\n    queue: q\n"
    proc = DispatcherProcess(tmp_path, config, url)
    try:
        proc.wait_consuming()
        broker.publish("q", "through")
        wait_until(lambda: proc.records() == ["through"], what="message")
        assert f"connected to 127.0.0.1:{broker.node.port}" in proc.output
    finally:
        assert proc.stop() == 0


def test_no_reachable_host_exits_nonzero_with_one_line(tmp_path: Path) -> None:
    dead1, dead2 = free_port(), free_port()
    config = "consumers:\n  - consumer: testconsumers:Recorder\n    queue: q\n"
    result = run_cli(tmp_path, "--config", "config.yml", config=config,
                     env={"RABBITMQ_URL": f"amqp://me:hunter22pw@127.0.0.1:{dead1},"
                                          f"127.0.0.1:{dead2}/"})
    assert result.returncode == 3, result
    errors = [line for line in result.stderr.splitlines() if " ERROR: " in line]
    assert len(errors) == 1, result.stderr
    assert "no broker accepted a connection at amqp://me:***@" in errors[0]
    assert "2 host(s) tried" in errors[0]
    assert "hunter22pw" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_startup_handler_runs_before_connecting(broker: BrokerHandle, tmp_path: Path) -> None:
    broker.declare("q")
    config = ("startup_handler: testconsumers:startup\n"
              "consumers:\n  - consumer: testconsumers:Recorder\n    queue: q\n")
    proc = DispatcherProcess(tmp_path, config, broker.url)
    try:
        proc.wait_consuming()
        broker.publish("q", "after")
        wait_until(lambda: proc.records() == ["startup", "after"], what="startup then message")
    finally:
        assert proc.stop() == 0


def test_failing_startup_handler_and_constructor(broker: BrokerHandle, tmp_path: Path) -> None:
    broker.declare("q")
    result = run_cli(tmp_path, "--config", "config.yml",
                     config=("startup_handler: testconsumers:bad_startup\n"
                             "consumers:\n  - consumer: testconsumers:Recorder\n    queue: q\n"),
                     env={"RABBITMQ_URL": broker.url})
    assert result.returncode == 5
    assert ("config.yml: startup_handler: testconsumers:bad_startup raised RuntimeError: "
            "startup failed (at testconsumers.py:") in result.stderr
    result = run_cli(tmp_path, "--config", "config.yml",
                     config="consumers:\n  - consumer: testconsumers:BadInit\n    queue: q\n",
                     env={"RABBITMQ_URL": broker.url})
    assert result.returncode == 5
    assert "config.yml: consumers[0].consumer: testconsumers:BadInit() raised RuntimeError: " \
        "cannot construct" in result.stderr
    assert "Traceback" not in result.stderr
    # Nothing was consumed or lost.
    assert broker.queue_info("q")["consumers"] == "0"


def test_password_never_logged_even_at_debug(broker: BrokerHandle, tmp_path: Path) -> None:
    broker.node.ctl("add_user", "secretive", "pw-Zq81xK")
    broker.node.ctl("set_permissions", "-p", broker.vhost, "secretive", ".*", ".*", ".*")
    broker.declare("q")
    (tmp_path / "logging.ini").write_text("""
[loggers]
keys=root
[handlers]
keys=console
[formatters]
keys=plain
[logger_root]
level=DEBUG
handlers=console
[handler_console]
class=StreamHandler
level=DEBUG
formatter=plain
args=(sys.stderr,)
[formatter_plain]
format=%(name)s %(levelname)s %(message)s
""")
    url = broker.url.replace("guest:guest", "secretive:pw-Zq81xK")
    config = "consumers:\n  - consumer: testconsumers:Recorder\n    queue: q\n"
    proc = DispatcherProcess(tmp_path, config, url,
                             env={"LOGGING_FILE_CONFIG": str(tmp_path / "logging.ini")})
    try:
        proc.wait_consuming()
        broker.publish("q", "x")
        wait_until(lambda: proc.records() == ["x"], what="message")
    finally:
        assert proc.stop() == 0
    output = proc.output
    assert "pika" in output and "DEBUG" in output  # the file config took effect
    assert "pw-Zq81xK" not in output


def test_connection_name_and_heartbeat(broker: BrokerHandle, tmp_path: Path) -> None:
    broker.declare("q")
    config = "consumers:\n  - consumer: testconsumers:Recorder\n    queue: q\n"
    proc = DispatcherProcess(tmp_path, config, broker.url + "?heartbeat=7",
                             env={"RABBITMQ_HEARTBEAT": "9"})
    try:
        proc.wait_consuming()
        rows = broker.node.ctl("list_connections", "-q", "--no-table-headers",
                               "client_properties", "timeout", "vhost")
        mine = [r for r in rows.splitlines()
                if r.rstrip().endswith(broker.vhost) and "connection_name" in r]
        assert len(mine) == 1, rows
        assert f"pid {proc.process.pid} " in mine[0]
        assert '{"product","amqp-dispatcher"}' in mine[0]
        assert mine[0].split("\t")[1] == "9"
    finally:
        assert proc.stop() == 0


def test_connection_loss_exits_nonzero_without_reconnect(broker: BrokerHandle,
                                                         tmp_path: Path) -> None:
    broker.declare("q")
    config = ("reconnect: false\n"
              "consumers:\n  - consumer: testconsumers:Recorder\n    queue: q\n")
    proc = DispatcherProcess(tmp_path, config, broker.url)
    try:
        proc.wait_consuming()
        broker.node.ctl("close_all_connections", "-p", broker.vhost, "test closes it")
        assert proc.wait() == 3
        assert "connection to the broker lost" in proc.output
        assert "test closes it" in proc.output
    finally:
        proc.stop()


def test_seed_example_end_to_end(broker: BrokerHandle, tmp_path: Path) -> None:
    """The seed page's consumer and config: everything acked, failures redelivered,
    its publishes arrive."""
    broker.channel.exchange_declare("test_exchange", "topic")
    config = (REPO / "amqp-dispatcher-config.yml").read_text()
    proc = DispatcherProcess(tmp_path, config, broker.url,
                             env={"PYTHONUNBUFFERED": "1"})
    try:
        proc.wait_consuming()
        for i in range(40):
            broker.publish("demo.x", f"demo-{i}", exchange="amq.topic")
        wait_until(lambda: broker.drained("test_queue") and broker.counts("test_queue") ==
                   (0, 0) and proc.output.count("Done sleeping") >= 40, timeout=60,
                   what="every message done")
    finally:
        assert proc.stop() == 0
    out = proc.output
    consumed = out.count("Consuming message")
    # Failure lines are summarised; shutdown(exc) runs once per failure, and once per
    # instance (consumer_count: 2) at the stop.
    raised = out.count("Shut down") - 2
    assert "consume raised ValueError" in out
    assert out.count("Done sleeping") == 40
    assert consumed == 40 + raised  # every failure was redelivered, once per failure
    assert raised > 0
    assert broker.ready("test_published") == out.count("publishing")
    assert "example startup handler ran" in out

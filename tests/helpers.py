"""Test helpers: run the dispatcher as users do, publish, wait on conditions."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pika
import rabbitnode
import yaml
from rabbitnode import Broker

TESTS = Path(__file__).parent
REPO = TESTS.parent
SCRIPT = str(Path(sys.executable).parent / "amqp-dispatcher")


def _guard(marker: str) -> None:
    """tests/conftest.py's check that the running test carries ``marker``."""
    if rabbitnode.guard is not None:
        rabbitnode.guard(marker)


def wait_until(condition: Callable[[], Any], timeout: float = 30, what: str = "condition",
               interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class BrokerHandle:
    """One vhost on a node: publishing, inspecting, and a URL for the dispatcher."""

    def __init__(self, node: Broker, vhost: str) -> None:
        self.node = node
        self.vhost = vhost
        self.url = f"amqp://guest:guest@127.0.0.1:{node.port}/{quote(vhost, safe='')}"
        self._connection: pika.BlockingConnection | None = None

    @property
    def channel(self) -> Any:
        if self._connection is None or self._connection.is_closed:
            self._connection = pika.BlockingConnection(pika.URLParameters(self.url))
            self._channel = self._connection.channel()
        if self._channel.is_closed:
            self._channel = self._connection.channel()
        return self._channel

    def close(self) -> None:
        if self._connection is not None and self._connection.is_open:
            try:
                self._connection.close()
            except pika.exceptions.AMQPError:
                pass  # a test closed it from the broker side

    def declare(self, queue: str, **kwargs: Any) -> None:
        self.channel.queue_declare(queue, **kwargs)

    def publish(self, routing_key: str, body: bytes | str, exchange: str = "",
                **props: Any) -> None:
        self.channel.basic_publish(exchange, routing_key, body,
                                   pika.BasicProperties(**props) if props else None)

    def queue_info(self, queue: str) -> dict[str, str]:
        return self.node.queue_info(queue, self.vhost)

    def _declare_ok(self, queue: str) -> Any:
        """The queue's own answer to a passive queue.declare: no rabbitmqctl (an Erlang
        VM started per call), and exact at once, also for a quorum queue (whose counts
        in rabbitmqctl are refreshed only every few seconds). KeyError if there is no
        such queue, as for queue_info."""
        for attempt in (1, 2):
            try:
                return self.channel.queue_declare(queue, passive=True).method
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code == 404:
                    raise KeyError(queue) from None
                raise
            except pika.exceptions.AMQPConnectionError:
                # A test closed the connections or restarted the broker: pika finds out
                # at the next use of this connection. Once more on a new one.
                self._connection = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def ready(self, queue: str) -> int:
        """Messages ready in the queue (not those delivered and unacknowledged)."""
        return int(self._declare_ok(queue).message_count)

    def consumers(self, queue: str) -> int:
        return int(self._declare_ok(queue).consumer_count)

    def counts(self, queue: str) -> tuple[int, int]:
        """(ready, unacknowledged) as rabbitmqctl reports them: only rabbitmqctl knows
        the unacknowledged count. In a wait, has_counts() is cheaper."""
        info = self.queue_info(queue)
        return int(info["messages_ready"]), int(info["messages_unacknowledged"])

    def has_counts(self, queue: str, ready: int, unacked: int) -> bool:
        """counts(queue) == (ready, unacked), asking rabbitmqctl only once the ready
        count, from a passive declare, is the one expected."""
        return self.ready(queue) == ready and self.counts(queue)[1] == unacked

    def drained(self, queue: str) -> bool:
        """Nothing ready and nothing unacknowledged."""
        return self.has_counts(queue, 0, 0)

    def get_all(self, queue: str) -> list[bytes]:
        bodies = []
        while True:
            method, _, body = self.channel.basic_get(queue, auto_ack=True)
            if method is None:
                return bodies
            bodies.append(body)


class DispatcherProcess:
    """The console script as a subprocess, with its output captured to a file."""

    def __init__(self, tmp_path: Path, config: str, url: str | None = None,
                 env: dict[str, str] | None = None, args: tuple[str, ...] = (),
                 launcher: tuple[str, ...] = ()) -> None:
        """``launcher``: a command the console script runs under (``opentelemetry-instrument
        --``)."""
        self.config_path = tmp_path / "config.yml"
        self.config_path.write_text(config)
        self.record = tmp_path / "record.txt"
        self.log_path = tmp_path / "dispatcher.log"
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join([str(TESTS / "consumers"), str(REPO)])
        full_env["RECORD_FILE"] = str(self.record)
        full_env.pop("LOGGING_FILE_CONFIG", None)
        if url is not None:
            full_env["RABBITMQ_URL"] = url
        full_env.update(env or {})
        _guard("process")
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [*launcher, SCRIPT, "--config", str(self.config_path), *args],
            cwd=tmp_path, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def records(self) -> list[str]:
        if not self.record.exists():
            return []
        return self.record.read_text().split()

    def wait_for_log(self, pattern: str, timeout: float = 30) -> None:
        regex = re.compile(pattern)

        def found() -> bool:
            if self.process.poll() is not None and not regex.search(self.output):
                raise AssertionError(f"dispatcher exited ({self.process.returncode}) before "
                                     f"logging {pattern!r}:\n{self.output}")
            return bool(regex.search(self.output))

        wait_until(found, timeout, f"log line {pattern!r}")

    def consumer_entries(self) -> int:
        """How many consumers entries the config has (1 if it cannot be read as one)."""
        try:
            entries = yaml.safe_load(self.config_path.read_text()).get("consumers")
        except (yaml.YAMLError, AttributeError):
            return 1
        return len(entries) if isinstance(entries, list) and entries else 1

    def wait_consuming(self, timeout: float = 30, count: int | None = None) -> None:
        """Until ``count`` "consuming from" lines are logged: by default one per consumers
        entry of the config (each entry logs one once its basic.consume is confirmed),
        so that a test publishing next never publishes before every entry consumes."""
        wanted = self.consumer_entries() if count is None else count

        def consuming() -> bool:
            found = self.output.count("consuming from ")
            if found < wanted and self.process.poll() is not None:
                raise AssertionError(f"dispatcher exited ({self.process.returncode}) "
                                     f"after {found} of {wanted} 'consuming from' lines:\n"
                                     f"{self.output}")
            return found >= wanted

        wait_until(consuming, timeout, f"{wanted} 'consuming from' log line(s)")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"dispatcher still running after {timeout}s:\n"
                                 f"{self.output}") from None

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def run_cli(tmp_path: Path, *args: str, config: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the console script to completion (validation, start-up errors)."""
    _guard("process")
    if config is not None:
        (tmp_path / "config.yml").write_text(config)
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([str(TESTS / "consumers"), str(REPO)])
    full_env.pop("RABBITMQ_URL", None)
    full_env.update(env or {})
    return subprocess.run([SCRIPT, *args], cwd=tmp_path, env=full_env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)

"""A private RabbitMQ node for the tests and the benchmark.

Each Broker is its own node (own name, AMQP port, distribution port, data and
log directories under a temp dir), so the suite never touches a system-wide
broker on 5672.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")

# Set by tests/conftest.py: called with "broker" before a node is started, so a test
# that needs RabbitMQ without the broker marker fails (pytest -m "not broker" must run
# where RabbitMQ is not installed).
guard: Callable[[str], None] | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bin(name: str) -> str:
    """The unwrapped script: it runs as the calling user (see DESIGN.md)."""
    unwrapped = RABBIT_BIN / name
    if unwrapped.exists():
        return str(unwrapped)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found: install the rabbitmq-server package")
    return found


class Broker:
    def __init__(self, name: str | None = None, base_dir: str | None = None,
                 cookie: str | None = None, conf: str = "", advanced: str = "") -> None:
        """``conf``: rabbitmq.conf lines; ``advanced``: an advanced.config term."""
        self.name = name or f"adtest-{uuid.uuid4().hex[:8]}"
        self.node = f"{self.name}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self._own_dir = base_dir is None
        self.base = Path(base_dir or tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
        self.conf = conf
        self.advanced = advanced
        if cookie:  # nodes of one cluster share the Erlang cookie
            path = self.base / ".erlang.cookie"
            path.write_text(cookie)
            path.chmod(0o400)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        plugins = self.base / "enabled_plugins"
        if not plugins.exists():
            plugins.write_text("[].\n")
        config = self.base / "rabbitmq"
        env.update(
            HOME=str(self.base),
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.base / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.base / "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(plugins),
            RABBITMQ_CONFIG_FILE=str(config),
            RABBITMQ_PID_FILE=str(self.base / "rabbit.pid"),
        )
        (self.base / "rabbitmq.conf").write_text(self.conf)
        if self.advanced:
            (self.base / "advanced.config").write_text(self.advanced)
            env["RABBITMQ_ADVANCED_CONFIG_FILE"] = str(self.base / "advanced.config")
        return env

    def ctl(self, *args: str, timeout: float = 60, check: bool = True) -> str:
        result = subprocess.run(
            [_bin("rabbitmqctl"), "-n", self.node, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} failed: {result.stdout}{result.stderr}"
            )
        return result.stdout

    def plugins(self, *args: str, timeout: float = 60) -> str:
        """rabbitmq-plugins on this node, e.g. ``plugins("enable", "rabbitmq_...")``."""
        result = subprocess.run([_bin("rabbitmq-plugins"), "-n", self.node, *args],
                                env=self.env(), capture_output=True, text=True,
                                timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmq-plugins {' '.join(args)} failed: "
                               f"{result.stdout}{result.stderr}")
        return result.stdout

    def start(self, timeout: float = 90) -> None:
        if guard is not None:
            guard("broker")
        log = open(self.base / "server.out", "ab")
        self.process = subprocess.Popen(
            [_bin("rabbitmq-server")],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        # Wait for the AMQP listener, which opens once the broker has booted: a connect
        # costs nothing, where each rabbitmqctl ping starts an Erlang VM.
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"rabbitmq-server exited ({self.process.returncode}): "
                    + (self.base / "server.out").read_text()[-2000:]
                )
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("rabbitmq-server did not listen in time")
            time.sleep(0.1)
        self.ctl("await_startup", timeout=timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.ctl("stop", check=False)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._own_dir:
            shutil.rmtree(self.base, ignore_errors=True)

    def add_vhosts(self, names: list[str], user: str = "guest") -> None:
        """Create vhosts, each with every permission for user, in one rabbitmqctl call
        (import_definitions) rather than two per vhost."""
        definitions = {
            "vhosts": [{"name": name} for name in names],
            "permissions": [{"user": user, "vhost": name, "configure": ".*", "write": ".*",
                             "read": ".*"} for name in names],
        }
        path = self.base / f"vhosts-{uuid.uuid4().hex[:8]}.json"
        path.write_text(json.dumps(definitions))
        try:
            self.ctl("import_definitions", str(path), timeout=120)
        finally:
            path.unlink()

    # Helpers the tests use to look at the broker.

    def queue_info(self, queue: str, vhost: str = "/") -> dict[str, str]:
        cols = ["name", "messages_ready", "messages_unacknowledged", "durable",
                "auto_delete", "exclusive", "arguments", "consumers"]
        out = self.ctl("list_queues", "-p", vhost, "-q", "--no-table-headers", *cols)
        for line in out.splitlines():
            fields = line.split("\t")
            if fields and fields[0] == queue:
                return dict(zip(cols, fields))
        raise KeyError(queue)

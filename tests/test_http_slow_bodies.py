"""Clients that announce a body and never send it: they must not hold the endpoint."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from helpers import BrokerHandle, DispatcherProcess, wait_until
from rabbitnode import free_port
from test_metrics import PROBE_CONFIG, probe_failures, ready


class BodyHolders:
    """``count`` clients, a thread each: each sends a whole request announcing a body it
    never sends, and connects again as soon as the server closes it."""

    def __init__(self, port: int, head: bytes, count: int = 70) -> None:
        self.head = head
        self.port = port
        self.count = count
        self.connects = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._hold, daemon=True) for _ in range(count)]

    def __enter__(self) -> BodyHolders:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join()

    def all_connected(self) -> bool:
        with self.lock:
            return self.connects >= self.count

    def _hold(self) -> None:
        while not self.stopping.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                    sock.sendall(self.head)
                    with self.lock:
                        self.connects += 1
                    sock.settimeout(0.5)
                    while not self.stopping.is_set():
                        try:
                            if sock.recv(65536) == b"":
                                break  # closed by the server: connect again
                        except socket.timeout:
                            continue
            except OSError:
                self.stopping.wait(0.2)


@pytest.mark.parametrize("body", ["Content-Length: 1000000", "Transfer-Encoding: chunked"])
def test_probes_answer_while_clients_hold_every_connection_with_an_unsent_body(
        broker: BrokerHandle, tmp_path: Path, body: str) -> None:
    # A request announcing a body is answered, and then the server reads the body to
    # discard it: "answering" all that time, so none of them was closed to make room
    # and every new connection (a probe) was closed instead, until REQUEST_TIMEOUT.
    port = free_port()
    proc = DispatcherProcess(tmp_path, PROBE_CONFIG.format(port=port), broker.url)
    try:
        wait_until(lambda: proc.process.poll() is None and ready(port), what="/readyz 200")
        head = f"POST /healthz HTTP/1.1\r\nHost: localhost\r\n{body}\r\n\r\n".encode()
        with BodyHolders(port, head) as holders:
            wait_until(holders.all_connected, what="the clients connected")
            assert probe_failures(port, 12) == []
    finally:
        assert proc.stop() == 0, proc.output
    assert "Traceback" not in proc.output

"""Clients that announce a body and never send it: they must not hold the endpoint."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from helpers import BrokerHandle, DispatcherProcess, wait_until
from rabbitnode import free_port
from test_metrics import PROBE_CONFIG, Tricklers, probe_failures, ready


class BodyHolders(Tricklers):
    """Tricklers whose request is whole and announces a body they never send."""

    def __init__(self, port: int, head: bytes) -> None:
        super().__init__(port)
        self.HEAD = head

    def hold(self, sock: socket.socket) -> None:
        # The answer comes first; the connection is held until the server closes it.
        sock.settimeout(0.5)
        while not self.stopping.is_set():
            try:
                if sock.recv(65536) == b"":
                    return
            except socket.timeout:
                continue


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

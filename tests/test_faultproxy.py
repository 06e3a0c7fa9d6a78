"""The fault-injection proxy itself: against a local echo server, then against the broker."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pika
import pytest
from faultproxy import FaultProxy
from helpers import BrokerHandle, wait_until

DEADLINE = 5.0  # seconds a fault may take to show at the client; they take milliseconds


class EchoServer:
    """Echoes what each connection sends and records it; ends when the client does."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.received: list[bytearray] = []
        self.ended: list[bool] = []
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stopping = False
        self._accepter = threading.Thread(target=self._accept, name="echo:accept", daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while True:
            conn, _ = self.listener.accept()
            with self._lock:
                if self._stopping:
                    conn.close()
                    return
                index = len(self.received)
                self.received.append(bytearray())
                self.ended.append(False)
                self._conns.append(conn)
                thread = threading.Thread(target=self._echo, args=(conn, index),
                                          name=f"echo:{index}", daemon=True)
                self._threads.append(thread)
            thread.start()

    def _echo(self, conn: socket.socket, index: int) -> None:
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                self.received[index] += data
                conn.sendall(data)
        except OSError:
            pass  # reset by the proxy: that is what the tests do
        finally:
            self.ended[index] = True
            conn.close()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            conns = list(self._conns)
        socket.create_connection(("127.0.0.1", self.port)).close()  # wake accept()
        self._accepter.join(DEADLINE)
        self.listener.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(DEADLINE)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", echo.port) as fault_proxy:
        yield fault_proxy


@pytest.fixture(autouse=True)
def no_thread_errors(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An exception escaping any thread (the proxy's above all) fails the test."""
    errors: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", errors.append)
    yield
    assert not [f"{e.thread.name}: {e.exc_type.__name__}: {e.exc_value}" for e in errors]


def connect(proxy: FaultProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise AssertionError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


def read_to_end(sock: socket.socket, timeout: float = DEADLINE) -> tuple[bytes, str]:
    """Everything the peer sends until it goes away: (data, "eof" or "reset").

    Blocks on the socket with a deadline, so a connection the proxy fails to
    close makes the test fail with a timeout instead of hanging.
    """
    sock.settimeout(timeout)
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return bytes(data), "reset"
        except socket.timeout:
            raise AssertionError(f"connection still open after {timeout}s") from None
        if not chunk:
            return bytes(data), "eof"
        data += chunk


def assert_dropped_at_once(proxy: FaultProxy, how: tuple[str, ...] = ("eof", "reset")) -> None:
    """A connection through the proxy ends without a byte, within a second: the
    reset can even come so fast that connect() itself fails with it."""
    try:
        sock = connect(proxy)
    except (ConnectionResetError, BrokenPipeError):
        return
    with sock:
        data, ended = read_to_end(sock, timeout=1)
        assert data == b"" and ended in how


def test_forwards_both_ways(proxy: FaultProxy, echo: EchoServer) -> None:
    payload = bytes(range(256)) * 1000  # more than one socket buffer, each way
    with connect(proxy) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        assert recv_exactly(sock, len(payload)) == payload
        sender.join()
        assert echo.received[0] == payload
        assert (proxy.connections, proxy.active()) == (1, 1)
        assert proxy.client_bytes(0) == proxy.server_bytes(0) == len(payload)
        # A half-close passes through: the echo server sees EOF, closes, and so do we.
        sock.shutdown(socket.SHUT_WR)
        assert read_to_end(sock) == (b"", "eof")
    wait_until(lambda: proxy.active() == 0, DEADLINE, "the proxy to close the connection")
    assert echo.ended == [True]


def test_many_connections_then_drop_all(proxy: FaultProxy, echo: EchoServer) -> None:
    socks = [connect(proxy) for _ in range(50)]
    try:
        for i, sock in enumerate(socks):
            sock.sendall(f"hello {i:03}".encode())
        for i, sock in enumerate(socks):
            assert recv_exactly(sock, 9) == f"hello {i:03}".encode()
        assert (proxy.connections, proxy.active()) == (50, 50)
        assert proxy.drop_all() == 50
        for sock in socks:
            assert read_to_end(sock)[0] == b""
        wait_until(lambda: proxy.active() == 0, DEADLINE, "all connections closed")
        wait_until(lambda: all(echo.ended), DEADLINE, "the echo server to see every drop")
        assert proxy.drop_all() == 0
    finally:
        for sock in socks:
            sock.close()


def test_drop_all_kills_a_live_connection(proxy: FaultProxy, echo: EchoServer) -> None:
    with connect(proxy) as sock:
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        start = time.monotonic()
        assert proxy.drop_all() == 1
        data, how = read_to_end(sock)
        assert data == b"" and how in ("eof", "reset")
        assert time.monotonic() - start < 1
        # Writing to the dropped connection soon fails: the proxy sent a RST.
        with pytest.raises(OSError):
            wait_until(lambda: sock.send(b"x") and False, DEADLINE, "a failed send")
    wait_until(lambda: echo.ended == [True], DEADLINE, "the target side to be dropped too")
    wait_until(lambda: proxy.active() == 0, DEADLINE, "the proxy to close the connection")
    with connect(proxy) as sock:  # the proxy itself carries on
        sock.sendall(b"again")
        assert recv_exactly(sock, 5) == b"again"
    assert proxy.connections == 2


def test_refuse(proxy: FaultProxy, echo: EchoServer) -> None:
    with connect(proxy) as open_before:
        # Round trip first: refuse() acts at accept, which may come after connect().
        open_before.sendall(b"hi")
        assert recv_exactly(open_before, 2) == b"hi"
        proxy.refuse(True)
        for _ in range(3):
            assert_dropped_at_once(proxy, ("reset",))
        assert (proxy.refused, proxy.connections) == (3, 1)
        assert len(echo.received) == 1  # refused connections never reach the target
        open_before.sendall(b"still here")  # refusing leaves open connections alone
        assert recv_exactly(open_before, 10) == b"still here"
    proxy.refuse(False)
    with connect(proxy) as sock:
        sock.sendall(b"back")
        assert recv_exactly(sock, 4) == b"back"
    assert (proxy.refused, proxy.connections) == (3, 2)


def test_cut_after_forwards_exactly_n_bytes(proxy: FaultProxy, echo: EchoServer) -> None:
    payload = bytes(range(256)) * 4
    proxy.cut_after(100, connections=2)

    # 1: one write much longer than the limit.
    with connect(proxy) as sock:
        sock.sendall(payload)
        data, _ = read_to_end(sock)
        assert payload[:100].startswith(data)
    wait_until(lambda: echo.ended[:1] == [True], DEADLINE, "the target side of the cut")
    assert echo.received[0] == payload[:100]
    assert proxy.client_bytes(0) == 100

    # 2: small writes, each echoed, until one crosses the limit.
    with connect(proxy) as sock:
        for start in (0, 30, 60):
            sock.sendall(payload[start:start + 30])
            assert recv_exactly(sock, 30) == payload[start:start + 30]
        sock.sendall(payload[90:120])
        data, _ = read_to_end(sock)
        assert payload[90:100].startswith(data)
    wait_until(lambda: echo.ended[1:] == [True], DEADLINE, "the target side of the cut")
    assert echo.received[1] == payload[:100]

    # 3: the cut was for two connections only.
    with connect(proxy) as sock:
        sock.sendall(payload)
        assert recv_exactly(sock, len(payload)) == payload
    assert proxy.client_bytes(2) == len(payload)


def test_cut_after_zero_drops_at_once(proxy: FaultProxy, echo: EchoServer) -> None:
    proxy.cut_after(0)
    assert_dropped_at_once(proxy)
    wait_until(lambda: echo.ended == [True], DEADLINE, "the target side to be dropped")
    assert echo.received == [b""]


def test_close_after(proxy: FaultProxy) -> None:
    proxy.close_after(0.3)
    start = time.monotonic()
    with connect(proxy) as sock:
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        assert read_to_end(sock)[0] == b""
        lived = time.monotonic() - start
    assert 0.3 <= lived < 0.3 + DEADLINE

    proxy.close_after(None)
    with connect(proxy) as sock:
        # Nothing may happen for twice the old delay (this waits on purpose).
        assert select.select([sock], [], [], 0.6)[0] == []
        sock.sendall(b"pong")
        assert recv_exactly(sock, 4) == b"pong"


def test_stop_leaves_no_threads(echo: EchoServer) -> None:
    before = set(threading.enumerate())
    proxy = FaultProxy("127.0.0.1", echo.port).start()
    socks = [connect(proxy) for _ in range(5)]
    try:
        for sock in socks:
            sock.sendall(b"x")
            assert recv_exactly(sock, 1) == b"x"
        socks[0].shutdown(socket.SHUT_WR)  # one half-closed, one fully closed, three open
        socks[1].close()
        wait_until(lambda: proxy.active() <= 4, DEADLINE, "the closed client to be seen")
        assert len(proxy.threads()) == 6
        proxy.stop()
        proxy.stop()  # idempotent
        assert [t.name for t in proxy.threads() if t.is_alive()] == []
        assert [t.name for t in set(threading.enumerate()) - before
                if t.name.startswith("faultproxy")] == []
        assert proxy.active() == 0
        for sock in socks[2:]:
            assert read_to_end(sock)[0] == b""
        with pytest.raises(OSError):
            connect(proxy)
    finally:
        for sock in socks:
            sock.close()


def test_stop_without_start_and_restart() -> None:
    proxy = FaultProxy("127.0.0.1", 1)
    with pytest.raises(RuntimeError):
        proxy.port  # noqa: B018
    proxy.stop()
    with pytest.raises(RuntimeError):
        proxy.start()


def test_target_down_resets_the_client() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, not listening: connects are refused
        port = unused.getsockname()[1]
        with FaultProxy("127.0.0.1", port) as proxy:
            assert_dropped_at_once(proxy, ("reset",))
            wait_until(lambda: proxy.active() == 0, DEADLINE, "the connection to end")


def test_rewrite_url() -> None:
    with FaultProxy("127.0.0.1", 1) as proxy:
        assert (proxy.rewrite_url("amqp://guest:guest@127.0.0.1:5999/%2F?heartbeat=5")
                == f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F?heartbeat=5")
        assert proxy.rewrite_url("amqp://rabbit/v") == f"amqp://127.0.0.1:{proxy.port}/v"


# Against the real broker.


def pika_connection(proxy: FaultProxy, broker: BrokerHandle) -> pika.BlockingConnection:
    params = pika.URLParameters(proxy.rewrite_url(broker.url))
    params.connection_attempts = 1
    params.socket_timeout = DEADLINE
    return pika.BlockingConnection(params)


def handshake_bytes(proxy: FaultProxy, broker: BrokerHandle) -> int:
    """Client -> broker bytes of pika's handshake up to an open channel."""
    index = proxy.connections
    connection = pika_connection(proxy, broker)
    try:
        connection.channel()
        return proxy.client_bytes(index)
    finally:
        connection.close()


def test_pika_through_proxy_then_drop_all(broker: BrokerHandle) -> None:
    with FaultProxy("127.0.0.1", broker.node.port) as proxy:
        connection = pika_connection(proxy, broker)
        try:
            channel = connection.channel()
            handshake = proxy.client_bytes(0)
            print(f"\n[faultproxy] pika handshake up to channel open: {handshake} bytes "
                  f"client->broker, {proxy.server_bytes(0)} broker->client")
            channel.queue_declare("through-proxy")
            assert broker.queue_info("through-proxy")["name"] == "through-proxy"
            assert proxy.client_bytes(0) > handshake

            assert proxy.drop_all() == 1

            def closed() -> bool:
                try:
                    connection.process_data_events(time_limit=0.1)
                except pika.exceptions.AMQPError:
                    pass  # StreamLostError: what a dropped connection looks like
                return bool(connection.is_closed)

            wait_until(closed, DEADLINE, "pika to see the dropped connection")
        finally:
            if connection.is_open:
                connection.close()


def test_cut_after_handshake_kills_the_declare(broker: BrokerHandle) -> None:
    """The use case of cut_after: a connection that dies once the channel is open."""
    with FaultProxy("127.0.0.1", broker.node.port) as proxy:
        handshake = handshake_bytes(proxy, broker)
        proxy.cut_after(handshake + 1)  # let one byte of the next frame through
        connection = pika_connection(proxy, broker)
        try:
            channel = connection.channel()
            with pytest.raises(pika.exceptions.AMQPConnectionError):
                channel.queue_declare("never-declared")
        finally:
            if connection.is_open:
                connection.close()
        assert proxy.client_bytes(1) == handshake + 1
        with pytest.raises(KeyError):
            broker.queue_info("never-declared")
        assert handshake_bytes(proxy, broker) == handshake  # the cut was for one connection

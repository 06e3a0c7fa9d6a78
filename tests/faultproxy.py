"""A threaded TCP proxy that injects connection faults, for the tests.

Point a client (the dispatcher's RABBITMQ_URL, a pika connection) at the proxy
instead of the broker, then break its connections on purpose::

    with FaultProxy("127.0.0.1", rabbit.port) as proxy:
        url = proxy.rewrite_url(broker.url)      # same URL, host:port of the proxy
        ...                                      # start the dispatcher on ``url``
        proxy.drop_all()                         # every open connection dies now
        proxy.refuse(True)                       # new connections die at once
        proxy.cut_after(420)                     # next connection dies after 420 bytes
        proxy.close_after(2.0)                   # every new connection lives 2 s

Plain threads and blocking sockets (the tests are not gevent-patched): one thread
accepts on 127.0.0.1, and each connection gets one thread that connects to the
target and copies bytes both ways. The fault settings are read when a connection
is accepted, so they apply to new connections only; ``drop_all`` acts on the open
ones.

Dropping a connection ("aborting" it) means, for both the client and the target
side: SO_LINGER 0, then shutdown(SHUT_RDWR), which at once wakes the connection's
thread and sends a FIN (the peer's pending read returns EOF straight away), then
close(), which with SO_LINGER 0 sends a RST (the peer's next read or write fails
with ECONNRESET/EPIPE). A clean end on one side (EOF) is passed on as a half-close
to the other side, so an ordinary close through the proxy stays ordinary.

Connection threads never let an OSError escape: a reset, a broken pipe or a
target that refuses is the normal way for a connection to end here.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

_BUFSIZE = 65536
_LINGER_RESET = struct.pack("ii", 1, 0)  # struct linger {l_onoff=1, l_linger=0}
_JOIN_TIMEOUT = 10.0


def _set_reset_on_close(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass  # already closed or reset by the peer


def _kill(sock: socket.socket) -> None:
    """Make ``sock``'s peer see EOF now and a reset on close; wakes our own reader."""
    _set_reset_on_close(sock)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not connected any more


def _abort_close(sock: socket.socket) -> None:
    _set_reset_on_close(sock)
    sock.close()


class _Connection:
    """One client connection and its thread, which forwards to the target."""

    def __init__(self, proxy: FaultProxy, index: int, client: socket.socket,
                 cut_at: int | None, expires_at: float | None) -> None:
        self.index = index
        self.client = client
        self.server: socket.socket | None = None
        self.cut_at = cut_at
        self.expires_at = expires_at
        self.client_bytes = 0  # read from the client and passed on to the target
        self.server_bytes = 0  # read from the target and passed on to the client
        self.open = True
        self._target = proxy.target
        self._flowing = proxy.flowing
        self._connect_timeout = proxy.connect_timeout
        # Guards the sockets: abort() (any thread) never shuts down a socket that
        # the connection thread is closing, so it cannot hit a reused descriptor.
        self._lock = threading.Lock()
        self._aborting = False
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"{proxy.thread_prefix}:conn{index}")

    def abort(self) -> bool:
        """Drop both sides now. False if the connection had already ended."""
        with self._lock:
            if not self.open or self._aborting:
                return False
            self._aborting = True
            _kill(self.client)
            if self.server is not None:
                _kill(self.server)
            return True

    def _run(self) -> None:
        try:
            self._forward()
        except OSError:
            self._aborting = True  # reset, broken pipe, target down: drop the other side
        finally:
            with self._lock:
                for sock in (self.client, self.server):
                    if sock is None:
                        continue
                    if self._aborting:
                        _abort_close(sock)
                    else:
                        sock.close()
                self.open = False

    def _forward(self) -> None:
        client = self.client
        server = socket.create_connection(self._target, timeout=self._connect_timeout)
        server.settimeout(None)
        with self._lock:
            self.server = server
            if self._aborting:  # dropped while connecting
                _kill(server)
                return
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.cut_at == 0:
            self.abort()
            return
        with selectors.DefaultSelector() as selector:
            selector.register(client, selectors.EVENT_READ, server)
            selector.register(server, selectors.EVENT_READ, client)
            while selector.get_map():
                if self._aborting:
                    return
                if not self._flowing.is_set():  # paused: hold the data where it is
                    self._flowing.wait(0.05)
                    if self.expires_at is None or time.monotonic() < self.expires_at:
                        continue
                timeout = None
                if self.expires_at is not None:
                    timeout = self.expires_at - time.monotonic()
                    if timeout <= 0:
                        self.abort()
                        return
                for key, _ in selector.select(timeout):
                    if self._aborting:
                        return
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    sink: socket.socket = key.data
                    size = _BUFSIZE
                    if source is client and self.cut_at is not None:
                        size = min(size, self.cut_at - self.client_bytes)
                    data = source.recv(size)
                    if not data:  # clean EOF: pass the half-close on
                        selector.unregister(source)
                        sink.shutdown(socket.SHUT_WR)
                        continue
                    # Count before sending: once the peer has answered, the count
                    # already includes what it answered to.
                    if source is client:
                        self.client_bytes += len(data)
                    else:
                        self.server_bytes += len(data)
                    sink.sendall(data)
                    if source is client and self.client_bytes == self.cut_at:
                        self.abort()
                        return


class FaultProxy:
    """TCP proxy from 127.0.0.1:``port`` to ``(target_host, target_port)``.

    Counters: ``connections`` (forwarded connections accepted so far, monotonic),
    ``refused`` (connections accepted and reset while refusing), ``active()``
    (forwarded connections open now). Connections are numbered from 0 in accept
    order (refused ones excluded) for ``client_bytes``/``server_bytes``.
    """

    host = "127.0.0.1"

    def __init__(self, target_host: str, target_port: int, *,
                 connect_timeout: float = 5.0) -> None:
        self.target = (target_host, target_port)
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._connections: list[_Connection] = []
        self._refused = 0
        self._refusing = False
        self.flowing = threading.Event()  # cleared by pause(): nothing is forwarded
        self.flowing.set()
        self._cut: tuple[int, int] | None = None  # (nbytes, connections left)
        self._close_after: float | None = None
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = False
        self._stopped = False

    # Life cycle.

    def start(self) -> FaultProxy:
        """Listen on a free port of 127.0.0.1 and start accepting."""
        with self._lock:
            if self._listener is not None or self._stopped:
                raise RuntimeError("a FaultProxy can be started only once")
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, 0))
            listener.listen(128)
            listener.setblocking(False)
            self._listener = listener
            self._wake_r, self._wake_w = socket.socketpair()
            self._accept_thread = threading.Thread(
                target=self._accept_loop, daemon=True, name=f"{self.thread_prefix}:accept")
            self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, drop every open connection, join all threads. Idempotent.

        Raises RuntimeError if a thread of the proxy is still alive afterwards.
        """
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._stopping = True  # _admit() takes no connection from now on
        if self._accept_thread is not None:
            assert self._wake_w is not None
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass
            self._accept_thread.join(_JOIN_TIMEOUT)
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        connections = list(self._connections)
        for connection in connections:
            connection.abort()
        for connection in connections:
            connection.thread.join(_JOIN_TIMEOUT)
        alive = [t.name for t in self.threads() if t.is_alive()]
        if alive:
            raise RuntimeError(f"FaultProxy threads still running after stop: {alive}")

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # Where it listens.

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("FaultProxy not started")
        return int(self._listener.getsockname()[1])

    @property
    def thread_prefix(self) -> str:
        """Every thread of this proxy is named ``<thread_prefix>:...``."""
        return f"faultproxy-{id(self):x}"

    def rewrite_url(self, url: str) -> str:
        """``url`` (amqp://user:pass@host:port/vhost?...) with host:port of the proxy."""
        parts = urlsplit(url)
        userinfo, at, _ = parts.netloc.rpartition("@")
        return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{self.host}:{self.port}"))

    # Counters.

    @property
    def connections(self) -> int:
        """Connections accepted and forwarded so far (not counting refused ones)."""
        return len(self._connections)

    @property
    def refused(self) -> int:
        """Connections accepted and reset at once because the proxy was refusing."""
        return self._refused

    def active(self) -> int:
        """Forwarded connections open now."""
        return sum(1 for c in list(self._connections) if c.open)

    def client_bytes(self, index: int) -> int:
        """Bytes passed client -> target on connection ``index`` (0 = first)."""
        return self._connections[index].client_bytes

    def server_bytes(self, index: int) -> int:
        """Bytes passed target -> client on connection ``index`` (0 = first)."""
        return self._connections[index].server_bytes

    def threads(self) -> list[threading.Thread]:
        """The threads this proxy started (alive or not)."""
        found = [c.thread for c in list(self._connections)]
        if self._accept_thread is not None:
            found.insert(0, self._accept_thread)
        return found

    # Faults.

    def drop_all(self) -> int:
        """Abruptly close every open connection, both sides; returns how many."""
        return sum(1 for c in list(self._connections) if c.abort())

    def refuse(self, refusing: bool = True) -> None:
        """While refusing, each new connection is accepted and reset at once.

        The listener stays bound (closing and re-binding it could lose the port, or
        let a client's connect to the then-closed port connect to itself), so the
        client's connect() succeeds (or, if the reset is quick enough, fails with
        ECONNRESET) and its first read or write fails with a reset: to a client
        this looks like a broker that is not up. Open connections are left alone;
        use ``drop_all`` for those. Like every fault setting it acts when the
        proxy accepts, which can come just after the client's connect() returned.
        """
        self._refusing = refusing

    def cut_after(self, nbytes: int, connections: int = 1) -> None:
        """Cut each of the next ``connections`` new connections once ``nbytes`` bytes
        have gone client -> target on it: exactly ``nbytes`` are passed on, then both
        sides are dropped (0: dropped as soon as the target has accepted it).
        Replaces any cut still pending; ``connections=0`` cancels it.
        """
        if nbytes < 0 or connections < 0:
            raise ValueError("nbytes and connections must be >= 0")
        with self._lock:
            self._cut = (nbytes, connections) if connections else None

    def pause(self) -> None:
        """Forward nothing, either way, on every connection, until ``resume``: a broker
        that stopped answering. Connections stay open; new ones are accepted."""
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    def close_after(self, seconds: float | None) -> None:
        """Drop every new connection ``seconds`` after it was accepted (None: off)."""
        if seconds is not None and seconds < 0:
            raise ValueError("seconds must be >= 0")
        self._close_after = seconds

    # Internals.

    def _accept_loop(self) -> None:
        listener, wake_r = self._listener, self._wake_r
        assert listener is not None and wake_r is not None
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(wake_r, selectors.EVENT_READ)
            while not self._stopping:
                for key, _ in selector.select():
                    if key.fileobj is wake_r or self._stopping:
                        return
                    try:
                        client, _ = listener.accept()
                    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                        continue  # the client went away before we took it
                    self._admit(client)

    def _admit(self, client: socket.socket) -> None:
        client.setblocking(True)
        with self._lock:
            if self._stopping or self._refusing:
                if not self._stopping:
                    self._refused += 1
                _abort_close(client)
                return
            cut_at = None
            if self._cut is not None:
                nbytes, left = self._cut
                cut_at = nbytes
                self._cut = (nbytes, left - 1) if left > 1 else None
            expires_at = None
            if self._close_after is not None:
                expires_at = time.monotonic() + self._close_after
            connection = _Connection(self, len(self._connections), client, cut_at, expires_at)
            self._connections.append(connection)
            connection.thread.start()

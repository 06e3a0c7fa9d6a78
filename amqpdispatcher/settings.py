"""Connection settings from the environment: RABBITMQ_URL and RABBITMQ_HEARTBEAT.

RABBITMQ_URL has the 0.4.3 form ``amqp://USER:PASS@HOST[,HOST...][:PORT]/VHOST``.
A host may carry its own port (``h1:5673,h2:5674``); a host without one uses
the port written after the last host, else 5672 (5671 for ``amqps``).
"""

from __future__ import annotations

import os
import random
import socket
import ssl
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote

import pika

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"


class SettingsError(Exception):
    """Bad environment: a one-line message (never containing the password)."""


@dataclass(frozen=True)
class Settings:
    hosts: tuple[tuple[str, int], ...]
    user: str
    password: str
    vhost: str
    heartbeat: int | None
    tls: bool = False

    def redacted_url(self) -> str:
        scheme = "amqps" if self.tls else "amqp"
        hosts = ",".join(f"{h}:{p}" for h, p in self.hosts)
        return f"{scheme}://{self.user}:***@{hosts}/{quote(self.vhost, safe='')}"

    def connection_parameters(self) -> list[pika.ConnectionParameters]:
        """One parameter set per host, in a fresh random order."""
        name = f"amqp-dispatcher {socket.gethostname()} pid {os.getpid()} {uuid.uuid4().hex[:6]}"
        credentials = pika.PlainCredentials(self.user, self.password)
        ssl_options = pika.SSLOptions(ssl.create_default_context()) if self.tls else None
        params = []
        for host, port in self.hosts:
            kwargs = dict(
                host=host,
                port=port,
                virtual_host=self.vhost,
                credentials=credentials,
                client_properties={"connection_name": name, "product": "amqp-dispatcher"},
                connection_attempts=1,
                socket_timeout=5,
                stack_timeout=15,
                ssl_options=ssl_options,
            )
            if self.heartbeat is not None:
                kwargs["heartbeat"] = self.heartbeat
            params.append(pika.ConnectionParameters(**kwargs))
        random.shuffle(params)
        return params


def _split_hosts(netloc: str, default_port: int) -> list[tuple[str, int | None]]:
    hosts: list[tuple[str, int | None]] = []
    for piece in netloc.split(","):
        piece = piece.strip()
        if piece.startswith("["):  # [ipv6]:port
            host, _, rest = piece[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port_text = piece.partition(":")
        if not host:
            raise SettingsError("RABBITMQ_URL: empty host name in the host list")
        if port_text:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                # Never echo URL text: a mistyped URL can put the password here.
                raise SettingsError("RABBITMQ_URL: a port in the host list is not a number "
                                    "from 1 to 65535 (is a '/' or '@' in the password "
                                    "not percent-encoded?)")
            hosts.append((host, int(port_text)))
        else:
            hosts.append((host, None))
    return hosts


def parse_url(url: str, heartbeat_env: str | None = None) -> Settings:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("amqp", "amqps"):
        raise SettingsError("RABBITMQ_URL: expected amqp://USER:PASS@HOST[,HOST...][:PORT]/VHOST")
    tls = scheme == "amqps"
    default_port = 5671 if tls else 5672
    rest, _, query = rest.partition("?")
    authority, _, vhost = rest.partition("/")
    userinfo, at, netloc = authority.rpartition("@")
    user, password = "guest", "guest"
    if at:
        raw_user, _, raw_password = userinfo.partition(":")
        user, password = unquote(raw_user), unquote(raw_password)
    if not netloc:
        raise SettingsError("RABBITMQ_URL: no host given")
    pieces = _split_hosts(netloc, default_port)
    shared_port = pieces[-1][1] or default_port
    hosts = tuple((h, p if p is not None else shared_port) for h, p in pieces)

    heartbeat: int | None = None
    params = parse_qs(query)
    if "heartbeat" in params:
        heartbeat = _heartbeat(params["heartbeat"][-1], "RABBITMQ_URL: heartbeat")
    if heartbeat_env:
        heartbeat = _heartbeat(heartbeat_env, "RABBITMQ_HEARTBEAT")
    return Settings(hosts=hosts, user=user, password=password,
                    vhost=unquote(vhost) or "/", heartbeat=heartbeat, tls=tls)


def _heartbeat(text: str, where: str) -> int:
    if not text.strip().isdigit():
        raise SettingsError(f"{where}: expected a whole number of seconds, got {text!r}")
    return int(text)


def settings_from_env(environ: Mapping[str, str] = os.environ) -> Settings:
    return parse_url(environ.get("RABBITMQ_URL") or DEFAULT_URL,
                     environ.get("RABBITMQ_HEARTBEAT"))

"""Connection settings from the environment: RABBITMQ_URL and RABBITMQ_HEARTBEAT.

RABBITMQ_URL has the 0.4.3 form ``amqp://USER:PASS@HOST[,HOST...][:PORT]/VHOST``.
A host may carry its own port (``h1:5673,h2:5674``); a host without one uses
the port written after the last host, else 5672 (5671 for ``amqps``).

Surrounding whitespace (a secret file's trailing newline) is ignored. A URL that
cannot be split unambiguously, because a '?', '#', '@' or '/' in the password is
not percent-encoded, is an error, and so is an unknown query parameter. Error
messages never quote the URL: a mistyped one can put the password anywhere.
"""

from __future__ import annotations

import os
import random
import re
import socket
import ssl
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote

import pika

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
QUERY_PARAMETERS = ("heartbeat",)
MAX_HEARTBEAT = 65535  # connection.tune carries it in 16 bits

_DIGITS = re.compile(r"[0-9]+")
_PARAMETER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,40}")
_ENCODE = "percent-encode '?', '#', '@' and '/' in the user and password (%3F %23 %40 %2F)"


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
    password_as_written: str = ""  # in the URL, before percent-decoding: also kept out of logs
    worker: str = ""  # "2/4" in a worker process of --processes 4: named in connection_name

    def redacted_url(self) -> str:
        scheme = "amqps" if self.tls else "amqp"
        hosts = ",".join(f"{h}:{p}" for h, p in self.hosts)
        return f"{scheme}://{self.user}:***@{hosts}/{quote(self.vhost, safe='')}"

    def connection_parameters(self) -> list[pika.ConnectionParameters]:
        """One parameter set per host, in a fresh random order."""
        name = f"amqp-dispatcher {socket.gethostname()} pid {os.getpid()} {uuid.uuid4().hex[:6]}"
        if self.worker:
            name += f" worker {self.worker}"
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
            if not _DIGITS.fullmatch(port_text) or not 0 < int(port_text) < 65536:
                # Never echo URL text: a mistyped URL can put the password here.
                raise SettingsError("RABBITMQ_URL: a port in the host list is not a number "
                                    "from 1 to 65535 (is a '/' or '@' in the password "
                                    "not percent-encoded?)")
            hosts.append((host, int(port_text)))
        else:
            hosts.append((host, None))
    return hosts


def parse_url(url: str, heartbeat_env: str | None = None) -> Settings:
    url = url.strip()
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise SettingsError("RABBITMQ_URL: contains whitespace or a control character; "
                            "percent-encode it (a space is %20)")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("amqp", "amqps"):
        raise SettingsError("RABBITMQ_URL: expected amqp://USER:PASS@HOST[,HOST...][:PORT]/VHOST")
    tls = scheme == "amqps"
    default_port = 5671 if tls else 5672
    # Where the user, password, hosts, vhost and query begin and end must not depend
    # on characters that can be in an unencoded password.
    if "#" in rest:
        raise SettingsError(f"RABBITMQ_URL: a '#' cannot be parsed unambiguously; {_ENCODE}")
    rest, _, query = rest.partition("?")
    if "@" in query:
        raise SettingsError("RABBITMQ_URL: a '?' comes before an '@', so it cannot be parsed "
                            f"unambiguously; {_ENCODE}")
    authority, _, vhost = rest.partition("/")
    if "@" in vhost:
        raise SettingsError("RABBITMQ_URL: a '/' comes before an '@', so it cannot be parsed "
                            f"unambiguously; {_ENCODE}, and '@' in the vhost")
    userinfo, at, netloc = authority.rpartition("@")
    user, password, raw_password = "guest", "guest", ""
    if at:
        raw_user, _, raw_password = userinfo.partition(":")
        user, password = unquote(raw_user), unquote(raw_password)
    if not netloc:
        raise SettingsError("RABBITMQ_URL: no host given")
    pieces = _split_hosts(netloc, default_port)
    shared_port = pieces[-1][1] or default_port
    hosts = tuple((h, p if p is not None else shared_port) for h, p in pieces)

    heartbeat: int | None = None
    seen: set[str] = set()
    for name, value in parse_qsl(query, keep_blank_values=True):
        # Only a name that looks like one is quoted back: this is still URL text.
        shown = f"{name!r}" if _PARAMETER_NAME.fullmatch(name) else "with an unusual name"
        if name not in QUERY_PARAMETERS:
            known = ", ".join(QUERY_PARAMETERS)
            raise SettingsError(f"RABBITMQ_URL: unknown query parameter {shown}; "
                                f"known: {known}")
        if name in seen:
            raise SettingsError(f"RABBITMQ_URL: query parameter {shown} is given twice")
        seen.add(name)
        heartbeat = _heartbeat(value, "RABBITMQ_URL: heartbeat", quote_text=False)
    if heartbeat_env:
        heartbeat = _heartbeat(heartbeat_env, "RABBITMQ_HEARTBEAT")
    return Settings(hosts=hosts, user=user, password=password,
                    vhost=unquote(vhost) or "/", heartbeat=heartbeat, tls=tls,
                    password_as_written=raw_password)


def _heartbeat(text: str, where: str, quote_text: bool = True) -> int:
    text = text.strip()
    got = f", got {text!r}" if quote_text else ""
    if not _DIGITS.fullmatch(text):
        raise SettingsError(f"{where}: expected a whole number of seconds{got}")
    if int(text) > MAX_HEARTBEAT:
        raise SettingsError(f"{where}: expected at most {MAX_HEARTBEAT} seconds{got}")
    return int(text)


def settings_from_env(environ: Mapping[str, str] = os.environ) -> Settings:
    return parse_url(environ.get("RABBITMQ_URL") or DEFAULT_URL,
                     environ.get("RABBITMQ_HEARTBEAT"))

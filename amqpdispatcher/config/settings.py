"""Connection settings from the environment: RABBITMQ_URL and RABBITMQ_HEARTBEAT.

RABBITMQ_URL has the 0.4.3 form ``amqp://USER:PASS@HOST[,HOST...][:PORT]/VHOST``.
A host may carry its own port (``h1:5673,h2:5674``); a host without one uses
the port written after the last host, else 5672 (5671 for ``amqps``).

Surrounding whitespace (a secret file's trailing newline) is ignored. A URL that
cannot be split unambiguously, because a '?', '#', '@' or '/' in the password is
not percent-encoded, is an error, and so is an unknown query parameter. Error
messages never quote the URL: a mistyped one can put the password anywhere.

The query parameters of RabbitMQ's URI spec for TLS (cacertfile, certfile,
keyfile, verify, server_name_indication) make one SSL context at start, shared
by every host of an amqps:// URL; files that cannot be read or loaded are
errors then, not at the first connection.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NoReturn
from urllib.parse import quote, unquote

log = logging.getLogger("amqp-dispatcher.connection")

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
TLS_PARAMETERS = ("cacertfile", "certfile", "keyfile", "verify", "server_name_indication")
QUERY_PARAMETERS = ("heartbeat", *TLS_PARAMETERS)
VERIFY_VALUES = ("verify_peer", "verify_none")
MAX_HEARTBEAT = 65535  # connection.tune carries it in 16 bits

_DIGITS = re.compile(r"[0-9]+")
_PARAMETER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,40}")
_HOST_NAME = re.compile(r"[A-Za-z0-9.:-]{1,253}")
# OpenSSL's "[LIBRARY: CODE] " before the reason and CPython's " (_ssl.c:LINE)" after it.
_SSL_DECORATION = re.compile(r"^\[[^\]]*\]\s*|\s*\(_ssl\.c:\d+\)$")
_ENCODE = "percent-encode '?', '#', '@' and '/' in the user and password (%3F %23 %40 %2F)"


class SettingsError(Exception):
    """Bad environment: a one-line message (never containing the password)."""


@dataclass(frozen=True)
class TLSOptions:
    """What the TLS query parameters made: one context for every host of the URL."""

    context: ssl.SSLContext
    verify: bool = True
    # Sent as SNI and checked against the certificate instead of each host's own name.
    server_name: str | None = None


@dataclass(frozen=True)
class Settings:
    hosts: tuple[tuple[str, int], ...]
    user: str
    password: str
    vhost: str
    heartbeat: int | None
    tls: TLSOptions | None = None  # None: amqp://, no TLS
    password_as_written: str = ""  # in the URL, before percent-decoding: also kept out of logs
    worker: str = ""  # "2/4" in a worker process of --processes 4: named in connection_name

    def redacted_url(self) -> str:
        scheme = "amqps" if self.tls else "amqp"
        hosts = ",".join(f"{h}:{p}" for h, p in self.hosts)
        return f"{scheme}://{self.user}:***@{hosts}/{quote(self.vhost, safe='')}"


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

    parameters = _query_parameters(query)
    heartbeat: int | None = None
    if "heartbeat" in parameters:
        heartbeat = _heartbeat(parameters["heartbeat"], "RABBITMQ_URL: heartbeat",
                               quote_text=False)
    if heartbeat_env:
        heartbeat = _heartbeat(heartbeat_env, "RABBITMQ_HEARTBEAT")
    given_tls = [name for name in TLS_PARAMETERS if name in parameters]
    if given_tls and not tls:
        raise SettingsError(f"RABBITMQ_URL: {', '.join(given_tls)}: only for amqps:// URLs "
                            "(TLS); this one is amqp://")
    return Settings(hosts=hosts, user=user, password=password,
                    vhost=unquote(vhost) or "/", heartbeat=heartbeat,
                    tls=_tls_options(parameters) if tls else None,
                    password_as_written=raw_password)


def _query_parameters(query: str) -> dict[str, str]:
    parameters: dict[str, str] = {}
    for piece in query.split("&"):
        if not piece:
            continue
        raw_name, _, raw_value = piece.partition("=")
        # unquote, not unquote_plus: a '+' in a file name stays a '+'.
        name = unquote(raw_name)
        # Only a name that looks like one is quoted back: this is still URL text.
        shown = f"{name!r}" if _PARAMETER_NAME.fullmatch(name) else "with an unusual name"
        if name not in QUERY_PARAMETERS:
            raise SettingsError(f"RABBITMQ_URL: unknown query parameter {shown}; "
                                f"known: {', '.join(QUERY_PARAMETERS)}")
        if name in parameters:
            raise SettingsError(f"RABBITMQ_URL: query parameter {shown} is given twice")
        parameters[name] = unquote(raw_value)
    return parameters


def _heartbeat(text: str, where: str, quote_text: bool = True) -> int:
    text = text.strip()
    got = f", got {text!r}" if quote_text else ""
    if not _DIGITS.fullmatch(text):
        raise SettingsError(f"{where}: expected a whole number of seconds{got}")
    if int(text) > MAX_HEARTBEAT:
        raise SettingsError(f"{where}: expected at most {MAX_HEARTBEAT} seconds{got}")
    return int(text)


def settings_from_env(environ: Mapping[str, str] = os.environ) -> Settings:
    settings = parse_url(environ.get("RABBITMQ_URL") or DEFAULT_URL,
                         environ.get("RABBITMQ_HEARTBEAT"))
    if settings.tls and not settings.tls.verify:
        log.warning("RABBITMQ_URL: verify=verify_none: the broker's certificate is not "
                    "verified, so anyone on the network path can pose as the broker")
    return settings


# -- TLS ------------------------------------------------------------------------------
# File paths are shown in errors: by now the query cannot hold any of the password
# (a '?' before the '@' was refused above), and the path is what the operator must fix.


def _tls_options(parameters: Mapping[str, str]) -> TLSOptions:
    verify = parameters.get("verify", "verify_peer")
    if verify not in VERIFY_VALUES:
        raise SettingsError(f"RABBITMQ_URL: verify: expected {' or '.join(VERIFY_VALUES)}")
    server_name = parameters.get("server_name_indication")
    if server_name == "disable":  # Erlang's client can send none; Python's ssl cannot
        raise SettingsError("RABBITMQ_URL: server_name_indication: 'disable' is not "
                            "supported; give a host name, or leave it out to use each host's")
    if server_name is not None and not _HOST_NAME.fullmatch(server_name):
        raise SettingsError("RABBITMQ_URL: server_name_indication: expected a host name")
    cacertfile = _tls_file(parameters, "cacertfile")
    certfile = _tls_file(parameters, "certfile")
    keyfile = _tls_file(parameters, "keyfile")
    if keyfile and not certfile:
        raise SettingsError("RABBITMQ_URL: keyfile: needs certfile, the client certificate")
    # With a cacertfile, it is the only trust anchor; without, the system's CA store.
    try:
        context = ssl.create_default_context(cafile=cacertfile)
    except ssl.SSLError as exc:
        raise SettingsError(f"RABBITMQ_URL: cacertfile: cannot load CA certificates from "
                            f"{cacertfile!r}: {ssl_reason(str(exc))}") from None
    if verify == "verify_none":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if certfile:
        _load_client_certificate(context, certfile, keyfile)
    return TLSOptions(context=context, verify=verify == "verify_peer", server_name=server_name)


def _tls_file(parameters: Mapping[str, str], name: str) -> str | None:
    path = parameters.get(name)
    if path is None:
        return None
    if not path:
        raise SettingsError(f"RABBITMQ_URL: {name}: expected a file name")
    if "\0" in path:  # %00: open() would raise ValueError, not OSError
        raise SettingsError(f"RABBITMQ_URL: {name}: a file name cannot contain a NUL "
                            "character (%00)")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise SettingsError(f"RABBITMQ_URL: {name}: cannot read {path!r}: "
                            f"{exc.strerror}") from None
    return path


class _EncryptedKey(Exception):
    pass


def _no_password() -> NoReturn:
    # Without a callback OpenSSL would prompt on the terminal: a daemon would hang.
    raise _EncryptedKey


def _load_client_certificate(context: ssl.SSLContext, certfile: str,
                             keyfile: str | None) -> None:
    key_name, key_path = ("keyfile", keyfile) if keyfile else ("certfile", certfile)
    try:
        context.load_cert_chain(certfile, keyfile, password=_no_password)
    except _EncryptedKey:
        raise SettingsError(f"RABBITMQ_URL: {key_name}: the private key in {key_path!r} is "
                            "encrypted; give it unencrypted, in a file only this user "
                            "can read") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            problem = (f"{key_name}: the private key in {key_path!r} does not match the "
                       f"certificate in {certfile!r}")
        elif exc.reason is not None:
            problem = (f"certfile: cannot load the client certificate from {certfile!r}: "
                       f"{ssl_reason(str(exc))}")
        elif not _has_certificate(certfile):
            problem = f"certfile: no PEM certificate in {certfile!r}"
        elif keyfile:
            problem = f"keyfile: no PEM private key in {keyfile!r}"
        else:
            problem = (f"certfile: no PEM private key in {certfile!r}: append it to the "
                       "certificate, or give it in keyfile")
        raise SettingsError(f"RABBITMQ_URL: {problem}") from None


def _has_certificate(path: str) -> bool:
    # OpenSSL says only "PEM lib" when either file is wrong: find out which.
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=path)
    except ssl.SSLError:
        return False
    return True


def ssl_reason(text: str) -> str:
    """An SSL error's text as one readable line (``certificate verify failed: Hostname
    mismatch, ...``): without OpenSSL's code before it and CPython's source line after."""
    return _SSL_DECORATION.sub("", text)

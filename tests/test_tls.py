"""TLS: the query parameters of an amqps:// RABBITMQ_URL, parsed (pure logic) and used
against a private RabbitMQ node with a TLS listener, whose CA, server and client
certificates the test makes with trustme.

The node's certificate names only ``localhost``, and it demands a client
certificate (``fail_if_no_peer_cert``), so one node shows a verified
connection, a client certificate accepted and a missing one refused, a server
checked against the host's own name or server_name_indication, and an
untrusted server refused.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import trustme
from cryptography.hazmat.primitives import serialization  # trustme's own dependency
from helpers import BrokerHandle, DispatcherProcess, run_cli, wait_until
from rabbitnode import Broker, free_port

from amqpdispatcher.amqp.connection import connection_parameters
from amqpdispatcher.config.settings import QUERY_PARAMETERS, SettingsError, parse_url, ssl_reason

PASSWORD = "s3cret-pw"  # on the node below it is guest's password
CONFIG = "consumers:\n  - consumer: testconsumers:Recorder\n    queue: {queue}\n"


@dataclass
class PKI:
    ca: Path
    other_ca: Path  # a CA that did not sign the node's certificate
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_cert_and_key: Path  # one file, key first, as some tools write it


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    base = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("localhost")
    client = ca.issue_cert("amqp-dispatcher.client")
    pki = PKI(*(base / name for name in ("ca.pem", "other-ca.pem", "server.pem", "server.key",
                                          "client.pem", "client.key", "client-both.pem")))
    ca.cert_pem.write_to_path(str(pki.ca))
    other.cert_pem.write_to_path(str(pki.other_ca))
    server.cert_chain_pems[0].write_to_path(str(pki.server_cert))
    server.private_key_pem.write_to_path(str(pki.server_key))
    client.cert_chain_pems[0].write_to_path(str(pki.client_cert))
    client.private_key_pem.write_to_path(str(pki.client_key))
    client.private_key_and_cert_chain_pem.write_to_path(str(pki.client_cert_and_key))
    return pki


@dataclass
class TLSNode:
    node: Broker
    port: int

    def url(self, host: str = "localhost", password: str = PASSWORD,
            **parameters: Path | str) -> str:
        query = "&".join(f"{name}={quote(str(value), safe='/')}"
                         for name, value in parameters.items())
        return f"amqps://guest:{password}@{host}:{self.port}/%2F" + (f"?{query}" if query else "")


@pytest.fixture(scope="module")
def tls_node(pki: PKI) -> Iterator[TLSNode]:
    port = free_port()
    node = Broker(conf=f"listeners.ssl.local = 127.0.0.1:{port}\n"
                       f"ssl_options.cacertfile = {pki.ca}\n"
                       f"ssl_options.certfile = {pki.server_cert}\n"
                       f"ssl_options.keyfile = {pki.server_key}\n"
                       "ssl_options.verify = verify_peer\n"
                       "ssl_options.fail_if_no_peer_cert = true\n")
    node.start()
    try:
        node.ctl("change_password", "guest", PASSWORD)
        yield TLSNode(node, port)
    finally:
        node.stop()


def _client(pki: PKI) -> dict[str, Path]:
    return {"cacertfile": pki.ca, "certfile": pki.client_cert, "keyfile": pki.client_key}


def _consume_one(tls_node: TLSNode, tmp_path: Path, url: str, queue: str) -> str:
    """Run the dispatcher on url until it handled one message; its output."""
    handle = BrokerHandle(tls_node.node, "/")
    handle.url = handle.url.replace(":guest@", f":{PASSWORD}@")
    try:
        handle.declare(queue)
        proc = DispatcherProcess(tmp_path, CONFIG.format(queue=queue), url)
        try:
            proc.wait_consuming()
            handle.publish(queue, "over-tls")
            wait_until(lambda: proc.records() == ["over-tls"], what="the message")
        finally:
            assert proc.stop() == 0, proc.output
        return proc.output
    finally:
        handle.close()


def _refused(tmp_path: Path, url: str) -> str:
    """Start the dispatcher on url, expecting exit 3 with one error line; that line."""
    result = run_cli(tmp_path, "--config", "config.yml", config=CONFIG.format(queue="q"),
                     env={"RABBITMQ_URL": url})
    assert result.returncode == 3, result
    errors = [line for line in result.stderr.splitlines() if " ERROR: " in line]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert PASSWORD not in result.stderr + result.stdout
    assert "_ssl.c" not in result.stderr  # CPython's source line is noise to an operator
    return errors[0]


# -- against the TLS listener ---------------------------------------------------------


def test_verified_connection_with_client_certificate_consumes(
        tls_node: TLSNode, pki: PKI, tmp_path: Path) -> None:
    output = _consume_one(tls_node, tmp_path, tls_node.url(**_client(pki)), "verified")
    assert f"connected to localhost:{tls_node.port}" in output
    assert "not verified" not in output
    assert PASSWORD not in output


def test_broker_refuses_a_client_without_certificate(
        tls_node: TLSNode, pki: PKI, tmp_path: Path) -> None:
    error = _refused(tmp_path, tls_node.url(cacertfile=pki.ca))
    # TLS 1.3: the broker's alert arrives after the client's side of the handshake.
    assert error.endswith("last error: SSLError: tlsv13 alert certificate required"), error


@pytest.mark.parametrize("trusted", ["system CAs", "another CA"])
def test_untrusted_server_is_refused(tls_node: TLSNode, pki: PKI, tmp_path: Path,
                                     trusted: str) -> None:
    client: dict[str, Path | str] = {"certfile": pki.client_cert, "keyfile": pki.client_key}
    if trusted == "another CA":
        client["cacertfile"] = pki.other_ca
    error = _refused(tmp_path, tls_node.url(**client))
    assert "no broker accepted a connection at amqps://guest:***@localhost:" in error
    # The node sends its CA with its certificate, hence "self-signed ... in chain".
    assert error.endswith("last error: SSLCertVerificationError: certificate verify failed: "
                          "self-signed certificate in certificate chain"), error


def test_server_is_checked_against_each_hosts_own_name(
        tls_node: TLSNode, pki: PKI, tmp_path: Path) -> None:
    error = _refused(tmp_path, tls_node.url("127.0.0.1", **_client(pki)))
    assert error.endswith("certificate verify failed: IP address mismatch, certificate is not "
                          "valid for '127.0.0.1'."), error
    # In a host list every host gets the same TLS options, and its own name checked:
    # in whichever order they are tried, only localhost is accepted.
    output = _consume_one(tls_node, tmp_path, tls_node.url("127.0.0.1,localhost", **_client(pki)),
                          "hostlist")
    assert f"connected to localhost:{tls_node.port}" in output
    assert f"connected to 127.0.0.1:{tls_node.port}" not in output
    for line in output.splitlines():  # if 127.0.0.1 was tried first
        if "cannot connect to 127.0.0.1" in line:
            assert line.endswith("IP address mismatch, certificate is not valid for "
                                 "'127.0.0.1'."), line


def test_server_name_indication_is_the_name_checked(
        tls_node: TLSNode, pki: PKI, tmp_path: Path) -> None:
    output = _consume_one(tls_node, tmp_path, tls_node.url(
        "127.0.0.1", server_name_indication="localhost", **_client(pki)), "sni")
    assert f"connected to 127.0.0.1:{tls_node.port}" in output
    error = _refused(tmp_path, tls_node.url(server_name_indication="wrong.example",
                                            **_client(pki)))
    assert error.endswith("certificate verify failed: Hostname mismatch, certificate is not "
                          "valid for 'wrong.example'."), error


def test_verify_none_connects_unverified_and_warns_once(
        tls_node: TLSNode, pki: PKI, tmp_path: Path) -> None:
    # Neither the CA nor the name (127.0.0.1) would pass verification.
    output = _consume_one(tls_node, tmp_path, tls_node.url(
        "127.0.0.1", verify="verify_none", certfile=pki.client_cert_and_key), "unverified")
    warnings = [line for line in output.splitlines() if "not verified" in line]
    assert len(warnings) == 1, output
    assert " WARNING: RABBITMQ_URL: verify=verify_none: the broker's certificate is not verified" \
        in warnings[0]


def test_check_connects_with_the_tls_parameters(tls_node: TLSNode, pki: PKI,
                                                tmp_path: Path) -> None:
    handle = BrokerHandle(tls_node.node, "/")
    handle.url = handle.url.replace(":guest@", f":{PASSWORD}@")
    try:
        handle.declare("checked")
    finally:
        handle.close()
    config = CONFIG.format(queue="checked")
    result = run_cli(tmp_path, "--check", "--config", "config.yml", config=config,
                     env={"RABBITMQ_URL": tls_node.url(**_client(pki))})
    assert result.returncode == 0, result
    assert result.stdout.startswith(f"config.yml: OK: amqps://guest:***@localhost:"
                                    f"{tls_node.port}/%2F has what the config needs"), result
    untrusted = {"certfile": pki.client_cert, "keyfile": pki.client_key,
                 "cacertfile": pki.other_ca}
    result = run_cli(tmp_path, "--check", "--config", "config.yml", config=config,
                     env={"RABBITMQ_URL": tls_node.url(**untrusted)})
    assert result.returncode == 1, result
    assert result.stderr.startswith("config.yml: cannot check: no broker accepted a connection at "
                                    "amqps://guest:***@localhost:"), result.stderr
    assert result.stderr.rstrip().endswith("SSLCertVerificationError: certificate verify "
                                           "failed: self-signed certificate in certificate "
                                           "chain"), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert PASSWORD not in result.stdout + result.stderr


@pytest.mark.parametrize("query, message", [
    ("?cacert=x", "RABBITMQ_URL: unknown query parameter 'cacert'; known: heartbeat, "),
    ("?verify=verify_maybe", "RABBITMQ_URL: verify: expected verify_peer or verify_none"),
    ("?cacertfile=/nonexistent/ca.pem",
     "RABBITMQ_URL: cacertfile: cannot read '/nonexistent/ca.pem': No such file or directory"),
    ("?cacertfile=/etc/ssl/ca.pem%00x",
     "RABBITMQ_URL: cacertfile: a file name cannot contain a NUL character (%00)"),
])
def test_bad_tls_parameters_stop_the_start(tmp_path: Path, query: str, message: str) -> None:
    result = run_cli(tmp_path, "--config", "config.yml", config=CONFIG.format(queue="q"),
                     env={"RABBITMQ_URL": f"amqps://guest:{PASSWORD}@127.0.0.1:1/{query}"})
    assert result.returncode == 1, result
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith(message), result.stderr
    assert PASSWORD not in result.stderr


# -- parsing (no broker) --------------------------------------------------------------


def test_amqps_without_parameters_verifies_against_the_system_store() -> None:
    tls = parse_url("amqps://u:p@h/").tls
    assert tls is not None and tls.verify and tls.server_name is None
    assert tls.context.verify_mode == ssl.CERT_REQUIRED and tls.context.check_hostname
    assert parse_url("amqp://u:p@h/").tls is None


def test_cacertfile_is_the_only_trust_anchor(pki: PKI) -> None:
    tls = parse_url(f"amqps://u:p@h/?cacertfile={pki.ca}").tls
    assert tls is not None
    assert [ca["subject"] for ca in tls.context.get_ca_certs()] == \
        [ca["subject"] for ca in _loaded(pki.ca)]


def _loaded(path: Path) -> list[dict]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(path))
    return context.get_ca_certs()


def test_certfile_may_hold_the_key(pki: PKI) -> None:
    assert parse_url(f"amqps://u:p@h/?certfile={pki.client_cert_and_key}").tls is not None
    assert parse_url(f"amqps://u:p@h/?certfile={pki.client_cert}"
                     f"&keyfile={pki.client_key}").tls is not None


def test_file_names_are_percent_decoded_and_plus_is_kept(pki: PKI, tmp_path: Path) -> None:
    odd = tmp_path / "c+a file.pem"
    odd.write_bytes(pki.ca.read_bytes())
    assert parse_url(f"amqps://u:p@h/?cacertfile={tmp_path}/c+a%20file.pem").tls is not None


def test_verify_none_disables_verification_and_the_name_check() -> None:
    tls = parse_url("amqps://u:p@h/?verify=verify_none").tls
    assert tls is not None and not tls.verify
    assert tls.context.verify_mode == ssl.CERT_NONE and not tls.context.check_hostname
    tls = parse_url("amqps://u:p@h/?verify=verify_peer").tls
    assert tls is not None and tls.verify and tls.context.verify_mode == ssl.CERT_REQUIRED


def test_every_host_gets_the_same_tls_options() -> None:
    # No server_hostname: pika checks each connection against its own host.
    params = connection_parameters(parse_url("amqps://u:p@a,b:5/"))
    assert {p.ssl_options.server_hostname for p in params} == {None}
    assert len({id(p.ssl_options.context) for p in params}) == 1
    params = connection_parameters(
        parse_url("amqps://u:p@a,b:5/?server_name_indication=rabbit.example"))
    assert {p.ssl_options.server_hostname for p in params} == {"rabbit.example"}
    assert {p.host for p in params} == {"a", "b"}


def test_tls_parameters_on_amqp_are_an_error(pki: PKI) -> None:
    with pytest.raises(SettingsError, match=r"^RABBITMQ_URL: cacertfile, verify: only for "
                                            r"amqps:// URLs \(TLS\); this one is amqp://$"):
        parse_url(f"amqp://u:pw@h/?verify=verify_peer&cacertfile={pki.ca}")


def _bad(pki: PKI, tmp_path: Path) -> list[tuple[str, str]]:
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(pki.client_key.read_bytes(), password=None)
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.TraditionalOpenSSL,
                                            serialization.BestAvailableEncryption(b"pass")))
    return [
        ("verify=yes", "verify: expected verify_peer or verify_none"),
        ("verify=", "verify: expected verify_peer or verify_none"),
        ("server_name_indication=disable",
         "server_name_indication: 'disable' is not supported; give a host name, or leave it "
         "out to use each host's"),
        ("server_name_indication=a/b", "server_name_indication: expected a host name"),
        ("server_name_indication=", "server_name_indication: expected a host name"),
        ("cacertfile=", "cacertfile: expected a file name"),
        (f"cacertfile={tmp_path}", f"cacertfile: cannot read '{tmp_path}': Is a directory"),
        (f"cacertfile={pki.client_key}", f"cacertfile: cannot load CA certificates from "
                                         f"'{pki.client_key}': no certificate or crl found"),
        (f"keyfile={pki.client_key}", "keyfile: needs certfile, the client certificate"),
        (f"certfile={pki.client_cert}",
         f"certfile: no PEM private key in '{pki.client_cert}': append it to the certificate, "
         "or give it in keyfile"),
        (f"certfile={pki.client_key}&keyfile={pki.client_key}",
         f"certfile: no PEM certificate in '{pki.client_key}'"),
        (f"certfile={pki.client_cert}&keyfile={pki.ca}",
         f"keyfile: no PEM private key in '{pki.ca}'"),
        (f"certfile={pki.client_cert}&keyfile={pki.server_key}",
         f"keyfile: the private key in '{pki.server_key}' does not match the certificate in "
         f"'{pki.client_cert}'"),
        (f"certfile={pki.client_cert}&keyfile={encrypted}",
         f"keyfile: the private key in '{encrypted}' is encrypted; give it unencrypted, in a "
         "file only this user can read"),
        ("certfile=a&certfile=b", "query parameter 'certfile' is given twice"),
        ("ssl_options=1", f"unknown query parameter 'ssl_options'; known: "
                          f"{', '.join(QUERY_PARAMETERS)}"),
    ]


def test_bad_tls_values_are_one_line_naming_the_parameter(pki: PKI, tmp_path: Path) -> None:
    for query, message in _bad(pki, tmp_path):
        with pytest.raises(SettingsError) as info:
            parse_url(f"amqps://u:pw-secret@h/?{query}")
        assert str(info.value) == f"RABBITMQ_URL: {message}", query
        assert "pw-secret" not in str(info.value)


def test_ssl_reason_drops_openssl_codes_and_source_lines() -> None:
    assert ssl_reason("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to "
                      "get local issuer certificate (_ssl.c:1006)") == \
        "certificate verify failed: unable to get local issuer certificate"
    assert ssl_reason("[SSL] PEM lib (_ssl.c:3926)") == "PEM lib"
    assert ssl_reason("plain text") == "plain text"

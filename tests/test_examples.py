"""The systemd unit and the Kubernetes manifest in examples/ say what the README says.

(examples/supervisord.conf runs under a real supervisord: tests/test_supervisord.py.)
"""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import REPO, SCRIPT

from amqpdispatcher.cli import parse_args
from amqpdispatcher.config import Config
from amqpdispatcher.contracts.timeouts import CLOSE_TIMEOUT

EXAMPLES = REPO / "examples"
DEFAULT_DRAIN_TIMEOUT = Config(path="").drain_timeout


def test_systemd_unit_reloads_and_outlasts_the_drain(tmp_path: Path) -> None:
    unit = configparser.RawConfigParser()
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(EXAMPLES / "amqp-dispatcher.service")
    service = unit["Service"]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"  # the stop's SIGTERM to the arbiter alone
    assert int(service["TimeoutStopSec"]) > DEFAULT_DRAIN_TIMEOUT + CLOSE_TIMEOUT
    assert set(service["RestartPreventExitStatus"].split()) == {"1", "4", "5"}
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/amqp-dispatcher")
    assert parse_args(argv[1:]).processes >= 1  # --processes auto
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # systemd's own check, with a command that exists on this machine.
    text = (EXAMPLES / "amqp-dispatcher.service").read_text().replace(argv[0], SCRIPT)
    (tmp_path / "amqp-dispatcher.service").write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", "./amqp-dispatcher.service"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout + result.stderr, result


def test_kubernetes_deployment_probes_and_grace_period() -> None:
    documents = list(yaml.safe_load_all((EXAMPLES / "kubernetes.yaml").read_text()))
    kinds = {document["kind"]: document for document in documents}
    config = yaml.safe_load(kinds["ConfigMap"]["data"]["config.yml"])
    deployment = kinds["Deployment"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= \
        deployment["spec"]["template"]["metadata"]["labels"].items()
    pod = deployment["spec"]["template"]["spec"]
    drain_timeout = config.get("drain_timeout", DEFAULT_DRAIN_TIMEOUT)
    assert pod["terminationGracePeriodSeconds"] > drain_timeout + CLOSE_TIMEOUT
    [container] = pod["containers"]
    args = parse_args(container["command"][1:])
    [mount] = container["volumeMounts"]
    [volume] = pod["volumes"]
    assert volume["name"] == mount["name"]
    assert volume["configMap"]["name"] == kinds["ConfigMap"]["metadata"]["name"]
    assert args.config == f"{mount['mountPath']}/config.yml"
    assert str(args.processes) == container["resources"]["requests"]["cpu"]
    [port] = container["ports"]
    assert port["containerPort"] == config["http"]["port"] == 9800
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}


def test_keda_scaled_object_scales_the_deployment_on_its_queue() -> None:
    deployment_documents = list(yaml.safe_load_all((EXAMPLES / "kubernetes.yaml").read_text()))
    kinds = {document["kind"]: document for document in deployment_documents}
    config = yaml.safe_load(kinds["ConfigMap"]["data"]["config.yml"])
    [container] = kinds["Deployment"]["spec"]["template"]["spec"]["containers"]
    [url] = [env["valueFrom"]["secretKeyRef"] for env in container["env"]
             if env["name"] == "RABBITMQ_URL"]
    keda = {document["kind"]: document
            for document in yaml.safe_load_all((EXAMPLES / "keda-scaledobject.yaml").read_text())}
    scaled = keda["ScaledObject"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == kinds["Deployment"]["metadata"]["name"]
    [trigger] = scaled["triggers"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"]["mode"] == "QueueLength"
    assert trigger["metadata"]["queueName"] in {entry["queue"] for entry in config["consumers"]}
    authentication = keda["TriggerAuthentication"]
    assert trigger["authenticationRef"]["name"] == authentication["metadata"]["name"]
    # The broker's URL from the dispatcher's own Secret.
    assert authentication["spec"]["secretTargetRef"] == [
        {"parameter": "host", "name": url["name"], "key": url["key"]}]

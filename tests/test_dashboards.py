"""The shipped dashboard and alert rules: examples/grafana/amqp-dispatcher.json and
examples/prometheus/alerts.yml name only metrics a real service exports, and the rules
pass `promtool check rules` and their unit tests (`promtool test rules`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import REPO, BrokerHandle, DispatcherProcess, wait_until
from prometheus_client.parser import text_string_to_metric_families
from rabbitnode import free_port
from test_metrics import get

DASHBOARD = REPO / "examples" / "grafana" / "amqp-dispatcher.json"
ALERTS = REPO / "examples" / "prometheus" / "alerts.yml"
ALERT_TESTS = REPO / "examples" / "prometheus" / "alerts.test.yml"

# scripts/setup.sh installs Debian's prometheus package, which ships promtool (CI runs it).
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found: scripts/setup.sh installs it (Debian's "
                             "prometheus package); it could not be installed here")

# PromQL words that are not metric names.
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
            "group_right", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or Grafana's label_values()) selects."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings: label values, templates
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b\d+(?:\.\d+)?(?:ms|[smhdwy])?\b", " ", expr)  # numbers, durations
    # Label lists: by (...), on (...), group_left (...), and label_values(metric, LABEL).
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r",\s*[a-zA-Z_]\w*\s*\)", ")", expr)
    names = set()
    for match in re.finditer(r"\$?[a-zA-Z_:][\w:]*(\s*\()?", expr):
        word = match.group(0)
        if word.startswith("$") or match.group(1) or word in KEYWORDS:
            continue  # a Grafana variable, a function or aggregation, a keyword
        names.add(word)
    return names


def test_metric_names_are_found_in_expressions() -> None:
    assert metric_names('sum by (queue, le) (rate(a_bucket{job=~"$job"}[$__rate_interval]))'
                        ' / on (job) group_left b > 0.1 and c{x="y z"} offset 5m') == \
        {"a_bucket", "b", "c"}
    assert metric_names('label_values(amqp_dispatcher_consuming{job=~"$job"}, queue)') == \
        {"amqp_dispatcher_consuming"}


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    found += [variable["query"]["query"] for variable in dashboard["templating"]["list"]
              if variable["type"] == "query"]
    return found


def alert_expressions() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


CONFIG = """
http:
  port: {port}
  queue_depth_interval: 1
stats_interval: 0
queues:
  - queue: orders
consumers:
  - consumer: testconsumers:Outcomes
    queue: orders
    retry:
      max_attempts: 2
      delay: 0.1
      dead_letter_queue: orders.dead
    # Never trips here: for its amqp_dispatcher_circuit_* series.
    circuit_breaker: {{failure_ratio: 1, min_calls: 1000, window: 10, open_for: 60}}
"""


def test_every_metric_the_dashboard_and_the_alerts_name_is_exported(
        broker: BrokerHandle, tmp_path: Path) -> None:
    port = free_port()
    # --processes: the arbiter's /metrics has every family of a worker's, and its own.
    proc = DispatcherProcess(tmp_path, CONFIG.format(port=port), broker.url,
                             args=("--processes", "2"))
    try:
        proc.wait_for_log("all 2 workers consuming")
        broker.publish("orders", "ack-1")
        broker.publish("orders", "always-1")

        def exported() -> set[str]:
            status, text = get(port, "/metrics")
            assert status == 200, text
            return {sample.name for family in text_string_to_metric_families(text)
                    for sample in family.samples}

        wait_until(lambda: "amqp_dispatcher_queue_messages_ready" in exported(),
                   what="the queue depth read")
        names = exported()
    finally:
        assert proc.stop() == 0, proc.output
    for what, expressions in (("dashboard", dashboard_expressions()),
                              ("alerts.yml", alert_expressions())):
        assert expressions, what
        for expr in expressions:
            selected = metric_names(expr)
            assert selected, (what, expr)
            assert selected <= names, (f"{what}: {expr!r} names {selected - names}, "
                                       f"which /metrics does not have")


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "amqp-dispatcher"
    titles = [panel["title"] for panel in dashboard["panels"]]
    for title in ("Throughput by outcome", "Failure ratio", "Consume latency",
                  "In flight vs instances", "Queue depth", "Reconnects", "Blocked hub"):
        assert title in titles
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]


@needs_promtool
def test_promtool_checks_the_alert_rules() -> None:
    result = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout


@needs_promtool
def test_promtool_unit_tests_the_alert_rules() -> None:
    result = subprocess.run([PROMTOOL, "test", "rules", str(ALERT_TESTS)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout

"""The docs say what the code does: the reference pages' generated parts match the code
they are made from, every key, flag, variable, exit status, metric and signal has its
entry, the code a page shows is a file the suite runs, and the README fits on a screen
with an example that works."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import REPO, BrokerHandle, DispatcherProcess, run_cli, wait_until
from prometheus_client.parser import text_string_to_metric_families
from rabbitnode import free_port

sys.path.insert(0, str(REPO / "scripts"))

import docs  # noqa: E402
from amqpdispatcher.cli import build_parser  # noqa: E402
from amqpdispatcher.config.keys import _Key  # noqa: E402
from amqpdispatcher.config.top_level import TOP_LEVEL_KEYS  # noqa: E402
from amqpdispatcher.contracts import exits  # noqa: E402
from amqpdispatcher.contracts.environment import VARIABLES  # noqa: E402
from amqpdispatcher.contracts.metrics import BY_NAME  # noqa: E402
from amqpdispatcher.contracts.signals import REFERENCE  # noqa: E402
from amqpdispatcher.testing import Harness  # noqa: E402

DOCS = REPO / "docs"
PACKAGE = REPO / "amqpdispatcher"


def page(path: str) -> str:
    return (DOCS / path).read_text(encoding="utf-8")


# -- generated parts --------------------------------------------------------------------

def test_every_generated_part_is_up_to_date_and_on_one_page() -> None:
    assert docs.main(["--check"]) == 0, "run .venv/bin/python scripts/docs.py"
    for name in docs.PARTS:
        holders = [p.relative_to(DOCS) for p in docs.pages()
                   if f"<!-- generated: {name} " in p.read_text(encoding="utf-8")]
        assert len(holders) == 1, (name, holders)


def test_check_mode_fails_on_an_out_of_date_part(tmp_path: Path) -> None:
    text = page("reference/exit-statuses.md")
    table = exits.markdown_table()
    assert table in text
    stale = text.replace(table, table.replace("| 2 |", "| 9 |"))
    assert docs.generated(stale) == text  # made anew from the code
    copy = tmp_path / "exit-statuses.md"
    copy.write_text(stale, encoding="utf-8")
    script = [sys.executable, str(REPO / "scripts" / "docs.py")]
    result = subprocess.run([*script, "--check", str(copy)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert "exit-statuses.md: a generated part is out of date" in result.stderr
    assert subprocess.run([*script, str(copy)], timeout=60).returncode == 0
    assert copy.read_text(encoding="utf-8") == text


# -- every thing that exists has its entry ----------------------------------------------

def _keys(keys: dict[str, _Key], path: str) -> list[tuple[str, str, _Key]]:
    found = []
    for name, spec in keys.items():
        found.append((path, name, spec))
        if spec.entries is not None:
            suffix = "[]" if list in spec.types else ""
            found += _keys(spec.entries, f"{path}.{name}{suffix}" if path else name + suffix)
    return found


def test_every_config_key_has_a_description_and_a_reference_entry() -> None:
    text = page("reference/config.md")
    for path, name, spec in _keys(TOP_LEVEL_KEYS, ""):
        assert spec.doc, f"{path}.{name}: give its _Key a doc="
        heading = f"### `{path}`" if path else "### top level"
        section = text[text.index(heading + "\n"):]
        section = section[:section.find("\n### ", 1) if "\n### " in section[1:] else None]
        assert f"| `{name}` |" in section, f"{path}.{name} is not under {heading}"


def test_every_flag_has_help_and_a_reference_entry() -> None:
    text = page("reference/cli.md")
    for action in build_parser()._actions:
        assert action.help, action.option_strings
        for flag in action.option_strings:
            assert f"`{flag}" in text or f", {flag}" in text, flag
        if not isinstance(action, argparse._HelpAction):
            assert any(f"`{flag}" in text for flag in action.option_strings)


# WSGI request variables (the endpoint's), not the process's environment.
_WSGI = {"CONTENT_LENGTH", "HTTP_TRANSFER_ENCODING", "PATH_INFO", "REQUEST_METHOD"}


def test_every_environment_variable_read_has_a_reference_entry() -> None:
    read = set()
    for source in PACKAGE.rglob("*.py"):
        text = source.read_text(encoding="utf-8")
        read |= set(re.findall(r"environ(?:\.get|\.pop)?[\[(]\s*[\"']([A-Z][A-Z0-9_]+)[\"']", text))
        read |= set(re.findall(r"getenv\(\s*[\"']([A-Z][A-Z0-9_]+)[\"']", text))
    read -= _WSGI
    assert {"RABBITMQ_URL", "RABBITMQ_HEARTBEAT", "LOGGING_FILE_CONFIG", "LOG_FORMAT"} <= read
    documented = {v.name for v in VARIABLES}
    assert read <= documented, read - documented
    text = page("reference/environment.md")
    for variable in VARIABLES:
        assert f"`{variable.name}`" in text


def test_every_exit_status_has_a_reference_entry() -> None:
    constants = {value for name, value in vars(exits).items()
                 if name.startswith("EXIT_") and isinstance(value, int)}
    listed = {int(number) for status in exits.STATUSES
              for number in re.findall(r"\d+", status.status)}
    assert constants <= listed, constants - listed
    text = page("reference/exit-statuses.md")
    for status in exits.STATUSES:
        assert f"| {status.status} | {status.meaning} |" in text


def test_every_signal_acted_on_has_a_reference_entry() -> None:
    listed = {name for row in REFERENCE for name in re.findall(r"SIG[A-Z0-9]+", row.names)}
    assert docs.signal_names() <= listed, docs.signal_names() - listed
    text = page("reference/signals.md")
    for row in REFERENCE:
        assert f"| {row.names} |" in text


def _served(port: int) -> set[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    names = set()
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        if name.startswith("amqp_dispatcher_"):
            names.add(name)
    return names


@pytest.mark.parametrize("processes", [1, 2])
def test_every_metric_served_has_a_reference_entry(broker: BrokerHandle, tmp_path: Path,
                                                   processes: int) -> None:
    port = free_port()
    config = (f"http: {{port: {port}}}\nstats_interval: 0\nqueues:\n  - queue: q\n"
              "consumers:\n  - {consumer: testconsumers:Recorder, queue: q}\n")
    dispatcher = DispatcherProcess(tmp_path, config, url=broker.url,
                                   args=("--processes", str(processes)))
    try:
        dispatcher.wait_consuming(count=processes)
        broker.publish("q", b"1")
        wait_until(lambda: dispatcher.records() == ["1"], 30, "the message handled")
        served = _served(port)
    finally:
        assert dispatcher.stop() == 0
    assert "amqp_dispatcher_messages_total" in served
    assert served <= set(BY_NAME), served - set(BY_NAME)
    if processes > 1:
        assert "amqp_dispatcher_workers" in served
    text = page("reference/metrics.md")
    for name in BY_NAME:
        assert f"| `{name}` |" in text


# -- pages ------------------------------------------------------------------------------

def _nav_pages(nav: list[object]) -> list[str]:
    found: list[str] = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        found += _nav_pages(value) if isinstance(value, list) else [str(value)]
    return found


def test_every_page_is_in_the_navigation() -> None:
    nav = _nav_pages(yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in docs.pages())
    assert sorted(nav) == pages


def test_code_a_page_shows_is_included_from_a_file() -> None:
    """A consumer module or a whole config shown on a page is a file of examples/ (that the
    suite runs), included with --8<--, never a copy that could drift."""
    copies = []
    for path in docs.pages():
        for lang, body in re.findall(r"```(\w*)\n(.*?)```", path.read_text(), re.S):
            if "--8<--" in body:
                continue
            if (lang == "python" and "def consume(" in body) or (
                    lang == "yaml" and re.search(r"^consumers:", body, re.M)):
                copies.append(f"{path.relative_to(DOCS)}: {body[:60]!r}")
    assert copies == []


def test_every_included_example_config_validates(tmp_path: Path) -> None:
    included = set()
    for path in docs.pages():
        included |= {name for name in re.findall(r'--8<-- "([^"]+\.ya?ml)"', path.read_text())
                     if re.search(r"^consumers:", (REPO / name).read_text(), re.M)}
    assert "examples/quickstart/config.yml" in included
    for name in sorted(included):
        config = REPO / name
        result = run_cli(tmp_path, "--validate", "--config", str(config),
                         env={"PYTHONPATH": f"{config.parent}:{REPO}"})
        assert result.returncode == 0, (name, result.stderr)


# -- the README -------------------------------------------------------------------------

def test_the_readme_fits_on_a_screen_and_its_example_works(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150
    module = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    config = yaml.safe_load(re.search(r"```yaml\n(.*?)```", readme, re.S).group(1))
    (tmp_path / "greeter.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("greeter", None)
    try:
        with Harness(config) as h:
            h.publish("", "greetings", b'{"name": "Ada"}')
            h.publish("", "greetings", b'{"nom": "?"}')
            h.run()
            assert h.outcomes("greetings") == {"ack": 1, "requeue": 0, "reject": 0,
                                               "retry": 2, "dead_letter": 1}
            assert h.messages("greetings.failed") == [b'{"nom": "?"}']
    finally:
        sys.modules.pop("greeter", None)
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (REPO / link).exists(), link

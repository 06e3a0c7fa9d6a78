"""The quickstart (docs/getting-started/quickstart.md) as a newcomer follows it: its
files in examples/quickstart/, run as the page says, against a real broker."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from helpers import REPO, BrokerHandle, DispatcherProcess, wait_until

QUICKSTART = REPO / "examples" / "quickstart"
PAGE = REPO / "docs" / "getting-started" / "quickstart.md"


def test_the_quickstart_runs_as_the_page_says(broker: BrokerHandle, tmp_path: Path) -> None:
    page = PAGE.read_text(encoding="utf-8")
    for name in ("greeter.py", "config.yml", "publish.py", "test_greeter.py"):
        assert f'--8<-- "examples/quickstart/{name}"' in page  # shown as they are run
    # The page runs the dispatcher from the directory holding greeter.py: the working
    # directory is on sys.path, as with python -m.
    dispatcher = DispatcherProcess(tmp_path, (QUICKSTART / "config.yml").read_text(),
                                   url=broker.url, env={"PYTHONPATH": str(QUICKSTART)})
    try:
        dispatcher.wait_consuming()
        published = subprocess.run([sys.executable, "publish.py"], cwd=QUICKSTART,
                                   env={"RABBITMQ_URL": broker.url, "PATH": "/usr/bin:/bin"},
                                   capture_output=True, text=True, timeout=60)
        assert published.returncode == 0, published.stderr
        assert published.stdout.count("published") == 3
        dispatcher.wait_for_log(r"Hello, Ada! \(attempt 1\)")
        dispatcher.wait_for_log(r"Hello, Grace! \(attempt 1\)")
        # The third has no name: tried three times (1 s, then 2 s apart), then moved.
        wait_until(lambda: broker.ready("greetings.failed") == 1, 30,
                   "the nameless message in greetings.failed")
        assert dispatcher.output.count("ValueError: no name in") >= 1
        assert broker.get_all("greetings.failed") == [b'{"nom": "?"}']
        dispatcher.signal(signal.SIGTERM)
        assert dispatcher.wait() == 0
        assert "greeter stopping after" in dispatcher.output
        assert broker.drained("greetings")
    finally:
        dispatcher.stop()


def test_the_quickstart_tests_pass_as_the_page_runs_them() -> None:
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "test_greeter.py"], cwd=QUICKSTART, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_the_stream_example_reads_every_entry_from_the_first(broker: BrokerHandle,
                                                              tmp_path: Path) -> None:
    """examples/audit.yml and audit.py, shown in docs/guides/topology.md ("Streams")."""
    examples = REPO / "examples"
    config = (examples / "audit.yml").read_text()
    first = DispatcherProcess(tmp_path, config, url=broker.url,
                              env={"PYTHONPATH": str(examples)})
    try:
        first.wait_consuming()
        for n in range(3):
            broker.publish("audit_log", f"entry {n}".encode())
        for n in range(3):
            first.wait_for_log(rf"audit entry {n}: entry {n}")
        assert first.stop() == 0
    finally:
        first.stop()
    # A stream keeps what was read: the next start reads it again from the first entry.
    again = tmp_path / "again"
    again.mkdir()
    second = DispatcherProcess(again, config, url=broker.url, env={"PYTHONPATH": str(examples)})
    try:
        for n in range(3):
            second.wait_for_log(rf"audit entry {n}: entry {n}")
    finally:
        assert second.stop() == 0

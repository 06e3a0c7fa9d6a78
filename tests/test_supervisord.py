"""The dispatcher under a real supervisord, with the stop settings of
examples/supervisord.conf: `supervisorctl stop` drains, nothing is lost; with
--processes, `supervisorctl signal HUP` reloads first."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, SCRIPT, TESTS, BrokerHandle, wait_until

from amqpdispatcher.cli import parse_args


def example_program() -> configparser.SectionProxy:
    example = configparser.RawConfigParser()
    example.read(REPO / "examples" / "supervisord.conf")
    return example["program:amqp-dispatcher"]


def test_example_runs_the_arbiter() -> None:
    program = example_program()
    assert parse_args(program["command"].split()[1:]).processes >= 1  # --processes auto
    assert program["stopsignal"] == "TERM" and int(program["stopwaitsecs"]) > 30


@pytest.mark.parametrize("processes", [1, 2])
def test_supervisorctl_stop_drains(broker: BrokerHandle, tmp_path: Path, processes: int) -> None:
    broker.declare("jobs", durable=True)
    for i in range(40):
        broker.publish("jobs", f"j{i}", delivery_mode=2)
    (tmp_path / "config.yml").write_text(
        "queues:\n  - queue: jobs\n"
        "consumers:\n  - consumer: testconsumers:Faulty\n    queue: jobs\n"
        "    consumer_count: 4\n    prefetch_count: 8\n")
    record = tmp_path / "record.txt"
    pythonpath = os.pathsep.join([str(TESTS / "consumers"), str(REPO)])
    # Percent signs are supervisord's interpolation; the URL has %2F-style escapes.
    url = broker.url.replace("%", "%%")
    example = example_program()
    (tmp_path / "supervisord.conf").write_text(f"""
[supervisord]
nodaemon=true
logfile={tmp_path}/supervisord.log
pidfile={tmp_path}/supervisord.pid
[unix_http_server]
file={tmp_path}/supervisor.sock
[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
[supervisorctl]
serverurl=unix://{tmp_path}/supervisor.sock
[program:dispatcher]
command={SCRIPT} --processes {processes} --config {tmp_path}/config.yml
directory={tmp_path}
environment=RABBITMQ_URL="{url}",PYTHONPATH="{pythonpath}",RECORD_FILE="{record}",FAIL_RATE="0",PAUSE="2"
stopsignal={example["stopsignal"]}
stopwaitsecs={example["stopwaitsecs"]}
autorestart={example["autorestart"]}
exitcodes={example["exitcodes"]}
startsecs=1
redirect_stderr=true
stdout_logfile={tmp_path}/dispatcher.log
""")
    bin_dir = Path(sys.executable).parent
    supervisord = subprocess.Popen([str(bin_dir / "supervisord"), "-c",
                                    str(tmp_path / "supervisord.conf")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(bin_dir / "supervisorctl"), "-c",
                               str(tmp_path / "supervisord.conf"), *args],
                              capture_output=True, text=True, timeout=60)

    def records() -> list[str]:
        return record.read_text().split() if record.exists() else []

    try:
        wait_until(lambda: "RUNNING" in ctl("status", "dispatcher").stdout,
                   what="program running")
        wait_until(lambda: len([r for r in records() if r.startswith("start:")]) >= 4,
                   what="four messages in consume")
        if processes > 1:
            assert "dispatcher: signalled" in ctl("signal", "HUP", "dispatcher").stdout
            wait_until(lambda: "reloaded: the 2 new workers consume" in
                       (tmp_path / "dispatcher.log").read_text(), what="the reload")
        stop = ctl("stop", "dispatcher")
        assert "stopped" in stop.stdout, stop
        log = (tmp_path / "dispatcher.log").read_text()
        assert "finishing messages in progress" in log and "INFO: stopped" in log, log
        started = {r[6:] for r in records() if r.startswith("start:")}
        done = {r[5:] for r in records() if r.startswith("done:")}
        assert started == done, "messages in consume at stop were not finished"
        ready, unacked = broker.counts("jobs")
        assert unacked == 0
        assert ready == 40 - len(done), "a message was lost or left unacked"
        assert "STOPPED" in ctl("status", "dispatcher").stdout
        # Stopped by its own drain, not by supervisord's SIGKILL.
        assert "stopped: dispatcher (exit status 0)" in \
            (tmp_path / "supervisord.log").read_text()
    finally:
        ctl("shutdown")
        supervisord.wait(timeout=60)


def test_supervisord_restarts_a_recycled_process(broker: BrokerHandle, tmp_path: Path) -> None:
    """With the example's autorestart and exitcodes, status 7 (recycled) is restarted."""
    broker.declare("jobs", durable=True)
    for i in range(100):
        broker.publish("jobs", f"j{i}", delivery_mode=2)
    (tmp_path / "config.yml").write_text(
        "queues:\n  - queue: jobs\n"
        "consumers:\n  - consumer: testconsumers:Stamped\n    queue: jobs\n"
        "    consumer_count: 2\n    prefetch_count: 4\n    rate_limit: 100\n"
        "recycle_after_messages: 30\n")
    record = tmp_path / "record.txt"
    pythonpath = os.pathsep.join([str(TESTS / "consumers"), str(REPO)])
    url = broker.url.replace("%", "%%")
    example = example_program()
    (tmp_path / "supervisord.conf").write_text(f"""
[supervisord]
nodaemon=true
logfile={tmp_path}/supervisord.log
pidfile={tmp_path}/supervisord.pid
[unix_http_server]
file={tmp_path}/supervisor.sock
[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
[supervisorctl]
serverurl=unix://{tmp_path}/supervisor.sock
[program:dispatcher]
command={SCRIPT} --config {tmp_path}/config.yml
directory={tmp_path}
environment=RABBITMQ_URL="{url}",PYTHONPATH="{pythonpath}",RECORD_FILE="{record}"
stopsignal={example["stopsignal"]}
stopwaitsecs={example["stopwaitsecs"]}
autorestart={example["autorestart"]}
exitcodes={example["exitcodes"]}
startsecs=0
redirect_stderr=true
stdout_logfile={tmp_path}/dispatcher.log
""")
    bin_dir = Path(sys.executable).parent
    supervisord = subprocess.Popen([str(bin_dir / "supervisord"), "-c",
                                    str(tmp_path / "supervisord.conf")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(bin_dir / "supervisorctl"), "-c",
                               str(tmp_path / "supervisord.conf"), *args],
                              capture_output=True, text=True, timeout=60)

    def starts() -> list[list[str]]:
        lines = record.read_text().split() if record.exists() else []
        return [line.split(":") for line in lines if line.startswith("start:")]

    try:
        wait_until(lambda: len(starts()) >= 100 and broker.drained("jobs"), timeout=90,
                   what="every message consumed, across restarts")
        bodies = [fields[1] for fields in starts()]
        assert sorted(bodies) == sorted(f"j{i}" for i in range(100))  # each once
        assert len({fields[3] for fields in starts()}) >= 3  # recycled at least twice
        log = (tmp_path / "supervisord.log").read_text()
        assert "exited: dispatcher (exit status 7; not expected)" in log, log
    finally:
        ctl("shutdown")
        supervisord.wait(timeout=60)

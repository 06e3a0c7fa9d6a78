"""--processes: the first start, where every worker loads the config at once and the one
that finds problems tells the arbiter (contracts/link.py), which prints them once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

from helpers import REPO, SCRIPT, TESTS, BrokerHandle, DispatcherProcess, run_cli, wait_until
from test_processes import RECORDER, slow_worker_start

MISSING = "consumers:\n  - consumer: testconsumers:Missing\n    queue: jobs\n"
PROBLEM = "config.yml: consumers[0].consumer: cannot import 'testconsumers:Missing'"


def env_for(tmp_path: Path, url: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(TESTS / "consumers"), str(REPO)])
    env.pop("RABBITMQ_URL", None)
    if url:
        env["RABBITMQ_URL"] = url
    return env


class Arbiter:
    """The console script with --processes, its stderr read line by line."""

    def __init__(self, tmp_path: Path, *args: str, url: str | None = None) -> None:
        self.process = subprocess.Popen(
            [SCRIPT, *args], cwd=tmp_path, env=env_for(tmp_path, url),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        self.lines: list[str] = []

    def read_until(self, text: str) -> None:
        assert self.process.stderr is not None
        while text not in "".join(self.lines):
            line = self.process.stderr.readline()
            assert line, f"stderr ended before {text!r}:\n{''.join(self.lines)}"
            self.lines.append(line)

    def worker_pids(self) -> list[int]:
        return [int(pid) for pid in re.findall(r"\(pid (\d+)\) started", "".join(self.lines))]

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        assert self.process.stderr is not None
        rest = self.process.stderr.read()
        return self.process.wait(timeout=timeout), "".join(self.lines) + rest


def zombie(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def signal_once_every_worker_exited(arbiter: Arbiter, workers: int, signum: int) -> None:
    """The arbiter, stopped, learns of every worker's exit and of ``signum`` in the same
    turn of its loop: the signal is acted on first."""
    arbiter.read_until(f"worker {workers}/{workers} (pid")
    os.kill(arbiter.process.pid, signal.SIGSTOP)
    pids = arbiter.worker_pids()
    wait_until(lambda: all(zombie(pid) for pid in pids), what="every worker to exit")
    os.kill(arbiter.process.pid, signum)
    os.kill(arbiter.process.pid, signal.SIGCONT)


def test_problems_larger_than_the_link_buffer_are_printed_once(tmp_path: Path) -> None:
    (tmp_path / "bigerr.py").write_text('raise ImportError("x" * 400000)\n')
    config = "consumers:\n  - consumer: bigerr:C\n    queue: jobs\n"
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(TESTS / "consumers"),
                                          str(REPO)])}
    single = run_cli(tmp_path, "--config", "config.yml", config=config, env=env)
    assert single.returncode == 1 and single.stderr.count("raised ImportError") == 1
    result = run_cli(tmp_path, "--processes", "3", "--config", "config.yml", env=env)
    assert result.returncode == 1
    assert result.stderr.count("raised ImportError") == 1
    printed = [line for line in result.stderr.splitlines() if line.startswith("config.yml")]
    assert printed == single.stderr.splitlines()


def test_a_stop_while_failing_workers_exit_prints_the_problems_once_and_exits_1(
        tmp_path: Path) -> None:
    (tmp_path / "config.yml").write_text(MISSING)
    for signum in (signal.SIGTERM, signal.SIGINT):
        arbiter = Arbiter(tmp_path, "--processes", "3", "--config", "config.yml")
        signal_once_every_worker_exited(arbiter, 3, signum)
        status, stderr = arbiter.finish()
        assert stderr.count(PROBLEM) == 1, stderr
        assert status == 1, stderr


def test_workers_that_lose_the_broker_as_a_stop_begins_do_not_make_it_exit_3(
        tmp_path: Path) -> None:
    """Status 3 is never the arbiter's: such a worker would have been replaced."""
    (tmp_path / "config.yml").write_text(RECORDER)
    arbiter = Arbiter(tmp_path, "--processes", "2", "--config", "config.yml",
                      url="amqp://guest:guest@127.0.0.1:1/")
    signal_once_every_worker_exited(arbiter, 2, signal.SIGTERM)
    status, stderr = arbiter.finish()
    assert status == 0, stderr


def test_a_config_path_starting_with_a_dash(tmp_path: Path) -> None:
    """The workers and the reload's check get ``--config=PATH``, which argparse cannot
    take for another flag."""
    (tmp_path / "-c.yml").write_text(MISSING)
    result = run_cli(tmp_path, "--processes", "2", "--config=-c.yml")
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("-c.yml: consumers[0].consumer: cannot import") == 1, \
        result.stderr
    assert "expected one argument" not in result.stderr


def test_problems_are_printed_although_a_consumer_module_left_a_thread_running(
        tmp_path: Path) -> None:
    """A non-daemon thread the consumer code starts at import would hold the
    interpreter's exit for ever: a process that never ran the dispatcher does not wait
    for it. The problems are printed once, without a traceback."""
    (tmp_path / "threaded.py").write_text(
        "import threading, time\n"
        "threading.Thread(target=lambda: time.sleep(3600)).start()\n"
        "class C:\n    def consume(self, amqp, msg): pass\n"
        "    def shutdown(self, exception=None): pass\n")
    (tmp_path / "config.yml").write_text(
        "consumers:\n  - consumer: threaded:C\n    queue: jobs\n" + MISSING[len("consumers:\n"):])
    problem = "config.yml: consumers[1].consumer: cannot import 'testconsumers:Missing'"
    arbiter = Arbiter(tmp_path, "--processes", "2", "--config", "config.yml")
    arbiter.read_until(problem)
    status, stderr = arbiter.finish()
    assert status == 1, stderr
    assert stderr.count(problem) == 1, stderr
    assert "Traceback" not in stderr, stderr
    assert not [pid for pid in arbiter.worker_pids() if Path(f"/proc/{pid}").exists()]
    # The interpreter's exit does not wait for the thread: nothing of the consumer ran.
    single = run_cli(tmp_path, "--validate", "--config", "config.yml",
                     env={"PYTHONPATH": env_for(tmp_path)["PYTHONPATH"]})
    assert single.returncode == 1 and single.stderr.count(problem) == 1, single.stderr
    assert "the consumer code left 1 thread(s) running" in single.stderr


def test_a_reload_whose_new_workers_all_find_a_problem_logs_it_once(
        broker: BrokerHandle, tmp_path: Path) -> None:
    broker.declare("jobs", durable=True)
    proc = DispatcherProcess(tmp_path, RECORDER, broker.url, args=("--processes", "3"),
                             env=slow_worker_start(tmp_path))
    try:
        proc.wait_for_log("all 3 workers consuming", timeout=60)
        proc.signal(signal.SIGHUP)
        proc.wait_for_log("is valid: starting 3 new workers")
        proc.config_path.write_text(RECORDER.replace("Recorder", "Missing"))
        proc.wait_for_log("the running workers carry on unchanged")
        wait_until(lambda: proc.output.count(" of the cancelled reload ") == 2,
                   what="every new worker to exit")
        broker.publish("jobs", "after")
        wait_until(lambda: "after" in " ".join(proc.records()), what="the message consumed")
    finally:
        status = proc.stop()
    assert status == 0, proc.output
    logged = re.findall(r"ERROR: worker \d/3 \(pid \d+\): .*cannot import", proc.output)
    assert len(logged) == 1, proc.output

"""--processes N: an arbiter supervising N worker processes, on a real broker."""

from __future__ import annotations

import fcntl
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import pytest
from helpers import (
    REPO,
    SCRIPT,
    TESTS,
    BrokerHandle,
    DispatcherProcess,
    run_cli,
    wait_until,
)
from test_reload import config as reload_config
from test_reload import reloadable

from amqpdispatcher.cli import parse_args
from amqpdispatcher.supervision import arbiter as arbiter_module
from amqpdispatcher.supervision.arbiter import Arbiter, Worker

RECORDER = ("queues:\n  - queue: jobs\n"
            "consumers:\n  - consumer: testconsumers:Recorder\n    queue: jobs\n")


def workers(proc: DispatcherProcess, state: str = "consuming") -> dict[int, list[int]]:
    """Worker number -> the pids that logged ``state``, oldest first."""
    found: dict[int, list[int]] = {}
    for number, pid in re.findall(rf"worker (\d+)/\d+ \(pid (\d+)\) {state}", proc.output):
        found.setdefault(int(number), []).append(int(pid))
    return found


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # an orphan nobody has reaped yet
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def bodies(records: list[str], outcome: str) -> Counter[str]:
    return Counter(r.split(":", 1)[1] for r in records if r.startswith(f"{outcome}:"))


def slow_worker_start(tmp_path: Path) -> dict[str, str]:
    """Environment in which each worker's interpreter start, before amqp-dispatcher's
    code runs, takes 1 s longer (a sitecustomize, in workers only), first leaving a file
    starting-PID: the window a loaded machine opens anyway, made wide enough to hit."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os, time\n"
        "if os.environ.get('AMQP_DISPATCHER_WORKER'):\n"
        f"    open(os.path.join({str(tmp_path)!r}, f'starting-{{os.getpid()}}'), 'w').close()\n"
        "    time.sleep(1)\n")
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(TESTS / "consumers"), str(REPO)])}


def pids_running(text: str) -> list[int]:
    """The processes whose command line contains ``text``."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in out.splitlines()[1:] if text in line]


def kill_leftovers(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_killed_worker_is_replaced_and_nothing_is_lost(broker: BrokerHandle,
                                                       tmp_path: Path) -> None:
    total = 1500
    broker.declare("jobs", durable=True)
    for i in range(total):
        broker.publish("jobs", f"m{i}")
    config = ("queues:\n  - queue: jobs\n"
              "consumers:\n  - consumer: testconsumers:Faulty\n    queue: jobs\n"
              "    consumer_count: 4\n    prefetch_count: 8\n")
    proc = DispatcherProcess(tmp_path, config, broker.url, args=("--processes", "3"),
                             env={"FAIL_RATE": "0", "PAUSE": "0.02"})
    try:
        proc.wait_for_log("all 3 workers consuming")
        wait_until(lambda: sum(bodies(proc.records(), "done").values()) >= 200,
                   what="two hundred messages done")
        victim = workers(proc)[2][0]
        os.kill(victim, signal.SIGKILL)
        proc.wait_for_log(rf"worker 2/3 \(pid {victim}\) was killed by SIGKILL; "
                          "starting a new one")
        wait_until(lambda: len(workers(proc).get(2, [])) == 2, what="a new worker 2 consuming")
        wait_until(lambda: broker.drained("jobs"), what="every message acked")
        assert proc.process.poll() is None, "the arbiter stopped"
        done = bodies(proc.records(), "done")
    finally:
        assert proc.stop() == 0, proc.output
    assert set(done) == {f"m{i}" for i in range(total)}, "a message was lost"
    # Only what the killed worker had in hand (its prefetch) can have run twice.
    assert sum(done.values()) - total <= 8


def test_sigterm_drains_every_worker(broker: BrokerHandle, tmp_path: Path) -> None:
    broker.declare("jobs", durable=True)
    config = ("queues:\n  - queue: jobs\n"
              "consumers:\n  - consumer: testconsumers:Hostile\n    queue: jobs\n"
              "    consumer_count: 4\n    prefetch_count: 4\n")
    proc = DispatcherProcess(tmp_path, config, broker.url, args=("--processes", "3"))
    try:
        proc.wait_for_log("all 3 workers consuming")
        rows = broker.node.ctl("list_connections", "-q", "--no-table-headers",
                               "client_properties", "vhost")
        names = re.findall(r'"amqp-dispatcher \S+ pid (\d+) \w+ worker (\d)/3"', rows)
        assert sorted((int(n), int(pid)) for pid, n in names) == \
            sorted((n, pids[0]) for n, pids in workers(proc).items()), rows
        for i in range(12):  # each takes 1 s; 3 workers x 4 instances hold them all
            broker.publish("jobs", f"hold-{i}")
        wait_until(lambda: len(bodies(proc.records(), "start")) == 12,
                   what="twelve consume calls in progress")
        proc.signal(signal.SIGUSR1)  # passed on: every worker shows where its consumers are
        wait_until(lambda: proc.output.count("the stack of every greenlet follows") == 3,
                   what="three stack dumps")
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.output
    finally:
        proc.stop()
    records = proc.records()
    assert bodies(records, "done") == bodies(records, "start"), "a consume did not finish"
    assert len(bodies(records, "done")) == 12
    assert broker.counts("jobs") == (0, 0)
    assert "every worker stopped; exiting with status 0" in proc.output


@pytest.mark.parametrize(("signals", "status"), [((signal.SIGTERM, signal.SIGTERM), 143),
                                                 ((signal.SIGINT,), 130)])
def test_second_sigterm_or_sigint_stops_every_worker_at_once(
        broker: BrokerHandle, tmp_path: Path, signals: tuple[int, ...], status: int) -> None:
    broker.declare("jobs", durable=True)
    config = ("queues:\n  - queue: jobs\n"
              "consumers:\n  - consumer: testconsumers:Misbehaving\n    queue: jobs\n")
    proc = DispatcherProcess(tmp_path, config, broker.url, args=("--processes", "2"))
    try:
        proc.wait_for_log("all 2 workers consuming")
        broker.publish("jobs", "hang-forever")
        wait_until(lambda: "hanging:hang-forever" in proc.records(), what="a stuck consume")
        for signum in signals:
            proc.signal(signum)
            proc.wait_for_log(f"received {signal.Signals(signum).name}")
        assert proc.wait(timeout=20) == status, proc.output
    finally:
        proc.stop()
    # The worker in consume (not only the arbiter) stopped at once.
    assert re.search(r"amqp-dispatcher\[\d+\] INFO: received SIG(TERM while draining|INT): "
                     "stopping now", proc.output), proc.output
    wait_until(lambda: broker.has_counts("jobs", 1, 0), what="the message back in the queue")


def test_worker_that_keeps_failing_is_restarted_with_backoff(tmp_path: Path) -> None:
    """Status 3 (no broker) is not a config error: the worker is started again, 1 s, then
    2 s later...; SIGTERM meanwhile stops the service at once."""
    config = "consumers:\n  - consumer: testconsumers:Recorder\n    queue: jobs\n"
    proc = DispatcherProcess(tmp_path, config, "amqp://guest:guest@127.0.0.1:1/",
                             args=("--processes", "2"))
    try:
        proc.wait_for_log(r"worker 1/2 \(pid \d+\) exited with status 3; starting a new one in 1s")
        proc.wait_for_log(r"worker 1/2 \(pid \d+\) exited with status 3; starting a new one in 2s")
        proc.signal(signal.SIGTERM)
        # 0, or 3 if a worker's connection attempt failed just as the SIGTERM came.
        assert proc.wait(timeout=20) in (0, 3), proc.output
    finally:
        proc.stop()
    assert "exited with status 3 at start: stopping" not in proc.output


def test_worker_failing_at_start_stops_the_service(broker: BrokerHandle,
                                                   tmp_path: Path) -> None:
    broker.declare("jobs")
    config = "consumers:\n  - consumer: testconsumers:BadInit\n    queue: jobs\n"
    proc = DispatcherProcess(tmp_path, config, broker.url, args=("--processes", "2"))
    try:
        assert proc.wait(timeout=60) == 5, proc.output
    finally:
        proc.stop()
    assert re.search(r"worker \d/2 \(pid \d+\) exited with status 5 at start: stopping every "
                     r"worker", proc.output), proc.output
    assert len(workers(proc, "started")) == 2 and \
        all(len(pids) == 1 for pids in workers(proc, "started").values()), "a worker restarted"


def test_bad_config_is_reported_once_with_status_1(tmp_path: Path) -> None:
    """The workers start at once and each finds the problem; the arbiter prints it once
    and exits 1, starting none of them again."""
    config = "consumers:\n  - consumer: testconsumers:Missing\n    queue: jobs\n"
    result = run_cli(tmp_path, "--processes", "3", "--config", "config.yml", config=config)
    assert result.returncode == 1, result.stderr
    problem = "config.yml: consumers[0].consumer: cannot import 'testconsumers:Missing'"
    assert result.stderr.count(problem) == 1, result.stderr
    started = re.findall(r"worker (\d)/3 \(pid \d+\) started", result.stderr)
    assert sorted(started) == ["1", "2", "3"], result.stderr  # none started again
    assert "Traceback" not in result.stderr and not result.stdout
    # Many problems (kilobytes on the link, written just before the worker exits): all
    # printed, once each, as a single process prints them.
    config = "consumers:\n" + "".join(f"  - consumer: testconsumers:Missing{i}\n"
                                      f"    queue: jobs\n    prefetch_count: -{i + 1}\n"
                                      for i in range(30))
    single = run_cli(tmp_path, "--config", "config.yml", config=config)
    assert single.returncode == 1 and len(single.stderr) > 4096, single.stderr
    result = run_cli(tmp_path, "--processes", "2", "--config", "config.yml")
    assert result.returncode == 1, result.stderr
    printed = [line for line in result.stderr.splitlines() if line.startswith("config.yml")]
    assert printed == single.stderr.splitlines(), result.stderr
    for bad in ("0", "-1", "two"):
        result = run_cli(tmp_path, "--processes", bad, "--config", "config.yml")
        assert result.returncode == 2
        assert "--processes: expected a positive whole number or 'auto'" in result.stderr
    assert parse_args(["--processes", "auto"]).processes == len(os.sched_getaffinity(0))


def test_workers_drain_and_stop_when_the_arbiter_is_killed(broker: BrokerHandle,
                                                           tmp_path: Path) -> None:
    broker.declare("jobs", durable=True)
    config = ("drain_timeout: 10\nqueues:\n  - queue: jobs\n"
              "consumers:\n  - consumer: testconsumers:Hostile\n    queue: jobs\n"
              "    consumer_count: 2\n    prefetch_count: 2\n")
    proc = DispatcherProcess(tmp_path, config, broker.url, args=("--processes", "2"))
    try:
        proc.wait_for_log("all 2 workers consuming")
        pids = [found[0] for found in workers(proc).values()]
        for i in range(4):
            broker.publish("jobs", f"hold-{i}")
        wait_until(lambda: len(bodies(proc.records(), "start")) == 4,
                   what="four consume calls in progress")
        proc.process.kill()
        proc.process.wait()
        wait_until(lambda: all(gone(pid) for pid in pids), timeout=20,
                   what="the workers to stop")
    finally:
        proc.stop()
    assert proc.output.count("the arbiter is gone: finishing messages in progress") == 2
    assert bodies(proc.records(), "done") == bodies(proc.records(), "start")
    assert broker.counts("jobs") == (0, 0)


def test_sighup_with_a_broken_config_changes_nothing(broker: BrokerHandle,
                                                     tmp_path: Path) -> None:
    (tmp_path / "reloadable.py").write_text(reloadable(1))
    proc = DispatcherProcess(tmp_path, reload_config(1), broker.url,
                             args=("--processes", "2"))
    try:
        proc.wait_for_log("all 2 workers consuming")
        proc.config_path.write_text(
            "consumers:\n  - consumer: reloadable:Missing\n    queue: jobs\n"
            "    consumer_count: -1\n")
        validate = run_cli(tmp_path, "--validate", "--config", str(proc.config_path),
                           env={"RECORD_FILE": str(proc.record)})
        assert validate.returncode == 1
        proc.signal(signal.SIGHUP)
        proc.wait_for_log("SIGHUP: .* has problems")
        logged = [line.split(" ERROR: ", 1)[1] for line in proc.output.splitlines()
                  if "arbiter" in line and " ERROR: " in line]
        assert logged[:-1] == validate.stderr.splitlines()
        for i in range(10):
            broker.publish("jobs", f"after-{i}")
        wait_until(lambda: sum(r.startswith("done:v1:after-") for r in proc.records()) == 10,
                   what="the running workers consume")
        assert len(workers(proc, "started")) == 2
        assert all(len(pids) == 1 for pids in workers(proc, "started").values())
    finally:
        assert proc.stop() == 0, proc.output


def test_sighup_deploys_new_config_and_code_under_load(broker: BrokerHandle,
                                                       tmp_path: Path) -> None:
    total = 1000
    broker.declare("jobs", durable=True)
    for i in range(total):
        broker.publish("jobs", f"m{i}")
    (tmp_path / "reloadable.py").write_text(reloadable(1))
    proc = DispatcherProcess(tmp_path, reload_config(2), broker.url,
                             args=("--processes", "2"))
    try:
        wait_until(lambda: sum(r.startswith("done:v1:") for r in proc.records()) >= 150,
                   what="150 messages done by the first workers")
        (tmp_path / "reloadable.py").write_text(reloadable(2))
        proc.config_path.write_text(reload_config(3))
        proc.signal(signal.SIGHUP)
        proc.wait_for_log("reloaded: the 2 new workers consume")
        wait_until(lambda: proc.output.count("of the previous set stopped") == 2,
                   what="the previous workers to stop")
        wait_until(lambda: broker.drained("jobs"), what="every message acked")
        assert proc.process.poll() is None
        records = proc.records()
    finally:
        assert proc.stop() == 0, proc.output
    done = Counter(r.split(":", 2)[2] for r in records if r.startswith("done:"))
    assert set(done) == {f"m{i}" for i in range(total)}, "a message was lost"
    # At most what was in flight (2 workers x prefetch 4) could be handled twice.
    assert sum(done.values()) - total <= 8
    assert records.count("init:v1") == 2 * 2 and records.count("init:v2") == 2 * 3
    assert any(r.startswith("done:v2:") for r in records)
    started_v1 = {r[9:] for r in records if r.startswith("start:v1:")}
    assert started_v1 == {r[8:] for r in records if r.startswith("done:v1:")}


def test_replacement_failing_at_start_is_started_again_once_the_service_consumed(
        broker: BrokerHandle, tmp_path: Path) -> None:
    """Only the first start's 1, 4 or 5 is a config error. Here the service consumed,
    then a worker died and its replacement's constructor met a dependency that was down
    for a while (exit 5): it is started again with the backoff, never stopping the
    service (systemd's RestartPreventExitStatus=1 4 5 would never restart it)."""
    broker.declare("jobs", durable=True)
    (tmp_path / "flaky.py").write_text(
        "import os\n"
        "class C:\n"
        "    def __init__(self):\n"
        "        if os.path.exists('db-down'):\n"
        "            raise ConnectionError('database unreachable')\n"
        "    def consume(self, amqp, msg): pass\n"
        "    def shutdown(self, exception=None): pass\n")
    config = "queues:\n  - queue: jobs\nconsumers:\n  - consumer: flaky:C\n    queue: jobs\n"
    proc = DispatcherProcess(tmp_path, config, broker.url, args=("--processes", "2"))
    try:
        proc.wait_for_log("all 2 workers consuming")
        (tmp_path / "db-down").write_text("")
        os.kill(workers(proc)[1][0], signal.SIGKILL)
        proc.wait_for_log(r"worker 1/2 \(pid \d+\) exited with status 5 \(the startup handler "
                          r"or a consumer constructor raised\) before it consumed; starting a "
                          r"new one in 2s")
        (tmp_path / "db-down").unlink()  # the dependency is back
        wait_until(lambda: len(workers(proc).get(1, [])) == 2, what="a new worker 1 consuming")
        assert proc.process.poll() is None
    finally:
        assert proc.stop() == 0, proc.output
    assert re.search(r"amqp-dispatcher.arbiter\[\d+\] ERROR: worker 1/2 \(pid \d+\) exited "
                     r"with status 5", proc.output), proc.output


def test_replacement_finding_a_config_problem_logs_it_and_is_started_again(
        broker: BrokerHandle, tmp_path: Path) -> None:
    """After the first start, a config problem a replacement finds (the file edited on
    disk) is logged at ERROR, named by worker, and the replacement is started again with
    the backoff; nothing is printed as at the first start."""
    broker.declare("jobs", durable=True)
    proc = DispatcherProcess(tmp_path, RECORDER, broker.url, args=("--processes", "2"))
    try:
        proc.wait_for_log("all 2 workers consuming")
        proc.config_path.write_text(RECORDER.replace("Recorder", "Missing"))
        os.kill(workers(proc)[1][0], signal.SIGKILL)
        proc.wait_for_log(r"ERROR: worker 1/2 \(pid \d+\): .*config.yml: consumers\[0\]"
                          r"\.consumer: cannot import 'testconsumers:Missing'")
        proc.wait_for_log(r"worker 1/2 \(pid \d+\) exited with status 1 \(the config or the "
                          r"environment has a problem\) before it consumed; starting a new one")
        proc.config_path.write_text(RECORDER)
        wait_until(lambda: len(workers(proc).get(1, [])) == 2, what="a new worker 1 consuming")
        broker.publish("jobs", "after")
        wait_until(lambda: "after" in " ".join(proc.records()), what="the message consumed")
    finally:
        assert proc.stop() == 0, proc.output
    assert proc.output.count("cannot import 'testconsumers:Missing'") >= 1
    assert not re.search(r"^config.yml: ", proc.output, re.M), proc.output  # logged, not printed


def test_sigusr1_is_passed_on_only_to_workers_that_handle_it(broker: BrokerHandle,
                                                            tmp_path: Path) -> None:
    """A worker still starting its interpreter has no handler: SIGUSR1's default action
    would kill it. It gets SIGUSR1 once it has reported 'started'."""
    broker.declare("jobs", durable=True)
    proc = DispatcherProcess(tmp_path, RECORDER, broker.url, args=("--processes", "2"),
                             env=slow_worker_start(tmp_path))
    try:
        wait_until(lambda: len(list(tmp_path.glob("starting-*"))) == 2,
                   what="both workers' interpreters starting")
        proc.signal(signal.SIGUSR1)
        # Both, unless the machine is so slow that one got past its 1 s meanwhile.
        proc.wait_for_log("received SIGUSR1: passed on to every worker but the [12] starting "
                          "their interpreter")
        proc.wait_for_log("all 2 workers consuming")
        dumps = proc.output.count("the stack of every greenlet follows")
        proc.signal(signal.SIGUSR1)
        wait_until(lambda: proc.output.count("the stack of every greenlet follows") >= dumps + 2,
                   what="both workers' stacks")
    finally:
        assert proc.stop() == 0, proc.output
    assert "killed by SIGUSR1" not in proc.output, proc.output


def test_sighup_during_the_start_reloads_once_the_workers_consume(
        broker: BrokerHandle, tmp_path: Path) -> None:
    """A SIGHUP during the start is acted on once every worker consumes, once."""
    broker.declare("jobs", durable=True)
    (tmp_path / "slowimport.py").write_text(
        "import time\ntime.sleep(1)\n"
        "class C:\n    def consume(self, amqp, msg): pass\n"
        "    def shutdown(self, exception=None): pass\n")
    config = "queues:\n  - queue: jobs\nconsumers:\n  - consumer: slowimport:C\n    queue: jobs\n"
    proc = DispatcherProcess(tmp_path, config, broker.url, args=("--processes", "2"))
    try:
        proc.wait_for_log("arbiter pid")  # logged as the workers start
        proc.signal(signal.SIGHUP)
        proc.wait_for_log("received SIGHUP: reloading once the start, check or reload in "
                          "progress is done")
        proc.wait_for_log("all 2 workers consuming")
        proc.wait_for_log("reloading again, for the SIGHUP received meanwhile")
        proc.wait_for_log("reloaded: the 2 new workers consume")
        proc.signal(signal.SIGHUP)  # one more reload, not two
        wait_until(lambda: proc.output.count("reloaded: the 2 new workers consume") == 2,
                   what="the second reload")
        wait_until(lambda: proc.output.count("of the previous set stopped") == 4,
                   what="both previous sets to stop")
        assert proc.output.count("received SIGHUP: checking") == 1
    finally:
        assert proc.stop() == 0, proc.output


def fake_worker(made: list[Worker], consuming: bool) -> tuple[Worker, socket.socket]:
    """A Worker whose process is a real child that waits (for the arbiter's logic), and
    the worker's end of its link."""
    ours, theirs = socket.socketpair()
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    worker = Worker(1, 1, process, ours, time.monotonic(), "", started=True, consuming=consuming)
    made.append(worker)
    return worker, theirs


def test_arbiter_reads_a_link_at_a_file_descriptor_above_1023(tmp_path: Path) -> None:
    """select.select refuses a descriptor >= 1024 (ValueError): a worker spawned while
    the arbiter had many files open (its endpoint's connections) once got such a link,
    and the arbiter exited 70, taking every worker down."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1100:
        pytest.skip(f"RLIMIT_NOFILE's hard limit is {hard}")
    (tmp_path / "config.yml").write_text(RECORDER)
    arbiter = Arbiter(str(tmp_path / "config.yml"), 1)
    made: list[Worker] = []
    worker, their_end = fake_worker(made, consuming=False)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1100), hard))
    try:
        high = fcntl.fcntl(worker.link.fileno(), fcntl.F_DUPFD_CLOEXEC, 1024)
        worker.link.close()
        worker.link = socket.socket(fileno=high)
        arbiter.workers, arbiter.serving = [worker], {1: worker}
        their_end.send(b"started\nconsuming\n")
        arbiter._read_links(5)
        assert worker.started and worker.consuming
    finally:
        for worker in made:
            worker.process.kill()
            worker.process.wait()
            worker.link.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_new_set_consuming_during_a_stop_hands_nothing_over(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """SIGTERM during a reload, then a new worker's 'consuming' line (written just before
    it got the stop's SIGTERM): the old workers, draining since the stop, must not get
    a second SIGTERM (stop at once)."""
    caplog.set_level(logging.INFO)
    (tmp_path / "config.yml").write_text(RECORDER)
    arbiter = Arbiter(str(tmp_path / "config.yml"), 1)
    made: list[Worker] = []
    old, _old_end = fake_worker(made, consuming=True)
    new, new_end = fake_worker(made, consuming=False)
    arbiter.workers, arbiter.serving, arbiter.new_set = [old, new], {1: old}, {1: new}
    sent: list[tuple[Worker, int]] = []
    arbiter._send = lambda worker, signum: sent.append((worker, signum))  # type: ignore[method-assign]
    try:
        arbiter._on_term(signal.SIGTERM)
        new_end.send(b"consuming\n")
        arbiter._read_link(new)
    finally:
        for worker in made:
            worker.process.kill()
            worker.process.wait()
    assert sent == [(old, signal.SIGTERM), (new, signal.SIGTERM)]
    assert "reloaded:" not in caplog.text


def test_reload_whose_new_workers_do_not_consume_in_time_is_cancelled(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.yml").write_text(RECORDER)
    arbiter = Arbiter(str(tmp_path / "config.yml"), 1)
    made: list[Worker] = []
    old, _old_end = fake_worker(made, consuming=True)
    new, _new_end = fake_worker(made, consuming=False)
    arbiter.workers, arbiter.serving, arbiter.new_set = [old, new], {1: old}, {1: new}
    arbiter.running = True
    sent: list[tuple[Worker, int]] = []
    arbiter._send = lambda worker, signum: sent.append((worker, signum))  # type: ignore[method-assign]
    monkeypatch.setattr(arbiter_module, "RELOAD_TIMEOUT", 0.2)
    try:
        arbiter.reload_deadline = time.monotonic() + arbiter_module.RELOAD_TIMEOUT
        arbiter._reload_timeout_due()
        assert arbiter.new_set is not None and not sent  # not yet
        wait_until(lambda: time.monotonic() >= arbiter.reload_deadline, what="the deadline")
        arbiter._reload_timeout_due()
    finally:
        for worker in made:
            worker.process.kill()
            worker.process.wait()
    assert arbiter.new_set is None and arbiter.serving == {1: old}
    assert sent == [(new, signal.SIGTERM)]
    assert "SIGHUP: the new workers did not all consume within 0.2s: the running workers " \
           "carry on unchanged" in caplog.text
    assert new.retired == "of the cancelled reload"


def test_worker_stuck_in_blocking_code_exits_soon_after_the_arbiter_is_killed(
        broker: BrokerHandle, tmp_path: Path) -> None:
    """A consume in blocking code (an unpatched sleep) holds the worker's hub, so the
    drain never starts; its watchdog thread ends it drain_timeout + 10 s after the arbiter
    died (workers run in sessions of their own: a supervisor's kill misses them)."""
    broker.declare("jobs", durable=True)
    (tmp_path / "blocking.py").write_text(
        "import os, time\n"
        "class C:\n"
        "    def consume(self, amqp, msg):\n"
        "        open(os.environ['RECORD_FILE'], 'a').write('start\\n')\n"
        "        time.sleep(60)\n"
        "    def shutdown(self, exception=None): pass\n")
    config = ("drain_timeout: 1\nqueues:\n  - queue: jobs\n"
              "consumers:\n  - consumer: blocking:C\n    queue: jobs\n")
    proc = DispatcherProcess(tmp_path, config, broker.url, args=("--processes", "2"))
    pids: list[int] = []
    try:
        proc.wait_for_log("all 2 workers consuming")
        pids = [found[0] for found in workers(proc).values()]
        broker.publish("jobs", "x")
        wait_until(lambda: "start" in proc.records(), what="a blocked consume")
        proc.process.kill()  # supervisord's SIGKILL once stopwaitsecs ran out
        proc.process.wait()
        killed = time.monotonic()
        wait_until(lambda: all(gone(pid) for pid in pids), timeout=1 + 10 + 5,
                   what="every worker to stop within drain_timeout + 10 s")
        assert time.monotonic() - killed > 1 + 10 - 1  # the drain had its time
    finally:
        kill_leftovers(pids)
        proc.stop()
    assert "the arbiter is gone and this worker has not stopped within drain_timeout (1s) " \
           "+ 10s (blocking code in consume?): exiting now with status 6" in proc.output
    wait_until(lambda: broker.has_counts("jobs", 1, 0), what="the message back in the queue")


def test_watchdog_exits_while_the_stuck_worker_holds_the_log(broker: BrokerHandle,
                                                           tmp_path: Path) -> None:
    """stderr a pipe nobody reads, and full: a consume blocked in its log write holds the
    handler's lock. The watchdog logged its last line before os._exit, so it waited for
    that lock for ever, and the worker outlived the arbiter."""
    broker.declare("jobs", durable=True)
    (tmp_path / "flooding.py").write_text(
        "import logging, os\n"
        "class C:\n"
        "    def consume(self, amqp, msg):\n"
        "        open(os.environ['RECORD_FILE'], 'a').write('start\\n')\n"
        "        logging.getLogger('flood').warning('x' * 1000000)\n"
        "    def shutdown(self, exception=None): pass\n")
    (tmp_path / "config.yml").write_text(
        "drain_timeout: 1\nqueues:\n  - queue: jobs\n"
        "consumers:\n  - consumer: flooding:C\n    queue: jobs\n")
    record = tmp_path / "record.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS / "consumers"), str(REPO)]),
           "RABBITMQ_URL": broker.url, "RECORD_FILE": str(record)}
    arbiter = subprocess.Popen(
        [SCRIPT, "--processes", "2", "--config", "config.yml"], cwd=tmp_path, env=env,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert arbiter.stderr is not None
    lines: list[str] = []
    for line in arbiter.stderr:  # read until every worker consumes, then never again
        lines.append(line.decode(errors="replace"))
        if "all 2 workers consuming" in lines[-1]:
            break
    pids = [int(pid) for pid in re.findall(r"worker \d/2 \(pid (\d+)\) consuming",
                                           "".join(lines))]
    try:
        assert len(pids) == 2, lines
        broker.publish("jobs", "x")
        wait_until(lambda: record.exists() and "start" in record.read_text(),
                   what="a consume writing to the full pipe")
        arbiter.kill()
        arbiter.wait()
        wait_until(lambda: all(gone(pid) for pid in pids), timeout=1 + 10 + 5,
                   what="every worker to exit within drain_timeout + 10 s")
    finally:
        kill_leftovers(pids)
        arbiter.kill()
        arbiter.wait()
        arbiter.stderr.close()
    wait_until(lambda: broker.has_counts("jobs", 1, 0), what="the message back in the queue")


def test_config_check_child_dies_with_the_killed_arbiter(broker: BrokerHandle,
                                                         tmp_path: Path) -> None:
    """The `--validate` child of a reload (importing consumer code, which may hang) gets
    SIGKILL from the kernel when the arbiter dies (PR_SET_PDEATHSIG)."""
    broker.declare("jobs", durable=True)
    seconds = tmp_path / "import-seconds"
    seconds.write_text("0")
    (tmp_path / "slowimport.py").write_text(
        f"import time\ntime.sleep(float(open({str(seconds)!r}).read()))\n"
        "class C:\n    def consume(self, amqp, msg): pass\n"
        "    def shutdown(self, exception=None): pass\n")
    config = "queues:\n  - queue: jobs\nconsumers:\n  - consumer: slowimport:C\n    queue: jobs\n"
    proc = DispatcherProcess(tmp_path, config, broker.url, args=("--processes", "2"))
    check = f"--validate --config={proc.config_path}"
    try:
        proc.wait_for_log("all 2 workers consuming")
        seconds.write_text("30")
        proc.signal(signal.SIGHUP)
        wait_until(lambda: pids_running(check), what="the check child")
        proc.process.kill()
        proc.process.wait()
        wait_until(lambda: not pids_running(check), timeout=5,
                   what="the check child to go with the arbiter")
    finally:
        kill_leftovers(pids_running(str(proc.config_path)))
        proc.stop()


def test_sigint_while_workers_start_stops_them_without_a_traceback(broker: BrokerHandle,
                                                                  tmp_path: Path) -> None:
    """Workers that have not consumed get SIGTERM for a fast stop: SIGINT would raise
    KeyboardInterrupt in an interpreter still starting ('Fatal Python error:
    init_import_site'). The arbiter still exits 130."""
    broker.declare("jobs", durable=True)
    proc = DispatcherProcess(tmp_path, RECORDER, broker.url, args=("--processes", "2"),
                             env=slow_worker_start(tmp_path))
    try:
        wait_until(lambda: len(list(tmp_path.glob("starting-*"))) == 2,
                   what="both workers' interpreters starting")
        proc.signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 130, proc.output
    finally:
        proc.stop()
    assert "Traceback" not in proc.output and "Fatal Python error" not in proc.output, \
        proc.output


@pytest.mark.parametrize("args", [(), ("--processes", "2")], ids=["single", "processes"])
def test_broker_password_is_hidden_in_printed_config_problems(
        broker: BrokerHandle, tmp_path: Path, args: tuple[str, ...]) -> None:
    """A config problem quotes what the consumer code raised at import, here holding
    RABBITMQ_URL: printed (not logged), it is redacted as a log line would be; the
    arbiter relays its check child's lines as they are."""
    password = "Zq9-pw-Secret"
    (tmp_path / "leaky.py").write_text(
        "import os\nraise RuntimeError('cannot start with ' + os.environ['RABBITMQ_URL'])\n")
    url = broker.url.replace("guest:guest@", f"guest:{quote(password)}@")
    result = run_cli(tmp_path, "--config", "config.yml", *args,
                     config="consumers:\n  - consumer: leaky:C\n    queue: jobs\n",
                     env={"RABBITMQ_URL": url})
    assert result.returncode == 1
    assert re.search(r"leaky:C.*RuntimeError: cannot start with amqp://guest:\*\*\*@",
                     result.stderr), result.stderr
    assert password not in result.stdout + result.stderr, result.stderr


def test_stop_status_counts_a_previous_set_still_draining(broker: BrokerHandle,
                                                          tmp_path: Path) -> None:
    """SIGTERM right after a reload: a worker of the previous set, still draining, runs
    out of drain_timeout (6). The stop's status is the highest of every worker it
    waited for."""
    broker.declare("jobs", durable=True)
    config = ("drain_timeout: 2\nqueues:\n  - queue: jobs\n"
              "consumers:\n  - consumer: testconsumers:Timed\n    queue: jobs\n")
    proc = DispatcherProcess(tmp_path, config, broker.url, args=("--processes", "2"),
                             env={"SLOW": "30"})
    try:
        proc.wait_for_log("all 2 workers consuming")
        broker.publish("jobs", "slow")
        wait_until(lambda: "start:slow" in proc.records(), what="a slow consume")
        proc.signal(signal.SIGHUP)
        proc.wait_for_log("reloaded: the 2 new workers consume")
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 6, proc.output
    finally:
        proc.stop()
    assert re.search(r"worker \d/2 \(pid \d+\) of the previous set exited with status 6",
                     proc.output), proc.output
    assert "every worker stopped; exiting with status 6" in proc.output

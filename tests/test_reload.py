"""SIGHUP in a single process: the config and consumer code are loaded again, a new
generation takes over, the old one drains; a config with problems changes nothing."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
import pytest
from helpers import TESTS, BrokerHandle, DispatcherProcess, run_cli, wait_until

from amqpdispatcher.config import ConfigError, load_config
from amqpdispatcher.config.settings import parse_url
from amqpdispatcher.consuming.outcomes import ACK
from amqpdispatcher.runtime.generations import Generations, Running, load_afresh
from amqpdispatcher.supervision.arbiter import Arbiter, Worker

# A consumer module the tests write next to the config (the working directory is on
# sys.path), then rewrite to deploy new code.
RELOADABLE = '''
import os
import gevent

VERSION = {version}
RECORD_FILE = os.environ["RECORD_FILE"]


def record(line):
    with open(RECORD_FILE, "a") as handle:
        handle.write(line + "\\n")


class Consumer:
    def __init__(self):
        record(f"init:v{{VERSION}}")

    def consume(self, amqp, msg):
        body = msg.body.decode()
        record(f"start:v{{VERSION}}:{{body}}")
        gevent.sleep({pause})
        record(f"done:v{{VERSION}}:{{body}}")

    def shutdown(self, exception=None):
        record(f"shutdown:v{{VERSION}}")
'''


def reloadable(version: int, pause: float = 0.01) -> str:
    # Each version differs in size too, so that no stale bytecode is ever used.
    return RELOADABLE.format(version=version, pause=pause) + "#" * version + "\n"


def config(count: int, consumer: str = "reloadable:Consumer", prefetch: int = 4) -> str:
    return ("queues:\n  - queue: jobs\n"
            f"consumers:\n  - consumer: {consumer}\n    queue: jobs\n"
            f"    consumer_count: {count}\n    prefetch_count: {prefetch}\n")


def test_sighup_with_a_broken_config_changes_nothing(broker: BrokerHandle,
                                                     tmp_path: Path) -> None:
    (tmp_path / "reloadable.py").write_text(reloadable(1))
    proc = DispatcherProcess(tmp_path, config(2), broker.url)
    try:
        proc.wait_consuming()
        proc.config_path.write_text(
            "consumers:\n  - consumer: testconsumers:Missing\n    queue: jobs\n"
            "    prefetch_count: ten\n")
        validate = run_cli(tmp_path, "--validate", "--config", str(proc.config_path))
        assert validate.returncode == 1
        expected = validate.stderr.splitlines()
        assert len(expected) == 2, expected
        proc.signal(signal.SIGHUP)
        proc.wait_for_log("SIGHUP: .* has problems")
        logged = [line.split(" ERROR: ", 1)[1] for line in proc.output.splitlines()
                  if " ERROR: " in line]
        assert logged[:2] == expected
        broker.publish("jobs", "after")
        wait_until(lambda: "done:v1:after" in proc.records(), what="the running config consumes")
        assert proc.output.count("consuming from") == 1
        assert proc.records().count("init:v1") == 2
    finally:
        assert proc.stop() == 0, proc.output


def test_sighup_deploys_new_config_and_code_under_load(broker: BrokerHandle,
                                                       tmp_path: Path) -> None:
    total = 600
    broker.declare("jobs", durable=True)
    for i in range(total):
        broker.publish("jobs", f"m{i}")
    (tmp_path / "reloadable.py").write_text(reloadable(1))
    proc = DispatcherProcess(tmp_path, config(2), broker.url)
    try:
        pid = proc.process.pid
        wait_until(lambda: sum(r.startswith("done:v1:") for r in proc.records()) >= 100,
                   what="a hundred messages done by the first generation")
        (tmp_path / "reloadable.py").write_text(reloadable(2))
        proc.config_path.write_text(config(5))
        proc.signal(signal.SIGHUP)
        proc.wait_for_log("reloaded: the new generation consumes")
        proc.wait_for_log("the previous generation stopped")
        wait_until(lambda: broker.drained("jobs"), what="every message acked")
        records = proc.records()
        assert proc.process.pid == pid and proc.process.poll() is None
    finally:
        assert proc.stop() == 0, proc.output
    done = Counter(r.split(":", 2)[2] for r in records if r.startswith("done:"))
    assert set(done) == {f"m{i}" for i in range(total)}, "a message was lost"
    assert sum(done.values()) == total, "a message was handled twice"
    assert records.count("init:v1") == 2 and records.count("init:v2") == 5
    assert any(r.startswith("done:v2:") for r in records)
    # The old generation's consume calls in progress at the handover finished there.
    started_v1 = {r[9:] for r in records if r.startswith("start:v1:")}
    done_v1 = {r[8:] for r in records if r.startswith("done:v1:")}
    assert started_v1 == done_v1
    assert records.count("shutdown:v1") == 2


def test_sighup_whose_new_generation_cannot_start_keeps_the_old(broker: BrokerHandle,
                                                                tmp_path: Path) -> None:
    (tmp_path / "reloadable.py").write_text(reloadable(1))
    proc = DispatcherProcess(tmp_path, config(1), broker.url)
    try:
        proc.wait_consuming()
        proc.config_path.write_text(config(1, consumer="testconsumers:BadInit"))
        proc.signal(signal.SIGHUP)
        proc.wait_for_log(r"SIGHUP: the new generation did not start \(status 5")
        broker.publish("jobs", "after")
        wait_until(lambda: "done:v1:after" in proc.records(), what="the old generation consumes")
        # Consumer code that exits as it is imported does not take the process with it.
        proc.config_path.write_text(config(1))
        (tmp_path / "reloadable.py").write_text("import sys\nsys.exit(3)\n")
        proc.signal(signal.SIGHUP)
        proc.wait_for_log("SIGHUP: importing the consumer code raised SystemExit: 3")
        broker.publish("jobs", "later")
        wait_until(lambda: "done:v1:later" in proc.records(), what="the old generation consumes")
    finally:
        assert proc.stop() == 0, proc.output


def test_sigterm_during_the_handover_lets_the_old_generation_finish(
        broker: BrokerHandle, tmp_path: Path) -> None:
    """The old generation already drains: SIGTERM must not reach it as a second one."""
    broker.declare("jobs", durable=True)
    proc = DispatcherProcess(tmp_path, config(1, consumer="testconsumers:Timed"), broker.url,
                             env={"SLOW": "2"})
    try:
        proc.wait_consuming()
        broker.publish("jobs", "slow")
        wait_until(lambda: "start:slow" in proc.records(), what="a slow consume in progress")
        proc.signal(signal.SIGHUP)
        proc.wait_for_log("reloaded: the new generation consumes")
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, proc.output
    finally:
        proc.stop()
    assert proc.records() == ["start:slow", "done:slow"]
    assert "stopping now" not in proc.output
    assert broker.counts("jobs") == (0, 0)


def test_load_afresh_imports_the_consumer_package_again_or_keeps_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process: the consumer's top-level package is imported again; on a problem the
    modules in use are put back."""
    package = tmp_path / "reloadpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helper.py").write_text("VERSION = 1\n")
    (package / "consumer.py").write_text(
        "from reloadpkg.helper import VERSION\n"
        "class Consumer:\n    def consume(self, amqp, msg): pass\n"
        "    def shutdown(self, exception=None): pass\n")
    path = tmp_path / "config.yml"
    path.write_text("consumers:\n  - consumer: reloadpkg.consumer:Consumer\n    queue: q\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    running, resolved = load_config(str(path))
    assert sys.modules["reloadpkg.helper"].VERSION == 1
    (package / "helper.py").write_text("VERSION = 2  # a new release\n")
    _, fresh = load_afresh(running)
    new_helper = sys.modules["reloadpkg.helper"]
    assert new_helper.VERSION == 2  # a module of the package the config does not name
    assert fresh.consumer_classes != resolved.consumer_classes
    (package / "consumer.py").write_text("raise RuntimeError('broken release')\n")
    with pytest.raises(ConfigError, match="broken release"):
        load_afresh(running)
    assert sys.modules["reloadpkg.helper"] is new_helper
    assert sys.modules["reloadpkg.consumer"].Consumer is \
        fresh.consumer_classes["reloadpkg.consumer:Consumer"]
    for name in [name for name in sys.modules if name.startswith("reloadpkg")]:
        del sys.modules[name]


SLOW_IMPORT = (
    "import os, time\nopen('importing', 'w').close()\n"
    "time.sleep({seconds})  # a heavy import (django.setup(), pandas, ...)\n"
    "class C:\n    def consume(self, amqp, msg): pass\n"
    "    def shutdown(self, exception=None): pass\n")


def test_signals_while_the_consumer_code_is_imported_at_start(broker: BrokerHandle,
                                                               tmp_path: Path) -> None:
    """Before the main loop has its handlers: SIGHUP (systemctl reload during a slow
    start) and SIGUSR2 are logged and ignored, SIGUSR1 shows where the start is; the
    main loop's handlers then replace these (SIGHUP reloads)."""
    broker.declare("jobs", durable=True)
    (tmp_path / "slowimport.py").write_text(SLOW_IMPORT.format(seconds=1.5))
    proc = DispatcherProcess(tmp_path, config(1, consumer="slowimport:C"), broker.url)
    try:
        wait_until(lambda: (tmp_path / "importing").exists(), what="the consumer import")
        for signum in (signal.SIGHUP, signal.SIGUSR2, signal.SIGUSR1):
            proc.signal(signum)
            proc.wait_for_log(f"received {signal.Signals(signum).name} during start-up")
        proc.wait_consuming()
        assert "received SIGHUP during start-up, before the consumer code is loaded: " \
               "ignored" in proc.output
        assert "received SIGUSR1 during start-up: the start is at" in proc.output
        assert "slowimport.py" in proc.output.split("the start is at", 1)[1]
        proc.signal(signal.SIGHUP)
        proc.wait_for_log("reloaded: the new generation consumes")
    finally:
        assert proc.stop() == 0, proc.output


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_stop_signal_while_the_consumer_code_is_imported_at_start(
        broker: BrokerHandle, tmp_path: Path, signum: int, status: int) -> None:
    """Nothing was consumed yet: SIGTERM stops with 0, SIGINT with 130, at once."""
    (tmp_path / "slowimport.py").write_text(SLOW_IMPORT.format(seconds=30))
    proc = DispatcherProcess(tmp_path, config(1, consumer="slowimport:C"), broker.url)
    try:
        wait_until(lambda: (tmp_path / "importing").exists(), what="the consumer import")
        proc.signal(signum)
        assert proc.wait(timeout=10) == status, proc.output
    finally:
        proc.stop()
    assert f"received {signal.Signals(signum).name} during start-up: stopping" in proc.output
    assert "Traceback" not in proc.output


def test_reloads_leave_no_file_descriptor_behind(broker: BrokerHandle, tmp_path: Path) -> None:
    """Each generation's connection is released whole: pika's GeventConnection keeps a
    pipe for its thread-safe callbacks that pika never closes (broker.release_connection)."""
    (tmp_path / "reloadable.py").write_text(reloadable(1))
    proc = DispatcherProcess(tmp_path, config(1), broker.url)

    def fds() -> int:
        return len(os.listdir(f"/proc/{proc.process.pid}/fd"))

    try:
        proc.wait_consuming()
        before = fds()
        for done in range(1, 6):
            proc.signal(signal.SIGHUP)
            wait_until(lambda n=done: proc.output.count("the previous generation stopped") == n,
                       what=f"reload {done}")
        after = fds()
    finally:
        assert proc.stop() == 0, proc.output
    assert after - before <= 1, f"{after - before} more open fds after 5 reloads"


def test_reload_pauses_consumption_only_while_the_new_code_imports(
        broker: BrokerHandle, tmp_path: Path) -> None:
    """The documented bound (README, "Reload (SIGHUP)"): in a single process the new
    code imports on the hub, so the running generation consumes nothing for as long as
    the import takes (here 1.5 s of CPU), and no longer: the new generation's connecting
    and declaring do not pause it."""
    broker.declare("jobs", durable=True)
    for i in range(1000):
        broker.publish("jobs", f"m{i}")
    module = '''
import os, time, gevent
VERSION = {version}
if VERSION > 1:
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        pass
class Consumer:
    def consume(self, amqp, msg):
        gevent.sleep(0.02)
        with open(os.environ["RECORD_FILE"], "a") as f:
            f.write(f"{{time.time():.3f}}\\n")
    def shutdown(self, exception=None):
        pass
'''
    (tmp_path / "reloadable.py").write_text(module.format(version=1))
    proc = DispatcherProcess(tmp_path, config(4), broker.url)
    try:
        wait_until(lambda: len(proc.records()) >= 50, what="consuming")
        (tmp_path / "reloadable.py").write_text(module.format(version=2) + "#\n")
        proc.signal(signal.SIGHUP)
        proc.wait_for_log("the previous generation stopped")
        at_handover = len(proc.records())
        wait_until(lambda: len(proc.records()) >= at_handover + 50,
                   what="the new generation consuming")
    finally:
        assert proc.stop() == 0, proc.output
    times = sorted(float(t) for t in proc.records())
    longest = max(b - a for a, b in zip(times, times[1:]))
    assert longest < 1.5 + 1.5, f"no message was consumed for {longest:.1f}s during the reload"


def test_stop_status_counts_the_previous_generation_still_draining(
        broker: BrokerHandle, tmp_path: Path) -> None:
    """SIGTERM right after a reload: the previous generation, still draining, runs out of
    drain_timeout. The stop's status is the highest of the generations it waited for."""
    broker.declare("jobs", durable=True)
    proc = DispatcherProcess(tmp_path, "drain_timeout: 2\n" + config(
        1, consumer="testconsumers:Timed"), broker.url, env={"SLOW": "30"})
    try:
        proc.wait_consuming()
        broker.publish("jobs", "slow")
        wait_until(lambda: "start:slow" in proc.records(), what="a slow consume in progress")
        proc.signal(signal.SIGHUP)
        proc.wait_for_log("reloaded: the new generation consumes")
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 6, proc.output
    finally:
        proc.stop()
    assert "the previous generation stopped with status 6" in proc.output
    wait_until(lambda: broker.has_counts("jobs", 1, 0), what="the message back in the queue")


class RacingGenerations(Generations):
    """Generations whose reload's new generation reports that it consumes just as the
    reload times out: both events are queued, the timeout's first (the race is a few
    microseconds wide in a real process)."""

    raced: Running | None = None

    def _launch(self, generation: Running) -> None:
        if generation is self.current:
            super()._launch(generation)
            return
        self.raced = generation

        def started() -> None:
            self.events.put(("reload_timeout", generation))
            self.events.put(("started", generation))

        generation.greenlet = gevent.spawn(generation.generation.run, started)
        generation.greenlet.link(lambda _: self.events.put(("exited", generation)))


def until(condition: Callable[[], Any], what: str, timeout: float = 30) -> None:
    """wait_until for the greenlets of this process: yields to them while it waits."""
    with gevent.Timeout(timeout, AssertionError(f"timed out after {timeout}s waiting for "
                                                f"{what}")):
        while not condition():
            gevent.sleep(0.02)


def test_a_reload_that_consumes_as_it_times_out_keeps_the_running_generation(
        broker: BrokerHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process, for the order of the events: the new generation was told to stop by
    the timeout; its late report must not make it the running one (it would stop, and
    the service with it, exit 0), and the running one carries on."""
    monkeypatch.syspath_prepend(str(TESTS / "consumers"))
    path = tmp_path / "config.yml"
    path.write_text(config(1, consumer="testconsumers:Recorder"))
    running, resolved = load_config(str(path))
    generations = RacingGenerations(running, resolved, parse_url(broker.url))
    runner = gevent.spawn(generations.run, False)
    old = generations.current
    try:
        until(lambda: old.started, "the first generation consuming")
        generations.events.put(("signal", signal.SIGHUP))
        until(lambda: runner.dead or (generations.raced is not None
                                      and not generations.raced.alive
                                      and generations.candidate is None),
              "the reload's end")
        assert not runner.dead, f"the service stopped, status {runner.value}"
        assert generations.current is old and not old.stopping and old.alive
        assert not generations.stopping and not generations.retiring
        broker.publish("jobs", "after")
        acked = old.generation.pools[0].metrics.outcomes
        until(lambda: acked[ACK] == 1, "the running generation consuming")
    finally:
        generations.stop()
        runner.join(timeout=30)
    assert runner.successful() and runner.value == 0


class FakeProcess:
    """What the arbiter's reload part uses of a worker's Popen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[int] = []

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)


def test_arbiter_ignores_a_new_worker_that_consumes_after_its_reload_timed_out(
        tmp_path: Path) -> None:
    """The same race under --processes: a new worker's "consuming" read after the reload
    timeout cancelled its set changes nothing; the running worker carries on."""
    arbiter = Arbiter(str(tmp_path / "config.yml"), 1)
    try:
        def worker(pid: int) -> Worker:
            return Worker(1, 1, FakeProcess(pid), None, time.monotonic(),  # type: ignore[arg-type]
                          "")

        old, new = worker(100), worker(200)
        old.consuming = True
        arbiter.running = True
        arbiter.serving = {1: old}
        arbiter.workers = [old, new]
        arbiter.new_set = {1: new}
        arbiter.reload_deadline = 0.0
        arbiter._reload_timeout_due()
        assert new.process.signals == [signal.SIGTERM] and arbiter.new_set is None
        new.consuming = True
        arbiter._on_consuming(new)
        assert arbiter.serving == {1: old} and not old.retired and not arbiter.stopping
        assert old.process.signals == []
    finally:
        os.close(arbiter.wake_r)
        os.close(arbiter.wake_w)

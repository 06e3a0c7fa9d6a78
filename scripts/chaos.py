"""Chaos soak: amqp-dispatcher --processes 2 under random faults must lose nothing.

    .venv/bin/python scripts/chaos.py --minutes 3 [--seed N] [--rate 40] [--keep]
                                      [--faults kill_worker,reload,...] [--gap 3,8]

Not part of CI or pytest: it runs for minutes and its faults are random.

What it sets up, all private to the run (a work directory under /tmp):
- its own RabbitMQ node (tests/rabbitnode.py), with a quorum input queue
  ``chaos.in``, a quorum output queue ``chaos.out`` and the dead-letter queue
  ``chaos.dead`` of the retry policy;
- ``amqp-dispatcher --processes 2`` on a generated config (scripts/chaosconsumer.py,
  consumer_count 10, retry max_attempts 3 with delays 0.2 s and 0.5 s), connected
  through a fault proxy (tests/faultproxy.py) so that its connections can be killed;
- a publisher thread putting inputs with unique ids on ``chaos.in`` with publisher
  confirms, directly on the node (not through the proxy): only confirmed ids count.

For --minutes, one random fault every few seconds, each logged with a timestamp:
drop every dispatcher connection at the proxy; SIGKILL a worker; SIGSTOP a worker
for a few seconds; SIGHUP the arbiter (reload); stop_app/start_app of the node; and
now and then a full restart of the node.

Then: faults stop, publishing stops, the soak waits (bounded) for the input and
delay queues to be empty with nothing unacked, SIGTERMs the arbiter (exit status
and time), reads back every output and dead-lettered message, and checks:
- every confirmed non-poison input has at least one output (``lost``: confirmed,
  no output and not dead-lettered);
- every confirmed poison input is in the dead-letter queue;
- nothing ready or unacked is left in the input and delay queues;
- the dispatcher exited 0 after SIGTERM.
Duplicates (ids with more than one output), worker RSS and fault counts are
reported. Exit 1 if an invariant is broken. The last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path.insert(0, str(REPO / "tests"))

from chaosconsumer import kind  # noqa: E402  (scripts/ is sys.path[0] when run as a script)
from faultproxy import FaultProxy  # noqa: E402
from rabbitnode import Broker  # noqa: E402

from amqpdispatcher.config.consumers import delay_queue_name  # noqa: E402

DISPATCHER = str(Path(sys.executable).parent / "amqp-dispatcher")

INPUT = "chaos.in"
OUTPUT = "chaos.out"
DEAD = "chaos.dead"
DELAYS_MS = (200, 500)  # what the retry policy below gives: 0.2, then 0.2 * 2.5
DELAY_QUEUES = tuple(delay_queue_name(INPUT, ms) for ms in DELAYS_MS)
WORKERS = 2
DRAIN_TIMEOUT = 15

CONFIG = f"""\
drain_timeout: {DRAIN_TIMEOUT}
queues:
  - queue: {INPUT}
    x_queue_type: quorum
  - queue: {OUTPUT}
    x_queue_type: quorum
consumers:
  - consumer: chaosconsumer:Relay
    queue: {INPUT}
    consumer_count: 10
    prefetch_count: 10
    time_limit: 60
    retry:
      max_attempts: 3
      delay: 0.2
      backoff: 2.5
      max_delay: 0.5
      dead_letter_queue: {DEAD}
"""

_T0 = time.monotonic()


def log(message: str) -> None:
    """One line on stdout with the wall clock and the seconds since the start."""
    stamp = time.strftime("%H:%M:%S", time.gmtime())
    print(f"{stamp}Z +{time.monotonic() - _T0:7.1f}s {message}", flush=True)


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


# -- processes ---------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (Linux /proc; no psutil in the virtualenv)."""
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found += [int(p) for p in handle.read().split()]
    except OSError:
        pass  # the process is gone
    return found


def worker_pids(arbiter: int) -> list[int]:
    """The arbiter's worker processes: its children but the config check
    (``--validate``), which it runs at start and at each SIGHUP."""
    pids = []
    for pid in children(arbiter):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            continue
        if b"amqpdispatcher" in argv and b"--validate" not in argv:
            pids.append(pid)
    return pids


def rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


# -- the publisher -----------------------------------------------------------------


class Publisher(threading.Thread):
    """Publishes inputs with ids 1, 2, 3 ... at ``rate`` per second with confirms.

    An id is recorded as confirmed only once the broker confirmed it; an id whose
    publish failed (connection lost, nack) may or may not be on the broker, so it
    is recorded apart and excluded from the invariants. After a failure the
    publisher reconnects every 0.5 s (the node may be stopped).
    """

    def __init__(self, url: str, rate: float) -> None:
        super().__init__(name="publisher", daemon=True)
        self.url = url
        self.interval = 1.0 / rate
        self.stopping = threading.Event()
        self.confirmed: set[int] = set()
        self.unconfirmed: set[int] = set()
        self.failures: collections.Counter[str] = collections.Counter()
        self.next_id = 1

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                connection = pika.BlockingConnection(pika.URLParameters(self.url))
            except pika.exceptions.AMQPError:
                self.failures["connect"] += 1
                self.stopping.wait(0.5)
                continue
            try:
                channel = connection.channel()
                channel.confirm_delivery()
                self._publish_loop(channel)
            except (pika.exceptions.AMQPError, OSError) as exc:
                self.failures[type(exc).__name__] += 1
                self.stopping.wait(0.5)
            finally:
                try:
                    if connection.is_open:
                        connection.close()
                except (pika.exceptions.AMQPError, OSError):
                    pass  # the broker went away under it

    def _publish_loop(self, channel: Any) -> None:
        next_at = time.monotonic()
        while not self.stopping.is_set():
            message_id = self.next_id
            self.next_id += 1
            properties = pika.BasicProperties(message_id=str(message_id), delivery_mode=2,
                                              headers={"chaos-id": str(message_id)})
            try:
                # mandatory: an input no queue took (a queue missing during a node
                # start) comes back as UnroutableError instead of a silent confirm.
                channel.basic_publish("", INPUT, f"input {message_id}".encode(), properties,
                                      mandatory=True)
            except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
                self.unconfirmed.add(message_id)
                self.failures[type(exc).__name__] += 1
                continue
            except BaseException:
                self.unconfirmed.add(message_id)
                raise
            self.confirmed.add(message_id)
            next_at += self.interval
            self.stopping.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=30)


# -- memory ------------------------------------------------------------------------


class MemorySampler(threading.Thread):
    """Samples the RSS of every worker process every ``interval`` seconds."""

    def __init__(self, arbiter: int, interval: float = 5.0) -> None:
        super().__init__(name="memory", daemon=True)
        self.arbiter = arbiter
        self.interval = interval
        self.stopping = threading.Event()
        self.samples: list[tuple[float, int, int]] = []  # (seconds since start, pid, kB)

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            now = time.monotonic() - _T0
            for pid in worker_pids(self.arbiter):
                kb = rss_kb(pid)
                if kb is not None:
                    self.samples.append((now, pid, kb))

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)

    def summary(self) -> dict[str, Any]:
        """First and last sample (the workers' mean RSS then), and the longest-lived
        worker's own first and last: workers are replaced by kills and reloads, and a
        fresh worker is small, so the longest-lived one is where a leak would show."""
        if not self.samples:
            return {}
        by_time: dict[float, list[int]] = collections.defaultdict(list)
        by_pid: dict[int, list[tuple[float, int]]] = collections.defaultdict(list)
        for at, pid, kb in self.samples:
            by_time[at].append(kb)
            by_pid[pid].append((at, kb))
        first_t, last_t = min(by_time), max(by_time)
        oldest = max(by_pid, key=lambda p: by_pid[p][-1][0] - by_pid[p][0][0])
        series = by_pid[oldest]
        return {
            "first_mean_kb": round(sum(by_time[first_t]) / len(by_time[first_t])),
            "last_mean_kb": round(sum(by_time[last_t]) / len(by_time[last_t])),
            "max_kb": max(kb for _, _, kb in self.samples),
            "workers_seen": len(by_pid),
            "longest_lived": {"pid": oldest, "seconds": round(series[-1][0] - series[0][0]),
                              "first_kb": series[0][1], "last_kb": series[-1][1]},
        }


# -- faults ------------------------------------------------------------------------


class Faults(threading.Thread):
    """One random fault every ``gap`` seconds until stopped, each logged."""

    WEIGHTS = {"drop_connections": 3, "kill_worker": 3, "stop_worker": 2, "reload": 2,
               "broker_stop_app": 2, "node_restart": 1}

    def __init__(self, node: Broker, proxy: FaultProxy, arbiter: subprocess.Popen[bytes],
                 rng: random.Random, kinds: list[str],
                 gap: tuple[float, float] = (3.0, 8.0)) -> None:
        super().__init__(name="faults", daemon=True)
        self.node = node
        self.proxy = proxy
        self.arbiter = arbiter
        self.rng = rng
        self.kinds = kinds
        self.gap = gap
        self.stopping = threading.Event()
        self.counts: collections.Counter[str] = collections.Counter()
        self.events: list[tuple[float, str, str]] = []  # (time.time() at start, fault, detail)
        self.errors: list[str] = []
        self.stopped_pids: set[int] = set()

    def run(self) -> None:
        weights = [self.WEIGHTS[n] for n in self.kinds]
        while not self.stopping.wait(self.rng.uniform(*self.gap)):
            fault = self.rng.choices(self.kinds, weights)[0]
            # The time it started: what a loss is correlated with (a node restart
            # takes seconds, and a stop_app's first second is when it bites).
            started = time.time()
            try:
                detail = getattr(self, fault)()
            except Exception as exc:  # noqa: BLE001  a failed fault is logged, the soak goes on
                self.errors.append(f"{fault}: {exc!r}")
                log(f"FAULT {fault} failed: {exc!r}")
                continue
            if detail is None:
                continue  # nothing to act on (no worker up at that moment)
            self.counts[fault] += 1
            self.events.append((started, fault, detail))

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=180)
        for pid in self.stopped_pids:  # never leave a worker frozen behind
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def _worker(self) -> int | None:
        pids = worker_pids(self.arbiter.pid)
        return self.rng.choice(pids) if pids else None

    # Each fault returns a one-line detail for the log, or None if it did nothing.

    def drop_connections(self) -> str:
        dropped = self.proxy.drop_all()
        log(f"FAULT drop_connections: {dropped} connection(s) dropped at the proxy")
        return f"{dropped} dropped"

    def kill_worker(self) -> str | None:
        pid = self._worker()
        if pid is None:
            return None
        os.kill(pid, signal.SIGKILL)
        log(f"FAULT kill_worker: SIGKILL worker pid {pid}")
        return f"pid {pid}"

    def stop_worker(self) -> str | None:
        pid = self._worker()
        if pid is None:
            return None
        seconds = self.rng.uniform(2.0, 6.0)
        log(f"FAULT stop_worker: SIGSTOP worker pid {pid} for {seconds:.1f}s")
        self.stopped_pids.add(pid)
        try:
            os.kill(pid, signal.SIGSTOP)
            self.stopping.wait(seconds)  # cut short by the end of the soak
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.stopped_pids.discard(pid)
        log(f"FAULT stop_worker: SIGCONT worker pid {pid}")
        return f"pid {pid} {seconds:.1f}s"

    def reload(self) -> str:
        self.arbiter.send_signal(signal.SIGHUP)
        log(f"FAULT reload: SIGHUP arbiter pid {self.arbiter.pid}")
        return "SIGHUP"

    def broker_stop_app(self) -> str:
        seconds = self.rng.uniform(2.0, 6.0)
        log(f"FAULT broker_stop_app: stop_app for {seconds:.1f}s")
        self.node.ctl("stop_app", timeout=120)
        # Not cut short by the end of the soak: the app must come back either way.
        time.sleep(seconds)
        self.node.ctl("start_app", timeout=120)
        log("FAULT broker_stop_app: start_app done")
        return f"{seconds:.1f}s"

    def node_restart(self) -> str:
        log("FAULT node_restart: stopping the node")
        started = time.monotonic()
        self.node.stop()  # keeps the data: the Broker was given its base_dir
        self.node.start(timeout=180)
        took = time.monotonic() - started
        log(f"FAULT node_restart: node up again after {took:.1f}s")
        return f"{took:.1f}s"


# -- the end -----------------------------------------------------------------------


def queue_counts(node: Broker) -> dict[str, tuple[int, int, int]]:
    """(ready, unacked, consumers) of every queue on the node, as rabbitmqctl says.

    Not to be trusted alone just after a node (re)start: for some seconds it reports
    0 ready and 0 unacked for quorum queues that hold thousands of messages (seen:
    the output queue listed as empty right after a node_restart)."""
    out = node.ctl("list_queues", "-q", "--no-table-headers", "name", "messages_ready",
                   "messages_unacknowledged", "consumers", timeout=60)
    counts = {}
    for line in out.splitlines():
        fields = line.split("\t")
        if len(fields) == 4:
            counts[fields[0]] = (int(fields[1]), int(fields[2]), int(fields[3]))
    return counts


def ready_counts(url: str, queues: tuple[str, ...]) -> dict[str, int]:
    """Messages ready in each of ``queues``, from a passive queue.declare: answered by
    the queue itself (a quorum queue's leader), so it is exact, unlike list_queues
    after a restart. Raises if the node is not up."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        return {q: channel.queue_declare(q, passive=True).method.message_count
                for q in queues}
    finally:
        connection.close()


def settled(node: Broker) -> bool:
    """The input and delay queues hold nothing, ready or unacked, and the dispatcher
    consumes from the input queue again (after a last broker fault, its reconnect
    backoff can be many seconds: until it is back, an empty queue proves nothing)."""
    try:
        ready = ready_counts(node.url, (INPUT, *DELAY_QUEUES))
        counts = queue_counts(node)
    except (RuntimeError, subprocess.TimeoutExpired, pika.exceptions.AMQPError):
        return False
    unacked = sum(counts.get(q, (0, 0, 0))[1] for q in (INPUT, *DELAY_QUEUES))
    consumers = counts.get(INPUT, (0, 0, 0))[2]
    return sum(ready.values()) == 0 and unacked == 0 and consumers > 0


def wait_settled(node: Broker, timeout: float) -> tuple[bool, float]:
    """Wait until ``settled``, three checks in a row (a message dead-lettered from a
    delay queue back to the input queue is briefly in neither)."""
    started = time.monotonic()
    streak = 0
    while time.monotonic() - started < timeout:
        streak = streak + 1 if settled(node) else 0
        if streak >= 3:
            return True, time.monotonic() - started
        time.sleep(1.0)
    return False, time.monotonic() - started


def read_queue(url: str, queue: str) -> list[tuple[dict[str, Any], bytes]]:
    """Every message of ``queue``, removed: (headers, body) each."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=500)
    messages = []
    for method, properties, body in channel.consume(queue, auto_ack=True,
                                                    inactivity_timeout=3):
        if method is None:
            break
        headers = dict(properties.headers or {})
        headers.setdefault("message_id", properties.message_id)
        messages.append((headers, body))
    channel.cancel()
    connection.close()
    return messages


def utc(at: float) -> str:
    return datetime.utcfromtimestamp(at).strftime("%H:%M:%S.%f")[:-3]


def broker_log_times(node: Broker, pattern: str) -> list[float]:
    """When the broker logged each line matching ``pattern`` (its log is in UTC:
    ``2026-12-04 16:38:51.711228+00:00 [warning] ...``)."""
    regex = re.compile(pattern)
    found = []
    for path in (node.base / "log").glob("*.log"):
        with open(path, errors="replace") as handle:
            for line in handle:
                if regex.search(line):
                    try:
                        found.append(datetime.fromisoformat(line[:32]).timestamp())
                    except ValueError:
                        found.append(0.0)  # a continuation line: counted, time unknown
    return sorted(found)


def bursts(times: list[float], within: float = 1.0) -> list[tuple[float, int]]:
    """``times`` grouped into bursts (each within ``within`` s of the previous):
    (first time, count) each. The broker drops its commands all at once, at a boot."""
    grouped: list[tuple[float, int]] = []
    last = None
    for at in times:
        if last is not None and at - last <= within:
            grouped[-1] = (grouped[-1][0], grouped[-1][1] + 1)
        else:
            grouped.append((at, 1))
        last = at
    return grouped


def log_time(line: str) -> float | None:
    """The time of a dispatcher log line (``2026-12-04 16:42:01,757 ...``, local time)."""
    try:
        return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return None


def dispatcher_lines(path: Path, ids: set[int]) -> dict[int, list[str]]:
    """The dispatcher's log lines naming each of ``ids`` (the retry policy logs the
    exception, whose message names the input: ``input 203 fails ...``)."""
    found: dict[int, list[str]] = collections.defaultdict(list)
    if not ids or not path.exists():
        return found
    regex = re.compile(r"input (\d+) ")
    with open(path, errors="replace") as handle:
        for line in handle:
            match = regex.search(line)
            if match and int(match.group(1)) in ids:
                found[int(match.group(1))].append(line.rstrip())
    return found


def history(record: Path, ids: set[int]) -> dict[int, list[str]]:
    """What the consumer recorded for ``ids``: one 'pid attempt event' per line."""
    found: dict[int, list[str]] = collections.defaultdict(list)
    if not record.exists() or not ids:
        return found
    with open(record) as handle:
        for line in handle:
            parts = line.split()
            if len(parts) == 4 and int(parts[1]) in ids:
                found[int(parts[1])].append(f"pid {parts[0]} attempt {parts[2]} {parts[3]}")
    return found


# -- main --------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--rate", type=float, default=40.0, help="inputs per second")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--settle-timeout", type=float, default=180.0,
                        help="seconds to wait for the queues to empty after the faults")
    parser.add_argument("--faults", default=",".join(Faults.WEIGHTS),
                        help="the kinds of fault to inject, comma-separated "
                             f"(default: all of {', '.join(Faults.WEIGHTS)})")
    parser.add_argument("--gap", default="3,8",
                        help="seconds between two faults: min,max (default 3,8)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (always kept when a check fails)")
    args = parser.parse_args()
    kinds = [k for k in args.faults.split(",") if k]
    unknown = [k for k in kinds if k not in Faults.WEIGHTS]
    if unknown or not kinds:
        parser.error(f"--faults: unknown kind(s) {unknown}; known: {list(Faults.WEIGHTS)}")
    try:
        low, high = (float(x) for x in args.gap.split(","))
    except ValueError:
        parser.error("--gap: expected two numbers, min,max")
    if not 0 < low <= high:
        parser.error("--gap: expected 0 < min <= max")
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)

    work = Path(tempfile.mkdtemp(prefix="chaos-"))
    log(f"chaos soak: {args.minutes} min, {args.rate}/s, seed {seed}, work dir {work}")
    # base_dir given: Broker.stop() keeps the data, so a node restart keeps the queues.
    node = Broker(name=f"chaos-{os.getpid()}", base_dir=str(work / "node"))
    (work / "node").mkdir()
    proxy: FaultProxy | None = None
    dispatcher: subprocess.Popen[bytes] | None = None
    dispatcher_log = None
    ok = False
    try:
        node.start()
        log(f"node {node.node} up on port {node.port}; logs in {node.base / 'log'}")
        channel = pika.BlockingConnection(pika.URLParameters(node.url)).channel()
        # The same declarations as the config's (and the policy's for the dead-letter
        # queue: durable, no arguments), so the dispatcher finds them equivalent.
        channel.queue_declare(INPUT, durable=True, arguments={"x-queue-type": "quorum"})
        channel.queue_declare(OUTPUT, durable=True, arguments={"x-queue-type": "quorum"})
        channel.queue_declare(DEAD, durable=True)
        channel.connection.close()

        proxy = FaultProxy("127.0.0.1", node.port).start()
        config = work / "config.yml"
        config.write_text(CONFIG)
        record = work / "record.txt"
        env = dict(os.environ, RABBITMQ_URL=proxy.rewrite_url(node.url),
                   PYTHONPATH=os.pathsep.join([str(SCRIPTS), str(REPO)]),
                   CHAOS_OUTPUT=OUTPUT, CHAOS_RECORD=str(record))
        env.pop("LOGGING_FILE_CONFIG", None)
        dispatcher_log_path = work / "dispatcher.log"
        dispatcher_log = open(dispatcher_log_path, "wb")
        dispatcher = subprocess.Popen(
            [DISPATCHER, "--processes", str(WORKERS), "--config", str(config)],
            cwd=work, env=env, stdout=dispatcher_log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        if not wait_for(lambda: "workers consuming" in dispatcher_log_path.read_text(
                errors="replace") or dispatcher.poll() is not None, 90):
            raise RuntimeError("the dispatcher did not start consuming within 90 s")
        if dispatcher.poll() is not None:
            raise RuntimeError(f"the dispatcher exited {dispatcher.returncode} at start")
        log(f"dispatcher arbiter pid {dispatcher.pid}: workers {worker_pids(dispatcher.pid)}")

        publisher = Publisher(node.url, args.rate)
        memory = MemorySampler(dispatcher.pid)
        faults = Faults(node, proxy, dispatcher, rng, kinds, (low, high))
        publisher.start()
        memory.start()
        faults.start()
        soak_end = time.monotonic() + args.minutes * 60
        while time.monotonic() < soak_end:
            time.sleep(min(15.0, max(0.0, soak_end - time.monotonic())))
            log(f"progress: {len(publisher.confirmed)} inputs confirmed, "
                f"faults {dict(faults.counts)}")
            if dispatcher.poll() is not None:
                log(f"the dispatcher exited {dispatcher.returncode} during the soak")
                break

        log("stopping the faults (a fault in progress finishes first)")
        faults.stop()
        log("stopping the publisher")
        publisher.stop()
        log(f"waiting up to {args.settle_timeout:.0f}s for {INPUT} and its delay queues "
            "to empty")
        drained, drain_took = wait_settled(node, args.settle_timeout)
        counts = queue_counts(node)
        log(f"settled={drained} after {drain_took:.1f}s: (ready, unacked, consumers) "
            + ", ".join(f"{q} {counts.get(q)}" for q in (INPUT, *DELAY_QUEUES, OUTPUT, DEAD)))
        memory.stop()

        log(f"SIGTERM to the arbiter pid {dispatcher.pid}")
        term_at = time.monotonic()
        dispatcher.send_signal(signal.SIGTERM)
        try:
            exit_status: int | None = dispatcher.wait(timeout=DRAIN_TIMEOUT + 45)
        except subprocess.TimeoutExpired:
            exit_status = None
            dispatcher.kill()
            dispatcher.wait()
        term_took = time.monotonic() - term_at
        log(f"dispatcher exited {exit_status} {term_took:.1f}s after SIGTERM")

        # With the dispatcher gone nothing is unacked: whatever the input and delay
        # queues hold now is ready, and a passive declare counts it exactly. It is
        # left over, not lost; its ids are read (after the longest delay, the delay
        # queues have moved theirs to the input queue) to tell the two apart.
        leftover = ready_counts(node.url, (INPUT, *DELAY_QUEUES))
        time.sleep(max(DELAYS_MS) / 1000 + 0.5)
        left_ids = {int(h["message_id"]) for q in (*DELAY_QUEUES, INPUT)
                    for h, _ in read_queue(node.url, q)}
        outputs = read_queue(node.url, OUTPUT)
        dead = read_queue(node.url, DEAD)
        ok = report(args, seed, work, node, publisher, faults, memory, outputs, dead,
                    leftover, left_ids, drained, drain_took, exit_status, term_took, record)
        return 0 if ok else 1
    finally:
        if dispatcher is not None and dispatcher.poll() is None:
            dispatcher.kill()  # the arbiter: its workers drain on their own when it is gone
            dispatcher.wait()
        if dispatcher_log is not None:
            dispatcher_log.close()
        if proxy is not None:
            proxy.stop()
        node.stop()
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory kept: {work} (dispatcher.log, record.txt, "
                  f"node/log/)", flush=True)


def report(args: argparse.Namespace, seed: int, work: Path, node: Broker,
           publisher: Publisher, faults: Faults, memory: MemorySampler,
           outputs: list[tuple[dict[str, Any], bytes]],
           dead: list[tuple[dict[str, Any], bytes]], leftover: dict[str, int],
           left_ids: set[int],
           drained: bool, drain_took: float, exit_status: int | None, term_took: float,
           record: Path) -> bool:
    out_count: collections.Counter[int] = collections.Counter(
        int(h["chaos-id"]) for h, _ in outputs)
    dead_count: collections.Counter[int] = collections.Counter(
        int(h["message_id"]) for h, _ in dead)
    confirmed = publisher.confirmed
    poison = {i for i in confirmed if kind(i) == "poison"}
    healthy = confirmed - poison
    lost = sorted(i for i in healthy
                  if i not in out_count and i not in dead_count and i not in left_ids)
    poison_missing = sorted(i for i in poison if i not in dead_count and i not in left_ids)
    poison_with_output = sorted(i for i in poison if i in out_count)
    healthy_dead = sorted(i for i in healthy if i in dead_count)
    published = confirmed | publisher.unconfirmed
    unknown_outputs = sorted(i for i in out_count if i not in published)
    duplicates = sum(1 for i in out_count if out_count[i] > 1)
    dead_duplicates = sum(1 for i in dead_count if dead_count[i] > 1)
    # The broker's own account of a quorum queue command it threw away: a message
    # dead-lettered from a delay queue while the queue's leader was not up yet.
    dropped_times = broker_log_times(node, r"leader not known\. Command is dropped")
    dropped_commands = len(dropped_times)
    leader_not_known = len(broker_log_times(node, r"leader not known"))
    # A missing input whose last line in the dispatcher's log is the retry policy's
    # "retrying in ..." was last seen moved (confirmed) to a delay queue: it was lost
    # between the delay queue and the input queue, on the broker.
    trace = history(record, set(lost) | set(poison_missing) | set(healthy_dead))
    logged_all = dispatcher_lines(work / "dispatcher.log", set(lost) | set(poison_missing))
    lost_in_delay = sorted(i for i, lines in logged_all.items() if "retrying in" in lines[-1])

    checks = {
        "no confirmed input lost": not lost,
        "every poison input dead-lettered": not poison_missing,
        "no poison input has an output": not poison_with_output,
        "input and delay queues empty after the stop": not any(leftover.values()),
        "dispatcher exited 0 after SIGTERM": exit_status == 0,
    }
    summary = {
        "seed": seed,
        "minutes": args.minutes,
        "fault_kinds": args.faults,
        "inputs_confirmed": len(confirmed),
        "inputs_unconfirmed": len(publisher.unconfirmed),
        "publisher_failures": dict(publisher.failures),
        "poison_confirmed": len(poison),
        "transient_confirmed": sum(1 for i in healthy if kind(i) == "transient"),
        "outputs": len(outputs),
        "dead_lettered": len(dead),
        "lost": len(lost),
        "poison_not_dead_lettered": len(poison_missing),
        "poison_with_output": len(poison_with_output),
        "non_poison_dead_lettered": len(healthy_dead),
        "outputs_of_unpublished_ids": len(unknown_outputs),
        "duplicate_ids": duplicates,
        "duplicates_pct": round(100.0 * duplicates / max(1, len(out_count)), 3),
        "dead_letter_duplicate_ids": dead_duplicates,
        "leftover": leftover,
        "leftover_confirmed_ids": len(left_ids & confirmed),
        "settled": drained,
        "settle_seconds": round(drain_took, 1),
        "exit_status": exit_status,
        "seconds_after_sigterm": round(term_took, 1),
        "memory": memory.summary(),
        "faults": dict(faults.counts),
        "fault_errors": faults.errors,
        "lost_last_seen_moving_to_delay_queue": len(lost_in_delay),
        "broker_leader_not_known_lines": leader_not_known,
        "broker_command_dropped_lines": dropped_commands,
        "checks": checks,
        "ok": all(checks.values()),
    }

    print("\n==== chaos soak report ====")
    print(f"seed {seed}; {args.minutes} min; work dir {work}")
    print(f"inputs confirmed {len(confirmed)} (poison {len(poison)}), unconfirmed "
          f"{len(publisher.unconfirmed)}; outputs {len(outputs)} for {len(out_count)} ids; "
          f"dead-lettered {len(dead)}")
    print(f"lost {len(lost)}; poison not dead-lettered {len(poison_missing)}; non-poison "
          f"dead-lettered {len(healthy_dead)}; duplicates {duplicates} ids "
          f"({summary['duplicates_pct']}% of ids with an output); dead-lettered more than "
          f"once: {dead_duplicates} ids")
    print(f"settled: {drained} in {drain_took:.1f}s; left in the queues after the stop "
          f"(not counted as lost): {leftover}")
    print(f"dispatcher exit {exit_status}, {term_took:.1f}s after SIGTERM")
    print(f"worker memory: {summary['memory']}")
    print(f"faults: {dict(faults.counts)}; failed faults: {faults.errors or 'none'}")
    print("fault log:")
    for at, fault, detail in faults.events:
        print(f"  {utc(at)}Z {fault} {detail}")
    print(f"broker log: {leader_not_known} line(s) 'leader not known', of which "
          f"{dropped_commands} 'leader not known. Command is dropped'")
    print(f"lost or missing poison last seen being moved to a delay queue: "
          f"{len(lost_in_delay)} of {len(lost) + len(poison_missing)}")
    if lost or poison_missing:
        # Which broker fault each loss goes with: the dispatcher's last line about the
        # id (its move to a delay queue) within 5 s after a broker stop began.
        moved_at = {i: log_time(lines[-1]) for i, lines in logged_all.items() if lines}
        broker_faults = [(at, fault) for at, fault, _ in faults.events
                         if fault in ("broker_stop_app", "node_restart")]
        matched = 0
        print("missing inputs per broker fault (last move within 5 s after it began):")
        for at, fault in broker_faults:
            ids = sorted(i for i, t in moved_at.items() if t is not None and at <= t <= at + 5)
            matched += len(ids)
            print(f"  {utc(at)}Z {fault}: {len(ids)} {ids}")
        print(f"  {matched} of {len(lost) + len(poison_missing)} missing inputs matched")
        print("broker 'Command is dropped' lines per burst: "
              + ", ".join(f"{utc(at)}Z x{n}" for at, n in bursts(dropped_times)))
    for name, passed in checks.items():
        print(f"  [{'ok' if passed else 'FAILED'}] {name}")
    shown = set(lost[:20]) | set(poison_missing[:20]) | set(healthy_dead[:20])
    logged = dispatcher_lines(work / "dispatcher.log", shown - set(logged_all))
    logged.update(logged_all)
    for label, ids in (("lost", lost), ("poison not dead-lettered", poison_missing),
                       ("non-poison dead-lettered", healthy_dead)):
        if ids:
            print(f"{label} ids (first 20 of {len(ids)}): {ids[:20]}")
            for i in ids[:20]:
                print(f"  {i} ({kind(i)}): {trace.get(i) or 'never reached consume'}")
                if logged.get(i):
                    print(f"      last dispatcher line: {logged[i][-1]}")
    print(json.dumps(summary, sort_keys=True))
    return bool(summary["ok"])


if __name__ == "__main__":
    sys.exit(main())

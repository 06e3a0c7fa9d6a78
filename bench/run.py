"""The benchmark: this dispatcher against the baselines, on one private broker.

    .venv/bin/python bench/run.py [--runs 3] [--quick] [--only 6[,2b...]]

Systems, run interleaved on the same workload:
  dispatcher  this package's console script, with a config file and bench/benchconsumers.py
  raw-ack     (a) a raw pika GeventConnection consumer acking inside its delivery callback
  raw-spawn   (b) the same, spawning one greenlet per delivery
  ad-0.11.0   (c) amqp-dispatcher 0.11.0 from PyPI in its own virtualenv (bench/work/)

Messages/s are measured inside the consumer, from the first to the last handled
message. After each run the queue must be empty: nothing unacked, nothing lost.
A throughput run that does not finish within its timeout is reported as failed.

System dispatcher-http (workload 1 only): this dispatcher with the `http` endpoint on
(which also times every consume call for the histogram), /metrics fetched once a
second by the benchmark process from the moment the dispatcher starts.
System dispatcher-p2-http (workload 1 only): the same with --processes 2, the
arbiter's /metrics scraped.

Systems publish-confirms and publish-no-confirms (workload 8 only): this dispatcher
with benchconsumers.Republish, which publishes one message per input to the
workload's output queue, with publisher_confirms true (the default: each publish
waits for the broker's confirm) and false; next to the same no-op run without
publishing. Every input must have been published to the output queue.

System dispatcher-p2 (workloads 1 and 9): this dispatcher with --processes 2, an
arbiter and two worker processes. Each worker reports its share of the messages
(benchconsumers, $BENCH_SPLIT); the rate is the total over the time from the
first message any worker handled to the last, and the workers' first messages
wait until every worker consumes (they start some 0.1 s apart). Its CPU is the
arbiter's and the workers' together; its peak RSS the largest of one process.
Workload 9 (2 ms of CPU per message) is where one process is one core: target
dispatcher-p2 >= 1.6x dispatcher on two cores, which the broker shares.

System dispatcher-flaky (workload 7 only): this dispatcher with benchconsumers.Flaky
(one message in ten fails once) and a retry policy (delay 0.1 s), next to the same
no-op run without failures.

Workload 6 (heavy tail): the k-th call in the consumer process (k from 1) sleeps
benchconsumers.heavy_tail_duration(k), 2 s when k % 100 == 0, else 5 ms. Its
yardstick is the in-order bound (in_order_bound): the throughput of an
overhead-free pool of consumer_count instances taking deliveries in publish
order, each instance taking the next one as soon as it is free.

A full run writes bench/results.md and bench/results.png; a run with --quick or
--only writes bench/work/results.md and bench/work/results.png instead.
"""

from __future__ import annotations

import argparse
import heapq
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pika

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / "work"
sys.path.insert(0, str(REPO / "tests"))

from benchconsumers import heavy_tail_duration  # noqa: E402
from rabbitnode import Broker, free_port  # noqa: E402

LEGACY_PY = WORK / "ad-0.11.0" / "bin" / "python"
SCRIPT = str(Path(sys.executable).parent / "amqp-dispatcher")


def ensure_legacy() -> None:
    if LEGACY_PY.exists():
        return
    subprocess.run([sys.executable, "-m", "venv", str(LEGACY_PY.parent.parent)], check=True)
    subprocess.run([str(LEGACY_PY), "-m", "pip", "install", "-q", "amqp-dispatcher==0.11.0",
                    "pika<1.0", "six"], check=True)


def publish(url: str, queue: str, count: int, size: int, empty: tuple[str, ...] = ()) -> None:
    """Put ``count`` messages in ``queue``, emptied first with the ``empty`` queues."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    for name in (queue, *empty):
        channel.queue_declare(name, durable=True)
        channel.queue_purge(name)
    body = b"x" * size
    for _ in range(count):
        channel.basic_publish("", queue, body)
    connection.close()


def counts(broker: Broker, queue: str) -> tuple[int, int]:
    info = broker.queue_info(queue)
    return int(info["messages_ready"]), int(info["messages_unacknowledged"])


# Systems whose messages are handled by several processes, each reporting its share.
SPLIT_SYSTEMS = ("dispatcher-p2", "dispatcher-p2-http")


def command(system: str, workload: dict, tmp: Path,
            http_port: int | None) -> tuple[list[str], dict[str, str]]:
    queue, count, prefetch = workload["queue"], workload["consumers"], workload["prefetch"]
    consumer = workload.get("consumer") or ("Sleep" if workload.get("sleep") else "NoOp")
    retry = top = ""
    queues = f"  - queue: {queue}\n    bindings: []\n"
    if system == "dispatcher-flaky":
        consumer = "Flaky"
        retry = "    retry:\n      max_attempts: 3\n      delay: 0.1\n"
    if system.startswith("publish-"):
        consumer = "Republish"
        queues += f"  - queue: {workload['output']}\n"
        top = f"publisher_confirms: {str(system == 'publish-confirms').lower()}\n"
    if http_port:
        top += f"http:\n  port: {http_port}\n"
    config = tmp / f"{system}.yml"
    config.write_text(f"{top}queues:\n{queues}"
                      f"consumers:\n  - consumer: benchconsumers:{consumer}\n"
                      f"    queue: {queue}\n"
                      f"    consumer_count: {count}\n    prefetch_count: {prefetch}\n{retry}")
    env = {"PYTHONPATH": str(BENCH), "BENCH_CONSUMER": consumer,
           "BENCH_PUBLISH_TO": workload.get("output", "")}
    if system in ("dispatcher", "dispatcher-flaky", "dispatcher-http", "dispatcher-p2",
                  "dispatcher-p2-http",
                  "publish-confirms", "publish-no-confirms"):
        # This checkout's package, whatever the virtualenv has installed.
        env["PYTHONPATH"] = os.pathsep.join([str(BENCH), str(REPO)])
        if system in SPLIT_SYSTEMS:
            env["BENCH_SPLIT"] = "1"
            return [SCRIPT, "--processes", "2", "--config", str(config)], env
        return [SCRIPT, "--config", str(config)], env
    if system == "ad-0.11.0":
        env["RABBITMQ_HEARTBEAT"] = "60"
        return [str(LEGACY_PY), str(BENCH / "legacy.py"), "--connection", "pika",
                "--config", str(config)], env
    mode = "ack" if system == "raw-ack" else "spawn"
    return [sys.executable, str(BENCH / "raw.py"), mode, queue, str(prefetch)], env


def start(system: str, workload: dict, broker: Broker, tmp: Path,
          out: Path, http_port: int | None = None) -> subprocess.Popen[bytes]:
    argv, env = command(system, workload, tmp, http_port)
    go = tmp / "go"
    go.unlink(missing_ok=True)
    full_env = dict(os.environ, RABBITMQ_URL=broker.url, BENCH_N=str(workload.get("count", 0)),
                    BENCH_OUT=str(out), BENCH_SLEEP=str(workload.get("sleep", 0)),
                    BENCH_GO=str(go), **env)
    log_path = tmp / f"{system}.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(argv, env=full_env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    if system in SPLIT_SYSTEMS:  # the workers' clocks start once every one consumes
        deadline = time.monotonic() + 60
        while "workers consuming" not in log_path.read_text(errors="replace") \
                and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        go.touch()
    return proc


class Scraper:
    """Fetches /metrics once a second in a thread, as Prometheus would, from the moment
    the port answers; keeps when each scrape started and how long it took."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.scrapes: list[tuple[float, float]] = []  # (wall clock start, seconds)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            started, wall = time.monotonic(), time.time()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    response.read()
                self.scrapes.append((wall, time.monotonic() - started))
                pause = 1.0 - (time.monotonic() - started)
            except OSError:
                pause = 0.05  # not listening yet
            if self.stopped.wait(max(0.0, pause)):
                return

    def stop(self, result: dict) -> dict:
        """The result with the scrapes made within its measured window, and their median
        duration (ms) over the whole run."""
        self.stopped.set()
        self.thread.join()
        window = result.get("window", (0.0, 0.0))
        return dict(result, scrapes=sum(window[0] <= t <= window[1] for t, _ in self.scrapes),
                    scrape_ms=statistics.median(s for _, s in self.scrapes) * 1000
                    if self.scrapes else None)


def finish(proc: subprocess.Popen[bytes]) -> tuple[float, float]:
    """Stop the process; return (peak RSS in MB, CPU seconds) from its rusage."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, _, usage = os.wait4(proc.pid, 0)
    except ChildProcessError:
        return 0.0, 0.0
    proc.returncode = 0
    return usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def in_order_bound(count: int, instances: int,
                   duration: Callable[[int], float]) -> tuple[float, float]:
    """(msg/s, makespan s) of an overhead-free pool of `instances` consumers.

    Deliveries are taken in publish order, the k-th (k from 1) lasting
    duration(k); each instance takes the next one as soon as it is free.
    A heap holds the instances' free-times: the k-th delivery starts at the
    earliest of them. The run ends when the last instance is done.
    """
    free = [0.0] * instances
    for k in range(1, count + 1):
        heapq.heappush(free, heapq.heappop(free) + duration(k))
    makespan = max(free)
    return count / makespan, makespan


def wait_requeued(broker: Broker, queue: str, limit: float = 15.0) -> None:
    """After a killed run: let the broker requeue its unacked deliveries before the next purge."""
    end = time.monotonic() + limit
    while counts(broker, queue)[1] and time.monotonic() < end:
        time.sleep(0.2)


def handled(out: Path, total: int, split: bool) -> tuple[float, float, int] | None:
    """(time of the first message, of the last, bytes) once all `total` were handled."""
    if not split:
        if not out.exists() or not out.read_text().endswith("\n"):
            return None
        first, last, nbytes = out.read_text().split()
        return float(first), float(last), int(nbytes)
    shares = [path.read_text().split() for path in out.parent.glob(f"{out.name}.*")
              if not path.name.endswith(".tmp")]
    if sum(int(count) for _, _, count, _ in shares) < total:
        return None
    return (min(float(first) for first, _, _, _ in shares),
            max(float(last) for _, last, _, _ in shares),
            sum(int(nbytes) for _, _, _, nbytes in shares))


def run_throughput(system: str, workload: dict, broker: Broker, tmp: Path) -> dict:
    queue, total = workload["queue"], workload["count"]
    output = workload.get("output") if system.startswith("publish-") else None
    publish(broker.url, queue, total, workload["size"], (output,) if output else ())
    out = tmp / "out.txt"
    for old in (out, *tmp.glob("out.txt.*")):
        old.unlink(missing_ok=True)
    http_port = free_port() if system in ("dispatcher-http", "dispatcher-p2-http") else None
    proc = start(system, workload, broker, tmp, out, http_port)
    scraper = Scraper(http_port) if http_port else None
    result = _measure(system, workload, broker, tmp, proc, out)
    return scraper.stop(result) if scraper is not None else result


def _measure(system: str, workload: dict, broker: Broker, tmp: Path,
             proc: subprocess.Popen[bytes], out: Path) -> dict:
    queue, total = workload["queue"], workload["count"]
    output = workload.get("output") if system.startswith("publish-") else None
    split = system in SPLIT_SYSTEMS
    timeout = workload.get("timeout", 300)
    log = tmp / f"{system}.log"
    deadline = time.monotonic() + timeout
    while (result := handled(out, total, split)) is None:
        if proc.poll() is not None:
            code = proc.returncode
            finish(proc)
            wait_requeued(broker, queue)
            return {"error": f"exited with code {code} before finishing; see {log}"}
        if time.monotonic() > deadline:
            ready, unacked = counts(broker, queue)  # rabbitmqctl: takes about a second
            late = handled(out, total, split) is not None
            finish(proc)
            wait_requeued(broker, queue)
            acked = total - ready - unacked
            return {"error": f"did not finish within {timeout:.0f} s (at the timeout: {acked:,} "
                             f"of {total:,} acked, {unacked} unacked"
                             f"{'; it finished just after' if late else ''}); see {log}"}
        time.sleep(0.05)
    first, last, nbytes = result
    elapsed = last - first
    time.sleep(0.5)  # the last acks reach the broker
    remaining = counts(broker, workload["queue"])
    rss, cpu = finish(proc)
    if output:  # every input published: without confirms, the last may still be arriving
        end = time.monotonic() + 10
        while (published := counts(broker, output)[0]) < total and time.monotonic() < end:
            time.sleep(0.2)
        if published != total:
            return {"error": f"{published:,} of {total:,} inputs published to {output}"}
    return {"rate": workload["count"] / elapsed, "mbps": int(nbytes) / elapsed / 1e6,
            "rss": rss, "cpu": cpu, "left": remaining, "window": (float(first), float(last))}


def run_idle(system: str, workload: dict, broker: Broker, tmp: Path) -> dict:
    publish(broker.url, workload["queue"], 0, 0)
    proc = start(system, workload, broker, tmp, tmp / "idle.txt")
    time.sleep(3)  # let it connect and settle before measuring
    stat = Path(f"/proc/{proc.pid}/stat")
    ticks = os.sysconf("SC_CLK_TCK")

    def cpu() -> float:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / ticks

    before, t0 = cpu(), time.monotonic()
    time.sleep(workload["seconds"])
    used = (cpu() - before) / (time.monotonic() - t0)
    rss, _ = finish(proc)
    return {"core_pct": used * 100, "rss": rss}


def run_scale(system: str, workload: dict, broker: Broker, tmp: Path) -> dict:
    publish(broker.url, workload["queue"], 0, 0)
    t0 = time.monotonic()
    proc = start(system, workload, broker, tmp, tmp / "scale.txt")
    log = tmp / f"{system}.log"
    deadline = t0 + 120
    while "consuming from" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            finish(proc)
            return {"error": "did not start consuming"}
        time.sleep(0.05)
    startup = time.monotonic() - t0
    rss, _ = finish(proc)
    return {"startup_s": startup, "rss": rss}


# What marks "every worker consuming" in each system's log.
CONSUMING_LINE = {"dispatcher": "consuming from", "dispatcher-p2": "all 2 workers consuming"}


def run_start(system: str, workload: dict, broker: Broker, tmp: Path) -> dict:
    """Seconds from exec to every worker consuming, the median of ``repeat`` starts."""
    publish(broker.url, workload["queue"], 0, 0)
    log = tmp / f"{system}.log"
    times = []
    for _ in range(workload["repeat"]):
        argv, env = command(system, workload, tmp, None)
        full_env = dict(os.environ, RABBITMQ_URL=broker.url, BENCH_OUT=str(tmp / "start.txt"),
                        **env)
        with open(log, "wb") as out:
            t0 = time.monotonic()
            proc = subprocess.Popen(argv, env=full_env, cwd=tmp, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            deadline = t0 + 60
            while CONSUMING_LINE[system] not in log.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    finish(proc)
                    return {"error": f"did not start consuming; see {log}"}
                time.sleep(0.002)
            times.append(time.monotonic() - t0)
        finish(proc)
    return {"startup_s": statistics.median(times), "starts": times}


WORKLOADS = [
    {"name": "1. no-op 30k x 100 B, 10 consumers, prefetch 100", "kind": "throughput",
     "queue": "bench_noop", "count": 30000, "size": 100, "consumers": 10, "prefetch": 100,
     "systems": ["raw-ack", "raw-spawn", "dispatcher", "dispatcher-http", "dispatcher-p2",
                 "dispatcher-p2-http", "ad-0.11.0"],
     "note": "dispatcher-http: the same with the `http` endpoint on (each consume call "
             "timed for the histogram) and /metrics fetched once a second by the "
             "benchmark from the dispatcher's start; dispatcher-p2-http: --processes 2 with "
             "`http` on, the arbiter's /metrics scraped alike (its workers keep their "
             "counters in the count files the arbiter reads after a worker's death). "
             "dispatcher-p2 (--processes 2) must not "
             "be slower than dispatcher: a no-op consumer is bound by the broker and the "
             "client, not by one core."},
    {"name": "2a. sleep 0.05 s, 20k, 200 consumers, prefetch 200", "kind": "throughput",
     "queue": "bench_io", "count": 20000, "size": 100, "consumers": 200, "prefetch": 200,
     "sleep": 0.05, "systems": ["raw-spawn", "dispatcher", "ad-0.11.0"], "baseline": "raw-spawn"},
    {"name": "2b. sleep 0.05 s, 20k, 200 consumers, prefetch 400 (ideal 4,000/s)",
     "kind": "throughput", "queue": "bench_io", "count": 20000, "size": 100,
     "consumers": 200, "prefetch": 400, "sleep": 0.05, "systems": ["dispatcher"],
     "ideal": 4000},
    {"name": "3. scale: 10,000 consumers", "kind": "scale", "queue": "bench_scale",
     "consumers": 10000, "prefetch": 100, "systems": ["dispatcher"]},
    {"name": "4. 1 MB x 500, 10 consumers, prefetch 100", "kind": "throughput",
     "queue": "bench_large", "count": 500, "size": 1_000_000, "consumers": 10, "prefetch": 100,
     "systems": ["raw-ack", "dispatcher"]},
    {"name": "5. idle for 10 s", "kind": "idle", "queue": "bench_idle", "consumers": 10,
     "prefetch": 100, "seconds": 10, "systems": ["dispatcher", "ad-0.11.0"]},
    {"name": "6. heavy tail: 10k x 100 B, 50 consumers, prefetch 100, "
             "every 100th call 2 s, else 5 ms",
     "kind": "throughput", "queue": "bench_tail", "count": 10000, "size": 100,
     "consumers": 50, "prefetch": 100, "consumer": "HeavyTail",
     "duration": heavy_tail_duration, "target": 0.90,
     "systems": ["raw-spawn", "dispatcher", "ad-0.11.0"],
     "note": "raw-spawn is a reference only: it runs up to prefetch (100) calls at once, "
             "not 50, so the 50-instance bound does not hold it."},
    {"name": "7. flaky: no-op 20k x 100 B, 10 consumers, prefetch 100, one message in ten "
             "fails once (retry after 0.1 s)",
     "kind": "throughput", "queue": "bench_flaky", "count": 20000, "size": 100,
     "consumers": 10, "prefetch": 100, "systems": ["dispatcher", "dispatcher-flaky"],
     "baseline": "dispatcher",
     "note": "dispatcher: no failures; dispatcher-flaky: 2,000 failures, each one a confirmed "
             "publish to the delay queue, an ack, an instance replaced, and the message "
             "consumed again 0.1 s later."},
    {"name": "8. publish from consume: 20k x 100 B, 50 consumers, prefetch 100, one publish "
             "per input, with and without publisher confirms",
     "kind": "throughput", "queue": "bench_publish", "output": "bench_publish.out",
     "count": 20000, "size": 100, "consumers": 50, "prefetch": 100,
     "systems": ["dispatcher", "publish-confirms", "publish-no-confirms"],
     "baseline": "dispatcher",
     "note": "dispatcher: no-op, no publish; publish-confirms: each consume publishes one "
             "message to bench_publish.out and waits for the broker's confirm "
             "(publisher_confirms: true, the default), 50 of them in flight at once; "
             "publish-no-confirms: the same with publisher_confirms: false. Every run must "
             "leave one message per input in bench_publish.out."},
    {"name": "9. CPU-bound: 2 ms of CPU per message, 4k x 100 B, 4 consumers, prefetch 20, "
             "--processes 1 vs 2",
     "kind": "throughput", "queue": "bench_cpu", "count": 4000, "size": 100,
     "consumers": 4, "prefetch": 20, "consumer": "CpuBound",
     "systems": ["dispatcher", "dispatcher-p2"], "baseline": "dispatcher",
     "note": "One process is one core: about 500 msg/s at most. Target: dispatcher-p2 "
             "(--processes 2) >= 1.6x dispatcher on two cores, which the broker shares."},
    {"name": "10. start: exec to every worker consuming, 4 consumers, --processes 1 vs 2",
     "kind": "start", "queue": "bench_start", "consumers": 4, "prefetch": 20, "repeat": 5,
     "systems": ["dispatcher", "dispatcher-p2"], "baseline": "dispatcher",
     "note": "From the exec of the console script to its log line saying every consumer "
             "consumes ('all 2 workers consuming' from the arbiter), the median of 5 starts "
             "per run. Target: dispatcher-p2 within 0.2 s of dispatcher."},
]

# Heavy tail: a run slower than about a fifth of the in-order bound is reported as
# not finishing: 5x the bound's makespan, at least 10 s (32 s for 10k, 11 s for 1k).
BOUND_TIMEOUT_FACTOR = 5
MIN_TIMEOUT = 10

RUNNERS = {"throughput": run_throughput, "idle": run_idle, "scale": run_scale,
           "start": run_start}


def prepare(workload: dict, quick: bool) -> dict:
    """The workload as run: a tenth of the messages with --quick, and its bound if any."""
    if quick and "count" in workload:
        workload = dict(workload, count=max(50, workload["count"] // 10))
    if "duration" in workload:
        rate, makespan = in_order_bound(workload["count"], workload["consumers"],
                                        workload["duration"])
        timeout = max(MIN_TIMEOUT, math.ceil(BOUND_TIMEOUT_FACTOR * makespan))
        workload = dict(workload, bound=rate, makespan=makespan, timeout=timeout)
    return workload


def bound_line(workload: dict) -> str:
    return (f"In-order bound for {workload['count']:,} messages over {workload['consumers']} "
            f"instances: {workload['bound']:,.0f} msg/s (makespan {workload['makespan']:.2f} s); "
            f"target: dispatcher >= {workload['target']:.0%} of it; "
            f"timeout {workload['timeout']} s per run.")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one run, a tenth of the messages")
    parser.add_argument("--only", help="run only workloads whose name starts with one of these "
                                       "comma-separated prefixes, e.g. 6 or 1,2b")
    args = parser.parse_args()
    prefixes = [p.strip() for p in args.only.split(",") if p.strip()] if args.only else []
    selected = [w for w in WORKLOADS if not prefixes
                or any(w["name"].startswith(p) for p in prefixes)]
    if not selected:
        parser.error(f"--only {args.only}: no workload name starts with that; names: "
                     + "; ".join(w["name"] for w in WORKLOADS))
    ensure_legacy()
    WORK.mkdir(exist_ok=True)
    broker = Broker(name="amqp-dispatcher-bench")
    broker.start()
    results: list[tuple[dict, dict[str, list[dict]]]] = []
    try:
        for workload in selected:
            workload = prepare(workload, args.quick)
            if "bound" in workload:
                print(f"{workload['name']} | {bound_line(workload)}", flush=True)
            runs = 1 if args.quick else args.runs
            per_system: dict[str, list[dict]] = {s: [] for s in workload["systems"]}
            for run in range(runs):  # interleaved: each system once per round
                for system in workload["systems"]:
                    tmp = WORK / f"run-{system}"
                    tmp.mkdir(exist_ok=True)
                    result = RUNNERS[workload["kind"]](system, workload, broker, tmp)
                    print(f"{workload['name']} | {system} | run {run + 1}: {result}",
                          flush=True)
                    per_system[system].append(result)
            results.append((workload, per_system))
    finally:
        broker.stop()
    partial = args.quick or bool(prefixes)
    write_report(results, WORK if partial else BENCH)
    return 0


def ratio_text(workload: dict, median: float, base_median: float | None,
               baseline_name: str) -> str:
    if "bound" in workload:
        return f"{median / workload['bound']:.0%} of in-order bound"
    if "ideal" in workload:
        return f"{median / workload['ideal']:.0%} of ideal"
    return f"{median / base_median:.2f}x {baseline_name}" if base_median else "-"


def write_report(results: list[tuple[dict, dict[str, list[dict]]]], out_dir: Path) -> None:
    machine = (f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, "
               f"{time.strftime('%Y-%m-%d')}")
    lines = ["# Benchmark results", "", f"Machine: {machine}", "",
             "Generated by `.venv/bin/python bench/run.py`; ratios are within this run.", ""]
    chart: list[tuple[dict, dict[str, float | None]]] = []
    for workload, per_system in results:
        name = workload["name"]
        lines += [f"## {name}", ""]
        if "bound" in workload:
            lines += [bound_line(workload), ""]
        if "note" in workload:
            lines += [workload["note"], ""]
        if workload["kind"] == "throughput":
            lines += ["| system | median msg/s | min-max | MB/s | vs baseline | peak RSS MB "
                      "| CPU s | queue after (ready, unacked) |",
                      "|---|---|---|---|---|---|---|---|"]
            baseline_name = workload.get("baseline", "raw-ack")
            base = [r["rate"] for r in per_system.get(baseline_name, []) if "rate" in r]
            base_median = statistics.median(base) if base else None
            bars: dict[str, float | None] = {}
            scraped: list[str] = []
            for system, runs in per_system.items():
                ok = [r for r in runs if "rate" in r]
                failed = [r for r in runs if "rate" not in r]
                if not ok:
                    bars[system] = None
                    lines.append(f"| {system} | failed: {failed[0].get('error')} "
                                 f"| | | | | | |")
                    continue
                rates = [r["rate"] for r in ok]
                median = statistics.median(rates)
                ratio = ratio_text(workload, median, base_median, baseline_name)
                if failed:
                    ratio += (f"; {len(failed)} of {len(runs)} runs failed: "
                              f"{failed[0].get('error')}")
                bars[system] = median
                if "scrapes" in ok[0]:
                    window = statistics.median(r["window"][1] - r["window"][0] for r in ok)
                    took = [r["scrape_ms"] for r in ok if r["scrape_ms"] is not None]
                    scraped.append(f"{system}: {sum(r['scrapes'] for r in ok)} scrape(s) of "
                                   f"/metrics within its {len(ok)} measured window(s) "
                                   f"(median {window:.2f} s); a scrape took "
                                   + (f"{statistics.median(took):.1f} ms (median)" if took
                                      else "(none answered)"))
                lines.append(
                    f"| {system} | {median:,.0f} | {min(rates):,.0f}-{max(rates):,.0f} "
                    f"| {statistics.median(r['mbps'] for r in ok):.1f} | {ratio} "
                    f"| {max(r['rss'] for r in ok):.0f} "
                    f"| {statistics.median(r['cpu'] for r in ok):.1f} "
                    f"| {', '.join(str(r['left']) for r in ok)} |")
            chart.append((workload, bars))
            if scraped:
                lines += [""] + scraped
        elif workload["kind"] == "idle":
            lines += ["| system | % of a core (median) | peak RSS MB |", "|---|---|---|"]
            for system, runs in per_system.items():
                lines.append(f"| {system} | {statistics.median(r['core_pct'] for r in runs):.2f} "
                             f"| {max(r['rss'] for r in runs):.0f} |")
        elif workload["kind"] == "start":
            lines += ["| system | exec to every worker consuming, s (median) | each start, s "
                      "| vs baseline |", "|---|---|---|---|"]
            base = [s for r in per_system.get(workload["baseline"], []) for s in
                    r.get("starts", [])]
            for system, runs in per_system.items():
                ok = [r for r in runs if "startup_s" in r]
                if not ok:
                    lines.append(f"| {system} | failed: {runs[0].get('error')} | | |")
                    continue
                starts = [s for r in ok for s in r["starts"]]
                median = statistics.median(starts)
                diff = (f"{median - statistics.median(base):+.2f} s" if base else "-")
                lines.append(f"| {system} | {median:.2f} "
                             f"| {', '.join(f'{s:.2f}' for s in starts)} | {diff} |")
        else:
            lines += ["| system | start to consuming, s | peak RSS MB |", "|---|---|---|"]
            for system, runs in per_system.items():
                ok = [r for r in runs if "rss" in r]
                if not ok:
                    lines.append(f"| {system} | failed | |")
                    continue
                lines.append(f"| {system} | {statistics.median(r['startup_s'] for r in ok):.2f} "
                             f"| {max(r['rss'] for r in ok):.0f} |")
        lines.append("")
    (out_dir / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"written: {out_dir / 'results.md'}")
    draw_chart(chart, out_dir / "results.png")


def draw_chart(chart: list[tuple[dict, dict[str, float | None]]], path: Path) -> None:
    """One panel per throughput workload; a dashed line marks its ideal or in-order bound."""
    if not chart:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)")
        return
    cols = min(3, len(chart))
    rows = math.ceil(len(chart) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(chart):]:
        ax.set_visible(False)
    for ax, (workload, systems) in zip(axes.flat, chart):
        names = list(systems)
        heights = [v or 0.0 for v in systems.values()]
        ax.bar(names, heights,
               color=["tab:green" if s.startswith("dispatcher") else "tab:gray"
                      for s in names])
        for i, value in enumerate(systems.values()):
            if value is None:
                ax.text(i, 0, "did not\nfinish", ha="center", va="bottom", fontsize=7,
                        color="tab:red")
        line = workload.get("bound") or workload.get("ideal")
        if line:
            label = "in-order bound" if "bound" in workload else "ideal"
            ax.axhline(line, color="tab:blue", linestyle="--", linewidth=1)
            ax.text(len(names) - 0.5, line, f"{label} {line:,.0f}/s", ha="right",
                    va="bottom", fontsize=7, color="tab:blue")
            ax.set_ylim(0, max([line, *heights]) * 1.15)
        ax.set_title(workload["name"], fontsize=8, wrap=True)
        ax.set_ylabel("messages/s (median)")
        ax.tick_params(axis="x", labelsize=7, rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark: this dispatcher against the baselines, on one private broker.

    .venv/bin/python bench/run.py [--runs 3] [--quick] [--only 6[,2b...]]

(--only takes name prefixes: "1." is workload 1 alone, "1" also 10 and 11.)

Systems, run interleaved on the same workload:
  dispatcher  this package's console script, with a config file and bench/benchconsumers.py
  raw-ack     (a) a raw pika GeventConnection consumer acking inside its delivery callback
  raw-spawn   (b) the same, spawning one greenlet per delivery
  ad-0.11.0   (c) amqp-dispatcher 0.11.0 from PyPI in its own virtualenv (bench/work/)

Peers (workloads 1, 2b, 6, 8, 9, 11): what a team would pick instead, each pinned
(PEERS) and installed by this script into a virtualenv of its own under bench/work/,
run by its own command line as its documentation recommends for the workload, the
handlers in bench/peerapps/ (benchwork.py counts as benchconsumers does):
  dramatiq    `dramatiq` (threads) or `dramatiq-gevent` (waiting work), RabbitmqBroker
  celery      `celery worker`, -P gevent (one process) or prefork (CPU-bound), acks_late
  faststream  `faststream run`, asyncio handlers, --workers 2 for CPU-bound
Each consumes what the benchmark publishes to the workload's queue (declared as the
peer declares it), in the peer's own envelope where it needs one (built by the
publisher before the timed window), and acks after its handler returns. A workload's
"peers" entry holds each one's setup; "ours" names the figure the peers are compared
with ("vs ours"). The report starts with one table of the medians against ours.

Workload 11 (latency): a fixed rate (11a: 1,000 msg/s; 11b: half each system's own
no-op median of workload 1) for 20 s, the publish time in the body; the consumer keeps
the time from there to the start of each call: p50, p99, p99.9, max; and the CPU
seconds of the system's processes per 1,000 messages.

Messages/s are measured inside the consumer, from the first to the last handled
message. After each run the queue must be empty: nothing unacked, nothing lost.
A throughput run that does not finish within its timeout is reported as failed.

System dispatcher-http (workload 1 only): this dispatcher with the `http` endpoint on
(which also times every consume call for the histogram), /metrics fetched once a
second by the benchmark process from the moment the dispatcher starts.
System dispatcher-p2-http (workload 1 only): the same with --processes 2, the
arbiter's /metrics scraped.
System dispatcher-otel (workloads 1 and 6): this dispatcher with OpenTelemetry's SDK
configured by its startup handler (benchconsumers.setup_tracing): a span per consume
call, through a BatchSpanProcessor to an exporter that drops them.

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
import json
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
import uuid
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


# The peers: what a team picking a RabbitMQ consumer runtime in Python would compare us
# with. Each in a virtualenv of its own under bench/work/, named after its pinned version.
PEERS: dict[str, dict] = {
    "dramatiq": {"version": "2.2.1", "pip": ["dramatiq[rabbitmq,gevent]==2.2.1"],
                 "client": "pika"},
    "celery": {"version": "5.7.0", "pip": ["celery[gevent]==5.7.0"], "client": "kombu, amqp"},
    "faststream": {"version": "0.7.8", "pip": ["faststream[rabbit,cli]==0.7.8"],
                   "client": "aio-pika, aiormq"},
}
PEERAPPS = BENCH / "peerapps"


def peer_bin(system: str, name: str) -> str:
    return str(WORK / f"{system}-{PEERS[system]['version']}" / "bin" / name)


def ensure_peers(systems: set[str]) -> None:
    for system in sorted(systems & PEERS.keys()):
        if Path(peer_bin(system, "python")).exists():
            continue
        venv = WORK / f"{system}-{PEERS[system]['version']}"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([peer_bin(system, "python"), "-m", "pip", "install", "-q",
                        *PEERS[system]["pip"]], check=True)


def peer_versions(system: str) -> str:
    """The versions installed in a peer's virtualenv: the peer and its AMQP client."""
    frozen = subprocess.run([peer_bin(system, "python"), "-m", "pip", "freeze"],
                            capture_output=True, text=True).stdout.split()
    wanted = {system, *(c.strip() for c in PEERS[system]["client"].split(",")), "gevent"}
    return ", ".join(line for line in frozen if line.split("==")[0].lower() in wanted)


def queue_arguments(system: str, queue: str) -> dict | None:
    """The arguments the system declares `queue` with (it must find it declared so)."""
    if system == "dramatiq":  # RabbitmqBroker._build_queue_arguments
        return {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{queue}.XQ"}
    return None


Envelope = Callable[[bytes], tuple[bytes, "pika.BasicProperties | None"]]


def envelope(system: str, queue: str) -> Envelope:
    """How the benchmark's publisher wraps a payload for `system`: a plain body for this
    dispatcher, the baselines and FastStream; Dramatiq's and Celery's own message
    formats (JSON, the payload as the one argument of the actor or task) for them."""
    if system == "dramatiq":
        props = pika.BasicProperties(delivery_mode=2)

        def dramatiq(payload: bytes) -> tuple[bytes, pika.BasicProperties | None]:
            return json.dumps({
                "queue_name": queue, "actor_name": "bench", "args": [payload.decode()],
                "kwargs": {}, "options": {}, "message_id": str(uuid.uuid4()),
                "message_timestamp": int(time.time() * 1000)},
                separators=(",", ":")).encode(), props
        return dramatiq
    if system == "celery":
        def celery(payload: bytes) -> tuple[bytes, pika.BasicProperties | None]:
            task_id, text = str(uuid.uuid4()), payload.decode()
            headers = {  # Celery's message protocol 2 (celery.app.amqp.as_task_v2)
                "lang": "py", "task": "bench", "id": task_id, "shadow": None, "eta": None,
                "expires": None, "group": None, "group_index": None, "retries": 0,
                "timelimit": [None, None], "root_id": task_id, "parent_id": None,
                "argsrepr": repr((text,)), "kwargsrepr": "{}", "origin": "bench",
                "ignore_result": False, "replaced_task_nesting": 0, "stamped_headers": None,
                "stamps": {}}
            body = json.dumps([[text], {}, {"callbacks": None, "errbacks": None,
                                            "chain": None, "chord": None}])
            return body.encode(), pika.BasicProperties(
                content_type="application/json", content_encoding="utf-8", headers=headers,
                correlation_id=task_id, reply_to="", delivery_mode=2, priority=0)
        return celery
    return lambda payload: (payload, None)


def publish(url: str, queue: str, count: int, size: int, empty: tuple[str, ...] = (),
            system: str = "") -> None:
    """Put ``count`` messages in ``queue``, emptied first with the ``empty`` queues: each
    deleted and declared again as `system` declares it, then the messages published in
    `system`'s envelope."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    for name in (queue, *empty):
        channel.queue_delete(name)
        channel.queue_declare(name, durable=True, arguments=queue_arguments(system, name))
    wrap = envelope(system, queue)
    payload = b"x" * size
    for _ in range(count):
        channel.basic_publish("", queue, *wrap(payload))
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
    if system == "dispatcher-otel":
        top = "startup_handler: benchconsumers:setup_tracing\n"
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
                  "dispatcher-p2-http", "dispatcher-otel",
                  "publish-confirms", "publish-no-confirms"):
        # This checkout's package, whatever the virtualenv has installed.
        env["PYTHONPATH"] = os.pathsep.join([str(BENCH), str(REPO)])
        if system in SPLIT_SYSTEMS:
            env["BENCH_SPLIT"] = "1"
            return [SCRIPT, "--processes", "2", "--config", str(config)], env
        return [SCRIPT, "--config", str(config)], env
    if system in PEERS:
        return peer_command(system, workload, env)
    if system == "ad-0.11.0":
        env["RABBITMQ_HEARTBEAT"] = "60"
        return [str(LEGACY_PY), str(BENCH / "legacy.py"), "--connection", "pika",
                "--config", str(config)], env
    mode = "ack" if system == "raw-ack" else "spawn"
    return [sys.executable, str(BENCH / "raw.py"), mode, queue, str(prefetch)], env


def peer_processes(system: str, workload: dict) -> int:
    """How many processes of `system` handle the workload's messages."""
    setup = workload.get("peers", {}).get(system, {})
    if system == "celery":
        return setup["concurrency"] if setup["pool"] == "prefork" else 1
    return setup.get("processes", setup.get("workers", 1))


def is_split(system: str, workload: dict) -> bool:
    return system in SPLIT_SYSTEMS or (system in PEERS and peer_processes(system, workload) > 1)


def peer_command(system: str, workload: dict,
                 env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """A peer run as its documentation says, with the workload's setup (workload["peers"])."""
    setup = workload["peers"][system]
    queue = workload["queue"]
    env = dict(env, PYTHONPATH=str(PEERAPPS), BENCH_QUEUE=queue,
               BENCH_PROCS=str(peer_processes(system, workload)),
               BENCH_CONFIRMS="1" if setup.get("confirms") else "0",
               BENCH_PUBLISH_TO=workload.get("output", ""))
    if system == "dramatiq":
        env["dramatiq_queue_prefetch"] = str(setup["prefetch"])
        launcher = "dramatiq-gevent" if setup.get("gevent") else "dramatiq"
        return [peer_bin(system, launcher), "dramatiq_app", "--processes",
                str(setup["processes"]), "--threads", str(setup["threads"]),
                "--queues", queue], env
    if system == "celery":
        env["BENCH_CELERY_NO_HEARTBEAT"] = "1" if setup["pool"] == "gevent" else "0"
        return [peer_bin(system, "celery"), "-A", "celery_app", "worker", "-P", setup["pool"],
                "-c", str(setup["concurrency"]), "--prefetch-multiplier",
                str(setup["multiplier"]), "-Q", queue], env
    env["BENCH_PREFETCH"] = str(setup["prefetch"])
    return [peer_bin(system, "faststream"), "run", "faststream_app:app", "--workers",
            str(setup.get("workers", 1)), "--log-level", "warning"], env


def peer_setup_text(system: str, workload: dict) -> str:
    """The peer's setup in this workload, in a sentence."""
    setup = workload["peers"][system]
    confirms = " publisher confirms on;" if setup.get("confirms") else ""
    if system == "dramatiq":
        return (f"`{'dramatiq-gevent' if setup.get('gevent') else 'dramatiq'} --processes "
                f"{setup['processes']} --threads {setup['threads']}`, "
                f"dramatiq_queue_prefetch={setup['prefetch']};{confirms} acked after the "
                f"actor returns")
    if system == "celery":
        green = (" broker_heartbeat=0 (see the notes at the end);"
                 if setup["pool"] == "gevent" else "")
        return (f"`celery worker -P {setup['pool']} -c {setup['concurrency']} "
                f"--prefetch-multiplier {setup['multiplier']}` (prefetch "
                f"{setup['concurrency'] * setup['multiplier']}), task_acks_late=True;"
                f"{green}"
                f"{' confirm_publish on;' if setup.get('confirms') else ''} acked after the "
                f"task returns")
    return (f"`faststream run --workers {setup.get('workers', 1)}`, prefetch_count "
            f"{setup['prefetch']} per process (= handlers at once);{confirms} default ack "
            f"policy (acked after the handler returns)")


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
                            stdin=subprocess.DEVNULL, start_new_session=system in PEERS)
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


def tree(pid: int) -> list[int]:
    """`pid` and its live descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def peak_rss(pid: int) -> float:
    """The largest peak RSS (VmHWM, MB) of one process of `pid`'s tree, 0 if none is left.
    Not the rusage's ru_maxrss: Linux carries the forking parent's peak RSS over the exec
    into it, so that it was never below the benchmark process's own size."""
    peak = 0
    for member in tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peak = max(peak, int(line.split()[1]))
    return peak / 1024


def finish(proc: subprocess.Popen[bytes], grace: float = 60.0) -> tuple[float, float]:
    """Stop the process; return (peak RSS in MB: the largest VmHWM of one process of its
    tree just before the SIGTERM; CPU seconds from its rusage: its own and that of the
    children it waited for). A process still there `grace` seconds after the SIGTERM is
    killed, with its process group if it leads one (the peers)."""
    rss = peak_rss(proc.pid) if proc.poll() is None else 0.0
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    try:
        while (waited := os.wait4(proc.pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                print(f"pid {proc.pid} still there {grace:.0f} s after SIGTERM: killed",
                      flush=True)
                if os.getpgid(proc.pid) == proc.pid:
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
                deadline = math.inf
            time.sleep(0.02)
    except ChildProcessError:
        return 0.0, 0.0
    usage = waited[2]
    proc.returncode = 0
    return rss or usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


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
              if path.suffix[1:].isdigit()]
    if sum(int(count) for _, _, count, _ in shares) < total:
        return None
    return (min(float(first) for first, _, _, _ in shares),
            max(float(last) for _, last, _, _ in shares),
            sum(int(nbytes) for _, _, _, nbytes in shares))


def publishes_to(system: str, workload: dict) -> str | None:
    """The queue to which `system` publishes one message per input, if it does."""
    if system.startswith("publish-") or system in PEERS:
        return workload.get("output")
    return None


def clean(out: Path) -> None:
    for old in (out, *out.parent.glob(f"{out.name}.*"), *out.parent.glob(f"{out.name}-ready.*")):
        old.unlink(missing_ok=True)


def run_throughput(system: str, workload: dict, broker: Broker, tmp: Path) -> dict:
    queue, total = workload["queue"], workload["count"]
    output = publishes_to(system, workload)
    publish(broker.url, queue, total, workload["size"], (output,) if output else (), system)
    out = tmp / "out.txt"
    clean(out)
    http_port = free_port() if system in ("dispatcher-http", "dispatcher-p2-http") else None
    proc = start(system, workload, broker, tmp, out, http_port)
    scraper = Scraper(http_port) if http_port else None
    result = _measure(system, workload, broker, tmp, proc, out)
    return scraper.stop(result) if scraper is not None else result


def _measure(system: str, workload: dict, broker: Broker, tmp: Path,
             proc: subprocess.Popen[bytes], out: Path) -> dict:
    queue, total = workload["queue"], workload["count"]
    output = publishes_to(system, workload)
    split = is_split(system, workload)
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


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of `pid` and its live descendants, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for member in tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


NOOP_MAX = WORK / "noop-max.json"  # each system's no-op median, kept for a later --only 11b


def latency_rate(system: str, workload: dict) -> float:
    if workload["rate"] != "half-noop":
        return float(workload["rate"])
    if system == "raw-ack":  # the reference: the thinnest consumer at the dispatcher's rate
        system = "dispatcher"
    known = json.loads(NOOP_MAX.read_text()) if NOOP_MAX.exists() else {}
    if system not in known:
        raise SystemExit(f"{workload['name']}: no no-op maximum for {system}: run workload 1 "
                         f"first (its medians are kept in {NOOP_MAX})")
    return known[system] / 2


def run_latency(system: str, workload: dict, broker: Broker, tmp: Path) -> dict:
    """Publish at a fixed rate for workload["seconds"], the publish time (time.time()) at the
    start of each payload, then "end M" (M published); the consumer keeps, for each message,
    the time from there to the start of its call. CPU: the system's process tree, from the
    first timed publish to the last message handled."""
    queue, seconds = workload["queue"], workload["seconds"]
    rate = latency_rate(system, workload)
    publish(broker.url, queue, 0, 0, (), system)
    out = tmp / "out.txt"
    clean(out)
    proc = start(system, dict(workload, count=0), broker, tmp, out)
    connection = pika.BlockingConnection(pika.URLParameters(broker.url))
    channel = connection.channel()
    wrap = envelope(system, queue)
    try:
        channel.basic_publish("", queue, *wrap(b"warmup"))
        deadline = time.monotonic() + 60
        while not (tmp / "out.txt.warm").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                finish(proc)
                return {"error": f"never handled the warm-up message; see {tmp / system}.log"}
            time.sleep(0.05)
        pad = b" " + b"x" * max(0, workload["size"] - 18)
        cpu0 = tree_cpu(proc.pid)
        t0 = time.perf_counter()
        total = 0  # published: fewer than rate * seconds if the publisher cannot keep up
        while (now := time.perf_counter()) < t0 + seconds:
            pause = t0 + total / rate - now
            if pause > 0:
                time.sleep(pause)
            channel.basic_publish("", queue, *wrap(b"%.6f" % time.time() + pad))
            total += 1
        published = total / (time.perf_counter() - t0)
        channel.basic_publish("", queue, *wrap(b"end %d" % total))
        deadline = time.monotonic() + seconds + 60
        while not (out.exists() and out.read_text().endswith("\n")):
            if proc.poll() is not None or time.monotonic() > deadline:
                finish(proc)
                wait_requeued(broker, queue)
                return {"error": f"did not handle all {total:,} messages; see {tmp / system}.log"}
            time.sleep(0.05)
        cpu = tree_cpu(proc.pid) - cpu0
    finally:
        connection.close()
    latencies = sorted(float(line) for line in (tmp / "out.txt.lat").read_text().split())
    time.sleep(0.5)
    remaining = counts(broker, queue)
    rss, _ = finish(proc)

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, math.ceil(p / 100 * len(latencies)) - 1)] * 1000

    return {"rate": rate, "published": published, "count": len(latencies), "p50": pct(50),
            "p99": pct(99), "p999": pct(99.9), "max": latencies[-1] * 1000,
            "cpu_per_1k": cpu / total * 1000, "rss": rss, "left": remaining}


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


# The peers' setup for a no-op consumer: one process, as `dispatcher`; prefetch 100.
NOOP_PEERS = {"dramatiq": {"processes": 1, "threads": 10, "prefetch": 100},
               "celery": {"pool": "gevent", "concurrency": 10, "multiplier": 10},
               "faststream": {"prefetch": 100}}
PEER_NAMES = list(PEERS)

WORKLOADS = [
    {"name": "1. no-op 30k x 100 B, 10 consumers, prefetch 100", "kind": "throughput",
     "queue": "bench_noop", "count": 30000, "size": 100, "consumers": 10, "prefetch": 100,
     "systems": ["raw-ack", "raw-spawn", "dispatcher", "dispatcher-http", "dispatcher-p2",
                 "dispatcher-p2-http", "dispatcher-otel", "ad-0.11.0", *PEER_NAMES],
     "ours": "dispatcher",
     "peers": NOOP_PEERS, "keep_noop_max": True,
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
     "consumers": 200, "prefetch": 400, "sleep": 0.05, "systems": ["dispatcher", *PEER_NAMES],
     "ideal": 4000, "ours": "dispatcher",
     "peers": {"dramatiq": {"gevent": True, "processes": 1, "threads": 200, "prefetch": 400},
               "celery": {"pool": "gevent", "concurrency": 200, "multiplier": 2},
               "faststream": {"prefetch": 200}},
     "note": "200 calls at once, each sleeping 50 ms cooperatively: 4,000/s at best. Peers: "
             "Dramatiq's gevent launcher and Celery's gevent pool, as their documentation "
             "recommends for I/O-bound work, 200 greenlets; FastStream runs as many handlers "
             "at once as its prefetch, hence prefetch 200."},
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
     "systems": ["raw-spawn", "dispatcher", "dispatcher-otel", "ad-0.11.0", *PEER_NAMES],
     "ours": "dispatcher",
     "peers": {"dramatiq": {"gevent": True, "processes": 1, "threads": 50, "prefetch": 100},
               "celery": {"pool": "gevent", "concurrency": 50, "multiplier": 2},
               "faststream": {"prefetch": 50}},
     "note": "raw-spawn is a reference only: it runs up to prefetch (100) calls at once, "
             "not 50, so the 50-instance bound does not hold it. The peers run 50 calls at "
             "once (FastStream: prefetch 50, as many handlers at once as its prefetch)."},
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
     "systems": ["dispatcher", "publish-confirms", "publish-no-confirms", *PEER_NAMES],
     "baseline": "dispatcher", "ours": "publish-confirms",
     "peers": {"dramatiq": {"gevent": True, "processes": 1, "threads": 50, "prefetch": 100,
                            "confirms": True},
               "celery": {"pool": "gevent", "concurrency": 50, "multiplier": 2,
                          "confirms": True},
               "faststream": {"prefetch": 50, "confirms": True}},
     "note": "dispatcher: no-op, no publish; publish-confirms: each consume publishes one "
             "message to bench_publish.out and waits for the broker's confirm "
             "(publisher_confirms: true, the default), 50 of them in flight at once; "
             "publish-no-confirms: the same with publisher_confirms: false. Every run must "
             "leave one message per input in bench_publish.out. Peers, 50 calls at once, each "
             "waiting for the broker's confirm of its publish: Dramatiq sends a message to "
             "an actor on bench_publish.out (RabbitmqBroker(confirm_delivery=True)); Celery "
             "sends a task to it (send_task, broker_transport_options confirm_publish); "
             "FastStream publishes the body (broker.publish; its default channel confirms)."},
    {"name": "9. CPU-bound: 2 ms of CPU per message, 4k x 100 B, 4 consumers, prefetch 20, "
             "--processes 1 vs 2",
     "kind": "throughput", "queue": "bench_cpu", "count": 4000, "size": 100,
     "consumers": 4, "prefetch": 20, "consumer": "CpuBound",
     "systems": ["dispatcher", "dispatcher-p2", *PEER_NAMES], "baseline": "dispatcher",
     "ours": "dispatcher-p2",
     "peers": {"dramatiq": {"processes": 2, "threads": 4, "prefetch": 20},
               "celery": {"pool": "prefork", "concurrency": 2, "multiplier": 20},
               "faststream": {"workers": 2, "prefetch": 20}},
     "note": "One process is one core: about 500 msg/s at most. Target: dispatcher-p2 "
             "(--processes 2) >= 1.6x dispatcher on two cores, which the broker shares. "
             "The peers run two processes too, prefetch 40 in all as dispatcher-p2."},
    {"name": "10. start: exec to every worker consuming, 4 consumers, --processes 1 vs 2",
     "kind": "start", "queue": "bench_start", "consumers": 4, "prefetch": 20, "repeat": 5,
     "systems": ["dispatcher", "dispatcher-p2"], "baseline": "dispatcher",
     "note": "From the exec of the console script to its log line saying every consumer "
             "consumes ('all 2 workers consuming' from the arbiter), the median of 5 starts "
             "per run. Target: dispatcher-p2 within 0.2 s of dispatcher."},
]

LATENCY = {"kind": "latency", "queue": "bench_latency", "size": 100, "consumers": 10,
           "prefetch": 100, "consumer": "Latency", "seconds": 20,
           "systems": ["raw-ack", "dispatcher", *PEER_NAMES], "ours": "dispatcher",
           "peers": NOOP_PEERS}
WORKLOADS += [
    dict(LATENCY, name="11a. latency at 1,000 msg/s for 20 s, 10 consumers, prefetch 100",
         rate=1000,
         note="The time from the publish (the time.time() before the envelope is built and "
              "the message published) to the start of the consumer's call. CPU: the "
              "system's processes, from the first publish to the last message handled, per "
              "1,000 messages. The peers set up as in workload 1."),
    dict(LATENCY, name="11b. latency at half each system's no-op maximum for 20 s, "
                       "10 consumers, prefetch 100",
         rate="half-noop",
         note="Each system at half its own median of workload 1 (in this run; a run of 11b "
              "alone takes the last kept in bench/work/noop-max.json); raw-ack, the raw pika "
              "consumer acking in its callback, at the dispatcher's rate, as the reference "
              "for what the broker and the publisher allow on this machine. 'published' is "
              "the rate the benchmark's one publisher (a pika BlockingConnection) achieved: "
              "below the target when it cannot keep up."),
]

# Heavy tail: a run slower than about a fifth of the in-order bound is reported as
# not finishing: 5x the bound's makespan, at least 10 s (32 s for 10k, 11 s for 1k).
BOUND_TIMEOUT_FACTOR = 5
MIN_TIMEOUT = 10

RUNNERS = {"throughput": run_throughput, "idle": run_idle, "scale": run_scale,
           "start": run_start, "latency": run_latency}


def prepare(workload: dict, quick: bool) -> dict:
    """The workload as run: a tenth of the messages with --quick, and its bound if any."""
    if quick and "count" in workload:
        workload = dict(workload, count=max(50, workload["count"] // 10))
    if quick and workload["kind"] == "latency":
        workload = dict(workload, seconds=4)
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
    parser.add_argument("--systems", help="run only these comma-separated systems of each "
                                          "workload, e.g. raw-ack,dispatcher,dispatcher-otel")
    args = parser.parse_args()
    prefixes = [p.strip() for p in args.only.split(",") if p.strip()] if args.only else []
    selected = [w for w in WORKLOADS if not prefixes
                or any(w["name"].startswith(p) for p in prefixes)]
    if not selected:
        parser.error(f"--only {args.only}: no workload name starts with that; names: "
                     + "; ".join(w["name"] for w in WORKLOADS))
    if args.systems:
        wanted = {s.strip() for s in args.systems.split(",") if s.strip()}
        known = {s for w in WORKLOADS for s in w["systems"]}
        if wanted - known:
            parser.error(f"--systems: unknown {', '.join(sorted(wanted - known))}; known: "
                         + ", ".join(sorted(known)))
        selected = [dict(w, systems=[s for s in w["systems"] if s in wanted]) for w in selected]
    WORK.mkdir(exist_ok=True)
    ensure_legacy()
    ensure_peers({system for workload in selected for system in workload["systems"]})
    broker = Broker(name=f"amqp-dispatcher-bench-{os.getpid()}")
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
            if workload.get("keep_noop_max"):
                known = json.loads(NOOP_MAX.read_text()) if NOOP_MAX.exists() else {}
                known.update({system: statistics.median(r["rate"] for r in runs if "rate" in r)
                              for system, runs in per_system.items()
                              if any("rate" in r for r in runs)})
                NOOP_MAX.write_text(json.dumps(known, indent=1))
    finally:
        broker.stop()
    partial = args.quick or bool(prefixes) or bool(args.systems)
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
    latency_chart: list[tuple[dict, dict[str, float]]] = []
    lines += peers_section(results)
    for workload, per_system in results:
        name = workload["name"]
        lines += [f"## {name}", ""]
        if "bound" in workload:
            lines += [bound_line(workload), ""]
        if "note" in workload:
            lines += [workload["note"], ""]
        if any(system in PEERS for system in per_system):
            lines += ["Peers: " + "; ".join(f"{system}: {peer_setup_text(system, workload)}"
                                            for system in per_system if system in PEERS)
                      + ".", ""]
        if workload["kind"] == "throughput":
            ours_name = workload.get("ours")
            ours = [r["rate"] for r in per_system.get(ours_name or "", []) if "rate" in r]
            ours_median = statistics.median(ours) if ours else None
            lines += ["| system | median msg/s | min-max | MB/s | vs baseline | peak RSS MB "
                      "| CPU s | queue after (ready, unacked) |"
                      + (f" vs ours ({ours_name}) |" if ours_name else ""),
                      "|---|---|---|---|---|---|---|---|" + ("---|" if ours_name else "")]
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
                                 f"| | | | | | |" + (" |" if ours_name else ""))
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
                    f"| {', '.join(str(r['left']) for r in ok)} |"
                    + (f" {median / ours_median:.2f}x |" if ours_name and ours_median else
                       " - |" if ours_name else ""))
            chart.append((workload, bars))
            if scraped:
                lines += [""] + scraped
        elif workload["kind"] == "latency":
            lines += ["| system | rate msg/s (published) | p50 ms | p99 ms | p99.9 ms | max ms "
                      "| CPU s per 1,000 msgs | peak RSS MB | p99 vs ours | CPU vs ours "
                      "| queue after |", "|---|---|---|---|---|---|---|---|---|---|---|"]
            ours = [r for r in per_system.get(workload["ours"], []) if "p99" in r]

            def med(runs: list[dict], key: str) -> float:
                return statistics.median(r[key] for r in runs)
            for system, runs in per_system.items():
                ok = [r for r in runs if "p99" in r]
                if not ok:
                    lines.append(f"| {system} | failed: {runs[0].get('error')} "
                                 "| | | | | | | | | |")
                    continue
                versus = (f"{med(ok, 'p99') / med(ours, 'p99'):.2f}x "
                          f"| {med(ok, 'cpu_per_1k') / med(ours, 'cpu_per_1k'):.2f}x"
                          if ours else "- | -")
                lines.append(
                    f"| {system} | {med(ok, 'rate'):,.0f} ({med(ok, 'published'):,.0f}) "
                    f"| {med(ok, 'p50'):.2f} | {med(ok, 'p99'):.2f} | {med(ok, 'p999'):.2f} "
                    f"| {med(ok, 'max'):.1f} | {med(ok, 'cpu_per_1k'):.3f} "
                    f"| {max(r['rss'] for r in ok):.0f} | {versus} "
                    f"| {', '.join(str(r['left']) for r in ok)} |")
            latency_chart.append((workload, {s: med([r for r in runs if "p99" in r], "p99")
                                             for s, runs in per_system.items()
                                             if any("p99" in r for r in runs)}))
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
    draw_chart(chart, latency_chart, out_dir / "results.png")


def peers_section(results: list[tuple[dict, dict[str, list[dict]]]]) -> list[str]:
    """The peers' versions, and one table: each workload's medians, ratios against ours."""
    peers = [p for p in PEERS if any(p in per_system for _, per_system in results)]
    if not peers:
        return []
    lines = ["## Against the peers: Dramatiq, Celery, FastStream", "",
             "Installed by bench/run.py into virtualenvs of their own under bench/work/: "
             + "; ".join(f"{p}: {peer_versions(p)}" for p in peers) + ". Each consumes the "
             "messages the benchmark publishes to the same queue on the same broker, in its "
             "own envelope where it needs one (Dramatiq's and Celery's JSON message, built "
             "before the timed window; FastStream a plain body), acks after the call "
             "returns, and is stopped with SIGTERM. Setup per workload under each table.", "",
             "| workload | ours | " + " | ".join(peers) + " |",
             "|---|---|" + "---|" * len(peers)]
    for workload, per_system in results:
        ours_name = workload.get("ours")
        if not ours_name or not any(p in per_system for p in peers):
            continue
        key, unit = (("p99", "ms p99") if workload["kind"] == "latency" else ("rate", "msg/s"))

        def median(system: str, per_system: dict = per_system, key: str = key) -> float | None:
            values = [r[key] for r in per_system.get(system, []) if key in r]
            return statistics.median(values) if values else None
        ours = median(ours_name)
        cells = []
        for p in peers:
            value = median(p)
            if p not in per_system:
                cells.append("")
            elif value is None:
                cells.append("failed")
            else:
                cells.append(f"{value:,.{1 if key == 'p99' else 0}f}"
                             + (f" ({value / ours:.2f}x)" if ours else ""))
        ours_text = f"{ours:,.{1 if key == 'p99' else 0}f}" if ours is not None else "failed"
        lines.append(f"| {workload['name'].split(', ')[0]} ({unit}) | {ours_name}: {ours_text} "
                     f"| " + " | ".join(cells) + " |")
    return lines + [""]


def draw_chart(chart: list[tuple[dict, dict[str, float | None]]],
               latency_chart: list[tuple[dict, dict[str, float]]], path: Path) -> None:
    """One panel per throughput workload (a dashed line marks its ideal or in-order bound),
    then one per latency workload (p99, ms)."""
    panels = [*((w, s, False) for w, s in chart), *((w, s, True) for w, s in latency_chart)]
    if not panels:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)")
        return

    def colour(system: str) -> str:
        if system.startswith(("dispatcher", "publish-")):
            return "tab:green"
        return "tab:orange" if system in PEERS else "tab:gray"

    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (workload, systems, latency) in zip(axes.flat, panels):
        names = list(systems)
        heights = [v or 0.0 for v in systems.values()]
        ax.bar(names, heights, color=[colour(s) for s in names])
        for i, value in enumerate(systems.values()):
            if value is None:
                ax.text(i, 0, "did not\nfinish", ha="center", va="bottom", fontsize=7,
                        color="tab:red")
        line = workload.get("bound") or workload.get("ideal")
        if line and not latency:
            label = "in-order bound" if "bound" in workload else "ideal"
            ax.axhline(line, color="tab:blue", linestyle="--", linewidth=1)
            ax.text(len(names) - 0.5, line, f"{label} {line:,.0f}/s", ha="right",
                    va="bottom", fontsize=7, color="tab:blue")
            ax.set_ylim(0, max([line, *heights]) * 1.15)
        ax.set_title(workload["name"], fontsize=8, wrap=True)
        ax.set_ylabel("p99 latency, ms (median; lower is better)" if latency
                      else "messages/s (median)")
        ax.tick_params(axis="x", labelsize=7, rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

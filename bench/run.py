"""The benchmark: this dispatcher against the baselines, on one private broker.

    .venv/bin/python bench/run.py [--runs 3] [--quick]

Systems, run interleaved on the same workload:
  dispatcher  this package's console script, with a config file and bench/benchconsumers.py
  raw-ack     (a) a raw pika GeventConnection consumer acking inside its delivery callback
  raw-spawn   (b) the same, spawning one greenlet per delivery
  ad-0.11.0   (c) amqp-dispatcher 0.11.0 from PyPI in its own virtualenv (bench/work/)

Messages/s are measured inside the consumer, from the first to the last handled
message. After each run the queue must be empty: nothing unacked, nothing lost.
Results go to bench/results.md and bench/results.png.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pika

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / "work"
sys.path.insert(0, str(REPO / "tests"))

from rabbitnode import Broker  # noqa: E402

LEGACY_PY = WORK / "ad-0.11.0" / "bin" / "python"
SCRIPT = str(Path(sys.executable).parent / "amqp-dispatcher")


def ensure_legacy() -> None:
    if LEGACY_PY.exists():
        return
    subprocess.run([sys.executable, "-m", "venv", str(LEGACY_PY.parent.parent)], check=True)
    subprocess.run([str(LEGACY_PY), "-m", "pip", "install", "-q", "amqp-dispatcher==0.11.0",
                    "pika<1.0", "six"], check=True)


def publish(url: str, queue: str, count: int, size: int) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.queue_declare(queue, durable=True)
    channel.queue_purge(queue)
    body = b"x" * size
    for _ in range(count):
        channel.basic_publish("", queue, body)
    connection.close()


def counts(broker: Broker, queue: str) -> tuple[int, int]:
    info = broker.queue_info(queue)
    return int(info["messages_ready"]), int(info["messages_unacknowledged"])


def command(system: str, workload: dict, tmp: Path) -> tuple[list[str], dict[str, str]]:
    queue, count, prefetch = workload["queue"], workload["consumers"], workload["prefetch"]
    consumer = "benchconsumers:Sleep" if workload.get("sleep") else "benchconsumers:NoOp"
    config = tmp / f"{system}.yml"
    config.write_text(f"queues:\n  - queue: {queue}\n    bindings: []\n"
                      f"consumers:\n  - consumer: {consumer}\n    queue: {queue}\n"
                      f"    consumer_count: {count}\n    prefetch_count: {prefetch}\n")
    env = {"PYTHONPATH": str(BENCH)}
    if system == "dispatcher":
        return [SCRIPT, "--config", str(config)], env
    if system == "ad-0.11.0":
        env["RABBITMQ_HEARTBEAT"] = "60"
        return [str(LEGACY_PY), str(BENCH / "legacy.py"), "--connection", "pika",
                "--config", str(config)], env
    mode = "ack" if system == "raw-ack" else "spawn"
    return [sys.executable, str(BENCH / "raw.py"), mode, queue, str(prefetch)], env


def start(system: str, workload: dict, broker: Broker, tmp: Path,
          out: Path) -> subprocess.Popen[bytes]:
    argv, env = command(system, workload, tmp)
    full_env = dict(os.environ, RABBITMQ_URL=broker.url, BENCH_N=str(workload.get("count", 0)),
                    BENCH_OUT=str(out), BENCH_SLEEP=str(workload.get("sleep", 0)), **env)
    log = open(tmp / f"{system}.log", "wb")
    return subprocess.Popen(argv, env=full_env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)


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


def run_throughput(system: str, workload: dict, broker: Broker, tmp: Path) -> dict:
    publish(broker.url, workload["queue"], workload["count"], workload["size"])
    out = tmp / "out.txt"
    out.unlink(missing_ok=True)
    proc = start(system, workload, broker, tmp, out)
    deadline = time.monotonic() + workload.get("timeout", 300)
    while not out.exists() or not out.read_text().endswith("\n"):
        if proc.poll() is not None or time.monotonic() > deadline:
            finish(proc)
            return {"error": f"{system} did not finish; see {tmp / (system + '.log')}"}
        time.sleep(0.05)
    first, last, nbytes = out.read_text().split()
    elapsed = float(last) - float(first)
    time.sleep(0.5)  # the last acks reach the broker
    remaining = counts(broker, workload["queue"])
    rss, cpu = finish(proc)
    return {"rate": workload["count"] / elapsed, "mbps": int(nbytes) / elapsed / 1e6,
            "rss": rss, "cpu": cpu, "left": remaining}


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


WORKLOADS = [
    {"name": "1. no-op 30k x 100 B, 10 consumers, prefetch 100", "kind": "throughput",
     "queue": "bench_noop", "count": 30000, "size": 100, "consumers": 10, "prefetch": 100,
     "systems": ["raw-ack", "raw-spawn", "dispatcher", "ad-0.11.0"]},
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
]

RUNNERS = {"throughput": run_throughput, "idle": run_idle, "scale": run_scale}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one run, a tenth of the messages")
    parser.add_argument("--only", help="run only workloads whose name starts with this")
    args = parser.parse_args()
    ensure_legacy()
    WORK.mkdir(exist_ok=True)
    broker = Broker(name="amqp-dispatcher-bench")
    broker.start()
    results: dict[str, dict[str, list[dict]]] = {}
    try:
        for workload in WORKLOADS:
            if args.only and not workload["name"].startswith(args.only):
                continue
            if args.quick and "count" in workload:
                workload = dict(workload, count=max(50, workload["count"] // 10))
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
            results[workload["name"]] = per_system
    finally:
        broker.stop()
    write_report(results)
    return 0


def write_report(results: dict[str, dict[str, list[dict]]]) -> None:
    machine = (f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, "
               f"{time.strftime('%Y-%m-%d')}")
    lines = ["# Benchmark results", "", f"Machine: {machine}", "",
             "Generated by `.venv/bin/python bench/run.py`; ratios are within this run.", ""]
    chart: dict[str, dict[str, float]] = {}
    for workload in WORKLOADS:
        name = workload["name"]
        if name not in results:
            continue
        lines += [f"## {name}", ""]
        per_system = results[name]
        if workload["kind"] == "throughput":
            lines += ["| system | median msg/s | min-max | MB/s | vs baseline | peak RSS MB "
                      "| CPU s | queue after (ready, unacked) |",
                      "|---|---|---|---|---|---|---|---|"]
            baseline_name = workload.get("baseline", "raw-ack")
            base = [r["rate"] for r in per_system.get(baseline_name, []) if "rate" in r]
            base_median = statistics.median(base) if base else None
            for system, runs in per_system.items():
                ok = [r for r in runs if "rate" in r]
                if not ok:
                    lines.append(f"| {system} | failed: {runs[0].get('error')} | | | | | | |")
                    continue
                rates = [r["rate"] for r in ok]
                median = statistics.median(rates)
                ratio = f"{median / base_median:.2f}x {baseline_name}" if base_median else "-"
                if "ideal" in workload:
                    ratio = f"{median / workload['ideal']:.0%} of ideal"
                chart.setdefault(name, {})[system] = median
                lines.append(
                    f"| {system} | {median:,.0f} | {min(rates):,.0f}-{max(rates):,.0f} "
                    f"| {statistics.median(r['mbps'] for r in ok):.1f} | {ratio} "
                    f"| {max(r['rss'] for r in ok):.0f} "
                    f"| {statistics.median(r['cpu'] for r in ok):.1f} "
                    f"| {', '.join(str(r['left']) for r in ok)} |")
        elif workload["kind"] == "idle":
            lines += ["| system | % of a core (median) | peak RSS MB |", "|---|---|---|"]
            for system, runs in per_system.items():
                lines.append(f"| {system} | {statistics.median(r['core_pct'] for r in runs):.2f} "
                             f"| {max(r['rss'] for r in runs):.0f} |")
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
    (BENCH / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))
    draw_chart(chart)


def draw_chart(chart: dict[str, dict[str, float]]) -> None:
    if not chart:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, len(chart), figsize=(5 * len(chart), 4), squeeze=False)
    for ax, (name, systems) in zip(axes[0], chart.items()):
        ax.bar(list(systems), list(systems.values()),
               color=["tab:green" if s == "dispatcher" else "tab:gray" for s in systems])
        ax.set_title(name, fontsize=8)
        ax.set_ylabel("messages/s (median)")
        ax.tick_params(axis="x", labelsize=7, rotation=20)
    fig.tight_layout()
    fig.savefig(BENCH / "results.png", dpi=90)


if __name__ == "__main__":
    sys.exit(main())

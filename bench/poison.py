"""One poison message (consume always raises), consumer_count 1, for 10 seconds:
consume calls, log bytes and CPU, without a retry policy and with one.

    .venv/bin/python bench/poison.py [--seconds 10]

Starts its own private broker; prints one line per case.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pika

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests"))

from rabbitnode import Broker  # noqa: E402

SCRIPT = str(Path(sys.executable).parent / "amqp-dispatcher")
CASES = {
    "no policy (0.4.3 behaviour)": "",
    "retry: max_attempts 5, delay 1, backoff 2": (
        "    retry:\n      max_attempts: 5\n      delay: 1\n      backoff: 2\n"
        "      dead_letter_queue: poison.failed\n"),
}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(broker: Broker, policy: str, seconds: float, work: Path) -> str:
    work.mkdir(parents=True, exist_ok=True)
    calls, log = work / "calls.txt", work / "dispatcher.log"
    calls.unlink(missing_ok=True)
    config = work / "config.yml"
    config.write_text("queues:\n  - queue: poison\n"
                      "consumers:\n  - consumer: benchconsumers:Poison\n    queue: poison\n"
                      + policy)
    connection = pika.BlockingConnection(pika.URLParameters(broker.url))
    channel = connection.channel()
    for queue in ("poison", "poison.failed"):
        channel.queue_delete(queue)
    with open(log, "wb") as out:
        proc = subprocess.Popen([SCRIPT, "--config", str(config)], cwd=work, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(os.environ, RABBITMQ_URL=broker.url,
                                         PYTHONPATH=os.pathsep.join([str(BENCH), str(REPO)]),
                                         BENCH_OUT=str(calls)))
        while "consuming from" not in log.read_text(errors="replace"):
            if proc.poll() is not None:
                return f"failed to start: see {log}"
            time.sleep(0.05)
        start_bytes, start_cpu = log.stat().st_size, cpu_seconds(proc.pid)
        channel.basic_publish("", "poison", b"poison")
        time.sleep(seconds)  # the measurement window itself
        count = len(calls.read_text().splitlines()) if calls.exists() else 0
        used = cpu_seconds(proc.pid) - start_cpu
        logged = log.stat().st_size - start_bytes
        proc.send_signal(signal.SIGINT)
        proc.wait()
    connection.close()
    return (f"{count:,} consume calls, {logged:,} log bytes, {used:.2f} CPU s "
            f"({used / seconds:.0%} of a core)")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    broker = Broker(name="amqp-dispatcher-poison")
    broker.start()
    try:
        for name, policy in CASES.items():
            print(f"{name}: {run(broker, policy, args.seconds, BENCH / 'work' / 'poison')}",
                  flush=True)
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

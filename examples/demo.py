"""Run the example end to end: a private broker, the dispatcher on the example
config, a few demo messages, and what the consumer printed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pika

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from rabbitnode import Broker  # noqa: E402


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    broker = Broker(name="amqp-dispatcher-demo")
    print(f"starting a private RabbitMQ node on port {broker.port} ...", flush=True)
    broker.start()
    dispatcher = None
    try:
        connection = pika.BlockingConnection(pika.URLParameters(broker.url))
        channel = connection.channel()
        # The example consumer publishes to test_exchange; 0.4.3 configs do not
        # declare exchanges, so the demo does.
        channel.exchange_declare("test_exchange", "topic")
        channel.queue_declare("test_queue", durable=True)  # as the config declares it
        env = dict(os.environ, RABBITMQ_URL=broker.url, PYTHONUNBUFFERED="1")
        script = str(Path(sys.executable).parent / "amqp-dispatcher")
        dispatcher = subprocess.Popen([script, "--config", "amqp-dispatcher-config.yml"],
                                      cwd=REPO, env=env)
        deadline = time.monotonic() + 30
        while channel.queue_declare("test_queue", durable=True, passive=True) \
                .method.consumer_count == 0:
            if time.monotonic() > deadline or dispatcher.poll() is not None:
                print("the dispatcher did not start consuming", file=sys.stderr)
                return 1
            time.sleep(0.2)
        for i in range(count):
            channel.basic_publish("amq.topic", "demo.hello", f"demo message {i}".encode())
        print(f"published {count} demo messages", flush=True)
        deadline = time.monotonic() + 30
        while True:
            q = channel.queue_declare("test_queue", durable=True, passive=True).method
            if q.message_count == 0:
                break
            if time.monotonic() > deadline:
                print("messages were not all consumed", file=sys.stderr)
                return 1
            time.sleep(0.2)
        time.sleep(1)  # let the last acks land before asking the broker
        published = channel.queue_declare("test_published", durable=True,
                                          passive=True).method.message_count
        print(f"all {count} messages consumed and acked; the consumer published "
              f"{published} message(s) to test_exchange", flush=True)
        connection.close()
        return 0
    finally:
        if dispatcher is not None and dispatcher.poll() is None:
            dispatcher.send_signal(signal.SIGTERM)
            dispatcher.wait(timeout=30)
        broker.stop()


if __name__ == "__main__":
    sys.exit(main())

"""Baselines: a raw pika GeventConnection consumer, no dispatcher.

mode "ack": acks inside the delivery callback (the client library's ceiling).
mode "spawn": spawns one greenlet per delivery, which runs the consumer and acks.
The consumer is benchconsumers.$BENCH_CONSUMER (default: Sleep if $BENCH_SLEEP, else NoOp).
"""

import os
import sys

import benchconsumers
import gevent
import pika
from pika.adapters.gevent_connection import GeventConnection


def main():
    mode, queue, prefetch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    default = "Sleep" if benchconsumers.SLEEP else "NoOp"
    consumer = getattr(benchconsumers, os.environ.get("BENCH_CONSUMER") or default)()
    done = gevent.event.Event()

    def on_open(connection):
        connection.channel(on_open_callback=on_channel)

    def on_channel(channel):
        def ack_inline(ch, method, properties, body):
            consumer.consume(None, Message(body))
            ch.basic_ack(method.delivery_tag)

        def handle(ch, method, body):
            consumer.consume(None, Message(body))
            ch.basic_ack(method.delivery_tag)

        def spawn(ch, method, properties, body):
            gevent.spawn(handle, ch, method, body)

        def start(_):
            channel.basic_consume(queue, ack_inline if mode == "ack" else spawn)
            print("consuming from", queue, flush=True)

        channel.basic_qos(prefetch_count=prefetch, callback=start)

    params = pika.URLParameters(os.environ["RABBITMQ_URL"])
    GeventConnection(params, on_open_callback=on_open)
    gevent.signal_handler(15, done.set)
    done.wait()


class Message:
    __slots__ = ("body",)

    def __init__(self, body):
        self.body = body


if __name__ == "__main__":
    import gevent.event  # noqa: F401

    main()

"""The FastStream peer: one asyncio subscriber on $BENCH_QUEUE, run by `faststream run`.

    faststream run faststream_app:app [--workers 2] --log-level warning

The default ack policy (acked after the handler returns); the channel's
prefetch_count from $BENCH_PREFETCH, which is also how many handlers run at
once (aio-pika runs each delivery in a task of its own). With $BENCH_PUBLISH_TO,
each call publishes the body to that queue with broker.publish (the default
channel has publisher confirms on: the call waits for the broker's confirm).
"""

import asyncio
import os

import benchwork
from faststream import FastStream
from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

QUEUE = os.environ["BENCH_QUEUE"]
OUTPUT = os.environ.get("BENCH_PUBLISH_TO", "")

broker = RabbitBroker(os.environ["RABBITMQ_URL"],
                      default_channel=Channel(prefetch_count=int(os.environ["BENCH_PREFETCH"])))
app = FastStream(broker)


@broker.subscriber(RabbitQueue(QUEUE, durable=True))
async def bench(body):
    if benchwork.warmup(body):
        return
    pause = benchwork.before(body)
    if pause:
        await asyncio.sleep(pause)
    if OUTPUT:
        await broker.publish(body, queue=OUTPUT)
    benchwork.tick(len(body))

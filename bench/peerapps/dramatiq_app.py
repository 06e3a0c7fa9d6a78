"""The Dramatiq peer: one actor on $BENCH_QUEUE, run by `dramatiq` or `dramatiq-gevent`.

    dramatiq[-gevent] dramatiq_app --processes P --threads T --queues $BENCH_QUEUE

RabbitmqBroker with its defaults (its default middleware; the message is acked
after the actor returns), confirm_delivery from $BENCH_CONFIRMS. The prefetch is
Dramatiq's own $dramatiq_queue_prefetch, set by the benchmark. With
$BENCH_PUBLISH_TO, each call sends one message to an actor on that queue
(`--queues` keeps this worker from consuming it).
"""

import os
import time

import benchwork
import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

QUEUE = os.environ["BENCH_QUEUE"]
OUTPUT = os.environ.get("BENCH_PUBLISH_TO", "")

broker = RabbitmqBroker(url=os.environ["RABBITMQ_URL"],
                        confirm_delivery=os.environ.get("BENCH_CONFIRMS") == "1")
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name="bench", queue_name=QUEUE)
def bench(payload):
    if benchwork.warmup(payload):
        return
    pause = benchwork.before(payload)
    if pause:
        time.sleep(pause)
    if OUTPUT:
        forward.send(payload)
    benchwork.tick(len(payload))


if OUTPUT:
    @dramatiq.actor(actor_name="bench_out", queue_name=OUTPUT)
    def forward(payload):
        pass

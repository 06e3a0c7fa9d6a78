"""The Celery peer: one task, run by `celery worker`.

    celery -A celery_app worker -P gevent|prefork -c C --prefetch-multiplier M -Q $BENCH_QUEUE

task_acks_late (acked after the task returns), the prefetch multiplier from the
command line; broker_transport_options confirm_publish from $BENCH_CONFIRMS.
With $BENCH_PUBLISH_TO, each task sends one task message to that queue.
Under -P gevent, broker_heartbeat 0 (see below).
Under -P gevent, time.sleep is gevent's (Celery patches at start).
"""

import os
import time

import benchwork
from celery import Celery

QUEUE = os.environ["BENCH_QUEUE"]
OUTPUT = os.environ.get("BENCH_PUBLISH_TO", "")

app = Celery("bench", broker=os.environ["RABBITMQ_URL"])
app.conf.update(
    task_acks_late=True,
    task_default_queue=QUEUE,
    broker_transport_options={"confirm_publish": os.environ.get("BENCH_CONFIRMS") == "1"},
)
if os.environ.get("BENCH_CELERY_NO_HEARTBEAT") == "1":
    # Under a green pool, Celery 5.7.0's synloop drains the event dispatcher's connection
    # with a 0.1 s timeout after every batch of frames while broker heartbeats are on
    # (celery/worker/loops.py, _quick_drain): about ten messages a second.
    app.conf.broker_heartbeat = 0


@app.task(name="bench")
def bench(payload):
    if benchwork.warmup(payload):
        return
    pause = benchwork.before(payload)
    if pause:
        time.sleep(pause)
    if OUTPUT:
        app.send_task("bench_out", args=[payload], queue=OUTPUT)
    benchwork.tick(len(payload))

"""Consumers for the benchmark, importable by this dispatcher and by 0.11.0 alike.

Each counts the messages it handles and, at the N-th, writes the time of the
first and the last and the bytes seen to $BENCH_OUT.
"""

import os
import time

import gevent

N = int(os.environ.get("BENCH_N", "0"))
OUT = os.environ.get("BENCH_OUT", "/dev/null")
SLEEP = float(os.environ.get("BENCH_SLEEP", "0"))
_state = {"count": 0, "first": None, "bytes": 0}


def tick(size):
    state = _state
    if state["first"] is None:
        state["first"] = time.time()
    state["count"] += 1
    state["bytes"] += size
    if state["count"] == N:
        with open(OUT, "w") as handle:
            handle.write(f"{state['first']:f} {time.time():f} {state['bytes']}\n")


class NoOp:
    def consume(self, amqp, msg):
        tick(len(msg.body))

    def shutdown(self, exception=None):
        pass


class Sleep:
    def consume(self, amqp, msg):
        gevent.sleep(SLEEP)
        tick(len(msg.body))

    def shutdown(self, exception=None):
        pass

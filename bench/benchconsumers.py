"""Consumers for the benchmark, importable by this dispatcher and by 0.11.0 alike.

Each counts the messages it handles and, at the N-th, writes the time of the
first and the last and the bytes seen to $BENCH_OUT. With $BENCH_SPLIT set (a
dispatcher with --processes, whose workers each handle a share of the N), each
process writes the time of its first and last message, its count and its bytes
to $BENCH_OUT.<pid> instead, ten times a second while they change, and the
benchmark adds them up; and the first message of each waits until the file
$BENCH_GO exists, which the benchmark creates once every worker consumes, so
that the clock starts when all of them do (workers start some 0.1 s apart).

CpuBound spends CPU_SECONDS (2 ms) of CPU on each message without yielding: one
process is one core.

Republish publishes each message's body to $BENCH_PUBLISH_TO through the default
exchange (one publish per input, as a consumer that forwards work does).

Flaky fails (raises) on the first attempt of every FLAKY_EVERY-th call in the
process: with a retry policy about one message in ten fails once, then succeeds.

HeavyTail's k-th call in the process (k = 1, 2, ...) sleeps
heavy_tail_duration(k): 2 s when k % 100 == 0, else 5 ms. Its duration is a
function of the call count, not of the message, so bench/run.py can compute
the in-order bound for exactly the durations the consumer will sleep.
"""

import os
import time

import gevent

N = int(os.environ.get("BENCH_N", "0"))
OUT = os.environ.get("BENCH_OUT", "/dev/null")
SLEEP = float(os.environ.get("BENCH_SLEEP", "0"))
PUBLISH_TO = os.environ.get("BENCH_PUBLISH_TO", "")
SPLIT = bool(os.environ.get("BENCH_SPLIT"))
GO = os.environ.get("BENCH_GO", "")
_state = {"count": 0, "first": None, "last": None, "bytes": 0, "calls": 0}
REPORT_EVERY = 0.1

HEAVY_EVERY = 100  # every 100th call is slow
HEAVY_SLOW = 2.0
HEAVY_FAST = 0.005


def heavy_tail_duration(k):
    """Seconds the k-th HeavyTail call in a process sleeps; k counts from 1."""
    return HEAVY_SLOW if k % HEAVY_EVERY == 0 else HEAVY_FAST


def tick(size):
    state = _state
    if state["first"] is None:
        while SPLIT and not os.path.exists(GO):
            gevent.sleep(0.01)
        if state["first"] is None:  # (other instances may have waited at the gate too)
            state["first"] = time.time()
            if SPLIT:
                gevent.spawn(_report)
    state["count"] += 1
    state["bytes"] += size
    if SPLIT:
        state["last"] = time.time()
    elif state["count"] == N:
        with open(OUT, "w") as handle:
            handle.write(f"{state['first']:f} {time.time():f} {state['bytes']}\n")


def _report():
    """This process's share, written whole (rename) whenever it changed."""
    path = f"{OUT}.{os.getpid()}"
    reported = None
    while True:
        state = _state
        line = f"{state['first']:f} {state['last']:f} {state['count']} {state['bytes']}\n"
        if line != reported:
            with open(path + ".tmp", "w") as handle:
                handle.write(line)
            os.replace(path + ".tmp", path)
            reported = line
        gevent.sleep(REPORT_EVERY)


class NoOp:
    def consume(self, amqp, msg):
        tick(len(msg.body))

    def shutdown(self, exception=None):
        pass


_latencies = []
_latency = {"target": None, "written": False}


class Latency:
    """Keeps the time from the publish (the time.time() that starts the body, then a space)
    to the start of the call. The body "warmup" only creates $BENCH_OUT.warm; the body
    "end M" says M messages were published: once M are handled, their times go to
    $BENCH_OUT.lat, one a line, then the first and last time and the bytes to $BENCH_OUT."""

    def consume(self, amqp, msg):
        body = msg.body
        if body == b"warmup":
            with open(OUT + ".warm", "w"):
                pass
            return
        if body.startswith(b"end "):
            _latency["target"] = int(body[4:])
        else:
            _latencies.append(time.time() - float(body.split(b" ", 1)[0]))
            tick(len(body))
        if len(_latencies) == _latency["target"] and not _latency["written"]:
            _latency["written"] = True
            with open(OUT + ".lat", "w") as handle:
                handle.write("".join(f"{s:.6f}\n" for s in _latencies))
            with open(OUT, "w") as handle:
                handle.write(f"{_state['first']:f} {time.time():f} {_state['bytes']}\n")

    def shutdown(self, exception=None):
        pass


class Republish:
    def consume(self, amqp, msg):
        amqp.publish("", PUBLISH_TO, None, msg.body)
        tick(len(msg.body))

    def shutdown(self, exception=None):
        pass


class Sleep:
    def consume(self, amqp, msg):
        gevent.sleep(SLEEP)
        tick(len(msg.body))

    def shutdown(self, exception=None):
        pass


class HeavyTail:
    """Sleeps heavy_tail_duration(k) on the k-th call in this process (all instances share k).

    The clock starts when the first call starts, not when it ends, so the
    measured time is the makespan the in-order bound is computed for.
    """

    def consume(self, amqp, msg):
        state = _state
        if state["first"] is None:
            state["first"] = time.time()
        state["calls"] += 1
        gevent.sleep(heavy_tail_duration(state["calls"]))
        tick(len(msg.body))

    def shutdown(self, exception=None):
        pass


CPU_SECONDS = 0.002


class CpuBound:
    """Spends CPU_SECONDS of this thread's CPU time per message, never yielding."""

    def consume(self, amqp, msg):
        end = time.thread_time() + CPU_SECONDS
        while time.thread_time() < end:
            pass
        tick(len(msg.body))

    def shutdown(self, exception=None):
        pass


FLAKY_EVERY = 10


class Flaky:
    """Raises on the first attempt of every FLAKY_EVERY-th call; counts successes only."""

    def consume(self, amqp, msg):
        state = _state
        state["calls"] += 1
        if state["calls"] % FLAKY_EVERY == 0 and msg.attempt == 1:
            raise RuntimeError("flaky")
        tick(len(msg.body))

    def shutdown(self, exception=None):
        pass


class Poison:
    """Always raises; counts its calls in $BENCH_OUT (one line each) for bench/poison.py."""

    def consume(self, amqp, msg):
        with open(OUT, "a") as handle:
            handle.write("x\n")
        raise ValueError("poison message")

    def shutdown(self, exception=None):
        pass


def setup_tracing():
    """Startup handler of the dispatcher-otel system: OpenTelemetry's SDK with a batch
    span processor whose exporter drops every span (the cost of making them, not of
    sending them anywhere)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Dropping(SpanExporter):
        def export(self, spans):
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Dropping()))
    trace.set_tracer_provider(provider)

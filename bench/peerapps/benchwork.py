"""The work and the counting of the peers' handlers (Dramatiq, Celery, FastStream).

The same contract as bench/benchconsumers.py, without gevent (each peer runs it
in its own virtualenv, in threads, greenlets or an asyncio loop): $BENCH_CONSUMER
names the work, the N-th message handled writes the time of the first and the
last and the payload bytes seen to $BENCH_OUT.

With $BENCH_PROCS > 1 (a peer running two processes), each process writes its
share to $BENCH_OUT.<pid> ten times a second while it changes, as
benchconsumers does with $BENCH_SPLIT; and the first message of each process
waits until every process has had one ($BENCH_OUT-ready.<pid> files), so that
the clock starts when all of them consume.

Latency: the payload starts with the publish time (time.time(), then a space);
`before` keeps the time from there to the start of the call. A payload "warmup"
only creates $BENCH_OUT.warm: the benchmark publishes one and waits for it
before it starts publishing at a fixed rate; "end M" says that M were published:
once M are handled, their times go to $BENCH_OUT.lat (one a line, seconds), then
the first and last time and the bytes to $BENCH_OUT.
"""

import glob
import os
import threading
import time

N = int(os.environ.get("BENCH_N", "0"))
OUT = os.environ.get("BENCH_OUT", "/dev/null")
SLEEP = float(os.environ.get("BENCH_SLEEP", "0"))
KIND = os.environ.get("BENCH_CONSUMER") or ("Sleep" if SLEEP else "NoOp")
PROCS = int(os.environ.get("BENCH_PROCS", "1"))
REPORT_EVERY = 0.1

# As benchconsumers: the k-th call in a process (k from 1) sleeps 2 s when k % 100 == 0,
# else 5 ms; 2 ms of this thread's CPU per CpuBound message.
HEAVY_EVERY, HEAVY_SLOW, HEAVY_FAST = 100, 2.0, 0.005
CPU_SECONDS = 0.002

_lock = threading.Lock()
_state = {"count": 0, "first": None, "last": None, "bytes": 0, "calls": 0, "target": None,
          "written": False}
_latencies = []


def text(payload):
    return payload.decode() if isinstance(payload, bytes) else str(payload)


def warmup(payload):
    """True if this is one of the benchmark's control messages: "warmup" (creates
    $BENCH_OUT.warm) or "end M" (M messages were published, see tick)."""
    body = text(payload)
    if body == "warmup":
        with open(OUT + ".warm", "w"):
            pass
        return True
    if body.startswith("end "):
        with _lock:
            _state["target"] = int(body[4:])
        _latency_done()
        return True
    return False


def _latency_done():
    """Once the "end M" message and M messages have come, write their times."""
    with _lock:
        if len(_latencies) != _state["target"] or _state["written"]:
            return
        _state["written"] = True
    with open(OUT + ".lat", "w") as handle:
        handle.write("".join(f"{s:.6f}\n" for s in _latencies))
    with open(OUT, "w") as handle:
        handle.write(f"{_state['first']:f} {time.time():f} {_state['bytes']}\n")


def _gate():
    """The first message of each of $BENCH_PROCS processes waits for the others'."""
    with open(f"{OUT}-ready.{os.getpid()}", "w"):
        pass
    while len(glob.glob(f"{OUT}-ready.*")) < PROCS:
        time.sleep(0.01)


def _start_clock():
    if _state["first"] is not None:
        return
    if PROCS > 1:
        _gate()
    with _lock:
        if _state["first"] is None:
            _state["first"] = _state["last"] = time.time()
            if PROCS > 1:
                threading.Thread(target=_report, daemon=True).start()


def before(payload):
    """The work done at the start of the call; returns the seconds the handler must then
    sleep its own way (time.sleep, gevent's patched one, or asyncio.sleep)."""
    if KIND == "Latency":
        _latencies.append(time.time() - float(text(payload).split(" ", 1)[0]))
        return 0.0
    if KIND == "HeavyTail":  # the clock starts when the first call starts
        _start_clock()
        with _lock:
            _state["calls"] += 1
            k = _state["calls"]
        return HEAVY_SLOW if k % HEAVY_EVERY == 0 else HEAVY_FAST
    if KIND == "CpuBound":
        end = time.thread_time() + CPU_SECONDS
        while time.thread_time() < end:
            pass
        return 0.0
    if KIND == "Sleep":
        return SLEEP
    return 0.0


def tick(size):
    """One message handled, its payload `size` bytes."""
    _start_clock()
    state = _state
    with _lock:
        state["count"] += 1
        state["bytes"] += size
        count = state["count"]
        if PROCS > 1:
            state["last"] = time.time()
    if KIND == "Latency":
        _latency_done()
    elif PROCS == 1 and count == N:
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
        time.sleep(REPORT_EVERY)

"""Consumer classes the tests run inside the dispatcher subprocess.

Each one appends a line per successfully handled message to $RECORD_FILE, so
the test can see what happened from outside the process.
"""

import json
import os
import time

import gevent

RECORD_FILE = os.environ.get("RECORD_FILE", "/dev/null")


def record(line):
    with open(RECORD_FILE, "a") as handle:
        handle.write(line + "\n")


def text(msg):
    return msg.body.decode()


def break_channel(amqp):
    """Ack, on the delivery's own channel, a tag the broker never sent: it closes that
    channel (406 PRECONDITION_FAILED - unknown delivery tag). A publish to a missing
    exchange no longer does: publishing has a connection of its own."""
    amqp._acker.channel.basic_ack(delivery_tag=10**9)


class Recorder:
    def consume(self, amqp, msg):
        record(text(msg))

    def shutdown(self, exception=None):
        pass


class Sleeper:
    """Sleeps cooperatively for the number of seconds in $SLEEP, then records."""

    delay = float(os.environ.get("SLEEP", "0.5"))

    def consume(self, amqp, msg):
        gevent.sleep(self.delay)
        record(text(msg))

    def shutdown(self, exception=None):
        pass


class Inspector:
    """Records what consume sees of the message and proxy, as one JSON line."""

    def consume(self, amqp, msg):
        info = dict(msg.delivery_info)
        props = dict(msg.properties)
        record(json.dumps({
            "body": text(msg),
            "body_type": type(msg.body).__name__,
            "delivery_info": info,
            "properties": props,
            "tag": amqp.tag,
            "responded_before": amqp.has_responded_to_message,
        }, separators=(",", ":"), default=str))

    def shutdown(self, exception=None):
        pass


class FailOnce:
    """Raises the first time it sees a body starting with 'fail', records the rest.

    Class-level memory survives instance replacement within one process.
    """

    seen = set()
    instances = 0

    def __init__(self):
        FailOnce.instances += 1
        record(f"init:{FailOnce.instances}")

    def consume(self, amqp, msg):
        body = text(msg)
        if body.startswith("fail") and body not in FailOnce.seen:
            FailOnce.seen.add(body)
            raise ValueError(f"failing {body} once")
        record(f"{body}:redelivered={msg.delivery_info['redelivered']}")

    def shutdown(self, exception=None):
        record(f"shutdown:{type(exception).__name__}")


class ProxyCommands:
    """The body says what to do with the proxy."""

    seen = set()

    def consume(self, amqp, msg):
        body = text(msg)
        command = body.split(":")[0]
        first = body not in ProxyCommands.seen
        ProxyCommands.seen.add(body)
        if command == "ack":
            amqp.ack()
        elif command == "nack-once":
            if first:
                amqp.nack()
                record(f"nacked:{body}")
                return
        elif command == "reject-drop":
            amqp.reject(requeue=False)
        elif command == "double-ack":
            amqp.ack()
            try:
                amqp.ack()
            except Exception as exc:  # noqa: BLE001
                record(f"error:{type(exc).__name__}:{str(exc).replace(' ', '_')}")
        elif command == "publish":
            amqp.publish("", "published_out", {"x-origin": "consumer"}, "from-consumer")
        elif command == "respond-then-raise":
            amqp.ack()
            raise RuntimeError("after ack")
        record(f"done:{body}:{amqp.has_responded_to_message}")

    def shutdown(self, exception=None):
        pass


class BadInit:
    def __init__(self):
        raise RuntimeError("cannot construct")

    def consume(self, amqp, msg):
        pass

    def shutdown(self, exception=None):
        pass


class NoShutdown:
    def consume(self, amqp, msg):
        pass


not_a_class = 42


def startup():
    record("startup")


def bad_startup():
    raise RuntimeError("startup failed")


class Faulty:
    """For fault injection: records start and outcome of each id, fails at random
    ($FAIL_RATE), and takes a random cooperative pause (up to $PAUSE seconds) so
    that messages are in flight when the fault hits."""

    fail_rate = float(os.environ.get("FAIL_RATE", "0.1"))
    pause = float(os.environ.get("PAUSE", "0.05"))

    def consume(self, amqp, msg):
        import random

        body = text(msg)
        record(f"start:{body}")
        gevent.sleep(random.uniform(0, self.pause))
        if random.random() < self.fail_rate:
            record(f"fail:{body}")
            raise RuntimeError("random failure")
        record(f"done:{body}")

    def shutdown(self, exception=None):
        pass


class Misbehaving:
    """The body names the misbehaviour; each happens once per body."""

    seen = set()
    broken_inits = 0

    def __init__(self):
        if Misbehaving.broken_inits:
            Misbehaving.broken_inits -= 1
            raise RuntimeError("replacement cannot be built yet")
        self.raise_in_shutdown = False

    def consume(self, amqp, msg):
        import sys

        body = text(msg)
        first = body not in Misbehaving.seen
        Misbehaving.seen.add(body)
        if first:
            if body == "system-exit":
                sys.exit(3)
            if body == "keyboard-interrupt":
                raise KeyboardInterrupt()
            if body == "greenlet-exit":
                raise gevent.GreenletExit()
            if body == "shutdown-raises":
                self.raise_in_shutdown = True
                raise ValueError("consume failed")
            if body == "init-raises":
                Misbehaving.broken_inits = 2
                raise ValueError("consume failed")
            if body == "break-channel":
                break_channel(amqp)
                gevent.sleep(0.5)  # the broker closes the channel meanwhile
        if body.startswith("hang"):
            record(f"hanging:{body}")
            gevent.sleep(3600)
        record(f"done:{body}")

    def shutdown(self, exception=None):
        if self.raise_in_shutdown:
            raise RuntimeError("shutdown failed too")


class BadLogFormat:
    """Logs with a format its arguments do not fill, as consumer code sometimes does;
    the second call passes the message body, which the test makes the broker password."""

    def consume(self, amqp, msg):
        import logging

        log = logging.getLogger("x")
        log.info("%s %s", "only-one")
        log.info("body %s %s", text(msg))
        log.info("consumed body %s", text(msg))
        record(text(msg))

    def shutdown(self, exception=None):
        record("shutdown")


class StrayOutput:
    """What would print plain text on stderr whatever the log format: 'badformat-*' logs
    with a format its arguments do not fill, 'greenlet-*' lets a greenlet raise,
    'warning-*' calls warnings.warn; each with the body in it. Records the body."""

    def consume(self, amqp, msg):
        import logging
        import warnings

        body = text(msg)
        kind = body.split("-")[0]
        if kind == "badformat":
            logging.getLogger("x").info("%s %s", body)
        elif kind == "greenlet":
            gevent.spawn(_raise, ValueError(body)).join()
        elif kind == "warning":
            warnings.warn(body, stacklevel=1)
        record(body)

    def shutdown(self, exception=None):
        pass


def _raise(exc):
    raise exc


def slow_startup():
    record("startup-begin")
    gevent.sleep(60)


class Timed:
    """'slow' sleeps $SLOW seconds; every other body sleeps 10 ms. Records start and end."""

    slow = float(os.environ.get("SLOW", "60"))

    def consume(self, amqp, msg):
        body = text(msg)
        record(f"start:{body}")
        gevent.sleep(self.slow if body == "slow" else 0.01)
        record(f"done:{body}")

    def shutdown(self, exception=None):
        pass


class _BadStr(Exception):
    def __str__(self):
        raise RuntimeError("__str__ of this exception raises")


def _count(prefix):
    if not os.path.exists(RECORD_FILE):
        return 0
    with open(RECORD_FILE) as handle:
        return sum(1 for line in handle if line.startswith(prefix))


class Hostile:
    """Bodies name what happens, once per body:
    'break-channel': get the broker to close the delivery's channel, then
    go on for 0.5 s; 'hold-*': take 1 s; 'bad-str': raise an exception whose __str__
    raises; 'barrier-G-N': wait (up to 20 s) until N messages of group G are in consume
    at once, proving N live worker slots; 'fail-then-no-init': raise, and from then on
    every construction of the class fails. Records init/shutdown per instance."""

    seen = set()
    inits_fail = False
    made = 0

    def __init__(self):
        if Hostile.inits_fail:
            raise RuntimeError("cannot construct any more")
        Hostile.made += 1
        self.name = f"i{Hostile.made}"
        record(f"init:{self.name}")

    def consume(self, amqp, msg):
        body = text(msg)
        first = body not in Hostile.seen
        Hostile.seen.add(body)
        record(f"start:{body}")
        if first and body == "break-channel":
            break_channel(amqp)
            gevent.sleep(0.5)
        elif first and body == "bad-str":
            raise _BadStr()
        elif first and body == "fail-then-no-init":
            Hostile.inits_fail = True
            raise ValueError("failing, and no replacement can be built")
        elif body.startswith("hold"):
            gevent.sleep(1)
        elif body.startswith("barrier-"):
            _, group, n = body.split("-")
            for _ in range(400):
                if _count(f"start:barrier-{group}-") >= int(n):
                    break
                gevent.sleep(0.05)
            else:
                record(f"timeout:{body}")
                return
        record(f"done:{body}")

    def shutdown(self, exception=None):
        record(f"shutdown:{self.name}")


class PoisonAck:
    """Every message gets the broker to close its channel (break_channel), and the
    message comes back."""

    def consume(self, amqp, msg):
        record(f"start:{text(msg)}")
        break_channel(amqp)
        gevent.sleep(0.2)

    def shutdown(self, exception=None):
        pass


class SlowShutdown:
    def __init__(self):
        record("init")

    def consume(self, amqp, msg):
        record(text(msg))

    def shutdown(self, exception=None):
        record("shutdown-begin")
        gevent.sleep(30)


def exiting_startup():
    import sys

    sys.exit(0)


class ExitOnSecondInit:
    made = 0

    def __init__(self):
        ExitOnSecondInit.made += 1
        if ExitOnSecondInit.made == 2:
            raise SystemExit(0)
        self.name = f"i{ExitOnSecondInit.made}"

    def consume(self, amqp, msg):
        pass

    def shutdown(self, exception=None):
        record(f"shutdown:{self.name}")


class PayloadError(Exception):
    """For retry.no_retry_for: a failure that no retry can mend."""


class InvalidPayload(PayloadError):
    """A subclass: no_retry_for names PayloadError."""


class Retried:
    """For the retry policy. Records 'attempt:BODY:N:TIME' on every call (N is
    msg.attempt, TIME the wall clock). Bodies: 'always-*' raise every time; 'twice-*'
    raise on attempts 1 and 2; 'sleep-*' sleep an hour (for time_limit); 'swallow-*'
    sleep, catching the time limit's exception twice, then return; 'invalid-*' raise
    InvalidPayload; 'json-*' raise json.JSONDecodeError; anything else is done at once.
    Records 'done:BODY' and 'shutdown:EXCEPTION-TYPE'."""

    def consume(self, amqp, msg):
        import time

        body = text(msg)
        record(f"attempt:{body}:{msg.attempt}:{time.time():.6f}")
        if body.startswith("invalid"):
            raise InvalidPayload(f"cannot read {body}")
        if body.startswith("json"):
            json.loads(body)
        if body.startswith("always"):
            raise ValueError(f"always failing {body}")
        if body.startswith("twice") and msg.attempt <= 2:
            raise ValueError(f"failing {body} on attempt {msg.attempt}")
        if body.startswith("sleep"):
            gevent.sleep(3600)
        if body.startswith("swallow"):
            from amqpdispatcher import TimeLimitExceeded

            for _ in range(2):
                try:
                    gevent.sleep(3600)
                except TimeLimitExceeded:
                    record(f"swallowed:{body}")
        record(f"done:{body}")

    def shutdown(self, exception=None):
        record(f"shutdown:{type(exception).__name__}")


class Outcomes:
    """For the metrics tests. Records 'QUEUE:BODY:ATTEMPT:WHAT' for every call, WHAT
    being what the call did to its message: 'returned' (the dispatcher acks it),
    'acked', 'nacked', 'rejected' (without requeue) or 'raised'. Bodies: 'ack-*' ack;
    'nack-*' nack on their first call, then return; 'drop-*' reject without requeue;
    'fail-*' raise on their first call, then return; 'always-*' raise every time;
    'hold-*' wait until $RELEASE_FILE exists, then return; 'wedge-*' the same without
    yielding to gevent (the process answers nothing meanwhile); anything else returns.
    "First" is per queue and body."""

    seen = set()

    def consume(self, amqp, msg):
        body = text(msg)
        kind = body.split("-")[0]
        prefix = f"{msg.delivery_info['routing_key']}:{body}"
        first = prefix not in Outcomes.seen
        Outcomes.seen.add(prefix)
        prefix += f":{msg.attempt}"
        if kind == "ack":
            amqp.ack()
            record(f"{prefix}:acked")
        elif kind == "nack" and first:
            amqp.nack()
            record(f"{prefix}:nacked")
        elif kind == "drop":
            amqp.reject(requeue=False)
            record(f"{prefix}:rejected")
        elif (kind == "fail" and first) or kind == "always":
            record(f"{prefix}:raised")
            raise ValueError(f"failing {body}")
        else:
            if kind == "hold":
                while not os.path.exists(os.environ["RELEASE_FILE"]):
                    gevent.sleep(0.02)
            if kind == "wedge":
                while not os.path.exists(os.environ["RELEASE_FILE"]):
                    time.sleep(0.02)
            record(f"{prefix}:returned")

    def shutdown(self, exception=None):
        pass


class LogsBody:
    """Logs each body at INFO (logger 'x'), then records it; the first call of a body
    starting with 'fail' raises instead, with the body in the exception."""

    seen = set()

    def consume(self, amqp, msg):
        import logging

        body = text(msg)
        logging.getLogger("x").info("consumed body %s", body)
        if body.startswith("fail") and body not in LogsBody.seen:
            LogsBody.seen.add(body)
            raise ValueError(f"failing {body}")
        record(body)

    def shutdown(self, exception=None):
        pass


class LoggedSleeper:
    """Logs 'consume started: BODY', sleeps $SLEEP seconds, then logs 'consume done:
    BODY' (at WARNING: in the dispatcher's own output, so a test can see what came
    first) and records."""

    delay = float(os.environ.get("SLEEP", "0.5"))

    def consume(self, amqp, msg):
        import logging

        logging.getLogger("testconsumers").warning("consume started: %s", text(msg))
        gevent.sleep(self.delay)
        logging.getLogger("testconsumers").warning("consume done: %s", text(msg))
        record(text(msg))

    def shutdown(self, exception=None):
        pass


class HubBlocker:
    """Blocks the whole process with an unpatched time.sleep of the seconds in the body
    (the classic mistake blocking_warning is there to find), then records
    ``slept:SECONDS``."""

    def consume(self, amqp, msg):
        time.sleep(float(text(msg)))
        record(f"slept:{text(msg)}")

    def shutdown(self, exception=None):
        pass


class FirstMiddleware:
    """Middleware recording each hook as 'mw:NAME:HOOK:...'."""

    name = "first"

    def on_start(self, config):
        record(f"mw:{self.name}:on_start:{len(config.consumers)}")

    def before_consume(self, entry, msg):
        record(f"mw:{self.name}:before:{entry.queue}:{text(msg)}")

    def after_consume(self, entry, msg, outcome, exception):
        name = type(exception).__name__ if exception is not None else "-"
        record(f"mw:{self.name}:after:{text(msg)}:{outcome}:{name}")

    def on_stop(self):
        record(f"mw:{self.name}:on_stop")


def _second_middleware():
    from amqpdispatcher import Middleware

    class SecondMiddleware(FirstMiddleware, Middleware):
        """The second: its before_consume refuses bodies 'refuse-*'."""

        name = "second"

        def before_consume(self, entry, msg):
            super().before_consume(entry, msg)
            if text(msg).startswith("refuse"):
                raise PayloadError(f"refused {text(msg)}")

    return SecondMiddleware


SecondMiddleware = _second_middleware()


class BrokenAfter:
    """Middleware whose after_consume always raises."""

    def after_consume(self, entry, msg, outcome, exception):
        raise RuntimeError("after_consume broke")


class ExitingHooks:
    """Middleware whose after_consume and on_stop call sys.exit(3)."""

    def after_consume(self, entry, msg, outcome, exception):
        import sys

        record(f"mw:exiting:after:{text(msg)}:{outcome}")
        sys.exit(3)

    def on_stop(self):
        import sys

        record("mw:exiting:on_stop")
        sys.exit(3)


class Breakable:
    """For circuit_breaker: raises while the file $FAIL_FILE exists (a downstream that
    is down). Records 'call:BODY:TIME:fail' or 'call:BODY:TIME:ok' on every call."""

    def consume(self, amqp, msg):
        import time

        failing = os.path.exists(os.environ["FAIL_FILE"])
        record(f"call:{text(msg)}:{time.time():.6f}:{'fail' if failing else 'ok'}")
        if failing:
            raise ConnectionError("the database is down")

    def shutdown(self, exception=None):
        pass


class SlowBreakable(Breakable):
    """Breakable, taking its time (cooperatively) first: bodies 'slow-*' 3 s, the
    others 0.2 s."""

    def consume(self, amqp, msg):
        gevent.sleep(3 if text(msg).startswith("slow") else 0.2)
        super().consume(amqp, msg)


class Stamped:
    """Records 'start:BODY:TIME:PID' as each call starts."""

    def consume(self, amqp, msg):
        import time

        record(f"start:{text(msg)}:{time.time():.6f}:{os.getpid()}")

    def shutdown(self, exception=None):
        pass


_LEAKED = []


class Leaky:
    """Keeps 5 MiB per message for ever (for recycle_above_memory_mb). Records the body."""

    def consume(self, amqp, msg):
        _LEAKED.append(bytearray(5 * 2**20))
        record(text(msg))

    def shutdown(self, exception=None):
        pass

"""The consumer of the chaos soak (scripts/chaos.py), and the rule both share.

Each input carries its id (an integer, as ``message_id``). What happens to it
is a function of the id alone (``kind``), so the soak can tell afterwards what
must have become of every input without asking the consumer:

- ``poison``: ``consume`` always raises; after ``max_attempts`` the retry
  policy must move it to the dead-letter queue;
- ``transient``: raises on its first attempt only (``msg.attempt == 1``), so it
  must come out through a retry delay queue;
- ``ok``: handled at once.

A handled input publishes exactly one output (confirmed, since
``publisher_confirms`` is on by default) to $CHAOS_OUTPUT with the input's id in
the ``chaos-id`` header, then returns, which acks the input.

Every attempt is also appended to $CHAOS_RECORD, one short line per event
(``pid id attempt event``), so that a lost id can be traced afterwards: which
worker took it, how often, and how each attempt ended. Lines are shorter than
PIPE_BUF and written with O_APPEND, so the workers' lines never interleave.
"""

from __future__ import annotations

import os
import random
from typing import Any

import gevent

OUTPUT_QUEUE = os.environ.get("CHAOS_OUTPUT", "chaos.out")
RECORD = os.environ.get("CHAOS_RECORD", "")

POISON_EVERY = 20      # 5% of ids: ids with id % 20 == 7
TRANSIENT_EVERY = 10   # 10% of ids (poison excluded): id % 10 == 3


def kind(message_id: int) -> str:
    """What the consumer does with input ``message_id``: poison, transient or ok."""
    if message_id % POISON_EVERY == 7:
        return "poison"
    if message_id % TRANSIENT_EVERY == 3:
        return "transient"
    return "ok"


class PoisonError(Exception):
    """Raised on every attempt of a poison input."""


class TransientError(Exception):
    """Raised on the first attempt of a transient input."""


def _record(message_id: int, attempt: int, event: str) -> None:
    if not RECORD:
        return
    line = f"{os.getpid()} {message_id} {attempt} {event}\n".encode()
    fd = os.open(RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


class Relay:
    def consume(self, amqp: Any, msg: Any) -> None:
        message_id = int(msg.properties["message_id"])
        attempt = msg.attempt
        _record(message_id, attempt, "start")
        # A little cooperative work, so that some deliveries are always in the
        # middle of consume when a fault strikes (a kill, a dropped connection).
        gevent.sleep(random.uniform(0.0, 0.05))
        what = kind(message_id)
        if what == "poison":
            _record(message_id, attempt, "raise-poison")
            raise PoisonError(f"input {message_id} is poison")
        if what == "transient" and attempt == 1:
            _record(message_id, attempt, "raise-transient")
            raise TransientError(f"input {message_id} fails on its first attempt")
        try:
            amqp.publish("", OUTPUT_QUEUE,
                         {"chaos-id": str(message_id), "chaos-attempt": str(attempt),
                          "chaos-pid": str(os.getpid())},
                         msg.body, persistent=True)
        except Exception as exc:
            _record(message_id, attempt, f"publish-failed:{type(exc).__name__}")
            raise
        _record(message_id, attempt, "published")

    def shutdown(self, exception: BaseException | None = None) -> None:
        pass

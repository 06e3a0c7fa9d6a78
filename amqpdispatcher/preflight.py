"""``--check``: whether the config would start on the broker, changing nothing there.

It connects as the daemon does and checks what the start needs: every queue the
dispatcher declares (the config's, and the delay and dead-letter queues of retry
policies) can be declared, and one that exists has the config's flags and
arguments; every ``passive: true`` queue, every bound exchange and every consumer
queue the config does not declare exists; the user may declare (configure), bind
(write on the queue, read on the exchange), consume (read) and, for a retry
policy, publish to the default exchange (write). One line per finding, naming the
file and the key path.

How each question is asked without changing anything (rabbit_channel.erl, the
same from RabbitMQ 3.10 to 4.x: the permission checks come before the work):

- exists: a passive ``queue.declare`` or ``exchange.declare`` (no permission
  needed);
- a queue that exists: ``queue.declare`` as the dispatcher sends it. The broker
  checks configure permission (403), then, the queue existing, only compares:
  flags, exclusivity (405) and arguments (406 "inequivalent arg", naming the
  argument and both values);
- a queue that does not exist yet: ``queue.declare`` with the config's
  arguments and ``x-max-length`` set to a string. The broker checks configure
  permission, the vhost's queue limit, with ``x-dead-letter-exchange`` read on
  the queue and write on that exchange, then refuses the argument (406 invalid
  arg) before creating anything;
- binding: ``queue.unbind`` of the binding with an argument no binding has. The
  broker checks what ``queue.bind`` checks (write on the queue, read on the
  exchange, the routing key against topic permissions), then finds nothing to
  remove;
- consuming: ``basic.consume`` with ``x-priority`` set to a string: the broker
  checks read permission, then refuses the argument (406) before any consumer
  exists;
- publishing: a confirmed, mandatory publish of an empty message to the default
  exchange with a routing key no queue has: the broker checks write permission,
  then returns the message, stored nowhere.

Not checked: what consumer code publishes, and one race: a queue deleted between
the passive and the full declaration is created by the latter, as the config
describes it (as the daemon would).
"""

from __future__ import annotations

import logging
import sys
import uuid
from typing import Any

import gevent.event
import pika

from .broker import BrokerError, SyncChannel, connect, describe_close
from .config import Binding, Config, ConsumerConfig, QueueConfig
from .publisher import Publisher
from .retry import retry_queues
from .settings import Settings

# A value the broker refuses for these arguments, after its permission checks.
PROBE = "amqp-dispatcher --check"
PROBE_QUEUE_ARGUMENT = "x-max-length"
PROBE_CONSUME_ARGUMENT = "x-priority"
CLOSE_TIMEOUT = 5.0


def check(config: Config, settings: Settings) -> int:
    """``--check``: print one line per finding on stderr, or an OK line on stdout;
    return 1 if anything (the connection included) would stop the start, else 0."""
    # Only findings are printed: the connection's progress lines would be noise.
    logging.getLogger("amqp-dispatcher").setLevel(logging.ERROR)
    try:
        findings = Preflight(config, settings).run()
    except BrokerError as exc:
        findings = [f"{config.path}: cannot check: {exc}"]
    for line in findings:
        print(line, file=sys.stderr)
    if findings:
        return 1
    bindings = sum(len(queue.bindings) for queue in config.queues)
    print(f"{config.path}: OK: {settings.redacted_url()} has what the config needs "
          f"({len(config.queues)} queue(s), {bindings} binding(s), "
          f"{len(config.consumers)} consumer(s))")
    return 0


class Preflight:
    def __init__(self, config: Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.findings: list[str] = []
        self.connection: Any = None
        self._sync: SyncChannel | None = None
        # Makes each probing binding and routing key one that nothing on the broker has.
        self._marker = f"amqp-dispatcher-check-{uuid.uuid4().hex}"

    def run(self) -> list[str]:
        """The findings; raises BrokerError if the connection fails."""
        self.connection = connect(self.settings)
        try:
            topology = self.config.queues + retry_queues(self.config)
            will_exist = {queue.queue: self._check_queue(queue) for queue in topology}
            for queue in topology:
                for i, binding in enumerate(queue.bindings):
                    self._check_binding(queue, i, binding)
            for entry in self.config.consumers:
                self._check_consumer(entry, will_exist)
            retried = next((entry for entry in self.config.consumers if entry.retry), None)
            if retried is not None:
                self._check_publish(retried)
        finally:
            self._close()
        return self.findings

    def _close(self) -> None:
        if not self.connection.is_open:
            return
        closed = gevent.event.Event()
        self.connection.add_on_close_callback(lambda *_: closed.set())
        self.connection.close()
        closed.wait(CLOSE_TIMEOUT)

    def _found(self, key_path: str, message: str, reason: Any = None) -> None:
        said = f": broker said {describe_close(reason)}" if reason is not None else ""
        self.findings.append(f"{self.config.path}: {key_path}: {message}{said}")

    def _ask(self, method: str, **kwargs: Any) -> tuple[Any, Any]:
        """One request on the probing channel: (the reply, None), or (None, the reason the
        broker closed the channel with). Raises BrokerError for the connection's failures."""
        if self._sync is None:
            self._sync = SyncChannel.open(self.connection)
        sync = self._sync
        try:
            return sync.call(getattr(sync.channel, method), **kwargs), None
        except BrokerError as exc:
            if not exc.channel_only:
                raise
            self._sync = None  # closed by the broker: the next request opens another
            return None, sync.close_reason

    def _check_queue(self, queue: QueueConfig) -> bool:
        """Whether the queue exists, or would be declared, at start."""
        name = queue.queue
        flags = dict(queue=name, durable=queue.durable, exclusive=queue.exclusive,
                     auto_delete=queue.auto_delete)
        _, refused = self._ask("queue_declare", queue=name, passive=True)
        if refused is None:
            if not queue.passive:
                _, refused = self._ask("queue_declare", **flags,
                                       arguments=queue.arguments() or None)
                if refused is not None:
                    self._found(queue.path, _declare_problem(name, refused, exists=True),
                                refused)
            return True
        if refused.reply_code != 404 or "down or inaccessible" in refused.reply_text:
            self._found(queue.path, _declare_problem(name, refused, exists=True), refused)
            return False
        if queue.passive:
            self._found(queue.path, f"queue {name!r} does not exist (passive: true only "
                        "checks that it does)")
            return False
        probe = {**queue.arguments(), PROBE_QUEUE_ARGUMENT: PROBE}
        declared, refused = self._ask("queue_declare", **flags, arguments=probe)
        if declared is not None:  # no RabbitMQ takes it; should one, say so
            self._found(queue.path, f"the broker accepted queue {name!r} with "
                        f"{PROBE_QUEUE_ARGUMENT} {PROBE!r}, so --check created it; it cannot "
                        "check this broker")
        elif f"invalid arg '{PROBE_QUEUE_ARGUMENT}'" not in refused.reply_text:
            self._found(queue.path, _declare_problem(name, refused, exists=False), refused)
        return True

    def _check_binding(self, queue: QueueConfig, index: int, binding: Binding) -> None:
        key_path = f"{queue.path}.bindings[{index}]"
        _, refused = self._ask("exchange_declare", exchange=binding.exchange, passive=True)
        if refused is not None:
            missing = refused.reply_code == 404
            self._found(key_path, f"exchange {binding.exchange!r} does not exist (the "
                        "dispatcher binds to it, it does not declare it)" if missing else
                        f"cannot use exchange {binding.exchange!r}",
                        None if missing else refused)
        _, refused = self._ask("queue_unbind", queue=queue.queue, exchange=binding.exchange,
                               routing_key=binding.routing_key,
                               arguments={"x-amqp-dispatcher-check": self._marker})
        if refused is not None and refused.reply_code == 403:
            self._found(key_path, f"the user {self.settings.user!r} may not bind queue "
                        f"{queue.queue!r} to exchange {binding.exchange!r} (it needs write "
                        "on the queue and read on the exchange)", refused)

    def _check_consumer(self, entry: ConsumerConfig, will_exist: dict[str, bool]) -> None:
        name = entry.queue
        if name not in will_exist:
            _, refused = self._ask("queue_declare", queue=name, passive=True)
            will_exist[name] = refused is None
            if refused is not None:
                self._found(f"{entry.path}.queue", f"queue {name!r} does not exist, and the "
                            "config does not declare it" if refused.reply_code == 404 else
                            f"cannot use queue {name!r}",
                            None if refused.reply_code == 404 else refused)
        consumed, refused = self._ask("basic_consume", queue=name,
                                      on_message_callback=lambda *_: None,
                                      arguments={PROBE_CONSUME_ARGUMENT: PROBE})
        if consumed is not None:  # no RabbitMQ takes it; should one, give it up at once
            assert self._sync is not None
            self._sync.close()
            self._sync = None
        elif refused.reply_code == 403:
            self._found(entry.path, f"the user {self.settings.user!r} may not consume from "
                        f"queue {name!r} (it needs read on the queue)", refused)
        elif refused.reply_code == 404 and will_exist[name]:
            pass  # declared at start, before the consumers
        elif f"invalid arg '{PROBE_CONSUME_ARGUMENT}'" not in refused.reply_text \
                and will_exist[name]:
            self._found(entry.path, f"cannot consume from queue {name!r}", refused)

    def _check_publish(self, entry: ConsumerConfig) -> None:
        """A retry policy publishes to its delay and dead-letter queues through the
        default exchange."""
        publisher = Publisher.open_on(self.connection, lambda *_: None)
        try:
            publisher.publish("", self._marker, b"", pika.BasicProperties())
            refused = publisher.sync.close_reason
            if getattr(refused, "reply_code", None) == 403:
                self._found(f"{entry.path}.retry", f"the user {self.settings.user!r} may not "
                            "publish to the default exchange, as a retry policy does (it "
                            "needs write on amq.default)", refused)
        finally:
            publisher.close()


def _declare_problem(name: str, refused: Any, exists: bool) -> str:
    if refused.reply_code == 403:
        return (f"the user may not declare queue {name!r} (it needs configure on the queue"
                + ("" if exists else "; with x-dead-letter-exchange, also read on the queue "
                   "and write on that exchange") + ")")
    if refused.reply_code == 405:
        return f"queue {name!r} is exclusive to another connection, or differs in exclusive"
    if exists and refused.reply_code == 406:
        return f"queue {name!r} exists with other flags or arguments"
    return f"cannot use queue {name!r}"

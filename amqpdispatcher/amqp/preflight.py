"""``--check``: whether the config would start on the broker, changing nothing there.

It connects as the daemon does (``RABBITMQ_URL``, its TLS parameters included)
and checks what the start needs: every exchange and queue the dispatcher
declares (the config's, and the delay and dead-letter queues of retry policies)
can be declared, and one that exists has the config's type, flags and arguments;
every ``passive: true`` exchange or queue, every exchange a binding names that
the config does not declare, and every consumer queue the config does not
declare, exists; the user may declare (configure), bind (write on the
destination, read on the source exchange), consume (read) and, for a retry
policy, publish to the default exchange (write). One line per finding, naming
the file and the key path; a queue or exchange that exists with other arguments
is told as the daemon tells it (broker.describe_inequivalent).

How each question is asked without changing anything (rabbit_channel.erl,
checked against RabbitMQ 3.10: the permission checks come before the work):

- exists: a passive ``queue.declare`` or ``exchange.declare`` (no permission
  needed);
- a queue or exchange that exists: its declaration as the dispatcher sends it.
  The broker checks configure permission (403), then, the queue or exchange
  existing, only compares: type, flags, exclusivity (405) and arguments (406
  "inequivalent arg", naming the argument and both values). An exchange type
  the broker does not know (a plugin's, not enabled) closes the connection
  (503): that is a finding, and the check goes on on a new connection;
- a queue that does not exist yet: ``queue.declare`` with the config's
  arguments and ``x-max-length`` set to a string. The broker checks configure
  permission, the vhost's queue limit, with ``x-dead-letter-exchange`` read on
  the queue and write on that exchange, then refuses the argument (406 invalid
  arg) before creating anything;
- an exchange that does not exist yet: ``exchange.declare`` with the config's
  arguments and ``alternate-exchange`` set to a number. The broker checks the
  type and configure permission, then refuses the argument (406 invalid type)
  before creating anything;
- binding: ``queue.unbind`` or ``exchange.unbind`` of the binding with an
  argument no binding has. The broker checks what binding checks (write on the
  destination, read on the source exchange, the routing key against topic
  permissions), then finds nothing to remove;
- consuming: ``basic.consume`` with ``x-priority`` set to a string: the broker
  checks read permission, then refuses the argument (406) before any consumer
  exists;
- publishing: a confirmed, mandatory publish of an empty message to the default
  exchange with a routing key no queue has: the broker checks write permission,
  then returns the message, stored nowhere.

Not checked: what consumer code publishes; whether an ``exclusive`` consumer
would meet another consumer (only consuming tells); an exchange's
``alternate-exchange`` permissions when it does not exist yet (the probe takes
that argument's place); and one race: a queue or exchange deleted between the
passive and the full declaration is created by the latter, as the config
describes it (as the daemon would).
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from typing import Any

import pika

from ..config import Binding, Config, ConsumerConfig, ExchangeConfig, QueueConfig
from ..config.retry import retry_queues
from ..config.settings import Settings
from ..contracts.timeouts import CLOSE_TIMEOUT
from .channel import SyncChannel
from .confirms import ConfirmChannel
from .connection import RPC_TIMEOUT, close_connection, connect, describe_close
from .errors import BrokerError, PublishError, PublishReturned
from .topology import describe_inequivalent, is_refused_exchange_type

# A value the broker refuses for these arguments, after its permission checks.
PROBE = "amqp-dispatcher --check"
PROBE_QUEUE_ARGUMENT = "x-max-length"
PROBE_EXCHANGE_ARGUMENT = "alternate-exchange"  # refused unless a string
PROBE_CONSUME_ARGUMENT = "x-priority"


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
    bindings = (sum(len(exchange.bindings) for exchange in config.exchanges)
                + sum(len(queue.bindings) for queue in config.queues))
    exchanges = f"{len(config.exchanges)} exchange(s), " if config.exchanges else ""
    print(f"{config.path}: OK: {settings.redacted_url()} has what the config needs "
          f"({exchanges}{len(config.queues)} queue(s), {bindings} binding(s), "
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
        # The config's exchanges: a binding to one needs no exchange on the broker yet.
        self._declared = {exchange.exchange for exchange in config.exchanges}

    def run(self) -> list[str]:
        """The findings; raises BrokerError if the connection fails."""
        self.connection = connect(self.settings)
        try:
            for exchange in self.config.exchanges:
                self._check_exchange(exchange)
            for exchange in self.config.exchanges:
                for i, binding in enumerate(exchange.bindings):
                    self._check_binding(exchange.path, i, binding, "exchange",
                                        exchange.exchange)
            topology = self.config.queues + retry_queues(self.config)
            will_exist = {queue.queue: self._check_queue(queue) for queue in topology}
            for queue in topology:
                for i, binding in enumerate(queue.bindings):
                    self._check_binding(queue.path, i, binding, "queue", queue.queue)
            for entry in self.config.consumers:
                self._check_consumer(entry, will_exist)
            retried = next((entry for entry in self.config.consumers if entry.retry), None)
            if retried is not None:
                self._check_publish(retried)
        finally:
            self._close()
        return self.findings

    def _close(self) -> None:
        close_connection(self.connection, CLOSE_TIMEOUT)

    def _found(self, key_path: str, message: str, reason: Any = None) -> None:
        said = f": broker said {describe_close(reason)}" if reason is not None else ""
        self.findings.append(f"{self.config.path}: {key_path}: {message}{said}")

    def _found_refusal(self, item: ExchangeConfig | QueueConfig, message: str,
                       reason: Any) -> None:
        """A declaration refused: a 406 over an argument or flag as the daemon says it."""
        inequivalent = describe_inequivalent(self.config.path, item, reason.reply_text)
        if inequivalent is not None:
            self.findings.append(inequivalent)
        else:
            self._found(item.path, message, reason)

    def _ask(self, method: str, **kwargs: Any) -> tuple[Any, Any]:
        """One request on the probing channel: (the reply, None), or (None, the reason the
        broker closed the channel with, or the connection over an unknown exchange type:
        the next request opens a new one). Raises BrokerError for the connection's other
        failures."""
        if self._sync is None:
            self._sync = SyncChannel.open(self.connection)
        sync = self._sync
        try:
            return sync.call(getattr(sync.channel, method), **kwargs), None
        except BrokerError as exc:
            self._sync = None  # closed: the next request opens another
            if is_refused_exchange_type(sync.close_reason):
                self.connection = connect(self.settings)
            elif not exc.channel_only:
                raise
            return None, sync.close_reason

    def _check_exchange(self, exchange: ExchangeConfig) -> None:
        name = exchange.exchange
        _, refused = self._ask("exchange_declare", exchange=name, passive=True)
        if refused is not None and refused.reply_code != 404:
            self._found(exchange.path, f"cannot use exchange {name!r}", refused)
            return
        if refused is not None and exchange.passive:
            self._found(exchange.path, f"exchange {name!r} does not exist (passive: true only "
                        "checks that it does)")
            return
        if exchange.passive:
            return
        declare = dict(exchange=name, exchange_type=exchange.type, durable=exchange.durable,
                       auto_delete=exchange.auto_delete, internal=exchange.internal)
        if refused is None:  # it exists: the declaration only compares
            _, refused = self._ask("exchange_declare", **declare,
                                   arguments=exchange.arguments or None)
            expected = None
        else:
            probe = {**exchange.arguments, PROBE_EXCHANGE_ARGUMENT: 0}
            declared, refused = self._ask("exchange_declare", **declare, arguments=probe)
            if declared is not None:  # no RabbitMQ takes it; should one, say so
                self._found(exchange.path, f"the broker accepted exchange {name!r} with "
                            f"{PROBE_EXCHANGE_ARGUMENT} 0, so --check created it; it cannot "
                            "check this broker")
            expected = f"for arg '{PROBE_EXCHANGE_ARGUMENT}'"
        if refused is None or expected is not None and expected in refused.reply_text:
            return
        if refused.reply_code == 503:
            self._found(f"{exchange.path}.type", f"exchange type {exchange.type!r} is unknown "
                        "to the broker (is the plugin that provides it enabled?)", refused)
        elif refused.reply_code == 403:
            self._found(exchange.path, f"the user {self.settings.user!r} may not declare "
                        f"exchange {name!r} (it needs configure on the exchange)", refused)
        else:
            self._found_refusal(exchange, f"cannot declare exchange {name!r}", refused)

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
                    self._found_refusal(queue, _declare_problem(name, refused, exists=True),
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

    def _check_binding(self, path: str, index: int, binding: Binding, kind: str,
                       destination: str) -> None:
        """A queue's or an exchange's binding to its source ``binding.exchange``."""
        key_path = f"{path}.bindings[{index}]"
        source = binding.exchange
        if source not in self._declared:
            _, refused = self._ask("exchange_declare", exchange=source, passive=True)
            if refused is not None:
                missing = refused.reply_code == 404
                self._found(key_path, f"exchange {source!r} does not exist, and the config "
                            "does not declare it in exchanges" if missing
                            else f"cannot use exchange {source!r}",
                            None if missing else refused)
        unbind = dict(routing_key=binding.routing_key,
                      arguments={"x-amqp-dispatcher-check": self._marker})
        if kind == "queue":
            _, refused = self._ask("queue_unbind", queue=destination, exchange=source, **unbind)
        else:
            _, refused = self._ask("exchange_unbind", destination=destination, source=source,
                                   **unbind)
        if refused is not None and refused.reply_code == 403:
            self._found(key_path, f"the user {self.settings.user!r} may not bind {kind} "
                        f"{destination!r} to exchange {source!r} (it needs write on the "
                        f"{kind} and read on the exchange)", refused)

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
        channel = ConfirmChannel.open_on(self.connection, lambda _: None)
        try:
            channel.publish("", self._marker, b"", pika.BasicProperties(), mandatory=True,
                            confirm=True, deadline=time.monotonic() + RPC_TIMEOUT)
        except PublishReturned:
            pass  # as intended: no queue took it
        except PublishError:
            refused = channel.close_reason
            if getattr(refused, "reply_code", None) == 403:
                self._found(f"{entry.path}.retry", f"the user {self.settings.user!r} may not "
                            "publish to the default exchange, as a retry policy does (it "
                            "needs write on amq.default)", refused)
        finally:
            if channel.open:
                channel.channel.close()


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

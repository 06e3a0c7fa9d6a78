"""The queues a retry policy needs, derived from the config: declared with the
config's own (runtime, --check) and watched by --exit-when-drained."""

from __future__ import annotations

from .consumers import ConsumerConfig, delay_queue_name
from .queues import QueueConfig
from .top_level import Config


def delay_queue_names(entry: ConsumerConfig) -> list[str]:
    """The entry's delay queues, one per distinct delay, shortest first."""
    if entry.retry is None:
        return []
    return [delay_queue_name(entry.queue, ms) for ms in entry.retry.delays_ms()]


def legacy_delay_queue_name(queue: str, delay_ms: int) -> str:
    """The classic delay queue earlier versions declared instead of delay_queue_name's.
    Not declared any more; one left on the broker still dead-letters what it holds
    back to ``queue`` when its TTL runs out (see docs/guides/failures.md, upgrading)."""
    return f"{queue}.retry.{delay_ms}ms"


def retry_queues(config: Config) -> tuple[QueueConfig, ...]:
    """The queues the retry policies need, declared with the config's own queues.

    One delay queue per distinct delay (a queue-wide TTL: a short delay never
    waits behind a long one), dead-lettering back to the entry's queue; and each
    dead-letter queue, durable. A name declared already is left out.

    A delay queue is a quorum queue with at-least-once dead-lettering, whatever
    the entry's queue is: it keeps an expired message until the entry's queue has
    confirmed taking it. A classic queue dead-letters at most once: a message
    that expires while the entry's queue cannot take it (a quorum queue without a
    leader yet, after a broker restart; a full queue; a deleted one) is dropped.
    At-least-once needs ``x-overflow: reject-publish``; a delay queue has no
    length limit, so nothing is rejected.
    """
    names = {queue.queue for queue in config.queues}
    derived: list[QueueConfig] = []
    for entry in (*config.consumers, *config.unselected):  # all of them, whatever --only
        if entry.retry is None:
            continue
        for ms, name in zip(entry.retry.delays_ms(), delay_queue_names(entry)):
            derived.append(QueueConfig(
                queue=name, x_queue_type="quorum", x_message_ttl=ms,
                x_dead_letter_exchange="", x_dead_letter_routing_key=entry.queue,
                x_overflow="reject-publish",
                extra_arguments={"x-dead-letter-strategy": "at-least-once"},
                path=f"{entry.path}.retry (delay queue)"))
        if entry.retry.dead_letter_queue:
            derived.append(QueueConfig(queue=entry.retry.dead_letter_queue,
                                       path=f"{entry.path}.retry.dead_letter_queue"))
    unique = []
    for queue in derived:
        if queue.queue not in names:
            names.add(queue.queue)
            unique.append(queue)
    return tuple(unique)

"""Consuming: one consumer entry's deliveries, from the broker to their outcome.

pool (ConsumerPool: ``consumer_count`` slot greenlets, each owning one consumer
instance), message (the ``msg`` and ``amqp`` a consume call gets), acks (settling
on the delivery's channel, coalesced), failure (the failure policy: requeue, retry
through a delay queue, dead-letter; time limits), outcomes (what becomes of each
delivery, counted where it is decided), middleware (the user's hooks around
consume: ``Middleware``, importable as ``from amqpdispatcher import Middleware``).
"""

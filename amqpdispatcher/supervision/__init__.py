"""Supervision: ``--processes N``.

arbiter (the supervising process: never talks to the broker, loads neither pika nor
gevent), endpoint (its HTTP endpoint, asking the workers), link (the worker's side
of the link to the arbiter). What both sides agree on is contracts/link.py.
"""

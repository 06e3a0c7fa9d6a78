"""What the parts of amqp-dispatcher agree on, in modules that import nothing of ours.

- ``exits``: the exit statuses, each with what it means (docs/reference/
  exit-statuses.md is generated from it: ``python scripts/docs.py``).
- ``signals``: what each signal means to a process, to a generation of
  consumers, and to the arbiter of ``--processes``.
- ``link``: the arbiter <-> worker link of ``--processes`` (environment
  variables, the lines a worker writes).
- ``timeouts``: the bounds several parts share.
- ``environment``, ``metrics``: the environment variables read and the metrics
  served, each with what it means (the reference pages are generated from them).

They import only the standard library, so that any part (the arbiter, which is
not a gevent program, included) can read them without loading the others.
"""

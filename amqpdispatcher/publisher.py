"""Where the README once said the PublishError family is importable from; kept so that
``from amqpdispatcher.publisher import PublishReturned`` goes on working. The code is
in amqp/errors.py (and ``from amqpdispatcher import PublishReturned`` is the short way)."""

from .amqp.errors import PublishError, PublishNacked, PublishReturned, PublishTimeout

__all__ = ["PublishError", "PublishNacked", "PublishReturned", "PublishTimeout"]

"""Where the README once said TimeLimitExceeded is importable from; kept so that
``from amqpdispatcher.retry import TimeLimitExceeded`` goes on working. The failure
policy is in consuming/failure.py (``from amqpdispatcher import TimeLimitExceeded``)."""

from .consuming.failure import TimeLimitExceeded

__all__ = ["TimeLimitExceeded"]

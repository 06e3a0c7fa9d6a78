"""amqp-dispatcher: run RabbitMQ consumers from a YAML file, on gevent."""

from typing import Any

__version__ = "1.0.0.dev0"


_PUBLISH_ERRORS = ("PublishError", "PublishNacked", "PublishReturned", "PublishTimeout")


def __getattr__(name: str) -> Any:
    # amqpdispatcher.TimeLimitExceeded and the PublishErrors, imported on first use:
    # setup.py imports this package for __version__ before gevent and pika are installed.
    if name == "TimeLimitExceeded":
        from .retry import TimeLimitExceeded

        return TimeLimitExceeded
    if name in _PUBLISH_ERRORS:
        from . import publisher

        return getattr(publisher, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

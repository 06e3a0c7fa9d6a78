"""amqp-dispatcher: run RabbitMQ consumers from a YAML file, on gevent."""

from typing import TYPE_CHECKING, Any

__version__ = "1.0.0.dev0"

if TYPE_CHECKING:  # what type checkers see; at run time, __getattr__ below
    from .amqp.errors import PublishError as PublishError
    from .amqp.errors import PublishNacked as PublishNacked
    from .amqp.errors import PublishReturned as PublishReturned
    from .amqp.errors import PublishTimeout as PublishTimeout
    from .api import Dispatcher as Dispatcher
    from .config import ConfigError as ConfigError
    from .config.settings import SettingsError as SettingsError
    from .consuming.failure import TimeLimitExceeded as TimeLimitExceeded
    from .consuming.middleware import Middleware as Middleware

# The public names, each imported on first use: setup.py imports this package for
# __version__ before gevent and pika are installed, and importing it stays cheap.
_LAZY = {"Dispatcher": "api", "ConfigError": "config", "SettingsError": "config.settings",
         "TimeLimitExceeded": "consuming.failure", "ListenError": "observability.wsgi",
         "PublishError": "amqp.errors", "PublishNacked": "amqp.errors",
         "PublishReturned": "amqp.errors", "PublishTimeout": "amqp.errors",
         "Middleware": "consuming.middleware"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

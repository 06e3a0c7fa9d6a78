"""Where the README once said ListenError is importable from; kept so that
``from amqpdispatcher.http import ListenError`` goes on working. The endpoint is in
observability/ (``from amqpdispatcher import ListenError``)."""

from .observability.wsgi import ListenError

__all__ = ["ListenError"]

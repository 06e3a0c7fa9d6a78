"""Reads an audit stream from its first entry (examples/audit.yml; docs/guides/topology.md).

A stream keeps its messages after they are read, and the dispatcher acks them all the
same: RabbitMQ keeps no position for these consumers, so with stream_offset: first the
whole stream is read again at every start. Make consume idempotent (or use next).
"""

import logging

log = logging.getLogger("audit")


class Indexer:
    def consume(self, amqp, msg):
        offset = (msg.properties.get("headers") or {}).get("x-stream-offset")
        log.info("audit entry %s: %s", offset, msg.body.decode())

    def shutdown(self, exception=None):
        pass

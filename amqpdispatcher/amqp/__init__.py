"""The AMQP glue: pika's gevent adapter turned into calls that block a greenlet.

errors (BrokerError, the public PublishError family), connection (connect, close,
backoff), channel (SyncChannel), topology (declaring the config), arguments (what
``amqp.publish`` accepts), confirms (one confirm-mode channel), publishing (the
publishing connection and its channels), preflight (``--check``).
"""

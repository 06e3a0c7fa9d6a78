"""amqp-dispatcher: run RabbitMQ consumers from a YAML file, on gevent."""

__version__ = "1.0.0.dev0"

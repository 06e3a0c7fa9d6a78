"""An example startup handler: runs once, before connecting."""

import logging


def startup():
    logging.getLogger("amqp-dispatcher").info("example startup handler ran")

"""Publish the quickstart's messages to the queue greetings, with publisher confirms.

    python publish.py                      # three messages: Ada, Grace, and one without a name
    python publish.py '{"name": "Linus"}'  # or your own
"""

import os
import sys

import pika

url = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@localhost:5672/")
bodies = sys.argv[1:] or ['{"name": "Ada"}', '{"name": "Grace"}', '{"nom": "?"}']

connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
channel.confirm_delivery()  # basic_publish now raises if the broker does not take it
for body in bodies:
    channel.basic_publish("", "greetings", body.encode(),
                          pika.BasicProperties(content_type="application/json",
                                               delivery_mode=pika.DeliveryMode.Persistent),
                          mandatory=True)
    print("published", body)
connection.close()

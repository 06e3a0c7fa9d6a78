"""The quickstart's tests: no broker needed (pytest test_greeter.py)."""

from pathlib import Path

from greeter import Greeter

from amqpdispatcher.testing import Harness

CONFIG = Path(__file__).with_name("config.yml")


def test_a_greeting_is_acked():
    result = Harness.consume(Greeter(), b'{"name": "Ada"}')
    assert result.outcome == "ack"
    assert result.exception is None


def test_a_message_without_a_name_is_retried_then_dead_lettered(amqp_harness):
    h = amqp_harness(CONFIG)
    h.publish("", "greetings", b'{"name": "Ada"}')
    h.publish("", "greetings", b'{"nom": "?"}')
    h.run()
    assert h.outcomes("greetings") == {"ack": 1, "requeue": 0, "reject": 0, "retry": 2,
                                       "dead_letter": 1}
    assert h.messages("greetings.failed") == [b'{"nom": "?"}']

"""Pure logic: URL parsing, ack coalescing, the failure policy's pieces (recording fakes
stand in for channels)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import gevent
import pika
import pika.amqp_object
import pika.callback
import pika.channel
import pika.exceptions
import pika.frame
import pika.spec
import pytest

from amqpdispatcher.amqp.channel import cancel_consumer
from amqpdispatcher.amqp.confirms import ConfirmChannel
from amqpdispatcher.amqp.connection import (
    _connect_failure,
    connection_parameters,
    is_delivery_ack_timeout,
)
from amqpdispatcher.amqp.errors import PublishError, PublishNacked, PublishReturned, PublishTimeout
from amqpdispatcher.amqp.topology import describe_inequivalent
from amqpdispatcher.config import (
    CircuitBreakerConfig,
    Config,
    ConsumerConfig,
    ExchangeConfig,
    QueueConfig,
    RetryConfig,
    load_config_dict,
)
from amqpdispatcher.config.retry import retry_queues
from amqpdispatcher.config.settings import SettingsError, parse_url
from amqpdispatcher.consuming.acks import Acknowledger
from amqpdispatcher.consuming.breaker import sample_interval
from amqpdispatcher.consuming.failure import (
    ATTEMPT_HEADER,
    TimeLimit,
    TimeLimitExceeded,
    attempt_of,
    dead_letter_headers,
    retry_headers,
)
from amqpdispatcher.consuming.outcomes import ACK, DROPPED, OUTCOMES
from amqpdispatcher.consuming.pool import ConsumerPool
from amqpdispatcher.runtime.generation import Generation


def test_url_defaults_and_decoding() -> None:
    s = parse_url("amqp://us%40er:p%3Ass@host/%2F")
    assert (s.user, s.password, s.vhost, s.hosts) == ("us@er", "p:ss", "/", (("host", 5672),))
    assert parse_url("amqp://u:p@h").vhost == "/"
    assert parse_url("amqp://u:p@h/").vhost == "/"
    assert parse_url("amqp://u:p@h/prod").vhost == "prod"
    assert parse_url("amqps://u:p@h/").hosts == (("h", 5671),)


def test_url_host_lists() -> None:
    # 0.4.3 form: the port after the last host applies to every host.
    assert parse_url("amqp://u:p@a,b,c:5673/v").hosts == (("a", 5673), ("b", 5673), ("c", 5673))
    # Each host may carry its own port.
    assert parse_url("amqp://u:p@a:1,b:2/v").hosts == (("a", 1), ("b", 2))
    assert parse_url("amqp://u:p@[::1]:5673/v").hosts == (("::1", 5673),)


def test_heartbeat_from_url_and_env() -> None:
    assert parse_url("amqp://u:p@h/").heartbeat is None
    assert parse_url("amqp://u:p@h/?heartbeat=30").heartbeat == 30
    assert parse_url("amqp://u:p@h/?heartbeat=30", "5").heartbeat == 5


@pytest.mark.parametrize("url", ["", "amqp:/h", "redis://h", "amqp://u:pw@h:0/",
                                 "amqp://u:pw@h,,k/", "amqp://u:pw@h:99999/"])
def test_bad_urls(url: str) -> None:
    with pytest.raises(SettingsError) as info:
        parse_url(url)
    assert "pw" not in str(info.value)


def test_surrounding_whitespace_is_stripped() -> None:
    """A secret file's trailing newline is not part of the vhost (or anything else)."""
    s = parse_url("amqp://u:p@h/prod\n")
    assert (s.vhost, s.password, s.hosts) == ("prod", "p", (("h", 5672),))
    assert parse_url("  amqp://u:p@h:5673/\r\n").hosts == (("h", 5673),)
    assert parse_url("amqp://u:p@h/?heartbeat=30\n").heartbeat == 30


def test_percent_encoded_password_characters() -> None:
    s = parse_url("amqp://u:a%3Fb%23c%40d%2Fe@h/v")
    assert (s.password, s.hosts, s.vhost) == ("a?b#c@d/e", (("h", 5672),), "v")


@pytest.mark.parametrize("url", [
    "amqp://u:12?pw34@host/",        # was: host 'u', port 12, user guest
    "amqp://u:pw?x@host/v?heartbeat=5",
    "amqp://u:12#pw34@host/",        # '#' anywhere
    "amqp://u:p@host/v#pw",
    "amqp://u:12/pw34@host/v",       # was: host 'u', port 12, vhost 'pw34@host/v'
])
def test_ambiguous_urls_are_rejected(url: str) -> None:
    with pytest.raises(SettingsError) as info:
        parse_url(url)
    message = str(info.value)
    assert message.startswith("RABBITMQ_URL: ") and "percent-encode" in message
    assert "pw" not in message and "12" not in message


@pytest.mark.parametrize("url", ["amqp://u:p w@h/", "amqp://u:pw@h/v\nx", "amqp://u:p\tw@h/",
                                 "amqp://u:p\x00w@h/", "amqp://u:p\x7fw@h/"])
def test_whitespace_and_control_characters_inside_are_rejected(url: str) -> None:
    with pytest.raises(SettingsError, match="whitespace or a control character") as info:
        parse_url(url)
    assert "pw" not in str(info.value) and "p w" not in str(info.value)


def test_unknown_query_parameters_are_rejected() -> None:
    with pytest.raises(SettingsError,
                       match="unknown query parameter 'heartbeet'; known: heartbeat"):
        parse_url("amqp://u:pw@h/?heartbeet=5")
    with pytest.raises(SettingsError, match="unknown query parameter 'ssl'"):
        parse_url("amqp://u:pw@h/?heartbeat=5&ssl=1")
    with pytest.raises(SettingsError, match="given twice"):
        parse_url("amqp://u:pw@h/?heartbeat=5&heartbeat=6")
    assert parse_url("amqp://u:pw@h/?").heartbeat is None


def test_heartbeat_range() -> None:
    assert parse_url("amqp://u:p@h/?heartbeat=0").heartbeat == 0
    assert parse_url("amqp://u:p@h/?heartbeat=65535").heartbeat == 65535
    assert parse_url("amqp://u:p@h/", "65535").heartbeat == 65535
    with pytest.raises(SettingsError, match="RABBITMQ_URL: heartbeat: expected at most 65535"):
        parse_url("amqp://u:p@h/?heartbeat=65536")
    with pytest.raises(SettingsError, match="RABBITMQ_HEARTBEAT: expected at most 65535"):
        parse_url("amqp://u:p@h/", "65536")
    for text in ("-1", "1.5", "\u00b2", ""):
        with pytest.raises(SettingsError, match="RABBITMQ_URL: heartbeat: expected a whole"):
            parse_url(f"amqp://u:p@h/?heartbeat={text}")


def test_non_ascii_digits_in_a_port_are_an_error_not_a_crash() -> None:
    with pytest.raises(SettingsError, match="a port in the host list is not a number"):
        parse_url("amqp://u:pw@h:\u00b2/")


def test_redacted_url_hides_password() -> None:
    s = parse_url("amqp://u:topsecret@a,b:5/v")
    assert s.redacted_url() == "amqp://u:***@a:5,b:5/v"


def test_hosts_are_tried_in_random_order() -> None:
    s = parse_url("amqp://u:p@a:1,b:2,c:3,d:4/v")
    orders = {tuple(p.host for p in connection_parameters(s)) for _ in range(50)}
    assert len(orders) > 1


class FakeChannel:
    def __init__(self) -> None:
        self.frames: list[tuple[str, int, bool]] = []

    def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self.frames.append(("ack", delivery_tag, multiple))

    def basic_reject(self, delivery_tag: int, requeue: bool) -> None:
        self.frames.append(("reject", delivery_tag, requeue))


def make(tags: int, prefetch: int = 100) -> tuple[Acknowledger, FakeChannel]:
    channel = FakeChannel()
    acker = Acknowledger(channel, prefetch, [0] * len(OUTCOMES))
    for tag in range(1, tags + 1):
        acker.delivered(tag)
    return acker, channel


def test_acks_in_one_loop_iteration_coalesce() -> None:
    acker, channel = make(5)
    for tag in range(1, 6):
        acker.ack(tag)
    assert channel.frames == []  # deferred to the end of the loop iteration
    gevent.sleep(0)
    assert channel.frames == [("ack", 5, True)]


def test_ack_never_covers_an_unfinished_delivery_nor_waits_for_it() -> None:
    acker, channel = make(4)
    acker.ack(2)
    acker.ack(3)
    gevent.sleep(0)
    # 1 is still being consumed: 2 and 3 are acked alone, at once, rather than held
    # back (which would keep the prefetch window full: a head-of-line stall).
    assert channel.frames == [("ack", 2, False), ("ack", 3, False)]
    acker.ack(1)
    gevent.sleep(0)
    assert channel.frames[-1] == ("ack", 1, True)  # covers nothing already acked
    acker.ack(4)
    gevent.sleep(0)
    assert channel.frames[-1] == ("ack", 4, True)
    assert acker.unsettled() == 0


def test_acks_below_the_oldest_unsettled_still_coalesce() -> None:
    acker, channel = make(6)
    for tag in (1, 2, 3, 5, 6):
        acker.ack(tag)
    gevent.sleep(0)
    assert channel.frames == [("ack", 3, True), ("ack", 5, False), ("ack", 6, False)]


def test_settling_on_a_channel_pika_already_closed_never_raises() -> None:
    class ClosedChannel(FakeChannel):
        def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
            raise pika.exceptions.ChannelWrongStateError("Channel is closed.")

        def basic_reject(self, delivery_tag: int, requeue: bool) -> None:
            raise pika.exceptions.ChannelWrongStateError("Channel is closed.")

    acker = Acknowledger(ClosedChannel(), 10, [0] * len(OUTCOMES))
    acker.delivered(1)
    acker.delivered(2)
    acker.ack(1)
    acker.flush()
    acker.reject(2, requeue=True)
    assert not acker.open


def test_reject_is_sent_at_once_and_never_swallowed() -> None:
    acker, channel = make(3)
    acker.ack(1)
    acker.reject(2, requeue=True)
    acker.ack(3)
    gevent.sleep(0)
    # The reject went first, on its own; the multiple ack up to 3 only covers 1 and 3,
    # which the broker still holds unacked.
    assert channel.frames == [("reject", 2, True), ("ack", 3, True)]


def test_trailing_reject_sends_no_ack() -> None:
    acker, channel = make(2)
    acker.reject(1, requeue=False)
    acker.reject(2, requeue=True)
    gevent.sleep(0)
    assert channel.frames == [("reject", 1, False), ("reject", 2, True)]
    assert acker.unsettled() == 0


def test_flush_early_when_half_the_prefetch_is_pending() -> None:
    acker, channel = make(10, prefetch=4)
    acker.ack(1)
    assert channel.frames == []
    acker.ack(2)
    assert channel.frames == [("ack", 2, True)]  # without yielding to the loop


def test_closed_channel_settles_nothing() -> None:
    acker, channel = make(2)
    acker.close()
    acker.ack(1)
    acker.reject(2, requeue=True)
    gevent.sleep(0)
    assert channel.frames == []


# -- the failure policy's pure pieces ----------------------------------------------------

def test_retry_delays_back_off_up_to_max_delay() -> None:
    retry = RetryConfig(max_attempts=6, delay=0.5, backoff=2, max_delay=3)
    assert [retry.delay_ms(n) for n in range(1, 6)] == [500, 1000, 2000, 3000, 3000]
    assert retry.delays_ms() == [500, 1000, 2000, 3000]  # one delay queue each
    assert RetryConfig(max_attempts=1).delays_ms() == []  # no retry: no delay queue
    assert RetryConfig(max_attempts=4, delay=1, backoff=1).delays_ms() == [1000]
    assert RetryConfig(delay=0.0001).delay_ms(1) == 1  # a TTL of 0 would not wait at all


def test_retry_queues_are_named_per_delay_and_declared_once() -> None:
    retry = RetryConfig(max_attempts=3, delay=1, backoff=2, dead_letter_queue="orders.failed")
    config = Config(path="c.yml", queues=(QueueConfig(queue="orders.failed"),), consumers=(
        ConsumerConfig("m:C", "orders", retry=retry, path="consumers[0]"),
        ConsumerConfig("m:D", "orders", retry=retry, path="consumers[1]"),
        ConsumerConfig("m:E", "other", path="consumers[2]")))
    queues = retry_queues(config)
    assert [q.queue for q in queues] == ["orders.retry.quorum.1000ms",
                                         "orders.retry.quorum.2000ms"]
    assert queues[0].durable
    assert queues[0].arguments() == {"x-message-ttl": 1000, "x-dead-letter-exchange": "",
                                     "x-dead-letter-routing-key": "orders",
                                     "x-queue-type": "quorum", "x-overflow": "reject-publish",
                                     "x-dead-letter-strategy": "at-least-once"}


def test_attempt_header() -> None:
    assert attempt_of(pika.BasicProperties()) == 1
    assert attempt_of(pika.BasicProperties(headers={"x-delivery-count": 4})) == 1
    assert attempt_of(pika.BasicProperties(headers={ATTEMPT_HEADER: 3})) == 3
    for bad in ("3", 0, -1, True, None):
        assert attempt_of(pika.BasicProperties(headers={ATTEMPT_HEADER: bad})) == 1


class _Method:
    exchange = "shop"
    routing_key = "order.created"
    delivery_tag = 7


def test_retry_and_dead_letter_headers() -> None:
    headers = retry_headers({"x-app": 1}, 1, _Method(), 0.0)
    assert headers == {"x-app": 1, ATTEMPT_HEADER: 2,
                       "x-amqp-dispatcher-first-failure": "1970-01-01T00:00:00.000+00:00",
                       "x-amqp-dispatcher-exchange": "shop",
                       "x-amqp-dispatcher-routing-key": "order.created"}
    # Later retries keep the first failure and the original exchange and routing key.
    again = retry_headers(headers, 2, type("M", (), {"exchange": "", "routing_key": "q"}), 9.0)
    assert again[ATTEMPT_HEADER] == 3
    assert again["x-amqp-dispatcher-first-failure"].startswith("1970-01-01T00:00:00.000")
    assert again["x-amqp-dispatcher-exchange"] == "shop"
    try:
        raise ValueError("bad\norder " + "x" * 2000)
    except ValueError as exc:
        dead = dead_letter_headers(again, exc, 3, _Method(),
                                   ConsumerConfig("m:C", "orders"), 61.5)
    assert dead["x-amqp-dispatcher-attempts"] == 3
    assert dead["x-amqp-dispatcher-exception-type"] == "ValueError"
    text = dead["x-amqp-dispatcher-exception"]
    assert text.startswith("ValueError: bad order xxx") and "\n" not in text
    assert len(text) == 1000 and text.endswith("...")
    assert dead["x-amqp-dispatcher-queue"] == "orders"
    assert dead["x-amqp-dispatcher-consumer"] == "m:C"
    assert dead["x-amqp-dispatcher-last-failure"] == "1970-01-01T00:01:01.500+00:00"
    assert dead["x-amqp-dispatcher-first-failure"].startswith("1970-01-01T00:00:00.000")


def test_a_move_records_the_validated_user_id_not_a_header_the_publisher_forged() -> None:
    """Before: the recording headers were only set when absent, so a publisher could
    send ``x-amqp-dispatcher-user-id: admin`` with its own (broker-validated) user_id:
    the first move dropped the real user_id and kept the forged header, which the README
    says holds the user_id as first published. A delivery with the property is as first
    published (a move drops it), so the property is what is recorded."""
    from amqpdispatcher.consuming.failure import EXPIRATION_HEADER, USER_ID_HEADER, _republished

    forged = {USER_ID_HEADER: "admin", EXPIRATION_HEADER: "86400000"}
    first = _republished(pika.BasicProperties(user_id="guest", expiration="500",
                                              headers=dict(forged)),
                         retry_headers(forged, 1, _Method(), 0.0))
    assert first.user_id is None and first.expiration is None
    assert first.headers[USER_ID_HEADER] == "guest"
    assert first.headers[EXPIRATION_HEADER] == "500"
    # A later move (the property gone) keeps what the first move recorded.
    later = _republished(first, retry_headers(first.headers, 2, _Method(), 1.0))
    assert later.headers[USER_ID_HEADER] == "guest"
    assert later.headers[EXPIRATION_HEADER] == "500"


class _FakeChannel:
    def __init__(self) -> None:
        self.published: list[str] = []

    def add_on_close_callback(self, callback: object) -> None:
        pass

    def add_on_return_callback(self, callback: object) -> None:
        pass

    def basic_publish(self, exchange: str, routing_key: str, body: bytes, properties: object,
                      mandatory: bool) -> None:
        self.published.append(routing_key)


def _confirm(ack: bool, tag: int, multiple: bool = False) -> object:
    method = (pika.spec.Basic.Ack if ack else pika.spec.Basic.Nack)(tag, multiple)
    return type("Frame", (), {"method": method})()


def _outcome(publish: gevent.Greenlet) -> type | None:
    publish.join(timeout=1)
    assert publish.ready()
    return None if publish.successful() else type(publish.exception)


def test_confirm_channel_matches_confirms_by_sequence_number() -> None:
    channel = _FakeChannel()
    unclaimed: list[object] = []
    confirms = ConfirmChannel(channel, 131072, unclaimed.append)
    props = pika.BasicProperties()
    deadline = time.monotonic() + 5
    publishes = [gevent.spawn(confirms.publish, "", f"k{i}", b"x", props, True, True, deadline)
                 for i in range(4)]
    gevent.sleep(0)
    assert channel.published == ["k0", "k1", "k2", "k3"]
    confirms._on_confirm(_confirm(False, 2))          # nack of the second only
    confirms._on_confirm(_confirm(True, 3, True))     # ack of 1 and 3 (2 is settled)
    # A message returned as unroutable is not published, though its ack follows.
    returned = type("R", (), {"exchange": "", "routing_key": "k3", "reply_code": 312,
                              "reply_text": "NO_ROUTE"})()
    confirms._on_return(None, returned, props, b"x")
    confirms._on_confirm(_confirm(True, 4))
    assert [_outcome(p) for p in publishes] == [None, PublishNacked, None, PublishReturned]
    assert unclaimed == []
    confirms._on_return(None, returned, props, b"x")  # nobody waits for it: reported
    assert unclaimed == [returned]
    # Not waited for (publisher_confirms: false): returns once written.
    confirms.publish("", "k5", b"x", props, False, False, deadline)
    assert channel.published[-1] == "k5"
    waiting = gevent.spawn(confirms.publish, "", "k6", b"x", props, False, True, deadline)
    gevent.sleep(0)
    confirms._on_close(None, pika.exceptions.ChannelClosedByBroker(404, "NOT_FOUND"))
    assert _outcome(waiting) is PublishError
    with pytest.raises(PublishError):  # closed: nothing sent
        confirms.publish("", "k", b"x", props, False, True, deadline)
    assert channel.published[-1] == "k6"
    with pytest.raises(PublishTimeout):  # no answer by the deadline
        ConfirmChannel(_FakeChannel(), 131072, unclaimed.append).publish(
            "", "k", b"x", props, False, True, time.monotonic() + 0.05)


def test_delivery_ack_timeout_is_recognised() -> None:
    timeout = pika.exceptions.ChannelClosedByBroker(
        406, "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. "
             "Timeout value used: 1800000 ms. This timeout value can be configured, see "
             "consumers doc guide to learn more")
    assert is_delivery_ack_timeout(timeout)
    assert not is_delivery_ack_timeout(pika.exceptions.ChannelClosedByBroker(
        406, "PRECONDITION_FAILED - unknown delivery tag 1"))


def test_time_limit_throws_into_the_running_consume_and_again_if_swallowed() -> None:
    seen: list[str] = []

    def swallowing() -> None:
        for _ in range(2):
            try:
                gevent.sleep(10)
            except TimeLimitExceeded:
                seen.append("thrown")

    limit = TimeLimit(0.05)
    with pytest.raises(TimeLimitExceeded, match="swallowed"):
        limit.run(swallowing)
    assert seen == ["thrown", "thrown"]
    limit.run(gevent.sleep, 0.01)  # stopped after each run: a quick one is untouched
    gevent.sleep(0.1)
    with pytest.raises(TimeLimitExceeded, match=r"time_limit \(0.05s\)"):
        limit.run(gevent.sleep, 10)


def test_time_limit_gives_every_call_its_whole_budget() -> None:
    """Before: one libev timer per worker, stopped and started again, kept only what was
    left of the budget: the second 0.3 s call under a 0.5 s limit was interrupted."""
    limit = TimeLimit(0.5)
    for _ in range(3):
        limit.run(gevent.sleep, 0.3)
    with pytest.raises(TimeLimitExceeded):
        limit.run(gevent.sleep, 2)
    limit.run(gevent.sleep, 0.3)  # after a fired limit, the next call has 0.5 s again


def test_time_limit_counts_a_call_that_never_yields_as_a_failure() -> None:
    import time

    with pytest.raises(TimeLimitExceeded, match="without yielding"):
        TimeLimit(0.05).run(time.sleep, 0.1)


def test_retry_delays_never_overflow_nor_loop_long() -> None:
    from amqpdispatcher.config import RetryConfig

    many = RetryConfig(max_attempts=2000, delay=0.5, backoff=2, max_delay=300)
    assert many.delays_ms()[-1] == 300_000 and len(many.delays_ms()) == 11
    assert many.delay_ms(1999) == 300_000
    flat = RetryConfig(max_attempts=30_000_000, delay=1, backoff=1, max_delay=300)
    assert flat.delays_ms() == [1000]


# The broker's 406 texts, as RabbitMQ 3.10 words them.
INEQUIVALENT = "PRECONDITION_FAILED - inequivalent arg '{}' for {} '{}' in vhost 'v': {}"


@pytest.mark.parametrize("arg, received_current, item, expected", [
    ("x-max-length", "received '20' but current is '10'", QueueConfig("q", path="queues[0]"),
     "c.yml: queues[0].x_max_length: queue 'q' already exists with x-max-length 10, the "
     "config asks for 20"),
    ("x-message-ttl", "received the value '5' of type 'signedint' but current is none",
     QueueConfig("q", path="queues[1]"),
     "c.yml: queues[1].x_message_ttl: queue 'q' already exists without x-message-ttl, the "
     "config asks for 5"),
    ("x-queue-type", "received none but current is the value 'quorum' of type 'longstr'",
     QueueConfig("q", path="queues[0]"),
     "c.yml: queues[0].x_queue_type: queue 'q' already exists with x-queue-type quorum, the "
     "config does not set it"),
    ("durable", "received 'false' but current is 'true'", QueueConfig("q", path="queues[0]"),
     "c.yml: queues[0].durable: queue 'q' already exists with durable true, the config asks "
     "for false"),
    ("x-max-age", "received the value '1D' of type 'longstr' but current is the value '7D' "
     "of type 'longstr'", QueueConfig("q", path="queues[2]"),
     "c.yml: queues[2].arguments.x-max-age: queue 'q' already exists with x-max-age 7D"),
    ("x-dead-letter-exchange", "received '' but current is 'dlx'",
     QueueConfig("q", path="queues[0]"), "with x-dead-letter-exchange dlx, the config asks "
     "for ''"),
    ("x-message-ttl", "received '1000' but current is '500'",
     QueueConfig("o.retry.quorum.1000ms", path="consumers[0].retry (delay queue)"),
     "c.yml: consumers[0].retry (delay queue): queue 'o.retry.quorum.1000ms' already "
     "exists"),
    ("type", "received 'fanout' but current is 'topic'",
     ExchangeConfig("e", "fanout", path="exchanges[0]"),
     "c.yml: exchanges[0].type: exchange 'e' already exists with type topic, the config asks "
     "for fanout (an exchange's type and arguments cannot change"),
    ("alternate-exchange", "received the value 'ae' of type 'longstr' but current is none",
     ExchangeConfig("e", "topic", path="exchanges[1]"),
     "c.yml: exchanges[1].arguments.alternate-exchange: exchange 'e' already exists without "
     "alternate-exchange, the config asks for ae"),
])
def test_inequivalent_arguments_are_one_line(arg: str, received_current: str,
                                             item: QueueConfig | ExchangeConfig,
                                             expected: str) -> None:
    kind = "queue" if isinstance(item, QueueConfig) else "exchange"
    name = item.queue if isinstance(item, QueueConfig) else item.exchange
    line = describe_inequivalent("c.yml", item, "406 " + INEQUIVALENT.format(
        arg, kind, name, received_current))
    assert line is not None and expected in line, line


def test_other_refusals_are_not_inequivalence() -> None:
    text = ("406 PRECONDITION_FAILED - invalid arg 'x-max-priority' for queue 'q' in vhost "
            "'/' of queue type rabbit_quorum_queue")
    assert describe_inequivalent("c.yml", QueueConfig("q"), text) is None


def test_consume_arguments() -> None:
    from datetime import date, datetime, timezone

    assert ConsumerConfig("m:C", "q").consume_arguments() == {}
    assert ConsumerConfig("m:C", "q", priority=-3, stream_offset="first").consume_arguments() \
        == {"x-priority": -3, "x-stream-offset": "first"}
    # A YAML date is its midnight, UTC: pika sends only a datetime as a timestamp.
    assert ConsumerConfig("m:C", "q", stream_offset=date(2024, 5, 1)).consume_arguments() == {
        "x-stream-offset": datetime(2024, 5, 1, tzinfo=timezone.utc)}
    assert ConsumerConfig("m:C", "q", stream_offset=0).consume_arguments() == {
        "x-stream-offset": 0}


def test_rejects_on_a_stream_are_acks() -> None:
    """RabbitMQ closes the connection over a reject or nack on a stream."""
    channel = FakeChannel()
    acker = Acknowledger(channel, 10, [0] * len(OUTCOMES), stream=True)
    for tag in (1, 2):
        acker.delivered(tag)
    acker.reject(1, requeue=True)
    acker.reject(2, requeue=False)
    acker.flush()
    assert channel.frames == [("ack", 2, True)]


def test_a_connect_failure_without_a_message_still_says_something() -> None:
    assert _connect_failure(pika.exceptions.AMQPConnectionError()) == (
        "AMQPConnectionError (no reason given: the broker, or something in between, closed "
        "the connection before the AMQP handshake finished)")
    assert _connect_failure(ConnectionRefusedError(111, "Connection refused")) == (
        "ConnectionRefusedError: [Errno 111] Connection refused")


# -- the private detail of pika that broker.cancel_consumer relies on --------------------

class FrameRecorder:
    """What a pika Channel needs of its connection: the callbacks, and somewhere to send."""

    def __init__(self) -> None:
        self.callbacks = pika.callback.CallbackManager()
        self.sent: list[pika.amqp_object.Method] = []

    def _send_method(self, channel_number: int, method: pika.amqp_object.Method,
                     content: object = None) -> None:
        self.sent.append(method)

    def receive(self, channel: pika.channel.Channel, method: pika.amqp_object.Method) -> None:
        """A method frame from the broker, dispatched as pika's Connection does."""
        received = pika.frame.Method(channel.channel_number, method)
        if self.callbacks.pending(channel.channel_number, method):
            self.callbacks.process(channel.channel_number, method, self, received)
        else:
            channel._handle_content_frame(received)

    def deliver(self, channel: pika.channel.Channel, tag: int) -> None:
        self.receive(channel, pika.spec.Basic.Deliver(consumer_tag="ctag", delivery_tag=tag))
        channel._handle_content_frame(pika.frame.Header(channel.channel_number, 1,
                                                        pika.spec.BasicProperties()))
        channel._handle_content_frame(pika.frame.Body(channel.channel_number, b"x"))


def consuming_channel() -> tuple[FrameRecorder, pika.channel.Channel, list[int]]:
    connection = FrameRecorder()
    channel = pika.channel.Channel(connection, 1, lambda _: None)  # type: ignore[arg-type]
    channel.open()
    connection.receive(channel, pika.spec.Channel.OpenOk())
    delivered: list[int] = []
    channel.basic_consume("q", lambda _ch, method, _props, _body:
                          delivered.append(method.delivery_tag), consumer_tag="ctag")
    connection.receive(channel, pika.spec.Basic.ConsumeOk(consumer_tag="ctag"))
    return connection, channel, delivered


def test_pika_rejects_what_arrives_for_a_consumer_it_cancels() -> None:
    """pika's own behaviour, the reason for broker.cancel_consumer: between basic_cancel
    and the broker's cancel-ok, pika rejects (requeue) each delivery itself."""
    connection, channel, delivered = consuming_channel()
    channel.basic_cancel("ctag", callback=lambda _: None)
    connection.deliver(channel, 1)
    assert delivered == []
    rejects = [m for m in connection.sent if isinstance(m, pika.spec.Basic.Reject)]
    assert [(m.delivery_tag, m.requeue) for m in rejects] == [(1, True)]


def test_cancel_consumer_passes_what_arrives_before_cancel_ok_to_the_consumer() -> None:
    connection, channel, delivered = consuming_channel()
    cancel_oks: list[object] = []
    assert cancel_consumer(channel, "ctag", cancel_oks.append)
    assert any(isinstance(m, pika.spec.Basic.Cancel) and not m.nowait
               for m in connection.sent)
    connection.deliver(channel, 1)
    connection.deliver(channel, 2)
    assert delivered == [1, 2]
    assert not any(isinstance(m, pika.spec.Basic.Reject) for m in connection.sent)
    assert cancel_oks == []
    connection.receive(channel, pika.spec.Basic.CancelOk(consumer_tag="ctag"))
    assert len(cancel_oks) == 1
    assert channel.consumer_tags == []  # pika forgot the consumer at cancel-ok
    # A consumer the broker cancelled already: nothing is sent, no cancel-ok will come.
    assert not cancel_consumer(channel, "ctag", cancel_oks.append)


class _Consumer:
    def consume(self, amqp: object, msg: object) -> None:
        pass

    def shutdown(self, exception: BaseException | None = None) -> None:
        pass


def test_a_fast_stop_sends_the_acks_already_collected() -> None:
    """Acks are coalesced until the end of the hub's loop iteration: a fast stop (a
    signal, drain_timeout running out) in that same iteration sends them rather than
    dropping them with the channel, so those messages are not handled again."""
    config, resolved = load_config_dict(
        {"consumers": [{"consumer": f"{__name__}:_Consumer", "queue": "q"}]})
    dispatcher = Generation(config, resolved, parse_url("amqp://u:p@127.0.0.1:1/"))
    acker, channel = make(2)
    acker.ack(1)  # its consume returned; the flush is scheduled, not yet run
    dispatcher.channels[0] = SimpleNamespace(acker=acker)  # type: ignore[assignment]
    assert dispatcher._stop_now(130) == 130
    assert channel.frames == [("ack", 1, True)]
    assert acker.outcomes[ACK] == 1 and acker.outcomes[DROPPED] == 0


def test_a_breakers_sampling_follows_its_window_within_bounds() -> None:
    assert sample_interval(30) == 1.0        # at most a second
    assert sample_interval(2) == pytest.approx(0.2)   # a tenth of a short window
    assert sample_interval(0.001) == 0.05    # a tiny window does not spin the hub


def test_a_delivery_no_slot_started_before_the_breaker_tripped_goes_back() -> None:
    """Between a trip and its pause (which gives back what waits), an idle slot must not
    start a delivery of the tripped entry: it rejects it with requeue instead."""
    calls: list[bytes] = []

    class Consumer:
        def consume(self, amqp, msg):
            calls.append(msg.body)

    sent: list[tuple[str, int, bool]] = []
    channel = SimpleNamespace(
        basic_reject=lambda delivery_tag, requeue: sent.append(("reject", delivery_tag, requeue)),
        basic_ack=lambda delivery_tag, multiple=False: sent.append(("ack", delivery_tag, False)))
    entry = ConsumerConfig("m:C", "q", circuit_breaker=CircuitBreakerConfig(), path="consumers[0]")
    pool = ConsumerPool(entry, Consumer, None, None)  # type: ignore[arg-type]
    acker = Acknowledger(channel, 10, pool.metrics.outcomes)
    pool.create_instances()
    assert pool.breaker is not None
    pool.breaker.trip()
    for tag in (1, 2):
        acker.delivered(tag)
        pool.work.put((acker, SimpleNamespace(delivery_tag=tag, redelivered=False,
                                              exchange="", routing_key="q"),
                       pika.spec.BasicProperties(), b"x"))
    pool.work.put(None)
    pool._work(0)
    assert calls == []
    assert sent == [("reject", 1, True), ("reject", 2, True)]

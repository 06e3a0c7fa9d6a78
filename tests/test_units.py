"""Pure logic: URL parsing and ack coalescing (a recording fake stands in for the channel)."""

from __future__ import annotations

import gevent
import pika.exceptions
import pytest

from amqpdispatcher.acks import Acknowledger
from amqpdispatcher.settings import SettingsError, parse_url


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
    orders = {tuple(p.host for p in s.connection_parameters()) for _ in range(50)}
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
    acker = Acknowledger(channel, prefetch)
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

    acker = Acknowledger(ClosedChannel(), 10)
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

"""amqpdispatcher.testing without a broker: routing by exchange type, passive
declarations, unroutable and mandatory publishes, the retry policy's headers,
time_limit, run()'s bound, Harness.consume's outcome rules, and the pytest plugin.
(tests/test_harness_equivalence.py runs the same against the daemon and a broker.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import gevent
import pytest
from helpers import REPO, TESTS, run_cli

from amqpdispatcher import PublishError, PublishReturned, TimeLimitExceeded
from amqpdispatcher.amqp.errors import TopologyError
from amqpdispatcher.config import ConfigError
from amqpdispatcher.consuming.failure import (
    ATTEMPT_HEADER,
    ATTEMPTS_HEADER,
    CONSUMER_HEADER,
    EXCEPTION_TYPE_HEADER,
    EXCHANGE_HEADER,
    QUEUE_HEADER,
    ROUTING_KEY_HEADER,
)
from amqpdispatcher.consuming.message import AlreadyRespondedError
from amqpdispatcher.runtime.generation import UserCodeError
from amqpdispatcher.testing import Harness, HarnessError
from amqpdispatcher.testing.broker import headers_match, topic_matches

ME = __name__
NOTHING = {"ack": 0, "requeue": 0, "reject": 0, "retry": 0, "dead_letter": 0}


def counts(**some: int) -> dict[str, int]:
    return {**NOTHING, **some}


# -- consumers the configs below name ------------------------------------------------

class Sink:
    """Acks everything."""

    def consume(self, amqp: Any, msg: Any) -> None:
        pass

    def shutdown(self, exception: BaseException | None = None) -> None:
        pass


class Commands:
    """Does what the body says: 'fail', 'fail-once' (on attempt 1), 'reject', 'nack-once'
    (nack when not redelivered), 'forward:EXCHANGE:KEY' (publish the body on),
    'mandatory:EXCHANGE:KEY' (publish with mandatory=True, uncaught), 'sleep'."""

    shutdowns: list[str] = []

    def consume(self, amqp: Any, msg: Any) -> None:
        command, *args = msg.body.decode().split(":")
        if command == "fail" or (command == "fail-once" and msg.attempt == 1):
            raise ValueError(f"failing {msg.body!r}")
        if command == "reject":
            amqp.reject(requeue=False)
        if command == "nack-once" and not msg.delivery_info["redelivered"]:
            amqp.nack()
        if command == "nack-always":
            amqp.nack()
        if command == "forward":
            amqp.publish(args[0], args[1], {"from": "commands"}, msg.body)
        if command == "mandatory":
            amqp.publish(args[0], args[1], None, msg.body, mandatory=True)
        if command == "sleep":
            gevent.sleep(60)

    def shutdown(self, exception: BaseException | None = None) -> None:
        Commands.shutdowns.append(type(exception).__name__)


def entry(queue: str, consumer: str = "Sink", **keys: Any) -> dict[str, Any]:
    return {"consumer": f"{ME}:{consumer}", "queue": queue, **keys}


# -- routing --------------------------------------------------------------------------

@pytest.mark.parametrize("pattern,key,matches", [
    ("a.b", "a.b", True), ("a.b", "a.c", False), ("a.*", "a.b", True), ("a.*", "a", False),
    ("a.*", "a.b.c", False), ("a.#", "a", True), ("a.#", "a.b.c", True), ("#", "", True),
    ("#", "x.y", True), ("*", "", False), ("#.c", "a.b.c", True), ("a.#.c", "a.c", True),
    ("a.#.c", "a.x.y.c", True), ("a.#.c", "a.x.y", False), ("*.*", "a.b", True),
    ("", "", True), ("", "a", False), ("a.*.#", "a", False), ("a.*.#", "a.b", True),
])
def test_topic_matching(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern, key) is matches


def test_headers_matching_all_any_and_x_keys() -> None:
    both = {"format": "pdf", "lang": "fr"}
    assert headers_match({"x-match": "all", **both}, {**both, "extra": 1})
    assert not headers_match({"x-match": "all", **both}, {"format": "pdf"})
    assert headers_match(both, both)  # all is the default
    assert headers_match({"x-match": "any", **both}, {"lang": "fr"})
    assert not headers_match({"x-match": "any", **both}, {"lang": "en"})
    # x- binding arguments are ignored, whatever the message carries ...
    assert headers_match({"x-match": "all", "format": "pdf", "x-tenant": "a"},
                         {"format": "pdf"})
    assert not headers_match({"x-match": "any", "x-tenant": "a"}, {"x-tenant": "a"})
    # ... but with all-with-x and any-with-x.
    assert not headers_match({"x-match": "all-with-x", "format": "pdf", "x-tenant": "a"},
                             {"format": "pdf"})
    assert headers_match({"x-match": "any-with-x", "x-tenant": "a"}, {"x-tenant": "a"})
    # A binding argument without a value asks for the header only; all of nothing is
    # everything, any of nothing is nothing.
    assert headers_match({"format": None}, {"format": "anything"})
    assert headers_match({"x-match": "all"}, None)
    assert not headers_match({"x-match": "any"}, {"a": 1})
    assert not headers_match({"flag": True}, {"flag": 1})  # an AMQP boolean is no integer


ROUTING = {
    "exchanges": [
        {"exchange": "events", "type": "topic"},
        {"exchange": "direct", "type": "direct"},
        {"exchange": "fan", "type": "fanout"},
        {"exchange": "docs", "type": "headers",
         "bindings": [{"exchange": "events", "routing_key": "order.*"}]},
        {"exchange": "internal", "type": "fanout", "internal": True,
         "bindings": [{"exchange": "fan", "routing_key": ""}]},
    ],
    "queues": [
        {"queue": "orders", "bindings": [{"exchange": "events", "routing_key": "order.*"}]},
        {"queue": "all", "bindings": [{"exchange": "events", "routing_key": "#"}]},
        {"queue": "red", "bindings": [{"exchange": "direct", "routing_key": "red"},
                                      {"exchange": "direct", "routing_key": "crimson"}]},
        {"queue": "f1", "bindings": [{"exchange": "fan", "routing_key": "ignored"}]},
        {"queue": "f2", "bindings": [{"exchange": "internal", "routing_key": ""}]},
        {"queue": "pdf", "bindings": [{"exchange": "docs", "routing_key": "",
                                       "arguments": {"x-match": "all", "format": "pdf",
                                                     "x-ignored": "yes"}}]},
        {"queue": "fr_or_de", "bindings": [{"exchange": "docs", "routing_key": "",
                                            "arguments": {"x-match": "any", "lang": "fr",
                                                          "country": "de"}}]},
    ],
    "consumers": [entry("unused_queue")],
}


def routing_harness() -> Harness:
    return Harness(ROUTING, existing_queues=["unused_queue"])


def test_routing_by_exchange_type_and_exchange_to_exchange_bindings() -> None:
    h = routing_harness()
    assert sorted(h.publish("events", "order.eu", b"1", {"format": "pdf"})) == [
        "all", "orders", "pdf"]
    assert h.publish("events", "order.eu.x", b"2") == ["all"]
    assert sorted(h.publish("events", "order.us", b"3", {"lang": "fr"})) == [
        "all", "fr_or_de", "orders"]
    assert h.publish("direct", "crimson", b"4") == ["red"]
    assert h.publish("direct", "blue", b"5") == []
    assert sorted(h.publish("fan", "whatever", b"6")) == ["f1", "f2"]  # through the internal one
    assert h.publish("", "red", b"7") == ["red"]  # the default exchange: by queue name
    assert h.publish("", "nowhere", b"8") == []
    assert h.publish("amq.topic", "x", b"9") == []  # predeclared, nothing bound
    assert h.messages("orders") == [b"1", b"3"]
    assert h.messages("all") == [b"1", b"2", b"3"]
    assert h.messages("red") == [b"4", b"7"]
    assert h.messages("pdf") == [b"1"]
    assert h.messages("fr_or_de") == [b"3"]


def test_cc_and_bcc_route_further_and_bcc_is_removed() -> None:
    h = routing_harness()
    assert h.publish("direct", "blue", b"1", {"CC": ["red"], "BCC": ["nowhere"]}) == ["red"]
    [stored] = h.stored("red")
    assert stored.properties.headers == {"CC": ["red"]}


def test_publishing_to_a_missing_or_internal_exchange_fails() -> None:
    h = routing_harness()
    with pytest.raises(PublishError, match="exchange 'nope' does not exist"):
        h.publish("nope", "k", b"x")
    with pytest.raises(PublishError, match="internal exchange 'internal'"):
        h.publish("internal", "", b"x")
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        h.publish("direct", "red", b"x", colour="blue")  # amqp.publish's own checks


def test_alternate_exchange_takes_the_unroutable() -> None:
    h = Harness({"exchanges": [{"exchange": "main", "type": "direct",
                                "arguments": {"alternate-exchange": "spill"}},
                               {"exchange": "spill", "type": "fanout"}],
                 "queues": [{"queue": "spilled",
                             "bindings": [{"exchange": "spill", "routing_key": ""}]}],
                 "consumers": [entry("spilled")]})
    assert h.publish("main", "unbound", b"x") == ["spilled"]


# -- the start: validation, passive, start-up code --------------------------------------

def test_a_config_the_daemon_refuses_is_refused_with_its_lines() -> None:
    bad = {"consumers": [{"consumer": f"{ME}:Sink", "queue": "q", "prefetch_count": 0,
                          "retry": {"max_attempts": 2, "dead_letter_queue": "q"}}]}
    with pytest.raises(ConfigError) as refused:
        Harness(bad)
    assert refused.value.problems == [
        "<dict>: consumers[0].prefetch_count: expected a positive integer, got 0",
        "<dict>: consumers[0].retry.dead_letter_queue: 'q' is the entry's own queue: "
        "a message that keeps failing would come straight back",
    ]


def test_the_harness_refuses_a_file_with_the_lines_of_validate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = ("queues:\n  - queue: q\n    x_max_lenght: 3\n"
            "consumers:\n  - consumer: harnessed:Orders\n    queue: q\n"
            "    consumer_count: 0\n    retry: {delay: 10, max_delay: 5}\n"
            "  - consumer: harnessed:Missing\n    queue: q\n")
    validated = run_cli(tmp_path, "--validate", "--config", "config.yml", config=text)
    assert validated.returncode == 1
    lines = [line for line in validated.stderr.splitlines() if line.startswith("config.yml")]
    assert len(lines) == 4, validated.stderr
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(TESTS / "consumers"))
    with pytest.raises(ConfigError) as refused:
        Harness("config.yml")
    assert refused.value.problems == lines


def test_passive_needs_what_the_test_created() -> None:
    config = {"exchanges": [{"exchange": "theirs", "passive": True}],
              "queues": [{"queue": "legacy", "passive": True,
                          "bindings": [{"exchange": "theirs", "routing_key": "k"}]}],
              "consumers": [entry("legacy")]}
    with pytest.raises(TopologyError) as refused:
        Harness(config)
    assert str(refused.value) == (
        "<dict>: exchanges[0]: exchange 'theirs' does not exist (passive: true only checks "
        "it): broker said 404 NOT_FOUND - no exchange 'theirs' in vhost '/'")
    with pytest.raises(TopologyError, match=r"queues\[0\]: queue 'legacy' does not exist"):
        Harness(config, existing_exchanges={"theirs": "direct"})
    h = Harness(config, existing_exchanges={"theirs": "direct"}, existing_queues=["legacy"])
    assert h.publish("theirs", "k", b"x") == ["legacy"]
    with pytest.raises(TypeError, match="existing_queues: expected a list"):
        Harness(config, existing_exchanges={"theirs": "direct"}, existing_queues="legacy")


def test_missing_binding_source_and_consumer_queue() -> None:
    with pytest.raises(TopologyError, match=r"queues\[0\]\.bindings\[0\]: cannot bind queue "
                                            "'q' to exchange 'ghost'"):
        Harness({"queues": [{"queue": "q", "bindings": [{"exchange": "ghost",
                                                        "routing_key": ""}]}],
                 "consumers": [entry("q")]})
    with pytest.raises(TopologyError, match=r"consumers\[0\]: cannot consume from queue "
                                            "'elsewhere'"):
        Harness({"consumers": [entry("elsewhere")]})


started: list[str] = []


def startup() -> None:
    started.append("startup")


def broken_startup() -> None:
    raise RuntimeError("no database")


def test_startup_handler_runs_first_and_its_failure_is_the_daemons() -> None:
    started.clear()
    Harness({"startup_handler": f"{ME}:startup", "consumers": [entry("q")]},
            existing_queues=["q"])
    assert started == ["startup"]
    with pytest.raises(UserCodeError, match="startup_handler: .*broken_startup raised "
                                            "RuntimeError: no database"):
        Harness({"startup_handler": f"{ME}:broken_startup", "consumers": [entry("q")]},
                existing_queues=["q"])


class CannotStart:
    def __init__(self) -> None:
        raise OSError("no database")

    def consume(self, amqp: Any, msg: Any) -> None:
        pass

    def shutdown(self, exception: BaseException | None = None) -> None:
        pass


def test_an_instance_that_cannot_be_built_at_start_is_the_daemons_user_code_error() -> None:
    with pytest.raises(UserCodeError) as refused:
        Harness({"consumers": [entry("q", "CannotStart")]}, existing_queues=["q"])
    assert re.fullmatch(rf"<dict>: consumers\[0\]\.consumer: {ME}:CannotStart\(\) raised "
                        r"OSError: no database \(at test_harness\.py:\d+\)", str(refused.value))


def test_what_is_not_modelled_is_refused_by_name() -> None:
    with pytest.raises(HarnessError, match="not 'x-delayed-message'"):
        Harness({"exchanges": [{"exchange": "d", "type": "x-delayed-message"}],
                 "consumers": [entry("q")]}, existing_queues=["q"])
    with pytest.raises(HarnessError, match="streams"):
        Harness({"queues": [{"queue": "s", "x_queue_type": "stream"}],
                 "consumers": [entry("s")]})


# -- consuming: outcomes, retries, dead letters, run()'s bound --------------------------

PIPELINE = {
    "exchanges": [{"exchange": "in", "type": "topic"}, {"exchange": "out", "type": "direct"},
                  {"exchange": "dead", "type": "fanout"}],
    "queues": [
        {"queue": "work", "x_dead_letter_exchange": "dead",
         "bindings": [{"exchange": "in", "routing_key": "job.#"}]},
        {"queue": "done", "bindings": [{"exchange": "out", "routing_key": "done"}]},
        {"queue": "rejected", "bindings": [{"exchange": "dead", "routing_key": ""}]},
    ],
    "consumers": [entry("work", "Commands", consumer_count=2,
                        retry={"max_attempts": 3, "delay": 1, "backoff": 2,
                               "dead_letter_queue": "work.failed"})],
}


def test_a_pipeline_retries_dead_letters_rejects_and_forwards() -> None:
    with Harness(PIPELINE) as h:
        for body in (b"forward:out:done", b"fail-once", b"fail", b"reject",
                     b"mandatory:out:nowhere", b"nack-once", b"forward:out:nowhere"):
            h.publish("in", "job.x", body)
        deliveries = h.run()
        assert h.messages("done") == [b"forward:out:done"]
        assert h.messages("work.failed") == [b"fail", b"mandatory:out:nowhere"]
        assert h.messages("rejected") == [b"reject"]
        assert h.messages("work") == []
        assert h.messages("work.retry.quorum.1000ms") == []
        assert h.outcomes("work") == counts(ack=4, requeue=1, reject=1, retry=5,
                                            dead_letter=2)
        assert deliveries == 4 + 1 + 1 + 5 + 2
        [failed, _] = h.stored("work.failed")
        headers = failed.properties.headers
        assert headers[ATTEMPT_HEADER] == 3 and headers[ATTEMPTS_HEADER] == 3
        assert headers[EXCEPTION_TYPE_HEADER] == "ValueError"
        assert headers[QUEUE_HEADER] == "work"
        assert headers[CONSUMER_HEADER] == f"{ME}:Commands"
        assert headers[EXCHANGE_HEADER] == "in" and headers[ROUTING_KEY_HEADER] == "job.x"
        # It went through the delay queues twice (1 s, then 2 s), as on the broker.
        assert [(d["queue"], d["reason"]) for d in headers["x-death"]] == [
            ("work.retry.quorum.2000ms", "expired"), ("work.retry.quorum.1000ms", "expired")]
        [rejected] = h.stored("rejected")
        assert rejected.properties.headers["x-first-death-reason"] == "rejected"
        # What consume published, unroutable ones included.
        assert [(p.routing_key, p.queues) for p in h.published] == [
            ("done", ("done",)), ("nowhere", ()), ("nowhere", ()), ("nowhere", ()),
            ("nowhere", ())]


def test_run_stops_a_message_redelivered_for_ever() -> None:
    config = {"queues": [{"queue": "q"}], "consumers": [entry("q", "Commands")]}
    with Harness(config) as h:
        h.publish("", "q", b"ok")
        h.publish("", "q", b"fail")
        with pytest.raises(HarnessError) as stopped:
            h.run(max_redeliveries=7)
        assert str(stopped.value) == (
            "queue 'q': the message b'fail' (exchange '', routing key 'q') was requeued 7 "
            "times: the broker would redeliver it for ever (its consume keeps failing, and "
            "the entry has no retry policy); it is left at the head of the queue")
        assert h.outcomes("q") == counts(ack=1, requeue=7)
        assert h.messages("q") == [b"fail"]
    with Harness(config) as h:
        h.publish("", "q", b"nack-always")
        with pytest.raises(HarnessError, match=re.escape(
                "(its consume keeps giving it back: amqp.nack() or "
                "amqp.reject(requeue=True))")):
            h.run(max_redeliveries=7)


def test_run_stops_consumers_feeding_each_other() -> None:
    config = {"queues": [{"queue": "q"}], "consumers": [entry("q", "Commands")]}
    with Harness(config) as h:
        h.publish("", "q", b"forward::q")
        with pytest.raises(HarnessError, match="after 50 deliveries: queue 'q' still has 1 "
                                               r"message\(s\), the next message b'forward::q'"):
            h.run(max_deliveries=50)


def test_quorum_delivery_limit_dead_letters() -> None:
    config = {"exchanges": [{"exchange": "dead", "type": "fanout"}],
              "queues": [{"queue": "q", "x_queue_type": "quorum", "x_delivery_limit": 2,
                          "x_dead_letter_exchange": "dead"},
                         {"queue": "q.dead", "x_queue_type": "quorum",
                          "bindings": [{"exchange": "dead", "routing_key": ""}]}],
              "consumers": [entry("q", "Commands")]}
    with Harness(config) as h:
        h.publish("", "q", b"fail")
        h.run()
        assert h.outcomes("q") == counts(requeue=3)
        assert h.messages("q.dead") == [b"fail"]


def test_time_limit_is_enforced_in_the_harness() -> None:
    Commands.shutdowns.clear()
    config = {"queues": [{"queue": "q"}],
              "consumers": [entry("q", "Commands", time_limit=0.05,
                                  retry={"max_attempts": 2, "delay": 5,
                                         "dead_letter_queue": "q.failed"})]}
    with Harness(config) as h:
        h.publish("", "q", b"sleep")
        h.run()
        assert h.messages("q.failed") == [b"sleep"]
        [failed] = h.stored("q.failed")
        assert failed.properties.headers[EXCEPTION_TYPE_HEADER] == "TimeLimitExceeded"
    assert Commands.shutdowns == ["TimeLimitExceeded", "TimeLimitExceeded", "NoneType"]


class FailsToConstructAgain:
    made = 0

    def __init__(self) -> None:
        FailsToConstructAgain.made += 1
        if FailsToConstructAgain.made > 1:
            raise OSError("no more connections")

    def consume(self, amqp: Any, msg: Any) -> None:
        raise ValueError("x")

    def shutdown(self, exception: BaseException | None = None) -> None:
        pass


def test_a_replacement_that_cannot_be_built_stops_run() -> None:
    FailsToConstructAgain.made = 0
    with Harness({"queues": [{"queue": "q"}],
                  "consumers": [entry("q", "FailsToConstructAgain")]}) as h:
        h.publish("", "q", b"x")
        with pytest.raises(HarnessError, match="creating a replacement instance of .* raised "
                                               "OSError: no more connections"):
            h.run()


def test_publisher_confirms_off_drops_unroutable_mandatory_silently() -> None:
    config = {"publisher_confirms": False, "queues": [{"queue": "q"}],
              "exchanges": [{"exchange": "out", "type": "direct"}],
              "consumers": [entry("q", "Commands")]}
    with Harness(config) as h:
        h.publish("", "q", b"mandatory:out:nowhere")
        h.run()
        assert h.outcomes("q") == counts(ack=1)


# -- Harness.consume --------------------------------------------------------------------

class Inspect:
    def __init__(self) -> None:
        self.seen: list[Any] = []
        self.shut: list[Any] = []

    def consume(self, amqp: Any, msg: Any) -> None:
        self.seen.append((msg.body, msg.delivery_info, msg.properties, msg.attempt, amqp.tag,
                          amqp.has_responded_to_message))
        command = msg.body
        if command == b"ack-twice":
            amqp.ack()
            amqp.ack()
        elif command == b"nack":
            amqp.nack()
        elif command == b"reject":
            amqp.reject(requeue=False)
        elif command == b"publish":
            amqp.publish("billing", "invoice.eu", {"id": 1}, "text", persistent=True,
                         message_id="m-1", mandatory=True)
        elif command == b"bad-publish":
            amqp.publish("billing", "k", None, b"x", priority=300)
        elif command == b"raise":
            raise KeyError("boom")

    def shutdown(self, exception: BaseException | None = None) -> None:
        self.shut.append(exception)


def test_consume_gives_the_daemons_msg_and_amqp() -> None:
    consumer = Inspect()
    result = Harness.consume(consumer, b"hello", headers={"k": "v"}, exchange="notify",
                             routing_key="job.mat", redelivered=True, attempt=3,
                             properties={"message_id": "id-1", "content_type": "text/plain"})
    assert result.outcome == "ack" and result.exception is None and result.published == []
    [(body, info, properties, attempt, tag, responded)] = consumer.seen
    assert body == b"hello" and attempt == 3 and tag == 1 and not responded
    assert info["redelivered"] is True and info["exchange"] == "notify"
    assert info["routing_key"] == "job.mat" and info["delivery_tag"] == 1
    assert properties == {"headers": {"k": "v", ATTEMPT_HEADER: 3}, "message_id": "id-1",
                          "content_type": "text/plain"}
    assert consumer.shut == []  # no failure: the instance is kept


def test_consume_outcome_rules() -> None:
    assert Harness.consume(Inspect(), b"nack").outcome == "requeue"
    assert Harness.consume(Inspect(), b"reject").outcome == "reject"
    consumer = Inspect()
    result = Harness.consume(consumer, b"raise")
    assert result.outcome == "requeue" and isinstance(result.exception, KeyError)
    assert consumer.shut == [result.exception]  # shutdown(exc), as the daemon does
    result = Harness.consume(Inspect(), b"ack-twice")
    assert result.outcome == "ack" and isinstance(result.exception, AlreadyRespondedError)
    result = Harness.consume(Inspect(), b"bad-publish")
    assert result.outcome == "requeue"
    assert str(result.exception) == ("amqp.publish: priority: expected an int from 0 to "
                                     "255, got 300")


def test_consume_records_what_is_published() -> None:
    result = Harness.consume(Inspect(), b"publish")
    [published] = result.published
    assert (published.exchange, published.routing_key, published.headers, published.body,
            published.mandatory) == ("billing", "invoice.eu", {"id": 1}, b"text", True)
    assert published.properties == {"delivery_mode": 2, "message_id": "m-1"}


def test_consume_applies_a_retry_policy() -> None:
    retry = {"max_attempts": 3, "delay": 2, "dead_letter_queue": "q.failed"}
    result = Harness.consume(Inspect(), b"raise", queue="q", retry=retry, exchange="ex",
                             routing_key="rk")
    assert result.outcome == "retry"
    assert result.moved is not None
    assert result.moved.routing_key == "q.retry.quorum.2000ms"
    assert result.moved.headers is not None
    assert result.moved.headers[ATTEMPT_HEADER] == 2
    assert result.moved.headers[EXCHANGE_HEADER] == "ex"
    assert result.moved.properties["delivery_mode"] == 2
    result = Harness.consume(Inspect(), b"raise", queue="q", retry=retry, attempt=3)
    assert result.outcome == "dead_letter" and result.moved is not None
    assert result.moved.routing_key == "q.failed"
    assert result.moved.headers is not None
    assert result.moved.headers[EXCEPTION_TYPE_HEADER] == "KeyError"
    assert result.moved.headers[CONSUMER_HEADER] == f"{ME}:Inspect"
    result = Harness.consume(Inspect(), b"raise", retry={"max_attempts": 1})
    assert result.outcome == "reject" and result.moved is None
    with pytest.raises(ConfigError, match=r"retry\.max_delay: .*at least"):
        Harness.consume(Inspect(), b"x", retry={"delay": 10, "max_delay": 5})


def test_consume_applies_no_retry_for_as_the_daemon_does() -> None:
    retry = {"max_attempts": 3, "dead_letter_queue": "q.failed",
             "no_retry_for": ["builtins:LookupError"]}
    result = Harness.consume(Inspect(), b"raise", queue="q", retry=retry)  # a KeyError
    assert result.outcome == "dead_letter" and result.moved is not None
    assert result.moved.routing_key == "q.failed"
    assert result.moved.headers is not None and result.moved.headers[ATTEMPTS_HEADER] == 1
    with pytest.raises(ConfigError) as refused:
        Harness.consume(Inspect(), b"x", retry={"no_retry_for": ["json:NoSuchThing",
                                                                   "json:loads"]})
    assert refused.value.problems == [
        "<Harness.consume>: consumers[0].retry.no_retry_for[0]: cannot import "
        "'json:NoSuchThing': module 'json' has no 'NoSuchThing'",
        "<Harness.consume>: consumers[0].retry.no_retry_for[1]: 'json:loads' is not a class"]


class Sleepy:
    def consume(self, amqp: Any, msg: Any) -> None:
        gevent.sleep(30)

    def shutdown(self, exception: BaseException | None = None) -> None:
        pass


def test_consume_enforces_time_limit() -> None:
    result = Harness.consume(Sleepy(), b"x", time_limit=0.05)
    assert result.outcome == "requeue"
    assert isinstance(result.exception, TimeLimitExceeded)


class CatchesReturned:
    caught: list[PublishReturned] = []

    def consume(self, amqp: Any, msg: Any) -> None:
        try:
            amqp.publish("out", "nowhere", None, b"x", mandatory=True)
        except PublishReturned as exc:
            CatchesReturned.caught.append(exc)

    def shutdown(self, exception: BaseException | None = None) -> None:
        pass


def test_mandatory_publish_to_an_unbound_key_raises_publish_returned() -> None:
    CatchesReturned.caught.clear()
    with Harness({"exchanges": [{"exchange": "out", "type": "direct"}],
                  "queues": [{"queue": "q"}],
                  "consumers": [entry("q", "CatchesReturned")]}) as h:
        h.publish("", "q", b"go")
        h.run()
        [returned] = CatchesReturned.caught
        assert (returned.reply_code, returned.reply_text) == (312, "NO_ROUTE")
        assert h.outcomes("q") == counts(ack=1)


# -- the pytest plugin ----------------------------------------------------------------

def test_the_plugin_fixture_is_registered_and_runs_the_example() -> None:
    """The worked example of docs/getting-started/testing.md, run as a user runs it:
    pytest finds the amqp_harness fixture through the package's entry point, no
    conftest.py needed."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "examples/test_orders.py"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_loading_the_plugin_loads_neither_gevent_nor_pika() -> None:
    """pytest loads the plugin at every start, before a conftest.py that monkey-patches
    with gevent: it must not have imported socket-using modules by then."""
    code = ("import sys, amqpdispatcher.testing.plugin; "
            "print(sorted(m for m in ('gevent', 'pika', 'ssl', 'amqpdispatcher.testing.harness',"
            " 'amqpdispatcher.runtime') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# -- what a hostile review found ---------------------------------------------------------

class Publishes:
    """Publishes what its body names: 'float' (a header AMQP cannot carry), 'huge'
    (headers over a frame), 'internal', 'cc-str' (a CC header that is not a list),
    'mutate' (changes its headers dict after publishing it)."""

    def consume(self, amqp: Any, msg: Any) -> None:
        what = msg.body.decode()
        if what == "float":
            amqp.publish("", "out", {"price": 9.99}, b"x")
        elif what == "huge":
            amqp.publish("", "out", {"big": "x" * 200_000}, b"x")
        elif what == "internal":
            amqp.publish("internal", "", None, b"x")
        elif what == "cc-str":
            amqp.publish("", "out", {"CC": "out"}, b"x")
        elif what == "mutate":
            headers = {"k": "v", "list": [1]}
            amqp.publish("", "out", headers, b"x")
            headers["k"] = "changed"
            headers["list"].append(2)

    def shutdown(self, exception: BaseException | None = None) -> None:
        pass


FLOAT = ("amqp.publish: headers['price']: a float cannot be sent in AMQP headers: use an "
         "int, a str or a decimal.Decimal")


def test_a_header_amqp_cannot_carry_fails_as_in_the_daemon() -> None:
    result = Harness.consume(Publishes(), b"float")
    assert result.outcome == "requeue" and isinstance(result.exception, TypeError)
    assert str(result.exception) == FLOAT
    result = Harness.consume(Publishes(), b"huge")
    assert isinstance(result.exception, PublishError)
    assert str(result.exception).startswith("headers too large for a frame")
    with pytest.raises(TypeError, match=re.escape(FLOAT)):
        Harness.consume(Publishes(), b"x", headers={"price": 9.99})  # no such delivery
    with Harness({"queues": [{"queue": "in"}, {"queue": "out"}],
                  "consumers": [entry("in", "Publishes")]}) as h:
        with pytest.raises(TypeError, match=re.escape(FLOAT)):
            h.publish("", "out", b"x", {"price": 9.99})
        h.publish("", "in", b"mutate")
        h.publish("", "in", b"float")  # TypeError each time: requeued, as by the daemon
        with pytest.raises(HarnessError, match="requeued 100 times"):
            h.run()
        # What was published is what the broker holds: nothing shared with the dict.
        assert h.stored("out")[0].properties.headers == {"k": "v", "list": [1]}
        assert h.published[0].headers == {"k": "v", "list": [1]}


def test_a_message_the_broker_refuses_is_lost_silently_without_confirms() -> None:
    def config(confirms: bool) -> dict[str, Any]:
        return {"publisher_confirms": confirms,
                "exchanges": [{"exchange": "internal", "type": "fanout", "internal": True}],
                "queues": [{"queue": "in"},
                           {"queue": "out", "bindings": [{"exchange": "internal",
                                                          "routing_key": ""}]}],
                "consumers": [entry("in", "Publishes")]}

    with Harness(config(False)) as h:
        h.publish("", "in", b"internal")
        h.publish("", "in", b"cc-str")
        h.run()
        assert h.outcomes("in") == counts(ack=2) and h.messages("out") == []
    result = Harness.consume(Publishes(), b"cc-str")  # no broker: recorded only
    assert result.outcome == "ack"
    with Harness(config(True)) as h:
        h.publish("", "in", b"cc-str")
        with pytest.raises(HarnessError, match="requeued 100 times"):
            h.run()  # PublishError each time: requeued, as the daemon would
        assert h.messages("out") == []


def test_an_existing_queue_is_declared_with_the_configs_arguments() -> None:
    config = {"exchanges": [{"exchange": "dlx", "type": "fanout"}],
              "queues": [{"queue": "q", "x_dead_letter_exchange": "dlx"},
                         {"queue": "dlq", "bindings": [{"exchange": "dlx",
                                                        "routing_key": ""}]}],
              "consumers": [entry("q", "Commands")]}
    with Harness(config, existing_queues=["q"]) as h:
        h.publish("", "q", b"reject")
        h.run()
        assert h.messages("dlq") == [b"reject"]


def test_an_existing_exchange_of_another_type_is_the_daemons_topology_error() -> None:
    config = {"exchanges": [{"exchange": "events", "type": "topic"}],
              "consumers": [entry("q")], "queues": [{"queue": "q"}]}
    with pytest.raises(TopologyError) as refused:
        Harness(config, existing_exchanges={"events": "fanout"})
    # tests/test_topology.py has the daemon's line, from the broker's refusal.
    assert str(refused.value) == (
        "<dict>: exchanges[0].type: exchange 'events' already exists with type fanout, "
        "the config asks for topic (an exchange's type and arguments cannot change: "
        "delete it or change the config)")
    Harness(config, existing_exchanges={"events": "topic"}).close()


def test_run_after_close_and_an_attempt_below_one_are_refused() -> None:
    h = Harness({"queues": [{"queue": "q"}], "consumers": [entry("q")]})
    h.publish("", "q", b"x")
    h.close()
    with pytest.raises(HarnessError, match=r"run\(\) after close\(\)"):
        h.run()
    for attempt in (0, -1, True, "2"):
        with pytest.raises(ValueError, match="attempt: expected an int from 1"):
            Harness.consume(Sink(), b"x", attempt=attempt)


class NoShutdown:
    def consume(self, amqp: Any, msg: Any) -> None:
        amqp.publish("amq.nowhere", "k", None, b"x")


def test_consume_refuses_what_the_daemon_refuses_to_run() -> None:
    with pytest.raises(ConfigError) as refused:
        Harness.consume(NoShutdown(), b"x")
    assert refused.value.problems == [
        f"<Harness.consume>: consumers[0].consumer: '{ME}:NoShutdown' has no shutdown method"]
    with pytest.raises(TypeError, match="pass an instance of Sink"):
        Harness.consume(Sink, b"x")


def test_an_amq_exchange_that_does_not_exist_is_refused_by_the_broker() -> None:
    # The daemon takes amq.* names to be the broker's own and does not check them: the
    # broker closes the channel (a PublishError with confirms, nothing without).
    with Harness({"queues": [{"queue": "q"}], "consumers": [entry("q", "Commands")]}) as h:
        with pytest.raises(PublishError, match="404 NOT_FOUND - no exchange 'amq.nowhere'"):
            h.publish("amq.nowhere", "k", b"x")
    with Harness({"publisher_confirms": False, "queues": [{"queue": "q"}],
                  "consumers": [entry("q", "Commands")]}) as h:
        h.publish("", "q", b"forward:amq.nowhere:k")
        h.run()
        assert h.outcomes("q") == counts(ack=1)


class Unbuildable(Sink):
    def __init__(self) -> None:
        raise OSError("no licence")


def test_a_start_that_fails_shuts_down_the_instances_it_built() -> None:
    """As the daemon's failed start (runtime/generation.py, _finish): shutdown(None) on
    every instance built, whether the topology or a later constructor failed."""
    Commands.shutdowns.clear()
    with pytest.raises(TopologyError):
        Harness({"queues": [{"queue": "q", "passive": True}],
                 "consumers": [entry("q", "Commands", consumer_count=2)]})
    assert Commands.shutdowns == ["NoneType", "NoneType"]
    Commands.shutdowns.clear()
    with pytest.raises(UserCodeError, match="consumers\\[1\\].consumer: .*raised OSError"):
        Harness({"queues": [{"queue": "q"}],
                 "consumers": [entry("q", "Commands"), entry("q", "Unbuildable")]})
    assert Commands.shutdowns == ["NoneType"]


def test_a_producer_may_set_user_id_which_a_move_records() -> None:
    result = Harness.consume(Inspect(), b"raise", queue="q", retry={"max_attempts": 2},
                             properties={"user_id": "guest"})
    assert result.moved is not None and "user_id" not in result.moved.properties
    assert result.moved.headers is not None
    assert result.moved.headers["x-amqp-dispatcher-user-id"] == "guest"
    with Harness({"queues": [{"queue": "q"}], "consumers": [entry("q")]}) as h:
        h.publish("", "q", b"x", user_id="guest")
        assert h.stored("q")[0].properties.user_id == "guest"
        with pytest.raises(TypeError, match="user_id: expected a str"):
            h.publish("", "q", b"x", user_id=5)


def test_an_existing_exchange_of_a_type_not_modelled_is_refused() -> None:
    config = {"queues": [{"queue": "q", "bindings": [{"exchange": "later",
                                                      "routing_key": "k"}]}],
              "consumers": [entry("q")]}
    for kind in ("x-delayed-message", "topik"):
        with pytest.raises(HarnessError, match=f"existing_exchanges: 'later': .* not '{kind}'"):
            Harness(config, existing_exchanges={"later": kind})


def test_a_message_requeued_until_its_ttl_ends_is_refused_as_time() -> None:
    config = {"queues": [{"queue": "q", "x_message_ttl": 60000,
                          "x_dead_letter_exchange": ""}],
              "consumers": [entry("q", "Commands")]}
    with Harness(config) as h:
        h.publish("", "q", b"fail")
        with pytest.raises(HarnessError, match="its TTL would end that on the broker"):
            h.run(max_redeliveries=3)
def test_middleware_runs_in_the_harness_as_in_the_daemon(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS / "consumers"))
    import testconsumers

    record = tmp_path / "record.txt"
    monkeypatch.setattr(testconsumers, "RECORD_FILE", str(record))
    h = Harness({"middleware": ["testconsumers:FirstMiddleware",
                                "testconsumers:SecondMiddleware"],
                 "queues": [{"queue": "q"}],
                 "consumers": [{"consumer": "testconsumers:Recorder", "queue": "q",
                                "retry": {"max_attempts": 1}}]})
    h.publish("", "q", b"ok")
    h.publish("", "q", b"refuse")
    h.run()
    h.close()
    lines = [line for line in record.read_text().split() if line.startswith("mw:")]
    assert lines == [
        "mw:first:on_start:1", "mw:second:on_start:1",
        "mw:first:before:q:ok", "mw:second:before:q:ok",
        "mw:second:after:ok:ack:-", "mw:first:after:ok:ack:-",
        "mw:first:before:q:refuse", "mw:second:before:q:refuse",
        "mw:second:after:refuse:reject:PayloadError",
        "mw:first:after:refuse:reject:PayloadError",
        "mw:second:on_stop", "mw:first:on_stop"]

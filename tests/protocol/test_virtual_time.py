"""Promise and schedule messages (virtual time of simulated fleets): round trips, checks, topics."""

from __future__ import annotations

import pytest

from fedhft.protocol import HeaderError, HelloMessage, WrongMessageKind, WrongRecipient, WrongTask, encode_hello
from fedhft.protocol.topics import parse_topic, promise_filter, promise_topic, schedule_topic
from fedhft.protocol.virtual_time import (
    PromiseMessage,
    ScheduleMessage,
    decode_promise,
    decode_schedule,
    encode_promise,
    encode_schedule,
)


def test_round_trips_and_recipient_checks() -> None:
    p = PromiseMessage("t", "dev-1", 3, 2, 123.25, 1.7e9)
    assert decode_promise(encode_promise(p), expected_task="t") == p
    s = ScheduleMessage("t", "dev-1", 123.25, 4, 1.7e9)
    assert decode_schedule(encode_schedule(s), expected_task="t", expected_client_id="dev-1") == s
    with pytest.raises(WrongTask):
        decode_promise(encode_promise(p), expected_task="other")
    with pytest.raises(WrongRecipient):
        decode_schedule(encode_schedule(s), expected_client_id="dev-2")


@pytest.mark.parametrize("due", [-1.0, float("nan"), float("inf"), 2e12, True, "5"])
def test_bad_times_are_refused_naming_the_field(due: object) -> None:
    with pytest.raises(HeaderError, match="due"):
        encode_promise(PromiseMessage("t", "d", 0, 0, due, 0.0))  # type: ignore[arg-type]


def test_a_message_of_another_kind_is_not_a_promise() -> None:
    hello = encode_hello(HelloMessage("t", "d", "p", "0" * 64, {}, 0.0))
    with pytest.raises(WrongMessageKind):
        decode_promise(hello)


def test_topics() -> None:
    assert parse_topic(promise_topic("t", "d")) == ("t", "promise", "d")
    assert parse_topic(schedule_topic("t", "d")) == ("t", "schedule", "d")
    assert promise_filter("t") == "fedhft/v1/t/promise/+"

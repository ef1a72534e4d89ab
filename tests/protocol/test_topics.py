"""The MQTT topic tree."""

from __future__ import annotations

import pytest

from fedhft.protocol import (
    TopicError,
    ack_topic,
    client_filters,
    client_model_topic,
    cluster_model_topic,
    hello_filter,
    hello_topic,
    model_topic,
    parse_topic,
    server_filters,
    shared_subscription,
    update_filter,
    update_topic,
    validate_id,
)


def test_builders() -> None:
    assert hello_topic("sst2", "rpi-07") == "fedhft/v1/sst2/hello/rpi-07"
    assert update_topic("sst2", "rpi-07") == "fedhft/v1/sst2/update/rpi-07"
    assert ack_topic("sst2", "rpi-07") == "fedhft/v1/sst2/ack/rpi-07"
    assert cluster_model_topic("sst2", 0) == "fedhft/v1/sst2/model/cluster/0"
    assert client_model_topic("sst2", "rpi-07") == "fedhft/v1/sst2/model/client/rpi-07"
    assert model_topic("sst2", "cluster/3") == "fedhft/v1/sst2/model/cluster/3"
    assert model_topic("sst2", "client/a.b_c") == "fedhft/v1/sst2/model/client/a.b_c"


def test_filters() -> None:
    assert update_filter("sst2") == "fedhft/v1/sst2/update/+"
    assert hello_filter("sst2") == "fedhft/v1/sst2/hello/+"
    assert server_filters("sst2") == ("fedhft/v1/sst2/update/+", "fedhft/v1/sst2/hello/+")
    assert client_filters("sst2", "c1") == ("fedhft/v1/sst2/ack/c1", "fedhft/v1/sst2/model/client/c1")
    assert client_filters("sst2", "c1", 2)[-1] == "fedhft/v1/sst2/model/cluster/2"


def test_shared_subscription() -> None:
    assert shared_subscription("servers", update_filter("sst2")) == "$share/servers/fedhft/v1/sst2/update/+"
    assert shared_subscription("g", "a/#") == "$share/g/a/#"
    for group in ("", "a/b", "a+", "#"):
        with pytest.raises(TopicError, match="share group"):
            shared_subscription(group, "a/+")
    for bad in ("", "a/#/b", "a/b#", "a+/b", "$share/g/a"):
        with pytest.raises(TopicError, match="filter"):
            shared_subscription("g", bad)


@pytest.mark.parametrize(
    ("topic", "parsed"),
    [
        ("fedhft/v1/sst2/hello/rpi-07", ("sst2", "hello", "rpi-07")),
        ("fedhft/v1/sst2/update/rpi-07", ("sst2", "update", "rpi-07")),
        ("fedhft/v1/sst2/ack/rpi-07", ("sst2", "ack", "rpi-07")),
        ("fedhft/v1/sst2/model/cluster/12", ("sst2", "model", "cluster/12")),
        ("fedhft/v1/sst2/model/client/rpi-07", ("sst2", "model", "client/rpi-07")),
    ],
)
def test_parse_round_trip(topic: str, parsed: tuple[str, str, str]) -> None:
    assert parse_topic(topic) == parsed


@pytest.mark.parametrize(
    ("topic", "fragment"),
    [
        ("fedhft/v2/sst2/hello/c", "not a fedhft/v1"),
        ("other/v1/sst2/hello/c", "not a fedhft/v1"),
        ("fedhft/v1/sst2/hello", "not a fedhft/v1"),
        ("fedhft/v1/sst2/bye/c", "unknown message kind"),
        ("fedhft/v1/sst2/hello/c/extra", "exactly one client id"),
        ("fedhft/v1/sst2/update/+", "client_id in topic"),
        ("fedhft/v1/sst2/update/#", "client_id in topic"),
        ("fedhft/v1/+/update/c", "task in topic"),
        ("fedhft/v1//update/c", "task in topic must not be empty"),
        ("fedhft/v1/sst2/update/", "client_id in topic must not be empty"),
        ("fedhft/v1/sst2/model/cluster/x", "model target"),
        ("fedhft/v1/sst2/model/cluster/01", "model target"),
        ("fedhft/v1/sst2/model/cluster/-1", "model target"),
        ("fedhft/v1/sst2/model/client/a/b", "model target"),
        ("fedhft/v1/sst2/model/group/a", "model target"),
        ("$share/g/fedhft/v1/sst2/update/c", "not a fedhft/v1"),
        ("fedhft/v1/" + "t" * 129 + "/update/c", "at most 128"),
    ],
)
def test_parse_rejects(topic: str, fragment: str) -> None:
    with pytest.raises(TopicError, match=fragment):
        parse_topic(topic)


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(TopicError, match="must be a string"):
        parse_topic(b"fedhft/v1/a/hello/b")


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "a#", "x" * 129, "sp ace", "é", None, 3])
def test_builders_validate_ids(bad: object) -> None:
    with pytest.raises(TopicError, match="client_id"):
        update_topic("sst2", bad)  # type: ignore[arg-type]
    with pytest.raises(TopicError, match="task"):
        hello_topic(bad, "c")  # type: ignore[arg-type]
    with pytest.raises(TopicError, match="task"):
        update_filter(bad)  # type: ignore[arg-type]


def test_cluster_index_is_checked() -> None:
    for bad in (-1, True, 1.0, 10**9):
        with pytest.raises(TopicError, match="cluster index"):
            cluster_model_topic("sst2", bad)  # type: ignore[arg-type]
    with pytest.raises(TopicError, match="model target"):
        model_topic("sst2", "cluster/")


def test_validate_id_limits() -> None:
    assert validate_id("x" * 128, "task") == "x" * 128
    assert validate_id("A-z_0.9", "task") == "A-z_0.9"

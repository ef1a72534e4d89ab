"""Plans, header peeking, norms and clipping, broker URLs and the Prometheus text format."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedhft.broker_server.metrics import Metrics, parse_metrics
from fedhft.broker_server.service import ServiceError
from fedhft.broker_server.validation import (
    ClientPlan,
    PlanRejected,
    UpdateHeader,
    UpdateRejected,
    check_version,
    clip_update,
    decode_checked,
    delta_norm,
    peek_update_header,
)
from fedhft.protocol import encode_update
from fedhft.protocol.envelope import DEFAULT_MAX_BYTES, KIND_UPDATE, unwrap
from fedhft.protocol.mqtt import BrokerAddress
from fedhft.protocol.mqtt import parse_broker_url as parse_url
from fedhft.protocol.tensor_names import a_name, b_rows_name
from tests.support.server import plan_dict, small_spec, update_message, update_tensors

SPEC = small_spec()


def test_plan_ranks_come_from_layers_and_targets_or_an_explicit_map() -> None:
    plan = ClientPlan.from_plan(plan_dict([0, 1], 4, ["query", "ffn_in"], 0.25), SPEC)
    assert plan.ranks == {"layers.0.ffn_in": 4, "layers.0.query": 4, "layers.1.ffn_in": 4, "layers.1.query": 4}
    assert plan.mask_ratio == 0.25
    assert ClientPlan.from_plan({"ranks": {"layers.1.value": 2}}, SPEC).ranks == {"layers.1.value": 2}
    shapes = plan.update_shapes(SPEC)
    assert shapes["layers.0.ffn_in.A"] == (4, 12) and shapes["layers.0.ffn_in.B_rows"] == (None, 4)


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        (plan_dict([5], 2, ["query"]), "not in the global adapter"),
        (plan_dict([0], 99, ["query"]), "outside 1..8"),
        (plan_dict([0], 2, ["query"], 1.5), "mask_ratio"),
        ({"layers": "nope"}, "not a LoRA plan"),
        ({"layers": []}, "adapts no module"),
    ],
)
def test_bad_plans_are_refused_naming_the_problem(plan: dict, message: str) -> None:
    with pytest.raises(PlanRejected, match=message):
        ClientPlan.from_plan(plan, SPEC)


def test_peek_reads_the_header_of_deflated_and_stored_envelopes() -> None:
    plan = ClientPlan.from_plan(plan_dict([1], 2, ["query"]), SPEC)
    payload = encode_update(update_message("t", "dev", 41, update_tensors(np.random.default_rng(0), SPEC, plan)))
    header = peek_update_header(payload)
    assert (header.task, header.client_id, header.seq) == ("t", "dev", 41)
    magic, version, kind, flags, reserved, body_len, raw_len = struct.unpack_from("<4sBBBBII", payload)
    raw = unwrap(payload, KIND_UPDATE, DEFAULT_MAX_BYTES).raw
    stored = struct.pack("<4sBBBBII", magic, version, kind, flags & ~1, reserved, len(raw), raw_len) + raw
    assert peek_update_header(stored) == header
    assert decode_checked(stored, SPEC, plan, "t", "dev").seq == 41  # decoders accept stored bodies too
    assert peek_update_header(payload[:40]) is None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_peek_never_raises_on_garbage(data: bytes) -> None:
    for payload in (b"FHFT\x01\x01\x01\x00" + data, data):
        assert peek_update_header(payload) is None or isinstance(peek_update_header(payload), UpdateHeader)


def test_delta_norm_is_the_norm_of_the_rebuilt_rows_and_clipping_scales_to_it() -> None:
    rng = np.random.default_rng(1)
    plan = ClientPlan.from_plan(plan_dict([0, 1], 3, ["query", "ffn_in"], 0.5), SPEC)
    t = update_tensors(rng, SPEC, plan, scale=1.0)
    dense = [t[b_rows_name(m)].astype(np.float64) @ t[a_name(m)] for m in plan.ranks]
    want = np.sqrt(sum((d**2).sum() for d in dense))
    assert delta_norm(t) == pytest.approx(want, rel=1e-5)
    clipped, scale = clip_update(t, want / 4)
    assert scale == pytest.approx(0.25) and delta_norm(clipped) == pytest.approx(want / 4, rel=1e-5)
    np.testing.assert_array_equal(clipped["head.weight"], t["head.weight"])
    assert clip_update(t, want * 2) == (t, 1.0)


def test_version_window() -> None:
    check_version(5, 7, 2)
    with pytest.raises(UpdateRejected, match="stale"):
        check_version(4, 7, 2)
    with pytest.raises(UpdateRejected, match="future_version"):
        check_version(8, 7, 2)


def test_broker_urls() -> None:
    def parse_broker_url(url: str) -> BrokerAddress:  # as the server reads --broker
        return parse_url(url, ServiceError, scheme_optional=True)

    assert parse_broker_url("mqtt://h:1884") == BrokerAddress("h", 1884, False)
    assert parse_broker_url("mqtts://broker.example").port == 8883 and parse_broker_url("mqtts://b").tls
    assert parse_broker_url("localhost").port == 1883
    with pytest.raises(ServiceError, match="mqtt://HOST:PORT"):
        parse_broker_url("http://h")


def test_prometheus_text_has_help_type_labels_and_summaries() -> None:
    m = Metrics()
    m.inc("fedhft_updates_total", {"status": "rejected", "reason": 'odd "reason"\n'})
    m.inc("fedhft_updates_total", {"status": "accepted", "reason": ""}, 3)
    m.observe("fedhft_aggregation_seconds", 0.5)
    m.observe("fedhft_aggregation_seconds", 0.25)
    m.set("fedhft_rank_collapse_ratio", float("nan"), {"cluster": "0"})
    text = m.render()
    assert "# TYPE fedhft_updates_total counter" in text and "# TYPE fedhft_aggregation_seconds summary" in text
    assert 'fedhft_updates_total{reason="odd \\"reason\\"\\n",status="rejected"} 1' in text
    got = parse_metrics(text)
    assert got['fedhft_updates_total{reason="",status="accepted"}'] == 3
    assert got["fedhft_aggregation_seconds_sum"] == 0.75 and got["fedhft_aggregation_seconds_count"] == 2
    assert np.isnan(got['fedhft_rank_collapse_ratio{cluster="0"}'])

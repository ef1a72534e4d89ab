"""Masked uploads and model loading (pure numpy): shapes, row choice, scaling, round trips."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedhft.edge_runtime.masking import (
    AdapterMismatch,
    AdapterSpec,
    ModuleSpec,
    build_update_tensors,
    delta_change_row_norms,
    kept_rows,
    model_to_params,
    params_to_model_tensors,
    top_rows,
)
from fedhft.protocol import decode_model, decode_update, encode_model, encode_update, generate_keypair
from fedhft.protocol.manifest import load_manifest
from fedhft.protocol.messages import ModelMessage, UpdateMessage
from fedhft.protocol.tensor_names import a_name, b_name, b_rows_name, rows_name

SPEC = AdapterSpec(
    modules=(
        ModuleSpec("layers.4.query", rank=2, in_features=12, out_features=12, max_rank=8),
        ModuleSpec("layers.5.ffn_in", rank=4, in_features=12, out_features=30, max_rank=8),
        ModuleSpec("layers.5.ffn_out", rank=8, in_features=30, out_features=12, max_rank=8),
    ),
    alpha=12.0,
    mask_ratio=0.25,
    head_shapes={"head.weight": (3, 12), "head.bias": (3,)},
)


def _params(spec: AdapterSpec, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    p: dict[str, np.ndarray] = {}
    for m in spec.modules:
        p[f"{m.name}.lora_A"] = rng.normal(0, 0.1, (m.rank, m.in_features)).astype(np.float32)
        p[f"{m.name}.lora_B"] = rng.normal(0, 0.1, (m.out_features, m.rank)).astype(np.float32)
    for name, shape in spec.head_shapes.items():
        p[name] = rng.normal(0, 0.1, shape).astype(np.float32)
    return p


def _with_ratio(spec: AdapterSpec, ratio: float) -> AdapterSpec:
    return AdapterSpec(spec.modules, spec.alpha, ratio, spec.head_shapes)


def test_kept_rows_is_ceil_of_the_ratio_without_float_noise() -> None:
    assert kept_rows(12, 0.25) == 3
    assert kept_rows(30, 0.1) == 3  # 0.1 * 30 = 3.0000000000000004 in floats
    assert kept_rows(10, 0.25) == 3
    assert kept_rows(7, 1.0) == 7
    assert kept_rows(3, 0.01) == 1
    with pytest.raises(AdapterMismatch):
        kept_rows(10, 0.0)


def test_row_norms_match_the_dense_change_and_ties_go_to_lower_index() -> None:
    rng = np.random.default_rng(0)
    a, a0 = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    b, b0 = rng.normal(size=(9, 3)), rng.normal(size=(9, 3))
    dense = 1.5 * (b @ a - b0 @ a0)
    np.testing.assert_allclose(delta_change_row_norms(a, b, a0, b0, 1.5), np.linalg.norm(dense, axis=1), rtol=1e-10)
    assert top_rows(np.array([1.0, 3.0, 3.0, 0.5, 3.0]), 2).tolist() == [1, 2]
    assert top_rows(np.array([0.0, 0.0, 0.0]), 2).tolist() == [0, 1]
    assert top_rows(np.array([1.0, 2.0]), 2).dtype == np.int32


def test_update_shapes_rows_and_scaled_b_rows() -> None:
    start, end = _params(SPEC, 0), _params(SPEC, 1)
    t = build_update_tensors(SPEC, end, start)
    assert {k: v.shape for k, v in t.items()} == SPEC.update_shapes()
    for m in SPEC.modules:
        s = SPEC.alpha / m.rank
        rows = t[rows_name(m.name)]
        assert len(rows) == math.ceil(0.25 * m.out_features) and rows.dtype == np.int32
        assert (np.diff(rows) > 0).all()
        a, b = end[f"{m.name}.lora_A"], end[f"{m.name}.lora_B"]
        a0, b0 = start[f"{m.name}.lora_A"], start[f"{m.name}.lora_B"]
        change = np.linalg.norm(s * (b.astype(np.float64) @ a - b0.astype(np.float64) @ a0), axis=1)
        assert set(rows.tolist()) == set(np.argsort(-change)[: len(rows)].tolist())
        np.testing.assert_array_equal(t[a_name(m.name)], a)
        np.testing.assert_array_equal(t[b_rows_name(m.name)], (np.float32(s) * b[rows]).astype(np.float32))
        # what the server rebuilds is this device's ΔW rows, (alpha / r) · B · A
        np.testing.assert_allclose(
            t[b_rows_name(m.name)] @ t[a_name(m.name)], (s * (b @ a))[rows], rtol=1e-6, atol=1e-7
        )
    np.testing.assert_array_equal(t["head.weight"], end["head.weight"])


def test_mask_ratio_one_sends_every_row_and_the_full_delta() -> None:
    spec = _with_ratio(SPEC, 1.0)
    start, end = _params(spec, 0), _params(spec, 1)
    t = build_update_tensors(spec, end, start)
    for m in spec.modules:
        assert t[rows_name(m.name)].tolist() == list(range(m.out_features))
        s = spec.alpha / m.rank
        delta = s * end[f"{m.name}.lora_B"].astype(np.float64) @ end[f"{m.name}.lora_A"]
        np.testing.assert_allclose(t[b_rows_name(m.name)] @ t[a_name(m.name)], delta, rtol=1e-6, atol=1e-7)


def test_the_change_not_the_value_picks_the_rows() -> None:
    spec = AdapterSpec((ModuleSpec("layers.0.value", 1, 4, 4, 1),), alpha=1.0, mask_ratio=0.25)
    a = np.ones((1, 4), np.float32)
    start = {"layers.0.value.lora_A": a, "layers.0.value.lora_B": np.array([[9.0], [0], [0], [0]], np.float32)}
    end = {"layers.0.value.lora_A": a, "layers.0.value.lora_B": np.array([[9.0], [0], [0.5], [0]], np.float32)}
    assert build_update_tensors(spec, end, start)["layers.0.value.rows"].tolist() == [2]


def test_encoded_update_decodes_to_the_same_slice() -> None:
    start, end = _params(SPEC, 0), _params(SPEC, 1)
    tensors = build_update_tensors(SPEC, end, start)
    msg = UpdateMessage("t", "c", 0, 1, 8, 0.5, {}, "p", "0" * 64, 1.0, tensors)
    back = decode_update(encode_update(msg, "fp32"), SPEC.update_shapes(), out_features=SPEC.out_features())
    for name, arr in tensors.items():
        np.testing.assert_array_equal(back.tensors[name], arr)


def test_model_to_params_truncates_and_unfolds_the_scaling() -> None:
    rng = np.random.default_rng(2)
    model: dict[str, np.ndarray] = {}
    for m in SPEC.modules:
        model[a_name(m.name)] = rng.normal(size=(m.max_rank, m.in_features)).astype(np.float32)
        model[b_name(m.name)] = rng.normal(size=(m.out_features, m.max_rank)).astype(np.float32)
    model["layers.9.key.A"] = np.ones((8, 5), np.float32)  # a module this device does not adapt: ignored
    model["layers.9.key.B"] = np.ones((5, 8), np.float32)
    params = model_to_params(SPEC, model)
    assert "head.weight" not in params  # the model carried no head: the device keeps its own
    for m in SPEC.modules:
        s = SPEC.alpha / m.rank
        a, b = params[f"{m.name}.lora_A"], params[f"{m.name}.lora_B"]
        assert a.shape == (m.rank, m.in_features) and b.shape == (m.out_features, m.rank)
        np.testing.assert_array_equal(a, model[a_name(m.name)][: m.rank])
        # the device's ΔW is the best rank-r part of the model's ΔW (first r components)
        want = model[b_name(m.name)][:, : m.rank].astype(np.float64) @ model[a_name(m.name)][: m.rank]
        np.testing.assert_allclose(s * (b.astype(np.float64) @ a), want, rtol=1e-5, atol=1e-6)


def test_model_params_wire_round_trip_is_exact_in_delta() -> None:
    params = _params(SPEC, 5)
    wire = params_to_model_tensors(SPEC, params)
    private, public = generate_keypair()
    payload = encode_model(ModelMessage("t", 3, "client/c", 1.0, "", {}, wire), private, "fp32")
    back = model_to_params(SPEC, decode_model(payload, verify_key=public).tensors)
    for name, arr in params.items():
        np.testing.assert_allclose(back[name], arr, rtol=1e-6, atol=1e-8)
    again = params_to_model_tensors(SPEC, back)
    for m in SPEC.modules:
        np.testing.assert_allclose(
            again[b_name(m.name)] @ again[a_name(m.name)],
            wire[b_name(m.name)] @ wire[a_name(m.name)],
            rtol=1e-5,
            atol=1e-7,
        )


def test_lower_rank_models_are_zero_padded_and_bad_models_are_refused() -> None:
    m = SPEC.modules[2]  # rank 8
    model = {
        f"{x.name}.{f}": np.ones(s, np.float32)
        for x in SPEC.modules
        for f, s in (("A", (2, x.in_features)), ("B", (x.out_features, 2)))
    }
    params = model_to_params(SPEC, model)
    assert (params[f"{m.name}.lora_A"][2:] == 0).all() and (params[f"{m.name}.lora_B"][:, 2:] == 0).all()
    missing = dict(model)
    del missing[b_name(m.name)]
    with pytest.raises(AdapterMismatch, match="lacks module"):
        model_to_params(SPEC, missing)
    wrong = dict(model, **{a_name(m.name): np.ones((2, 31), np.float32)})
    with pytest.raises(AdapterMismatch, match="do not fit"):
        model_to_params(SPEC, wrong)
    with pytest.raises(AdapterMismatch, match="only"):
        model_to_params(SPEC, dict(model, **{"head.bias": np.zeros(3, np.float32)}))


def test_spec_from_the_exported_manifest(tiny_export: Path) -> None:
    manifest = load_manifest(tiny_export)
    spec = AdapterSpec.from_manifest(manifest)
    assert {m.name: m.rank for m in spec.modules} == manifest.module_ranks()
    assert spec.alpha == manifest.lora["alpha"] and spec.mask_ratio == manifest.mask_ratio
    by_name = manifest.trainable_by_name()
    for m in spec.modules:
        assert by_name[f"{m.name}.lora_A"].shape == (m.rank, m.in_features)
        assert by_name[f"{m.name}.lora_B"].shape == (m.out_features, m.rank)
        assert spec.update_shapes()[rows_name(m.name)] == (math.ceil(manifest.mask_ratio * m.out_features),)

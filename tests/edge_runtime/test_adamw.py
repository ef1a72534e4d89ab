"""The numpy AdamW: ORT's Hugging Face-mode formula, in float32; the training-state file round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedhft.edge_runtime.adamw import AdamW, AdamWConfig, adamw_update, load_train_state, save_train_state
from fedhft.edge_runtime.trainer import BackendError


def reference(p, g_seq, lr, cfg):  # noqa: ANN001, ANN201
    """The same update in float64, written from the formula (not from the implementation)."""
    p, m, v = p.astype(np.float64), np.zeros_like(p, np.float64), np.zeros_like(p, np.float64)
    for t, g in enumerate(g_seq, start=1):
        m = cfg.beta1 * m + (1 - cfg.beta1) * g
        v = cfg.beta2 * v + (1 - cfg.beta2) * g * g
        lr_t = lr * np.sqrt(1 - cfg.beta2**t) / (1 - cfg.beta1**t)
        p = p - lr_t * m / (np.sqrt(v) + cfg.eps)
        p = p - lr * cfg.weight_decay * p
    return p


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_update_matches_the_formula(weight_decay: float) -> None:
    rng = np.random.default_rng(0)
    cfg = AdamWConfig(weight_decay=weight_decay)
    p0 = rng.standard_normal((5, 7)).astype(np.float32)
    grads = [rng.standard_normal((5, 7)).astype(np.float32) * 10.0 ** rng.integers(-7, 1) for _ in range(6)]
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for t, g in enumerate(grads, start=1):
        adamw_update(p, g, m, v, 1e-2, t, cfg)
    np.testing.assert_allclose(p, reference(p0, grads, 1e-2, cfg), rtol=1e-5, atol=1e-6)
    assert p.dtype == np.float32


def test_optimizer_counts_steps_over_named_tensors() -> None:
    opt = AdamW({"a": (2,), "b": (1, 3)}, lr=0.1)
    params = {"a": np.zeros(2, np.float32), "b": np.zeros((1, 3), np.float32)}
    grads = {"a": np.array([1.0, -1.0], np.float32), "b": np.ones((1, 3), np.float32)}
    opt.apply(params, grads)
    opt.apply(params, grads)
    assert opt.step == 2
    # constant gradients: every step moves by ~lr (the eps term is negligible here)
    np.testing.assert_allclose(params["a"], [-0.2, 0.2], rtol=1e-4)
    opt.reset()
    assert opt.step == 0 and not opt.m["a"].any()


def test_state_file_round_trip_and_refusals(tmp_path: Path) -> None:
    shapes = {"x.lora_A": (2, 3), "head.bias": (3,)}
    opt = AdamW(shapes, lr=1e-3)
    params = {k: np.arange(np.prod(s), dtype=np.float32).reshape(s) for k, s in shapes.items()}
    opt.apply(params, {k: np.ones(s, np.float32) for k, s in shapes.items()})
    path = tmp_path / "state.safetensors"
    save_train_state(path, params, opt, {"program_sha256": "ab"})
    got_p, got_m, got_v, step, meta = load_train_state(path, shapes)
    assert step == 1 and meta["program_sha256"] == "ab"
    for k in shapes:
        np.testing.assert_array_equal(got_p[k], params[k])
        np.testing.assert_array_equal(got_m[k], opt.m[k])
        np.testing.assert_array_equal(got_v[k], opt.v[k])
    with pytest.raises(BackendError, match="lacks"):
        load_train_state(path, dict(shapes, extra=(1,)))
    with pytest.raises(BackendError, match="shape"):
        load_train_state(path, {"x.lora_A": (3, 2), "head.bias": (3,)})
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(BackendError, match="not a readable training state"):
        load_train_state(path, shapes)
    nan = dict(params, **{"head.bias": np.full(3, np.nan, np.float32)})
    save_train_state(path, nan, opt)
    with pytest.raises(BackendError, match="non-finite"):
        load_train_state(path, shapes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.safetensors"]

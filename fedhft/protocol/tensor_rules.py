"""The rules decoded tensors must follow: name convention, shapes, row indices, finiteness.

Each check raises a :class:`TensorError` subclass naming the tensor; encoders and decoders both run them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from fedhft.protocol.errors import BadIndices, MissingTensor, NonFiniteTensor, ShapeMismatch, UnknownTensor
from fedhft.protocol.tensor_names import (
    HEAD_BIAS,
    HEAD_WEIGHT,
    MAX_NAME,
    MODEL_SUFFIXES,
    UPDATE_SUFFIXES,
    a_name,
    b_name,
    b_rows_name,
    is_delta_name,
    is_head_name,
    is_valid_name,
    rows_name,
    split_name,
)

Shapes = Mapping[str, tuple[int | None, ...]]


def group_modules(names: list[str], suffixes: tuple[str, ...]) -> dict[str, set[str]]:
    """Group tensor names by module; UnknownTensor / MissingTensor when they break the convention."""
    if not names:
        raise MissingTensor("message carries no tensors")
    modules: dict[str, set[str]] = {}
    dense = 0
    for name in names:
        if not is_valid_name(name):
            raise UnknownTensor(f"tensor name {str(name)[:80]!r} is not 1-{MAX_NAME} chars of [A-Za-z0-9._-]")
        if is_delta_name(name):
            dense += 1
            continue
        if is_head_name(name):
            continue
        parts = split_name(name, suffixes)
        if parts is None:
            allowed = "|".join(suffixes)
            raise UnknownTensor(f"tensor {name!r} is neither <module>{{{allowed}}} nor head.weight/head.bias")
        module, suffix = parts
        modules.setdefault(module, set()).add(suffix)
    for module, present in modules.items():
        lacking = [module + s for s in suffixes if s not in present]
        if lacking:
            raise MissingTensor(f"module {module!r} lacks tensors {lacking}")
    if (HEAD_WEIGHT in names) != (HEAD_BIAS in names):
        raise MissingTensor("head.weight and head.bias must come together")
    if dense and dense != len(names):
        raise UnknownTensor("a dense (full fine-tuning) message carries only <param>.delta tensors, no LoRA or head")
    return modules


def _check_dense(tensors: Mapping[str, np.ndarray]) -> None:
    """Every ``<param>.delta`` is at least 1-D with no empty dimension."""
    for name, arr in tensors.items():
        if is_delta_name(name) and (arr.ndim < 1 or 0 in arr.shape):
            raise ShapeMismatch(f"tensor {name!r}: a parameter delta needs >= 1 dimension, each >= 1; got {arr.shape}")


def _ndim(tensors: Mapping[str, np.ndarray], name: str, ndim: int) -> tuple[int, ...]:
    shape = tensors[name].shape
    if len(shape) != ndim:
        raise ShapeMismatch(f"tensor {name!r}: expected {ndim}-D, got shape {shape}")
    return shape


def _check_head(tensors: Mapping[str, np.ndarray]) -> None:
    if HEAD_WEIGHT not in tensors:
        return
    labels, _ = _ndim(tensors, HEAD_WEIGHT, 2)
    (bias,) = _ndim(tensors, HEAD_BIAS, 1)
    if bias != labels:
        raise ShapeMismatch(f"tensor 'head.bias': expected ({labels},) to match head.weight, got ({bias},)")


def _check_rank(tensors: Mapping[str, np.ndarray], module: str, b_of: Callable[[str], str]) -> None:
    """A is (r, in) with r, in >= 1 and the B tensor ``b_of(module)`` has r columns."""
    r, in_features = _ndim(tensors, a_name(module), 2)
    _, b_rank = _ndim(tensors, b_of(module), 2)
    if r < 1 or in_features < 1:
        raise ShapeMismatch(f"tensor {a_name(module)!r}: rank and in_features must be >= 1, got {(r, in_features)}")
    if b_rank != r:
        raise ShapeMismatch(f"tensor {b_of(module)!r}: expected {r} columns (rows of {a_name(module)}), got {b_rank}")


def _check_rows(tensors: Mapping[str, np.ndarray], module: str, out_features: Mapping[str, int] | None) -> None:
    name = rows_name(module)
    (k,) = _ndim(tensors, name, 1)
    rows = tensors[name]
    if rows.dtype != np.int32:
        raise BadIndices(f"tensor {name!r}: expected int32, got {rows.dtype}")
    uploaded = tensors[b_rows_name(module)].shape[0]
    if k != uploaded:
        raise ShapeMismatch(f"tensor {name!r}: {k} indices for {uploaded} rows of B_rows")
    if k and int(rows.min()) < 0:
        raise BadIndices(f"tensor {name!r}: indices must be >= 0, got {int(rows.min())}")
    if k > 1 and not bool((np.diff(rows.astype(np.int64)) > 0).all()):
        raise BadIndices(f"tensor {name!r}: indices must be sorted and unique")
    if out_features is None:
        return
    if module not in out_features:
        raise UnknownTensor(f"module {module!r} is not in out_features")
    if k and int(rows[-1]) >= out_features[module]:
        raise BadIndices(f"tensor {name!r}: index {int(rows[-1])} >= out_features {out_features[module]}")


def _check_finite(tensors: Mapping[str, np.ndarray]) -> None:
    for name, arr in tensors.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int(arr.size - np.isfinite(arr).sum())
            raise NonFiniteTensor(f"tensor {name!r}: {bad} NaN/inf values")


def _check_expected(tensors: Mapping[str, np.ndarray], expected: Shapes) -> None:
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise UnknownTensor(f"unexpected tensors {unknown[:5]}")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise MissingTensor(f"missing tensors {missing[:5]}")
    for name, want in expected.items():
        got = tensors[name].shape
        want = tuple(want)
        if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got, strict=True)):
            raise ShapeMismatch(f"tensor {name!r}: expected shape {want}, got {got}")


def check_update_tensors(
    tensors: Mapping[str, np.ndarray],
    expected_shapes: Shapes | None = None,
    out_features: Mapping[str, int] | None = None,
) -> None:
    """Validate decoded update tensors (float32 + int32 rows); raise a TensorError subclass."""
    modules = group_modules(list(tensors), UPDATE_SUFFIXES)
    if expected_shapes is not None:
        _check_expected(tensors, expected_shapes)
    _check_head(tensors)
    _check_dense(tensors)
    for module in modules:
        _check_rank(tensors, module, b_rows_name)
        _check_rows(tensors, module, out_features)
    _check_finite(tensors)


def check_model_tensors(tensors: Mapping[str, np.ndarray], expected_shapes: Shapes | None = None) -> None:
    """Validate decoded model tensors (float32); raise a TensorError subclass."""
    modules = group_modules(list(tensors), MODEL_SUFFIXES)
    if expected_shapes is not None:
        _check_expected(tensors, expected_shapes)
    _check_head(tensors)
    _check_dense(tensors)
    for module in modules:
        _check_rank(tensors, module, b_name)
    _check_finite(tensors)

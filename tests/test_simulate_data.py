"""Non-IID splits: deterministic, disjoint, skew grows as alpha shrinks."""

from __future__ import annotations

import numpy as np
import pytest

from fedhft.datasets import DatasetError
from fedhft.simulate.data import dirichlet_split, load_dataset

LABELS = np.repeat(np.arange(5), 200)


def _skew(alpha: float) -> float:
    split = dirichlet_split(LABELS, 10, alpha, seed=1)
    h = split.label_histogram(LABELS, 5).astype(float)
    p = h / h.sum(1, keepdims=True)
    return float((p.max(1)).mean())  # mean share of each client's dominant label


def test_same_seed_same_split_and_disjoint() -> None:
    a = dirichlet_split(LABELS, 8, 0.3, seed=7)
    b = dirichlet_split(LABELS, 8, 0.3, seed=7)
    assert np.array_equal(a.global_test, b.global_test)
    for ca, cb in zip(a.clients, b.clients, strict=True):
        assert np.array_equal(ca.train, cb.train) and np.array_equal(ca.test, cb.test)
    every = np.concatenate([a.global_test] + [np.concatenate([c.train, c.test]) for c in a.clients])
    assert len(every) == len(set(every.tolist())) == len(LABELS)
    assert not np.array_equal(a.clients[0].train, dirichlet_split(LABELS, 8, 0.3, seed=8).clients[0].train)


def test_smaller_alpha_means_more_label_skew() -> None:
    assert _skew(0.1) > _skew(1.0) > _skew(100.0)
    assert _skew(100.0) < 0.35  # near-IID: dominant label ~ 1/5


def test_bad_arguments_and_unknown_dataset() -> None:
    with pytest.raises(DatasetError):
        dirichlet_split(LABELS, 0, 0.5, seed=0)
    with pytest.raises(DatasetError, match="unknown data set"):
        load_dataset("no-such-set")


def test_bbc_news_is_registered() -> None:
    d = load_dataset("bbc-news")
    assert d.num_labels == 5 and len(d.texts) == 2225

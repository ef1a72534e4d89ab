"""Non-IID splits: deterministic, disjoint, skew grows as alpha shrinks."""

from __future__ import annotations

import numpy as np
import pytest

from fedhft.datasets import DatasetError
from fedhft.simulate.data import apportion, cap_test_sets, dirichlet_split, load_dataset, natural_split

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


def test_natural_split_gives_each_client_one_group_in_proportion() -> None:
    groups = ["tops"] * 500 + ["dresses"] * 300 + ["jackets"] * 150 + ["trend"] * 12
    split = natural_split(groups, 6, seed=1)
    keys = np.asarray(groups)
    seen = [sorted(set(keys[np.concatenate([c.train, c.test])])) for c in split.clients]
    assert [s for s in seen if s != ["trend"]] and sum(len(s) == 1 for s in seen) >= 5  # trend joins one client
    assert [s[0] for s in seen if len(s) == 1].count("tops") == 3  # 6 clients x 500/962 ≈ 3.1
    every = np.concatenate([split.global_test, *[np.concatenate([c.train, c.test]) for c in split.clients]])
    assert sorted(every.tolist()) == list(range(len(groups)))  # a partition: nothing lost, nothing twice
    assert set(keys[split.global_test]) == {"tops", "dresses", "jackets", "trend"}
    again = natural_split(groups, 6, seed=1)
    assert all(np.array_equal(a.train, b.train) for a, b in zip(split.clients, again.clients, strict=True))


def test_apportion_and_test_caps() -> None:
    assert apportion([500, 300, 150, 12], 6) == [3, 2, 1, 0]
    assert sum(apportion([5, 5, 5], 10)) == 10
    with pytest.raises(DatasetError):
        apportion([1, 1], 3)
    split = dirichlet_split(np.repeat(np.arange(4), 100), 4, 1.0, seed=0)
    capped = cap_test_sets(split, 0, 30, 5)
    assert len(capped.global_test) == 30 and set(capped.global_test) <= set(split.global_test)
    assert all(
        len(c.test) <= 5 and np.array_equal(c.train, o.train)
        for c, o in zip(capped.clients, split.clients, strict=True)
    )


def test_womens_clothing_reviews_load_from_the_installed_wheel() -> None:
    data = load_dataset("womens-clothing")
    assert len(data.texts) == 22628 and data.num_labels == 2 and set(data.labels) == {0, 1}
    assert data.groups is not None and len(set(data.groups)) == 6 and "Dresses" in data.groups
    rating = load_dataset("womens-clothing-rating")
    assert rating.num_labels == 5 and sorted(set(rating.labels)) == [0, 1, 2, 3, 4]


def _user_file(folder, suffix: str = ".csv"):  # noqa: ANN001, ANN202
    """120 reviews by 3 users of unequal size (50/40/30), labels pos/neg; CSV or JSONL."""
    import json

    users = ["ann"] * 50 + ["bob"] * 40 + ["cy"] * 30
    rows = [{"text": f"review {i} by {u}", "label": "pos" if i % 3 else "neg", "user": u} for i, u in enumerate(users)]
    path = folder / f"reviews{suffix}"
    if suffix == ".csv":
        path.write_text("text,label,user\n" + "".join(f"{r['text']},{r['label']},{r['user']}\n" for r in rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, users


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_user_file_splits_naturally_by_its_group_column(tmp_path, suffix: str) -> None:  # noqa: ANN001
    from fedhft.simulate.config import SimConfig
    from fedhft.simulate.methods import method_spec
    from fedhft.simulate.runner import make_split

    path, users = _user_file(tmp_path, suffix)
    data = load_dataset(str(path), "user")
    assert data.groups == users and data.label_names == ["neg", "pos"]
    assert load_dataset(str(path)).groups is None  # without --group-column: no groups, as before
    cfg = SimConfig(3, {"x": 3}, str(path), 0.5, 1, method_spec("fedhft"), tmp_path, split="natural",
                    group_column="user", max_test=None)  # fmt: skip
    split = make_split(load_dataset(cfg.dataset, cfg.group_column), cfg)
    held = [{users[i] for i in np.concatenate([c.train, c.test])} for c in split.clients]
    assert sorted(map(sorted, held)) == [["ann"], ["bob"], ["cy"]]  # each client holds one user's reviews only


def test_group_column_errors_are_one_line(tmp_path) -> None:  # noqa: ANN001
    from fedhft.edge_runtime.data import DataError

    path, _ = _user_file(tmp_path)
    with pytest.raises(DataError, match=r"missing column\(s\) \['dept'\]"):
        load_dataset(str(path), "dept")
    with pytest.raises(DatasetError, match="--group-column is for your own CSV/JSONL files"):
        load_dataset("bbc-news", "user")
    path.write_text("text,label,user\nok,pos,ann\nfine,neg,\n")
    with pytest.raises(DataError, match=r"reviews.csv:3: row lacks a 'text' or 'label' or 'user' value"):
        load_dataset(str(path), "user")

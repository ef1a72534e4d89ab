"""Local data: CSV/JSONL loading, label mapping, clear errors, seeded split and batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedhft.edge_runtime.data import (
    DataError,
    check_num_labels,
    load_labelled_file,
    shuffled_batches,
    split_holdout,
)
from fedhft.errors import FedHFTError


def _jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_csv_string_labels_map_by_sorted_names(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text('text,label\n"hello, world",pos\nbad movie,neg\nok,neu\nfine,pos\n')
    texts, labels, names = load_labelled_file(p)
    assert texts == ["hello, world", "bad movie", "ok", "fine"]
    assert names == ["neg", "neu", "pos"]
    assert labels.tolist() == [2, 0, 1, 2] and labels.dtype == np.int64


def test_csv_integer_labels_are_kept_and_columns_are_configurable(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text("body,y,extra\na,2,x\nb,0,y\n")
    texts, labels, names = load_labelled_file(p, text_column="body", label_column="y")
    assert texts == ["a", "b"] and labels.tolist() == [2, 0] and names == ["0", "1", "2"]


def test_jsonl_int_and_given_label_names(tmp_path: Path) -> None:
    p = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, "", {"text": "b", "label": 0}])
    _, labels, _ = load_labelled_file(p)
    assert labels.tolist() == [1, 0]
    q = _jsonl(tmp_path / "e.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])
    _, labels, names = load_labelled_file(q, label_names=["pos", "neu", "neg"])
    assert labels.tolist() == [0, 2] and names == ["pos", "neu", "neg"]
    with pytest.raises(DataError, match="not among the given names"):
        load_labelled_file(q, label_names=["pos"])


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.csv", None, "does not exist"),
        ("d.csv", "text,other\na,b\n", r"missing column\(s\) \['label'\]"),
        ("d.csv", "text,label\n", "no labelled rows"),
        ("d.csv", "text,label\na,\n", r"d.csv:2: row lacks"),
        ("d.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 1\n', r"d.jsonl:2: not valid JSON"),
        ("d.jsonl", '{"text": "a", "label": 0.5}\n', r"d.jsonl:1: 'label' must be a string or an integer"),
        ("d.jsonl", '{"text": "a"}\n', r"d.jsonl:1: missing column"),
        ("d.jsonl", "[1, 2]\n", "expected a JSON object"),
        ("d.jsonl", '{"text": "a", "label": -1}\n', "must be >= 0"),
        ("d.txt", "x", "unknown data format"),
    ],
)
def test_bad_files_raise_one_clear_error(tmp_path: Path, name: str, content: str | None, message: str) -> None:
    p = tmp_path / name
    if content is not None:
        p.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_labelled_file(p)
    assert isinstance(info.value, FedHFTError)
    assert "\n" not in str(info.value)


def test_more_labels_than_the_model_has_is_refused() -> None:
    check_num_labels(np.array([0, 1, 2]), ["a", "b", "c"], 3, "d.csv")
    with pytest.raises(DataError, match="4 label values .* model has 3 outputs"):
        check_num_labels(np.array([0, 1, 2, 3]), ["a", "b", "c", "d"], 3, "d.csv")
    with pytest.raises(DataError, match="model has 2 outputs"):
        check_num_labels(np.array([5]), ["0", "1", "2", "3", "4", "5"], 2, "d.csv")


def test_split_holdout_is_seeded_disjoint_and_complete() -> None:
    tr, ev = split_holdout(50, 0.1, seed=3)
    assert len(ev) == 5 and len(tr) == 45
    assert sorted(np.concatenate([tr, ev]).tolist()) == list(range(50))
    tr2, ev2 = split_holdout(50, 0.1, seed=3)
    assert ev.tolist() == ev2.tolist() and tr.tolist() == tr2.tolist()
    assert split_holdout(50, 0.1, seed=4)[1].tolist() != ev.tolist()
    assert len(split_holdout(3, 0.01, 0)[1]) == 1  # a positive fraction always holds one out
    assert len(split_holdout(5, 0.0, 0)[1]) == 0
    with pytest.raises(DataError):
        split_holdout(1, 0.5, 0)
    with pytest.raises(DataError):
        split_holdout(10, 1.0, 0)


def test_shuffled_batches_cover_each_epoch_and_repeat_with_the_seed() -> None:
    batches = list(shuffled_batches(10, 4, seed=1, epochs=2))
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    assert sorted(np.concatenate(batches[:3]).tolist()) == list(range(10))
    assert sorted(np.concatenate(batches[3:]).tolist()) == list(range(10))
    again = list(shuffled_batches(10, 4, seed=1, epochs=2))
    assert all((a == b).all() for a, b in zip(batches, again, strict=True))
    endless = shuffled_batches(3, 2, seed=0)
    assert len([next(endless) for _ in range(7)]) == 7

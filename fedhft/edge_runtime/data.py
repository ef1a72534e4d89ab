"""A device's local labelled data: CSV or JSONL files, a seeded holdout split and seeded batches.

Labels: when every label is an integer (a JSON int or a string of digits) the ids are kept as they are;
otherwise the labels are names, mapped to ids by their sorted unique values (or by ``label_names`` when
given, which is how clients of one federation agree on the ids whatever labels each of them holds).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from fedhft.errors import FedHFTError

_INT_RE = re.compile(r"[+-]?\d+")
CSV_SUFFIXES = (".csv", ".tsv")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


class DataError(FedHFTError):
    """A local data file that is missing, unreadable, empty or does not fit the model."""


def load_labelled_file(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
) -> tuple[list[str], np.ndarray, list[str]]:
    """Read ``(texts, labels, label_names)`` from a CSV/TSV or JSONL file; ``label_names[i]`` names id i."""
    texts, labels, names, _ = load_grouped_file(path, None, text_column, label_column, label_names)
    return texts, labels, names


def load_grouped_file(
    path: str | Path,
    group_column: str | None,
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
) -> tuple[list[str], np.ndarray, list[str], list[str] | None]:
    """As :func:`load_labelled_file`, plus each row's ``group_column`` value as a string (a natural partition key,
    e.g. a user or a department; None without a group column)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {p} does not exist")
    suffix = p.suffix.lower()
    columns = (text_column, label_column) + ((group_column,) if group_column else ())
    if suffix in CSV_SUFFIXES:
        rows = _read_csv(p, columns, delimiter="\t" if suffix == ".tsv" else ",")
    elif suffix in JSONL_SUFFIXES:
        rows = _read_jsonl(p, columns)
    else:
        raise DataError(f"{p}: unknown data format {suffix!r}; use .csv, .tsv or .jsonl")
    if not rows:
        raise DataError(f"{p}: no labelled rows")
    labels, names = label_ids([r[1] for r in rows], label_names, source=str(p))
    groups = [str(r[2]) for r in rows] if group_column else None
    return [str(r[0]) for r in rows], labels, names, groups


def _read_csv(p: Path, columns: Sequence[str], delimiter: str) -> list[list[object]]:
    """One ``[text, label, *more]`` list per row (``columns`` in that order), every value present."""
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            _check_columns(p, reader.fieldnames or [], columns)
            rows: list[list[object]] = []
            for row in reader:
                values = [row.get(c) for c in columns]
                if any(v is None for v in values) or any(str(v).strip() == "" for v in values[1:]):
                    lacks = " or ".join(repr(c) for c in columns)
                    raise DataError(f"{p}:{reader.line_num}: row lacks a {lacks} value")
                rows.append([values[0], *(str(v).strip() for v in values[1:])])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{p}: cannot read as CSV ({e})") from e
    return rows


def _read_jsonl(p: Path, columns: Sequence[str]) -> list[list[object]]:
    """One ``[text, label, *more]`` list per object; text a string, the others strings or integers."""
    rows: list[list[object]] = []
    try:
        with open(p, encoding="utf-8-sig") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{number}: not valid JSON ({e.msg})") from e
                if not isinstance(obj, dict):
                    raise DataError(f"{p}:{number}: expected a JSON object, got {type(obj).__name__}")
                _check_columns(p, list(obj), columns, where=f":{number}")
                values = [obj[c] for c in columns]
                if not isinstance(values[0], str):
                    raise DataError(f"{p}:{number}: {columns[0]!r} must be a string, got {type(values[0]).__name__}")
                for c, v in zip(columns[1:], values[1:], strict=True):
                    if isinstance(v, bool) or not isinstance(v, (int, str)):
                        raise DataError(f"{p}:{number}: {c!r} must be a string or an integer, got {type(v).__name__}")
                rows.append(values)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot read as JSONL ({e})") from e
    return rows


def _check_columns(p: Path, found: Sequence[str], wanted: Sequence[str], where: str = "") -> None:
    missing = [c for c in wanted if c not in found]
    if missing:
        raise DataError(f"{p}{where}: missing column(s) {missing}; found {list(found)[:20]}")


def label_ids(
    raw: Sequence[object], label_names: Sequence[str] | None = None, source: str = "data"
) -> tuple[np.ndarray, list[str]]:
    """Map raw label values to int64 ids; see the module docstring for the rule."""
    if label_names is not None:
        index = {str(n): i for i, n in enumerate(label_names)}
        if len(index) != len(label_names):
            raise DataError(f"label names {list(label_names)} repeat a name")
        unknown = sorted({str(v) for v in raw} - set(index))
        if unknown:
            raise DataError(f"{source}: labels {unknown[:10]} are not among the given names {list(label_names)}")
        return np.array([index[str(v)] for v in raw], dtype=np.int64), [str(n) for n in label_names]
    if all(isinstance(v, int) or (isinstance(v, str) and _INT_RE.fullmatch(v)) for v in raw):
        ids = np.array([int(v) for v in raw], dtype=np.int64)  # type: ignore[call-overload]
        if ids.min() < 0:
            raise DataError(f"{source}: integer labels must be >= 0, got {int(ids.min())}")
        return ids, [str(i) for i in range(int(ids.max()) + 1)]
    names = sorted({str(v) for v in raw})
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[str(v)] for v in raw], dtype=np.int64), names


def check_num_labels(labels: np.ndarray, label_names: Sequence[str], num_labels: int, source: str) -> None:
    """DataError when the data holds more label values than the model's ``num_labels`` outputs."""
    if len(label_names) > num_labels or (labels.size and int(labels.max()) >= num_labels):
        raise DataError(
            f"{source}: {len(label_names)} label values {list(label_names)[:10]} but the model has "
            f"{num_labels} outputs (export with --num-labels {len(label_names)} or fix the labels)"
        )


def split_holdout(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded ``(train_indices, eval_indices)`` of ``n`` rows; both non-empty when ``eval_fraction`` > 0."""
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"eval fraction must be in [0, 1), got {eval_fraction}")
    if n < 1:
        raise DataError("cannot split an empty data set")
    order = np.random.default_rng(seed).permutation(n)
    n_eval = 0 if eval_fraction == 0 else min(n - 1, max(1, round(n * eval_fraction)))
    if eval_fraction > 0 and n_eval < 1:
        raise DataError(f"{n} row(s) are too few to hold out an eval set; use --eval-fraction 0")
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def shuffled_batches(n: int, batch_size: int, seed: int, epochs: int | None = None) -> Iterator[np.ndarray]:
    """Index batches of a seeded shuffle of ``range(n)``, reshuffled each epoch; forever when epochs is None."""
    if n < 1 or batch_size < 1:
        raise DataError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    rng = np.random.default_rng(seed)
    epoch = 0
    while epochs is None or epoch < epochs:
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]
        epoch += 1


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)

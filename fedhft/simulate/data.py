"""Data for simulations: a small registry of packaged data sets, user files, and non-IID client splits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedhft.datasets import DatasetError, TextDataset, load_bbc_news

REGISTRY: dict[str, Callable[[], TextDataset]] = {"bbc-news": load_bbc_news}


def load_dataset(name_or_path: str) -> TextDataset:
    """A registered data set name, or a CSV/JSONL file with `text` and `label` columns."""
    if name_or_path in REGISTRY:
        return REGISTRY[name_or_path]()
    path = Path(name_or_path)
    if path.is_file():
        from fedhft.edge_runtime.data import load_labelled_file

        texts, labels, names = load_labelled_file(path)
        return TextDataset(path.stem, list(texts), [int(y) for y in labels], list(names))
    raise DatasetError(f"unknown data set '{name_or_path}': not a file and not one of {sorted(REGISTRY)}")


@dataclass(frozen=True)
class ClientSplit:
    """Indices into the data set: one client's local training and local test examples."""

    client: int
    train: np.ndarray
    test: np.ndarray


@dataclass(frozen=True)
class FederatedSplit:
    global_test: np.ndarray
    clients: list[ClientSplit]

    def label_histogram(self, labels: np.ndarray, num_labels: int) -> np.ndarray:
        """(clients, labels) counts of each client's training data."""
        return np.stack([np.bincount(labels[c.train], minlength=num_labels) for c in self.clients])


def dirichlet_split(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    *,
    global_test_fraction: float = 0.15,
    local_test_fraction: float = 0.2,
    min_train: int = 8,
) -> FederatedSplit:
    """Label-skewed split: for each label, shares over clients ~ Dirichlet(alpha) (small alpha = more skew).

    A held-out global test set is taken first (stratified); each client's examples are then split into local
    train and test parts (for personalized accuracy). Redraws until every client has `min_train` examples.
    """
    if num_clients < 1 or alpha <= 0:
        raise DatasetError(f"need clients >= 1 and alpha > 0, got {num_clients}, {alpha}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    test_idx, pool = [], []
    for y in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == y))
        k = int(round(global_test_fraction * len(idx)))
        test_idx.append(idx[:k])
        pool.append(idx[k:])
    for _attempt in range(100):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for idx in pool:
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for c, chunk in enumerate(np.split(idx, cuts)):
                parts[c].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_train + 1:
            break
    else:
        raise DatasetError(f"cannot give {num_clients} clients >= {min_train} examples each at alpha={alpha}")
    clients = []
    for c, part in enumerate(parts):
        idx = rng.permutation(np.array(part, dtype=np.int64))
        k = max(1, int(round(local_test_fraction * len(idx))))
        clients.append(ClientSplit(c, np.sort(idx[k:]), np.sort(idx[:k])))
    return FederatedSplit(np.sort(np.concatenate(test_idx)), clients)

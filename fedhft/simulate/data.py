"""Data for simulations: a small registry of packaged data sets, user files, and non-IID client splits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedhft.datasets import DatasetError, TextDataset, load_bbc_news, load_womens_clothing

REGISTRY: dict[str, Callable[[], TextDataset]] = {
    "bbc-news": load_bbc_news,
    "womens-clothing": load_womens_clothing,
    "womens-clothing-rating": lambda: load_womens_clothing("rating"),
}


def load_dataset(name_or_path: str, group_column: str | None = None) -> TextDataset:
    """A registered data set name, or a CSV/JSONL file with `text` and `label` columns; its ``group_column``
    (e.g. a user or a department) gives the groups that `--split natural` deals out to clients."""
    if name_or_path in REGISTRY:
        if group_column is not None:
            raise DatasetError(
                f"--group-column is for your own CSV/JSONL files; '{name_or_path}' brings its own groups (or none)"
            )
        return REGISTRY[name_or_path]()
    path = Path(name_or_path)
    if path.is_file():
        from fedhft.edge_runtime.data import load_grouped_file

        texts, labels, names, groups = load_grouped_file(path, group_column)
        return TextDataset(path.stem, list(texts), [int(y) for y in labels], list(names), groups)
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
    global_test, pool = _hold_out(labels, list(np.unique(labels)), global_test_fraction, rng)
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
    return FederatedSplit(global_test, _local_splits(parts, local_test_fraction, rng))


def _hold_out(
    keys: np.ndarray, order: list, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The global test set (``fraction`` of each key's examples, shuffled) and what remains of each key."""
    test, pools = [], []
    for key in order:
        idx = rng.permutation(np.flatnonzero(keys == key))
        k = int(round(fraction * len(idx)))
        test.append(idx[:k])
        pools.append(idx[k:])
    return np.sort(np.concatenate(test)), pools


def _local_splits(parts: list[list[int]], fraction: float, rng: np.random.Generator) -> list[ClientSplit]:
    """Each client's examples shuffled into local train and test (at least one test example)."""
    clients = []
    for c, part in enumerate(parts):
        idx = rng.permutation(np.array(part, dtype=np.int64))
        k = max(1, int(round(fraction * len(idx))))
        clients.append(ClientSplit(c, np.sort(idx[k:]), np.sort(idx[:k])))
    return clients


def _cap(idx: np.ndarray, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(idx, limit, replace=False)) if limit is not None and len(idx) > limit else idx


def cap_test_sets(split: FederatedSplit, seed: int, global_max: int | None, local_max: int | None) -> FederatedSplit:
    """Random subsets of the test sets (large data sets): evaluation cost stays bounded, training data is untouched."""
    rng = np.random.default_rng(seed + 7919)
    clients = [ClientSplit(c.client, c.train, _cap(c.test, local_max, rng)) for c in split.clients]
    return FederatedSplit(_cap(split.global_test, global_max, rng), clients)


def apportion(sizes: list[int], num_clients: int) -> list[int]:
    """Clients per group, proportional to group size (largest remainders), at most one per example."""
    total = sum(sizes)
    raw = [num_clients * n / total for n in sizes]
    counts = [min(int(r), n) for r, n in zip(raw, sizes, strict=True)]
    order = sorted(range(len(sizes)), key=lambda g: raw[g] - int(raw[g]), reverse=True)
    while sum(counts) < num_clients:
        grew = False
        for g in order:
            if sum(counts) < num_clients and counts[g] < sizes[g]:
                counts[g] += 1
                grew = True
        if not grew:
            raise DatasetError(f"cannot give {num_clients} clients an example each from {total} examples")
    return counts


def natural_split(
    groups: list[str],
    num_clients: int,
    seed: int,
    *,
    global_test_fraction: float = 0.15,
    local_test_fraction: float = 0.2,
    min_train: int = 8,
) -> FederatedSplit:
    """Non-IID by a natural key (e.g. a product department): each client holds examples of one group only.

    Groups get clients in proportion to their size; a group too small to get one is merged into the client with
    the fewest examples. The global test set is a stratified-by-group sample of every group.
    """
    keys = np.asarray(groups)
    rng = np.random.default_rng(seed)
    names = sorted(set(groups), key=lambda g: (-int((keys == g).sum()), g))
    global_test, pools = _hold_out(keys, names, global_test_fraction, rng)
    counts = apportion([len(p) for p in pools], num_clients)
    parts: list[list[int]] = []
    orphans: list[np.ndarray] = []
    for pool, n in zip(pools, counts, strict=True):
        if n == 0:
            orphans.append(pool)
            continue
        parts.extend(chunk.tolist() for chunk in np.array_split(pool, n))
    for pool in orphans:
        min(parts, key=len).extend(pool.tolist())
    if min(len(p) for p in parts) < min_train + 1:
        raise DatasetError(f"a natural split of {len(groups)} examples leaves a client with < {min_train + 1}")
    return FederatedSplit(global_test, _local_splits(parts, local_test_fraction, rng))

"""Local training and evaluation of one device's adapter on its own labelled texts (any Trainer backend)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedhft.edge_runtime.data import DataError, shuffled_batches, steps_per_epoch
from fedhft.edge_runtime.tokenize import TextEncoder
from fedhft.edge_runtime.trainer import DEFAULT_TRAINER_TIMEOUT, BackendError, Trainer
from fedhft.protocol.manifest import Manifest

BACKENDS = ("auto", "ort", "executorch", "native")  # auto: see backend_choice.choose_backend
Progress = Callable[[int, int, float], None]  # (steps done, planned steps, last loss)


@dataclass(frozen=True)
class TrainReport:
    """Mean loss and accuracy over the steps taken (training batches, or the whole eval set)."""

    loss: float
    accuracy: float
    steps: int
    samples: int
    seconds: float


def open_trainer(
    backend: str,
    profile_dir: str | Path,
    manifest: Manifest | None = None,
    learning_rate: float = 1e-3,
    trainer_timeout: float = DEFAULT_TRAINER_TIMEOUT,
) -> Trainer:
    """The training backend ``backend`` ("auto": chosen from the manifest) on the artifacts in ``profile_dir``.

    ``trainer_timeout``: seconds the native trainer subprocess may take per call (backends in-process ignore it).
    """
    if backend == "auto":
        from fedhft.edge_runtime.backend_choice import choose_backend

        backend = choose_backend(profile_dir, manifest)
    if backend == "ort":
        from fedhft.edge_runtime.ort_backend import OrtTrainer

        return OrtTrainer(profile_dir, manifest=manifest, learning_rate=learning_rate)
    if backend == "executorch":
        from fedhft.edge_runtime.executorch_backend import ExecuTorchTrainer

        return ExecuTorchTrainer(profile_dir, manifest=manifest, learning_rate=learning_rate)
    if backend == "native":
        from fedhft.edge_runtime.native_backend import NativeTrainer

        return NativeTrainer(profile_dir, manifest=manifest, learning_rate=learning_rate, timeout=trainer_timeout)
    raise BackendError(f"unknown backend {backend!r}; this runtime has {list(BACKENDS)}")


def _select(texts: Sequence[str], idx: np.ndarray) -> list[str]:
    return [texts[int(i)] for i in idx]


def train_local(
    trainer: Trainer,
    encoder: TextEncoder,
    texts: Sequence[str],
    labels: np.ndarray,
    *,
    steps: int | None = None,
    epochs: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    max_seconds: float | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainReport:
    """Train ``steps`` batches (or ``epochs`` passes) of a seeded shuffle; stop early at ``max_seconds``
    or when ``should_stop()`` turns true. The same seed gives the same batches."""
    labels = np.asarray(labels)
    n = len(texts)
    if n == 0 or labels.shape != (n,):
        raise DataError(f"need as many labels as texts (>= 1), got {n} texts and labels {labels.shape}")
    if (steps is None) == (epochs is None):
        raise DataError("give exactly one of steps or epochs")
    total = steps if steps is not None else int(epochs or 0) * steps_per_epoch(n, batch_size)
    if total < 1:
        raise DataError(f"steps and epochs must be >= 1, got steps={steps}, epochs={epochs}")
    t0 = time.perf_counter()
    loss_sum = 0.0
    correct = seen = done = 0
    for idx in shuffled_batches(n, batch_size, seed):
        if done >= total or (should_stop is not None and should_stop()):
            break
        if max_seconds is not None and done and time.perf_counter() - t0 >= max_seconds:
            break
        ids, mask = encoder.encode(_select(texts, idx))
        y = labels[idx]
        res = trainer.train_step(ids, mask, y)
        loss_sum += res.loss * len(idx)
        correct += int((np.asarray(res.logits).argmax(axis=1) == y).sum())
        seen += len(idx)
        done += 1
        if progress is not None:
            progress(done, total, res.loss)
    seconds = time.perf_counter() - t0
    return TrainReport(loss_sum / max(seen, 1), correct / max(seen, 1), done, seen, seconds)


def evaluate(
    trainer: Trainer, encoder: TextEncoder, texts: Sequence[str], labels: np.ndarray, batch_size: int = 32
) -> TrainReport:
    """Mean loss and accuracy of the current parameters over every example (no update). On a device, pass the
    training batch size: a larger eval batch raises the process's peak above the training step's (ORT: +100 MB
    for 32 against 8 on MiniLM at seq 128)."""
    labels = np.asarray(labels)
    n = len(texts)
    if n == 0 or labels.shape != (n,):
        raise DataError(f"need as many labels as texts (>= 1), got {n} texts and labels {labels.shape}")
    t0 = time.perf_counter()
    loss_sum = 0.0
    correct = steps = 0
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(n, start + batch_size))
        ids, mask = encoder.encode(_select(texts, idx))
        res = trainer.eval_step(ids, mask, labels[idx])
        loss_sum += res.loss * len(idx)
        correct += int((np.asarray(res.logits).argmax(axis=1) == labels[idx]).sum())
        steps += 1
    return TrainReport(loss_sum / n, correct / n, steps, n, time.perf_counter() - t0)

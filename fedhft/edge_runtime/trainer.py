"""The interface every on-device training backend implements (ORT, ExecuTorch, native)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from fedhft.errors import FedHFTError

DEFAULT_TRAINER_TIMEOUT = 600.0  # seconds a backend's trainer subprocess may take per call (--trainer-timeout)


class BackendError(FedHFTError):
    """A training backend cannot load its artifacts or was given bad inputs."""


@dataclass(frozen=True)
class StepResult:
    loss: float
    logits: np.ndarray  # (batch, num_labels)


class Trainer(Protocol):
    """Load artifacts, step, and exchange trainable tensors by their manifest names."""

    def train_step(self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray) -> StepResult: ...

    def eval_step(self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray) -> StepResult: ...

    def get_parameters(self) -> dict[str, np.ndarray]: ...

    def set_parameters(self, params: dict[str, np.ndarray]) -> None: ...

    def save_state(self, path: Path) -> None: ...

    def load_state(self, path: Path) -> None: ...


def check_batch(
    input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray, max_seq_len: int, num_labels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate and convert one batch to the artifacts' dtypes (int64 ids and mask, int64 labels)."""
    ids = np.asarray(input_ids)
    mask = np.asarray(attention_mask)
    y = np.asarray(labels)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise BackendError(f"input_ids {ids.shape} and attention_mask {mask.shape} must be equal 2-D shapes")
    if ids.shape[1] > max_seq_len or ids.shape[1] < 1:
        raise BackendError(f"sequence length {ids.shape[1]} is outside 1..{max_seq_len} (manifest max_seq_len)")
    if y.shape != (ids.shape[0],):
        raise BackendError(f"labels shape {y.shape} does not match batch size {ids.shape[0]}")
    if y.size and (y.min() < 0 or y.max() >= num_labels):
        raise BackendError(f"labels must be in 0..{num_labels - 1}, got {int(y.min())}..{int(y.max())}")
    return ids.astype(np.int64), mask.astype(np.int64), y.astype(np.int64)

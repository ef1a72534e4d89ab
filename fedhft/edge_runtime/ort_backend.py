"""ONNX Runtime on-device training backend (torch-free).

`onnxruntime/training/__init__.py` imports `optim`, which imports torch. A device has no torch, so
`import_training_api()` registers `onnxruntime.training` as a bare package and imports only its `api`.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np

from fedhft.edge_runtime.trainer import BackendError, StepResult, check_batch
from fedhft.protocol.manifest import Manifest, ManifestError, load_manifest, verify_artifacts


def import_training_api() -> Any:
    """`onnxruntime.training.api` without executing `onnxruntime/training/__init__.py` (which needs torch)."""
    if "onnxruntime.training.api" in sys.modules:
        return sys.modules["onnxruntime.training.api"]
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendError("onnxruntime-training is not installed (pip install onnxruntime-training-cpu)") from e
    onnxruntime.set_default_logger_severity(3)
    if "onnxruntime.training" not in sys.modules:
        pkg_dir = Path(onnxruntime.__file__).parent / "training"
        if not (pkg_dir / "api").is_dir():
            raise BackendError(
                "this onnxruntime has no training API: install onnxruntime-training-cpu, "
                "not the plain onnxruntime package"
            )
        bare = types.ModuleType("onnxruntime.training")
        bare.__path__ = [str(pkg_dir)]
        sys.modules["onnxruntime.training"] = bare
    return importlib.import_module("onnxruntime.training.api")


# glibc frees a block back to the OS only above its trim threshold, and raises its mmap threshold (up to 32 MB)
# after each large free: ORT's per-step activation buffers then stay in the heap between steps. Fixed values
# keep large buffers mmapped and trim what is freed. With the session options below and the edge's eval at the
# training batch size: `edge run` 434 -> 228 MB (bench/edge_memory.py, MiniLM rpi4-4gb, batch 8, seq 128).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOC_THRESHOLD_BYTES = 1 << 20


def limit_malloc_retention() -> bool:
    """Set glibc's trim and mmap thresholds to fixed values (process-wide); False where libc is not glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(M_TRIM_THRESHOLD, MALLOC_THRESHOLD_BYTES) == 1
    return mallopt(M_MMAP_THRESHOLD, MALLOC_THRESHOLD_BYTES) == 1 and ok


def session_options(threads: int | None = None, arena: bool = False) -> Any:
    """ORT session options for a memory-bound device: no CPU arena and no memory-pattern planning unless
    `arena` (both keep the largest batch's buffers reserved for the session's life, in each of the training
    and eval sessions), no constant folding (it would turn every int8 weight into a resident fp32 copy at
    load time).

    Full fine-tuning keeps the arena: without it, onnxruntime-training 1.19.2 corrupts the heap in the first
    training step of a full fine-tuning export ("free(): corrupted unsorted chunks" / SIGSEGV). LoRA exports
    train without it and ran clean under glibc's heap checker (GLIBC_TUNABLES=glibc.malloc.check=3 with
    libc_malloc_debug preloaded; MiniLM at depths 2 and 6)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = arena
    opts.enable_mem_pattern = arena
    opts.add_session_config_entry("optimization.disable_specified_optimizers", "ConstantFolding")
    if threads:
        opts.intra_op_num_threads = threads
    return opts


class OrtTrainer:
    """Trains the ORT artifacts of one profile directory with AdamW."""

    def __init__(
        self,
        profile_dir: str | Path,
        manifest: Manifest | None = None,
        learning_rate: float = 1e-3,
        threads: int | None = None,
    ) -> None:
        self.dir = Path(profile_dir)
        self.manifest = manifest or load_manifest(self.dir)
        files = verify_artifacts(self.manifest, self.dir, "ort")
        api = import_training_api()
        limit_malloc_retention()
        self._opts = session_options(threads, arena=self.manifest.training == "full")
        try:
            self.state = api.CheckpointState.load_checkpoint(str(files["checkpoint"]))
            self._open(api, files)
        except Exception as e:  # ORT raises its own Fail/InvalidArgument types
            raise BackendError(f"{self.dir}: ONNX Runtime cannot load the training artifacts: {e}") from e
        self.optimizer.set_learning_rate(learning_rate)
        self._graph_of = {t.name: t.graph_name for t in self.manifest.trainable}
        names = self.checkpoint_names()
        missing = [g for g in self._graph_of.values() if g not in names]
        if missing:
            raise ManifestError(f"{self.dir}: the checkpoint lacks trainable tensors the manifest names: {missing[:3]}")

    def _open(self, api: Any, files: dict[str, Path]) -> None:
        """Training and eval sessions and the optimizer on `self.state`, with this trainer's session options."""
        self.module = api.Module(
            str(files["training_model"]),
            self.state,
            str(files["eval_model"]),
            device="cpu",
            session_options=self._opts,
        )
        self.optimizer = api.Optimizer(str(files["optimizer_model"]), self.module)

    def checkpoint_names(self) -> set[str]:
        """Names of every parameter in the loaded checkpoint."""
        return {name for name, _ in self.state.parameters}

    def _batch(self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
        return list(check_batch(input_ids, attention_mask, labels, self.manifest.max_seq_len, self.manifest.num_labels))

    def train_step(self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray) -> StepResult:
        batch = self._batch(input_ids, attention_mask, labels)
        self.module.train()
        loss, logits = self.module(*batch)
        self.optimizer.step()
        self.module.lazy_reset_grad()
        return StepResult(float(loss), np.asarray(logits))

    def eval_step(self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray) -> StepResult:
        batch = self._batch(input_ids, attention_mask, labels)
        self.module.eval()
        loss, logits = self.module(*batch)
        return StepResult(float(loss), np.asarray(logits))

    def set_learning_rate(self, lr: float) -> None:
        self.optimizer.set_learning_rate(lr)

    def get_parameters(self) -> dict[str, np.ndarray]:
        """Trainable tensors by manifest name (copies)."""
        params = self.state.parameters
        return {name: np.array(params[g].data, copy=True) for name, g in self._graph_of.items()}

    def set_parameters(self, values: dict[str, np.ndarray]) -> None:
        """Overwrite trainable tensors (by manifest name); shapes must match the manifest exactly."""
        spec = self.manifest.trainable_by_name()
        params = self.state.parameters
        for name, value in values.items():
            t = spec.get(name)
            if t is None:
                raise BackendError(f"unknown trainable tensor '{name}' (not in the manifest)")
            arr = np.ascontiguousarray(value, dtype=np.float32)
            if tuple(arr.shape) != tuple(t.shape):
                raise BackendError(f"tensor '{name}' has shape {arr.shape}, the manifest says {t.shape}")
            if not np.isfinite(arr).all():
                raise BackendError(f"tensor '{name}' has non-finite values")
            params[t.graph_name].data = arr

    def save_state(self, path: Path) -> None:
        """Write the checkpoint with optimizer state (AdamW moments, step) to `path`."""
        api = import_training_api()
        api.CheckpointState.save_checkpoint(self.state, str(path), include_optimizer_state=True)

    def load_state(self, path: Path) -> None:
        """Restore parameters and optimizer state written by `save_state`."""
        api = import_training_api()
        try:
            state = api.CheckpointState.load_checkpoint(str(path))
        except Exception as e:
            raise BackendError(f"{path}: not a readable ORT checkpoint: {e}") from e
        files = verify_artifacts(self.manifest, self.dir, "ort")
        lr = self.optimizer.get_learning_rate()
        self.state = state
        self._open(api, files)  # the same session options as at load (they were dropped here before)
        self.optimizer.set_learning_rate(lr)

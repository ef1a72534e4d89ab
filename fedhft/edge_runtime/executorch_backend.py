"""ExecuTorch on-device training through ExecuTorch's Python bindings (which link libtorch).

The joint forward+backward program returns [loss, logits, gradients..., parameters...]; the parameter
outputs alias the program's (writable) adapter memory, so the numpy AdamW (fedhft.edge_runtime.adamw, the
same math as ORT's AdamW) updates them in place. torch and executorch are imported lazily, inside methods:
importing this module is torch-free. A device without torch runs the native trainer instead
(fedhft.edge_runtime.native_backend), on the same artifacts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedhft.edge_runtime.adamw import AdamW, load_train_state, save_train_state
from fedhft.edge_runtime.trainer import BackendError, StepResult, check_batch
from fedhft.logs import quiet_fd2
from fedhft.protocol.manifest import Manifest, ManifestError, load_manifest, verify_artifacts
from fedhft.protocol.program_spec import ProgramSpec, load_program_spec, verify_program_files

FORMAT = "executorch"


def load_executorch_package(
    profile_dir: Path, manifest: Manifest | None
) -> tuple[Manifest, ProgramSpec, dict[str, Path]]:
    """Manifest, program spec and verified file paths ("program", "weights") of a profile's ExecuTorch export.

    Files are checked against the manifest's sha256 when it lists the format, and always against program.json;
    every trainable tensor the manifest names must be a program parameter of the same shape.
    """
    manifest = manifest or load_manifest(profile_dir)
    if FORMAT in manifest.artifacts:
        verify_artifacts(manifest, profile_dir, FORMAT)
    spec, spec_dir = load_program_spec(profile_dir)
    files = verify_program_files(spec, spec_dir)
    by_name = spec.by_name()
    for t in manifest.trainable:
        p = by_name.get(t.name)
        if p is None:
            raise ManifestError(f"{spec_dir}: the ExecuTorch program lacks trainable tensor '{t.name}'")
        if tuple(p.shape) != tuple(t.shape):
            raise ManifestError(f"{spec_dir}: program tensor '{t.name}' has shape {p.shape}, manifest {t.shape}")
    if len(by_name) != len(manifest.trainable):
        extra = sorted(set(by_name) - {t.name for t in manifest.trainable})
        raise ManifestError(f"{spec_dir}: the program trains tensors the manifest does not name: {extra[:3]}")
    if spec.num_labels != manifest.num_labels or spec.seq_bounds[1] != manifest.max_seq_len:
        raise ManifestError(f"{spec_dir}: program.json does not match the manifest (labels or max_seq_len)")
    return manifest, spec, files


def prepare_batch(
    spec: ProgramSpec,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    labels: np.ndarray,
    max_seq_len: int,
    any_batch: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate a batch and right-pad it to the program's minimum sequence length (padding is masked out,
    so losses and gradients are unchanged). `any_batch` skips the batch-size bound (for chunked eval)."""
    ids, mask, y = check_batch(input_ids, attention_mask, labels, max_seq_len, spec.num_labels)
    lo_b, hi_b = spec.batch_bounds
    if not lo_b <= ids.shape[0] <= hi_b and not (any_batch and ids.shape[0] >= 1):
        raise BackendError(
            f"batch size {ids.shape[0]} is outside the program's bounds {lo_b}..{hi_b} (its memory plan; "
            "train with smaller batches or re-export with a larger max batch)"
        )
    short = spec.seq_bounds[0] - ids.shape[1]
    if short > 0:
        ids = np.pad(ids, ((0, 0), (0, short)), constant_values=spec.pad_token_id)
        mask = np.pad(mask, ((0, 0), (0, short)), constant_values=0)
    return np.ascontiguousarray(ids), np.ascontiguousarray(mask), y


def chunked_eval(
    run: Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[float, np.ndarray]],
    ids: np.ndarray,
    mask: np.ndarray,
    y: np.ndarray,
    max_batch: int,
) -> StepResult:
    """Evaluate a batch of any size in chunks the program accepts: the mean loss over all rows, all logits."""
    losses, logits = [], []
    for i in range(0, ids.shape[0], max_batch):
        loss, lg = run(ids[i : i + max_batch], mask[i : i + max_batch], y[i : i + max_batch])
        losses.append(loss * lg.shape[0])
        logits.append(lg)
    return StepResult(float(sum(losses) / ids.shape[0]), np.concatenate(logits))


class ExecuTorchTrainer:
    """Trains a profile's ExecuTorch program with AdamW (same interface as OrtTrainer)."""

    def __init__(
        self,
        profile_dir: str | Path,
        manifest: Manifest | None = None,
        learning_rate: float = 1e-3,
        threads: int | None = None,
    ) -> None:
        self.dir = Path(profile_dir)
        self.manifest, self.spec, files = load_executorch_package(self.dir, manifest)
        try:
            import torch

            with quiet_fd2():  # the runtime's CPU probe prints on first load
                from executorch.extension.pybindings import portable_lib
                from executorch.extension.training import TrainingModule
        except ImportError as e:
            raise BackendError(
                "the ExecuTorch Python backend needs torch and executorch (pip install executorch==1.5.1); "
                "torch-free devices use the native trainer"
            ) from e
        self._torch = torch
        if threads:
            portable_lib._unsafe_reset_threadpool(int(threads))
        try:
            with quiet_fd2():
                # enable_etdump: with an event tracer attached a step costs ~half the CPU (measured, see
                # native/trainer.cpp); the trace is flushed to /dev/null after the warm-up, which ends it.
                program = portable_lib._load_for_executorch(
                    str(files["program"]), data_path=str(files["weights"]), enable_etdump=True
                )
                fqns = [str(x) for x in program.run_method(f"__et_training_fqn_{self.spec.method}", ())]
        except Exception as e:  # the bindings raise RuntimeError/ValueError for malformed programs
            raise BackendError(f"{files['program']}: ExecuTorch cannot load the program: {e}") from e
        expected = [p.program_name for p in self.spec.parameters]
        if fqns != expected:
            missing = sorted(set(expected) - set(fqns))
            raise BackendError(
                f"{files['program']}: the program's parameters do not match program.json (missing {missing[:3]})"
            )
        self.module = TrainingModule(program)
        self._names = [p.name for p in self.spec.parameters]
        self._shapes = {p.name: tuple(p.shape) for p in self.spec.parameters}
        self.optimizer = AdamW(dict(self._shapes), lr=learning_rate)
        self._params: dict[str, np.ndarray] = {}
        self._warm_up()

    # ---- running the program -----------------------------------------------------------------------------
    def _run(self, ids: np.ndarray, mask: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, Any]:
        torch = self._torch
        inputs = (torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(y))
        try:
            loss, logits = self.module.forward_backward(self.spec.method, inputs)[:2]
        except RuntimeError as e:
            raise BackendError(f"ExecuTorch step failed for input shape {ids.shape}: {e}") from e
        return float(loss), logits.numpy().copy(), self.module.named_gradients()

    def _warm_up(self) -> None:
        """Run the smallest batch once: the program only exposes its parameter tensors after a run."""
        b, s = self.spec.batch_bounds[0], self.spec.seq_bounds[0]
        ids = np.zeros((b, s), np.int64)
        self._run(ids, np.ones_like(ids), np.zeros(b, np.int64))
        self.module.model.write_etdump_result_to_file(os.devnull)  # stop recording: no growth per step
        named = self.module.named_parameters()
        prog = {p.program_name: p.name for p in self.spec.parameters}
        self._params = {prog[k]: v.detach().numpy() for k, v in named.items()}  # views of program memory
        for name, arr in self._params.items():
            if tuple(arr.shape) != self._shapes[name] or arr.dtype != np.float32:
                raise BackendError(
                    f"program parameter '{name}' is {arr.dtype}{arr.shape}, expected {self._shapes[name]}"
                )

    def _batch(self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, ...]:
        return prepare_batch(self.spec, input_ids, attention_mask, labels, self.manifest.max_seq_len)

    def train_step(self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray) -> StepResult:
        ids, mask, y = self._batch(input_ids, attention_mask, labels)
        loss, logits, grads = self._run(ids, mask, y)
        by_name = {p.name: grads[p.program_name].numpy() for p in self.spec.parameters}
        self.optimizer.apply(self._params, by_name)
        return StepResult(loss, logits)

    def eval_step(self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray) -> StepResult:
        """Loss and logits without an update, for any batch size (chunked). The program is joint: gradients
        are computed and dropped."""
        ids, mask, y = prepare_batch(
            self.spec, input_ids, attention_mask, labels, self.manifest.max_seq_len, any_batch=True
        )
        return chunked_eval(lambda a, b, c: self._run(a, b, c)[:2], ids, mask, y, self.spec.batch_bounds[1])

    def set_learning_rate(self, lr: float) -> None:
        self.optimizer.lr = float(lr)

    # ---- parameters and state ----------------------------------------------------------------------------
    def get_parameters(self) -> dict[str, np.ndarray]:
        """Trainable tensors by manifest name (copies)."""
        return {name: self._params[name].copy() for name in self._names}

    def set_parameters(self, values: dict[str, np.ndarray]) -> None:
        """Overwrite trainable tensors (by manifest name); shapes must match the manifest exactly."""
        checked = check_parameters(values, self._shapes)
        for name, arr in checked.items():
            self._params[name][...] = arr

    def save_state(self, path: Path) -> None:
        """Write parameters and AdamW state (moments, step) to `path` atomically (safetensors)."""
        save_train_state(
            Path(path), self._params, self.optimizer, {"program_sha256": self.spec.files["program"].sha256}
        )

    def load_state(self, path: Path) -> None:
        """Restore parameters and AdamW state written by `save_state` (the learning rate stays as set)."""
        params, m, v, step, _ = load_train_state(Path(path), self._shapes)
        for name in self._names:
            self._params[name][...] = params[name]
            self.optimizer.m[name][...] = m[name]
            self.optimizer.v[name][...] = v[name]
        self.optimizer.step = step


def check_parameters(values: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Validate tensors to set (known name, exact shape, finite); return float32 contiguous copies."""
    out: dict[str, np.ndarray] = {}
    for name, value in values.items():
        shape = shapes.get(name)
        if shape is None:
            raise BackendError(f"unknown trainable tensor '{name}' (not in the manifest)")
        arr = np.ascontiguousarray(value, dtype=np.float32)
        if tuple(arr.shape) != tuple(shape):
            raise BackendError(f"tensor '{name}' has shape {arr.shape}, the manifest says {shape}")
        if not np.isfinite(arr).all():
            raise BackendError(f"tensor '{name}' has non-finite values")
        out[name] = arr
    return out

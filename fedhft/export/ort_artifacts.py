"""Compile a training model into ONNX Runtime on-device training artifacts.

Pitfalls handled here (each verified on onnxruntime-training 1.19.2, see README):
- the legacy exporter in eval mode merges equal initializers (all-zero lora_B): export in TRAINING mode;
- ORT 1.19's gradient builder cannot take torch's one-output LayerNormalization: export at opset 14, where
  layer norm is decomposed into primitive ops;
- ORT 1.19 loads IR version <= 10: generated files are stamped down to IR 10.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch

from fedhft.export.model import SequenceClassifier, TrainableTensorInfo
from fedhft.export.ort_graph_passes import recompute_dequantized_weights

OPSET = 14
MAX_IR_VERSION = 10
ROLES = {
    "training_model": "training_model.onnx",
    "eval_model": "eval_model.onnx",
    "optimizer_model": "optimizer_model.onnx",
    "checkpoint": "checkpoint",
}
log = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Send native (fd 2) output to a temp file; replay it only if the block raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as buf:
        os.dup2(buf.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            buf.seek(0)
            sys.stderr.write(buf.read().decode(errors="replace")[-4000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def export_onnx(model: SequenceClassifier, path: Path, seq_len: int = 16) -> onnx.ModelProto:
    """Trace `model` to ONNX with dynamic batch and sequence axes, keeping every initializer distinct."""
    ids = torch.ones(2, seq_len, dtype=torch.long)
    mask = torch.ones(2, seq_len, dtype=torch.long)
    dyn = {0: "batch", 1: "seq"}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (ids, mask),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={"input_ids": dyn, "attention_mask": dyn, "logits": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
            training=torch.onnx.TrainingMode.TRAINING,
            do_constant_folding=False,
            export_params=True,
        )
    return onnx.load(str(path))


def clamp_ir_version(path: Path) -> None:
    m = onnx.load(str(path))
    if m.ir_version > MAX_IR_VERSION:
        m.ir_version = MAX_IR_VERSION
        onnx.save(m, str(path))


def generate_ort_artifacts(
    onnx_model: onnx.ModelProto,
    trainable: list[TrainableTensorInfo],
    out_dir: Path,
    recompute_dequant: bool = True,
) -> dict[str, Path]:
    """Write training/eval/optimizer models and the checkpoint into `out_dir`; return role -> path."""
    os.environ.setdefault("ORT_LOGGING_LEVEL", "3")
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    from onnxruntime.training import artifacts

    requires_grad = [t.graph_name for t in trainable]
    names = {i.name for i in onnx_model.graph.initializer}
    missing = [g for g in requires_grad if g not in names]
    if missing:
        raise RuntimeError(f"the exported graph lost trainable initializers: {missing[:3]}")
    frozen = sorted(names - set(requires_grad))
    out_dir.mkdir(parents=True, exist_ok=True)
    with quiet_native_stderr():  # ORT's graph builders log every transformer at info level to fd 2
        artifacts.generate_artifacts(
            onnx_model,
            requires_grad=requires_grad,
            frozen_params=frozen,
            loss=artifacts.LossType.CrossEntropyLoss,
            optimizer=artifacts.OptimType.AdamW,
            artifact_directory=str(out_dir),
            additional_output_names=["logits"],
        )
    paths = {role: out_dir / name for role, name in ROLES.items()}
    for role, p in paths.items():
        if not p.is_file():
            raise RuntimeError(f"ORT did not write the {role} artifact")
    if recompute_dequant:
        training = onnx.load(str(paths["training_model"]))
        n = recompute_dequantized_weights(training)
        if n:
            onnx.save(training, str(paths["training_model"]))
        log.info("recomputed dequantized weights in backward", extra={"fields": {"consumers": n}})
    for p in paths.values():
        if p.suffix == ".onnx":
            clamp_ir_version(p)
    return paths

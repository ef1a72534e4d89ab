"""`fedhft export`: plan, build, compile and describe one training package per device profile.

Each profile directory is built in a temporary sibling and renamed into place, so an interrupted or failed
export never leaves a half-written artifact directory behind.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedhft.device_profiles.model_shape import (
    MODULE_KINDS,
    PACKAGED_MODEL,
    PACKAGED_MODEL_HUB_ID,
    packaged_model_dir,
    read_model,
)
from fedhft.device_profiles.planner import (
    DEFAULT_MEMORY_CEILING,
    DEFAULT_MIN_COMPRESSION,
    DEFAULT_OBJECTIVE,
    DEFAULT_UPLOAD_WINDOW,
    LoraPlan,
    full_finetune_plan,
    full_finetune_refusal,
    plan_lora,
    planned_runtime,
)
from fedhft.device_profiles.profile import DeviceProfile
from fedhft.errors import FedHFTError
from fedhft.export.model import TrainableTensorInfo, build_training_model, load_encoder, weights_sha256
from fedhft.export.tokenizer import write_tokenizer
from fedhft.protocol.manifest import (
    SCHEMA_VERSION,
    AdaptableModule,
    ArtifactFile,
    Manifest,
    TrainableTensor,
    sha256_file,
    write_manifest,
)
from fedhft.protocol.tensor_names import HEAD_BIAS, HEAD_WEIGHT

FORMATS = ("ort", "executorch")
log = logging.getLogger(__name__)


class ExportError(FedHFTError):
    """The export cannot proceed."""


@dataclass(frozen=True)
class ExportOptions:
    num_labels: int = 2
    max_seq_len: int = 128
    int8: bool = True
    seed: int = 0
    max_rank: int = 16
    lora_alpha: float = 16.0
    fixed_depth: int | None = None  # `fedhft export --depth`: force one depth for every profile
    upload_window: float | None = DEFAULT_UPLOAD_WINDOW  # seconds of the device's uplink its adapter may take
    min_compression: float | None = DEFAULT_MIN_COMPRESSION  # optional cap: full model bytes / this
    objective: str = DEFAULT_OBJECTIVE  # what the planner optimizes: "capacity" or "memory" (planner.OBJECTIVES)
    recompute: str | None = None  # what ExecuTorch backward recomputes (planner.RECOMPUTE_MODES; None: planner's)
    memory_ceiling: float | None = DEFAULT_MEMORY_CEILING  # capacity plans: share of full fine-tuning's peak


@dataclass(frozen=True)
class ExportResult:
    profile: str
    directory: Path
    plan: LoraPlan
    artifact_bytes: dict[str, int]
    seconds: float


def _global_adapter(num_layers: int, dims: Callable[[str], tuple[int, int]], max_rank: int) -> list[AdaptableModule]:
    return [
        AdaptableModule(f"layers.{i}.{k}", i, k, dims(k)[0], dims(k)[1], max_rank)
        for i in range(num_layers)
        for k in MODULE_KINDS
    ]


def _trainable(infos: list[TrainableTensorInfo]) -> list[TrainableTensor]:
    return [TrainableTensor(i.name, i.graph_name, tuple(i.shape), i.module, i.factor, i.rank) for i in infos]


def _check_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".fedhft-probe-", delete=True)
        probe.close()
    except OSError as e:
        raise ExportError(f"output directory {out} is not writable: {e.strerror or e}") from e


def _install(tmp: Path, final: Path) -> None:
    """Swap `tmp` into `final` (replacing an earlier export of the same profile)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{int(time.time() * 1e6)}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_profile(
    model: str | Path | None,
    profile: DeviceProfile,
    out: Path,
    formats: tuple[str, ...] = ("ort",),
    opts: ExportOptions | None = None,
    *,
    plan: LoraPlan | None = None,
    full_finetune: bool = False,
    name: str | None = None,
) -> ExportResult:
    """Export one profile's training package into `out/<name or profile>`.

    `plan` replaces the planner's choice (baselines, benchmarks). `full_finetune` trains every weight in fp32
    (plan["training"] = "full", `plan` ignored) and raises ExportError when the planner's memory estimate of
    full fine-tuning exceeds the profile's budget (such a device cannot take part in fedavg-full).
    """
    from fedhft.export.ort_artifacts import export_onnx, generate_ort_artifacts

    opts = opts or ExportOptions()
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ExportError(f"unknown export format(s) {bad}; choose from {list(FORMATS)}")
    if opts.num_labels < 2:
        raise ExportError(f"--num-labels must be >= 2, got {opts.num_labels}")
    t0 = time.perf_counter()
    spec = read_model(model)
    model_dir = spec.directory
    shape = spec.shape(opts.num_labels, opts.max_seq_len, profile.batch_size)
    _check_out_dir(out)
    runtime = planned_runtime(profile)
    if full_finetune:
        plan = full_finetune_plan(shape, profile, runtime=runtime, max_rank=opts.max_rank, lora_alpha=opts.lora_alpha)
        refusal = full_finetune_refusal(plan, profile)
        if refusal:
            raise ExportError(refusal)
    elif plan is None:
        plan = plan_lora(
            shape,
            profile,
            max_rank=opts.max_rank,
            int8=opts.int8,
            runtime=runtime,
            lora_alpha=opts.lora_alpha,
            fixed_depth=opts.fixed_depth,
            upload_window=opts.upload_window,
            min_compression=opts.min_compression,
            objective=opts.objective,
            recompute=opts.recompute,
            memory_ceiling=opts.memory_ceiling,
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".{profile.name}.tmp-", dir=out))
    try:
        tokenizer = write_tokenizer(spec, tmp)  # first: a model without a usable tokenizer fails fast
        encoder = load_encoder(model_dir)
        model_t, infos = build_training_model(
            encoder, plan, opts.num_labels, int8=opts.int8, seed=opts.seed, full_finetune=full_finetune
        )
        artifacts: dict[str, dict[str, ArtifactFile]] = {}
        if "ort" in formats:
            ort_dir = tmp / "ort"
            ort_dir.mkdir()
            onnx_path = tmp / "model.onnx"
            onnx_model = export_onnx(model_t, onnx_path)
            paths = generate_ort_artifacts(onnx_model, infos, ort_dir)
            onnx_path.unlink()
            artifacts["ort"] = {
                role: ArtifactFile(str(p.relative_to(tmp)), sha256_file(p), p.stat().st_size)
                for role, p in paths.items()
            }
        if "executorch" in formats:
            from fedhft.export.executorch_export import export_executorch

            et = export_executorch(
                model_t,
                infos,
                tmp / "executorch",
                max_batch=max(profile.batch_size, 1),
                max_seq_len=opts.max_seq_len,
                pad_token_id=spec.pad_token_id,
                recompute=plan.recompute,
            )
            artifacts["executorch"] = {
                role: ArtifactFile(str(p.relative_to(tmp)), sha256_file(p), p.stat().st_size)
                for role, p in et.files.items()
            }
        packaged = model_dir == packaged_model_dir()
        base_name = PACKAGED_MODEL if packaged else model_dir.name
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            base_model=base_name,
            base_model_sha256=weights_sha256(model_dir),
            profile=profile.to_dict(),
            plan=dict(plan.to_dict(), training="full") if full_finetune else plan.to_dict(),
            num_labels=opts.num_labels,
            max_seq_len=opts.max_seq_len,
            tokenizer=tokenizer,
            inputs=["input_ids", "attention_mask", "labels"],
            outputs=["loss", "logits"],
            quantization={
                "base": "int8" if opts.int8 and not full_finetune else "fp32",
                "linear": "symmetric int8, one fp32 scale per output channel",
                "word_embeddings": "symmetric int8, one fp32 scale per token row (dequantized on gather)",
                "other": "fp32 (position/type embeddings, biases, layer norms)",
            },
            lora={
                "alpha": opts.lora_alpha,
                "scaling": "alpha / rank",
                "mask_ratio": plan.mask_ratio,
                "mask": "upload the rows of dW = B·A with the largest L2 norms",
            },
            trainable=_trainable(infos),
            global_adapter=_global_adapter(shape.num_layers, shape.module_dims, opts.max_rank),
            head_shapes={
                HEAD_WEIGHT: (opts.num_labels, shape.hidden_size),
                HEAD_BIAS: (opts.num_labels,),
            },
            artifacts=artifacts,
            extra={
                "seed": opts.seed,
                "exported_at": time.time(),
                "model_dir": str(model_dir),  # what a saved peft adapter names as its base (with the hub id)
                "model_type": spec.model_type,
                **({"hub_id": PACKAGED_MODEL_HUB_ID} if packaged else {}),
            },
        )
        manifest.validate("export")
        write_manifest(manifest, tmp)
        final = out / (name or profile.name)
        tmp.chmod(0o755)
        _install(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sizes = {fmt: sum(a.bytes for a in files.values()) for fmt, files in artifacts.items()}
    return ExportResult(name or profile.name, final, plan, sizes, time.perf_counter() - t0)

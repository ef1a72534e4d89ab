"""Compile a masked-LoRA training model into an ExecuTorch joint forward+backward program.

Path (executorch 1.5.1 / torch 2.13): frozen linears are re-stored transposed (no per-step transposed copies)
-> torch.export with bounded dynamic batch and sequence dims -> `_export_forward_backward` (loss is output 0)
-> every `addmm(bias, x, w)` rewritten into `add(mm(x, w), bias)` (ExecuTorch's addmm kernel is ~5x slower)
-> `to_edge` -> GEMMs, transposes, GELU, softmax and elementwise add/mul delegated to XNNPACK (multi-threaded;
an mm's operands stay runtime inputs, so LoRA factors keep training) -> `to_executorch` with
`external_mutable_weights=True`: the trainable tensors live in their own `.ptd` file (the adapter), loaded
into writable memory; the frozen (int8) base stays inside the `.pte`.

Files, in `out_dir` (normally `<profile>/executorch/`): `train.pte`, `adapter.ptd`, `program.json`
(see fedhft.protocol.program_spec).
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from fedhft.device_profiles.planner import RECOMPUTE_MODES
from fedhft.errors import FedHFTError
from fedhft.export.layers import FrozenLinear
from fedhft.export.model import SequenceClassifier, TrainableTensorInfo, encoder_layers
from fedhft.export.recompute import mark_layer_inputs, recompute_activations
from fedhft.logs import event, quiet_fd2
from fedhft.protocol.program_spec import SPEC_NAME

METHOD = "forward"
PROGRAM_FILE = "train.pte"
WEIGHTS_FILE = "adapter.ptd"
MIN_SEQ = 8
PREFIX = "model."  # the wrapper's attribute holding the classifier: program names are PREFIX + graph_name
# Ops delegated to XNNPACK by default: with them a MiniLM step runs ~5x faster than on the portable and
# optimized kernels alone (single-threaded Eigen GEMMs, materialized transposes); see bench/backends.py.
XNNPACK_OPS = ("mm", "bmm", "permute", "gelu", "softmax", "add", "mul")
log = logging.getLogger(__name__)


# Ops XNNPACK may take -> (module under executorch.backends.xnnpack.partition.config, config class).
_XNNPACK_CONFIGS: dict[str, tuple[str, str]] = {
    "mm": ("gemm_configs", "MMConfig"),
    "bmm": ("generic_node_configs", "BMMConfig"),
    "gelu": ("generic_node_configs", "GeluConfig"),
    "softmax": ("generic_node_configs", "SoftmaxConfig"),
    "permute": ("generic_node_configs", "PermuteConfig"),
    "add": ("generic_node_configs", "AddConfig"),
    "mul": ("generic_node_configs", "MulConfig"),
}


class ExecuTorchExportError(FedHFTError):
    """The model cannot be compiled into an ExecuTorch training program."""


@dataclass(frozen=True)
class ExecuTorchArtifacts:
    """What `export_executorch` wrote: role -> path ("program", "weights", "spec"), the program's parameter
    names mapped to manifest names (in program order) and the accepted input bounds."""

    files: dict[str, Path]
    parameter_names: dict[str, str]
    batch_bounds: tuple[int, int]
    seq_bounds: tuple[int, int]


class TransposedFrozenLinear(nn.Module):
    """A FrozenLinear whose weight is stored transposed (in, out): `x @ W^T` becomes a plain mm, so the
    program does not materialize a transposed (dequantized) copy of every base weight in every step."""

    def __init__(self, frozen: FrozenLinear) -> None:
        super().__init__()
        self.in_features = frozen.in_features
        self.out_features = frozen.out_features
        self.int8 = frozen.int8
        if frozen.int8:
            self.register_buffer("weight_qt", frozen.weight_q.t().contiguous())
            self.register_buffer("weight_scale", frozen.weight_scale.detach().clone().reshape(1, -1))
        else:
            self.register_buffer("weight_t", frozen.weight.t().contiguous())
        self.register_buffer("bias", None if frozen.bias is None else frozen.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wt = self.weight_qt.to(torch.float32) * self.weight_scale if self.int8 else self.weight_t
        y = torch.matmul(x, wt)
        return y if self.bias is None else y + self.bias


def transpose_frozen_linears(model: nn.Module) -> int:
    """Replace every FrozenLinear in `model` (in place) by a TransposedFrozenLinear; return how many.

    A FrozenLinear shared by several parents (ALBERT's layers) gets one shared replacement.
    """
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, FrozenLinear)
    ]
    done: dict[int, TransposedFrozenLinear] = {}
    for parent, name, child in swaps:
        if id(child) not in done:
            done[id(child)] = TransposedFrozenLinear(child)
        setattr(parent, name, done[id(child)])
    return len(done)


class TrainingGraph(nn.Module):
    """(input_ids, attention_mask, labels) -> (mean cross-entropy loss, logits): the loss must be output 0."""

    def __init__(self, model: SequenceClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(input_ids, attention_mask)
        return F.cross_entropy(logits, labels), logits.detach()


def split_addmm(gm: torch.fx.GraphModule) -> int:
    """Rewrite `addmm(bias, x, w)` (beta = alpha = 1) into `add(mm(x, w), bias)`; return how many."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.addmm.default:
            continue
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            continue
        bias, x, w = node.args[:3]
        with gm.graph.inserting_before(node):
            mm = gm.graph.call_function(torch.ops.aten.mm.default, (x, w))
            add = gm.graph.call_function(torch.ops.aten.add.Tensor, (mm, bias))
        mm.meta = dict(node.meta)
        add.meta = dict(node.meta)
        if "val" in node.meta:  # mm has no bias broadcast: same shape as the addmm output
            mm.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(add)
        gm.graph.erase_node(node)
        count += 1
    gm.graph.lint()
    gm.recompile()
    return count


def sink_constant_ops(gm: torch.fx.GraphModule) -> int:
    """Move every op that reads only graph inputs and constants (or such ops) to just before its first user;
    return how many moved. Lowering to XNNPACK reorders the graph and hoists the fp32 casts of all int8 weights
    to its start, where the memory planner keeps them all alive at once."""
    const: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            const.add(node)
        elif node.op == "call_function" and node.all_input_nodes and all(a in const for a in node.all_input_nodes):
            const.add(node)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    moved = 0
    for node in reversed(list(gm.graph.nodes)):
        if node.op != "call_function" or node not in const or not node.users:
            continue
        first = min(node.users, key=lambda u: order[u])
        if first is not node.next:
            first.prepend(node)
            moved += 1
            order[node] = (order[node.prev] + order[first]) / 2  # exact between its new neighbours
    gm.graph.lint()
    gm.recompile()
    return moved


def _bounds(max_batch: int, max_seq_len: int) -> tuple[tuple[int, int], tuple[int, int]]:
    if max_batch < 1:
        raise ExecuTorchExportError(f"max_batch must be >= 1, got {max_batch}")
    if max_seq_len < 2:
        raise ExecuTorchExportError(f"max_seq_len must be >= 2 for an ExecuTorch program, got {max_seq_len}")
    return (1, max_batch), (min(MIN_SEQ, max_seq_len), max_seq_len)


def _dynamic_shapes(
    batch: tuple[int, int], seq: tuple[int, int]
) -> tuple[tuple[int, int], tuple[dict[int, object], ...]]:
    """Example (batch, seq) and the dynamic_shapes spec; a dim whose bounds are equal stays static."""
    from torch.export import Dim

    ex_b = 2 if batch[1] >= 2 else 1
    ex_s = seq[1]
    bd = Dim("batch", min=batch[0], max=batch[1]) if batch[1] > batch[0] else None
    sd = Dim("seq", min=seq[0], max=seq[1]) if seq[1] > seq[0] else None
    two: dict[int, object] = {}
    if bd is not None:
        two[0] = bd
    if sd is not None:
        two[1] = sd
    return (ex_b, ex_s), (two, dict(two), {0: bd} if bd is not None else {})


def export_executorch(
    model: SequenceClassifier,
    infos: list[TrainableTensorInfo],
    out_dir: Path,
    *,
    max_batch: int = 16,
    max_seq_len: int,
    pad_token_id: int = 0,
    xnnpack: tuple[str, ...] = XNNPACK_OPS,
    transpose_weights: bool = True,
    recompute: str = "none",
) -> ExecuTorchArtifacts:
    """Write `train.pte`, `adapter.ptd` and `program.json` into `out_dir` for `model` (built by
    `build_training_model`; not modified); `infos` names the trainable tensors (manifest name <-> graph name).

    `xnnpack` names the ops delegated to XNNPACK; `()` keeps everything on ExecuTorch's portable/optimized
    kernels (about 5x slower on MiniLM). `transpose_weights` stores frozen linear weights transposed.
    `recompute` (planner.RECOMPUTE_MODES): what backward recomputes instead of keeping (fedhft.export.recompute).
    The three files are written into a temporary sibling and renamed into place together.
    """
    batch_b, seq_b = _bounds(max_batch, max_seq_len)
    if recompute not in RECOMPUTE_MODES:
        raise ExecuTorchExportError(f"recompute {recompute!r} is not one of {', '.join(RECOMPUTE_MODES)}")
    graph_to_name = {i.graph_name: i.name for i in infos}
    shapes = {i.name: tuple(i.shape) for i in infos}
    unknown_ops = sorted(set(xnnpack) - set(_XNNPACK_CONFIGS))
    if unknown_ops:
        raise ExecuTorchExportError(
            f"cannot delegate {unknown_ops} to XNNPACK (choose from {sorted(_XNNPACK_CONFIGS)})"
        )
    wrapper = TrainingGraph(copy.deepcopy(model)).eval()
    n_transposed = transpose_frozen_linears(wrapper) if transpose_weights else 0
    trainable = {n for n, p in wrapper.named_parameters() if p.requires_grad}
    expected = {PREFIX + g for g in graph_to_name}
    if trainable != expected:
        raise ExecuTorchExportError(
            f"trainable parameters {sorted(trainable ^ expected)[:3]} do not match the trainable-tensor list"
        )
    (ex_b, ex_s), dyn = _dynamic_shapes(batch_b, seq_b)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (ex_b, ex_s), generator=gen)
    example = (ids, torch.ones_like(ids), torch.zeros(ex_b, dtype=torch.long))
    try:
        program, n_split, n_clones = _compile(wrapper, example, dyn, xnnpack, recompute)
    except ExecuTorchExportError:
        raise
    except Exception as e:  # torch.export / exir raise many types; name the stage in one line
        raise ExecuTorchExportError(f"ExecuTorch export failed: {type(e).__name__}: {str(e)[:300]}") from e
    passes = [f"addmm->add(mm) x{n_split}", f"transposed frozen linears x{n_transposed}"]
    passes += [f"recompute {recompute} x{n_clones}"] if recompute != "none" else []
    passes += [f"xnnpack: {','.join(xnnpack)}"] if xnnpack else []
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        pte, ptd = tmp / PROGRAM_FILE, tmp / WEIGHTS_FILE
        pte.write_bytes(program.buffer)
        _write_weights(program, ptd)
        order = _program_parameter_order(pte, ptd)
        unknown = [n for n in order if not n.startswith(PREFIX) or n[len(PREFIX) :] not in graph_to_name]
        if unknown or len(order) != len(graph_to_name):
            raise ExecuTorchExportError(f"the program's parameters {order[:3]}… do not match the trainable tensors")
        names = {fqn: graph_to_name[fqn[len(PREFIX) :]] for fqn in order}
        _write_spec(tmp, pte, ptd, names, shapes, batch_b, seq_b, pad_token_id, model, passes)
        tmp.chmod(0o755)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = {
        "program": out_dir / PROGRAM_FILE,
        "weights": out_dir / WEIGHTS_FILE,
        "spec": out_dir / SPEC_NAME,
    }
    event(log, "executorch exported", pte_bytes=files["program"].stat().st_size, passes=";".join(passes))
    return ExecuTorchArtifacts(files, names, batch_b, seq_b)


def _replace_dir(tmp: Path, final: Path) -> None:
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _xnnpack_partitioner(ops: tuple[str, ...]) -> object:
    import importlib

    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    base = "executorch.backends.xnnpack.partition.config"
    configs = [getattr(importlib.import_module(f"{base}.{m}"), c) for m, c in (_XNNPACK_CONFIGS[op] for op in ops)]
    # force_non_static_weights_for_f32_linear: an mm's right operand stays a runtime input of the delegate
    # instead of being packed into it as a constant (a packed LoRA factor would silently stop training).
    # Neighbouring ops share a delegate (per_op_mode=False): 2.4x faster to export than one node each, and
    # the same step time.
    return XnnpackPartitioner(configs=configs, per_op_mode=False, force_non_static_weights_for_f32_linear=True)


def _compile(
    wrapper: TrainingGraph,
    example: tuple[torch.Tensor, ...],
    dyn: tuple[dict[int, object], ...],
    xnnpack: tuple[str, ...],
    recompute: str = "none",
) -> tuple[object, int, int]:
    """torch.export -> joint graph (-> recomputation) -> addmm split -> edge (-> XNNPACK) -> ExecuTorch program;
    returns it with the number of addmm splits and of recomputed values."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge
    from torch.export.experimental import _export_forward_backward

    layers = encoder_layers(wrapper.model.encoder) if recompute != "none" else []
    with mark_layer_inputs(layers):
        ep = torch.export.export(wrapper, example, dynamic_shapes=dyn, strict=False)
    ep = _export_forward_backward(ep, joint_loss_index=0)
    n_clones = 0
    if recompute != "none":
        kinds = ("LOSS_OUTPUT", "USER_OUTPUT")
        names = {s.arg.name for s in ep.graph_signature.output_specs if s.kind.name in kinds}
        outputs = [n for n in ep.graph_module.graph.nodes if n.name in names]
        n_clones = recompute_activations(ep.graph_module, outputs, keep_matmuls=recompute == "selective")
    n_split = split_addmm(ep.graph_module)
    edge = to_edge(ep, compile_config=EdgeCompileConfig(_check_ir_validity=False))
    if xnnpack:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("executorch.backends.xnnpack.partition.xnnpack_partitioner").setLevel(logging.ERROR)
            edge = edge.to_backend(_xnnpack_partitioner(xnnpack))
    if recompute != "none":  # without recomputation the memory planner packed the unsunk order tighter (one run)
        sink_constant_ops(edge.exported_program().graph_module)
    return edge.to_executorch(ExecutorchBackendConfig(external_mutable_weights=True)), n_split, n_clones


def _write_weights(program: object, dest: Path) -> None:
    """The program's external tensor data (exactly one .ptd: the trainable weights) to `dest`."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        program.write_tensor_data_to_file(tmp)  # type: ignore[attr-defined]
        files = sorted(Path(tmp).glob("*.ptd"))
        if len(files) != 1:
            raise ExecuTorchExportError(f"expected one external weights file, ExecuTorch wrote {len(files)}")
        shutil.move(str(files[0]), dest)


def _program_parameter_order(pte: Path, ptd: Path) -> list[str]:
    """Load the written program with the ExecuTorch runtime and ask it for its parameter names (in order)."""
    with quiet_fd2():  # the runtime's CPU probe prints on first load
        from executorch.extension.pybindings.portable_lib import _load_for_executorch

        module = _load_for_executorch(str(pte), data_path=str(ptd))
    return [str(x) for x in module.run_method(f"__et_training_fqn_{METHOD}", ())]


def _write_spec(
    out_dir: Path,
    pte: Path,
    ptd: Path,
    names: dict[str, str],
    shapes: dict[str, tuple[int, ...]],
    batch_b: tuple[int, int],
    seq_b: tuple[int, int],
    pad_token_id: int,
    model: SequenceClassifier,
    passes: list[str],
) -> Path:
    import executorch.version

    from fedhft.protocol.manifest import sha256_file
    from fedhft.protocol.program_spec import (
        ProgramFile,
        ProgramParameter,
        ProgramSpec,
        write_program_spec,
    )

    spec = ProgramSpec(
        method=METHOD,
        inputs=["input_ids", "attention_mask", "labels"],
        outputs=["loss", "logits"],
        batch_bounds=batch_b,
        seq_bounds=seq_b,
        pad_token_id=pad_token_id,
        num_labels=int(model.head.out_features),
        files={
            role: ProgramFile(p.name, sha256_file(p), p.stat().st_size)
            for role, p in (("program", pte), ("weights", ptd))
        },
        parameters=[ProgramParameter(n, fqn, shapes[n]) for fqn, n in names.items()],
        exporter={
            "executorch": executorch.version.__version__,
            "torch": torch.__version__,
            "graph_passes": passes,
            "external_mutable_weights": True,
        },
    )
    return write_program_spec(spec, out_dir)


def export_executorch_for_profile(
    profile_dir: Path, model_dir: Path, *, max_batch: int | None = None, int8: bool | None = None
) -> ExecuTorchArtifacts:
    """Add ExecuTorch artifacts to a profile directory that `export_profile` wrote (any format): rebuild the
    identical model from the manifest's plan, seed and quantization; export it into `<profile>/executorch`.

    `max_batch` defaults to the profile's batch size: the memory plan is sized for the largest batch (on
    MiniLM, seq 128: ~115 MB of arenas for batch 8, ~230 MB for 16).
    """
    from fedhft.device_profiles.planner import LoraPlan
    from fedhft.export.model import build_training_model, load_encoder
    from fedhft.protocol.manifest import load_manifest

    m = load_manifest(profile_dir)
    if any(t.factor == "full" for t in m.trainable):
        raise ExecuTorchExportError("full fine-tuning packages are not exported for ExecuTorch")
    q8 = m.quantization.get("base") == "int8" if int8 is None else int8
    encoder = load_encoder(Path(model_dir))
    plan = LoraPlan.from_dict(m.plan)
    model, infos = build_training_model(encoder, plan, m.num_labels, int8=q8, seed=int(m.extra.get("seed", 0)))
    names = [i.name for i in infos]
    if sorted(names) != sorted(t.name for t in m.trainable):
        raise ExecuTorchExportError(f"{profile_dir}: rebuilt model's trainable tensors differ from the manifest")
    pad = int(getattr(encoder.config, "pad_token_id", 0) or 0)
    return export_executorch(
        model,
        infos,
        Path(profile_dir) / "executorch",
        max_batch=max_batch or int(m.profile.get("batch_size", 16)),
        max_seq_len=m.max_seq_len,
        pad_token_id=pad,
        recompute=plan.recompute,
    )

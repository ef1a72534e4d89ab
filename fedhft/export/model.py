"""Load a Hugging Face encoder from a local directory and turn it into a masked-LoRA training model."""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedhft.device_profiles.model_shape import FAMILIES, ModelLoadError, first_line, read_model, weight_files
from fedhft.device_profiles.planner import LoraPlan
from fedhft.export.layers import FrozenEmbedding, FrozenLinear, LoraLinear

# Where each canonical module kind sits inside one encoder layer, per module layout (model_shape.FAMILIES).
MODULE_PATHS: dict[str, dict[str, str]] = {
    "bert": {
        "query": "attention.self.query",
        "key": "attention.self.key",
        "value": "attention.self.value",
        "attn_out": "attention.output.dense",
        "ffn_in": "intermediate.dense",
        "ffn_out": "output.dense",
    },
    "distilbert": {
        "query": "attention.q_lin",
        "key": "attention.k_lin",
        "value": "attention.v_lin",
        "attn_out": "attention.out_lin",
        "ffn_in": "ffn.lin1",
        "ffn_out": "ffn.lin2",
    },
    "albert": {
        "query": "attention.query",
        "key": "attention.key",
        "value": "attention.value",
        "attn_out": "attention.dense",
        "ffn_in": "ffn",
        "ffn_out": "ffn_output",
    },
}


def weights_sha256(model_dir: Path) -> str:
    """sha256 of the checkpoint: its one weights file, or its shards read one after another in name order."""
    h = hashlib.sha256()
    for path in weight_files(model_dir):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_encoder(model_dir: Path) -> nn.Module:
    """The encoder with dropout off (deterministic steps, identical across runtimes) and eager attention.

    Refuses what `read_model` refuses, so export supports exactly what `fedhft plan` plans for.
    """
    read_model(model_dir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # transformers raises many types for a bad config
        raise ModelLoadError(f"cannot read {model_dir}/config.json: {first_line(e)}") from e
    for key, value in config.to_dict().items():
        if "dropout" in key and isinstance(value, float):  # e.g. hidden_dropout_prob; DistilBERT's dropout
            setattr(config, key, 0.0)
    try:
        encoder = AutoModel.from_pretrained(
            model_dir, config=config, local_files_only=True, attn_implementation="eager"
        )
    except Exception as e:
        raise ModelLoadError(f"cannot load weights from {model_dir}: {first_line(e)}") from e
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None  # fedhft classifies from mean-pooled tokens; the pooler is dead weight
    encoder.eval()
    return encoder


class SequenceClassifier(nn.Module):
    """Encoder + masked mean pooling + linear head; returns logits (ORT adds the loss)."""

    def __init__(self, encoder: nn.Module, num_labels: int, generator: torch.Generator) -> None:
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.head = nn.Linear(hidden, num_labels)
        with torch.no_grad():
            self.head.weight.normal_(0.0, 0.02, generator=generator)
            self.head.bias.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
        return self.head(pooled)


@dataclass(frozen=True)
class TrainableTensorInfo:
    """A trainable tensor: its manifest name, its name in the torch module (= ONNX initializer name)."""

    name: str
    graph_name: str
    shape: tuple[int, ...]
    module: str | None  # global module name (None for the head)
    factor: str  # "A" | "B" | "head" | "full"
    rank: int


def _freeze_linears(root: nn.Module, int8: bool) -> None:
    """Replace every nn.Linear under `root` by a FrozenLinear (int8 or fp32) of the same weights."""
    for module in list(root.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, FrozenLinear(child, int8=int8))


def _unshare_albert_layers(encoder: nn.Module) -> None:
    """ALBERT runs one shared layer per group at every depth. Give each depth its own module tree over the same
    frozen linear weights (stored once in the exported graph), so each depth can carry its own LoRA adapter."""
    c = encoder.config
    groups = encoder.encoder.albert_layer_groups
    if len(groups) == c.num_hidden_layers:
        return
    per_group = c.num_hidden_layers / c.num_hidden_groups
    # Only the frozen linears are shared; layer norms are copied, because ORT's gradient builder names
    # gradients after their tensor and fails on one tensor feeding two layer norms.
    memo: dict[int, object] = {id(m): m for g in groups for m in g.modules() if isinstance(m, FrozenLinear)}
    memo[id(c)] = c
    encoder.encoder.albert_layer_groups = nn.ModuleList(
        copy.deepcopy(groups[int(i / per_group)], dict(memo)) for i in range(c.num_hidden_layers)
    )
    c.num_hidden_groups = c.num_hidden_layers


def encoder_layers(encoder: nn.Module, layout: str | None = None) -> list[nn.Module]:
    """The encoder's layers in order, one module per depth (ALBERT's shared layers are unshared first); the
    layout defaults to the encoder's family's."""
    layout = layout or FAMILIES[encoder.config.model_type].layout
    if layout == "distilbert":
        return list(encoder.transformer.layer)
    if layout == "albert":
        _unshare_albert_layers(encoder)
        return [group.albert_layers[0] for group in encoder.encoder.albert_layer_groups]
    return list(encoder.encoder.layer)


def build_training_model(
    encoder: nn.Module,
    plan: LoraPlan | None,
    num_labels: int,
    *,
    int8: bool,
    seed: int = 0,
    full_finetune: bool = False,
) -> tuple[SequenceClassifier, list[TrainableTensorInfo]]:
    """Freeze (and int8-quantize) the base, inject LoRA per `plan`, add the head.

    `full_finetune=True` keeps every weight fp32 and trainable (the fedavg-full baseline and the memory
    reference); `plan` is then ignored.
    """
    gen = torch.Generator().manual_seed(seed)
    model = SequenceClassifier(encoder, num_labels, gen)
    if full_finetune:
        for p in model.parameters():
            p.requires_grad_(True)
        infos = [TrainableTensorInfo(n, n, tuple(p.shape), None, "full", 0) for n, p in model.named_parameters()]
        return model, infos
    assert plan is not None
    layout = FAMILIES[encoder.config.model_type].layout
    emb = encoder.embeddings
    emb.word_embeddings = FrozenEmbedding(emb.word_embeddings, int8=int8)
    _freeze_linears(encoder, int8)
    adapted = {(lp.layer, k): lp.rank for lp in plan.layers for k in lp.targets}
    loras: list[tuple[str, LoraLinear]] = []
    for li, layer in enumerate(encoder_layers(encoder, layout)):
        for kind, path in MODULE_PATHS[layout].items():
            rank = adapted.get((li, kind))
            if rank is None:
                continue
            parent_path, _, attr = path.rpartition(".")
            parent = layer.get_submodule(parent_path)
            lora = LoraLinear(getattr(parent, attr), rank, plan.lora_alpha, gen)
            setattr(parent, attr, lora)
            loras.append((f"layers.{li}.{kind}", lora))
    graph_name = {id(p): n for n, p in model.named_parameters()}
    infos: list[TrainableTensorInfo] = []
    for module, lora in loras:
        a, b = lora.lora_A, lora.lora_B
        infos.append(TrainableTensorInfo(f"{module}.lora_A", graph_name[id(a)], tuple(a.shape), module, "A", lora.rank))
        infos.append(TrainableTensorInfo(f"{module}.lora_B", graph_name[id(b)], tuple(b.shape), module, "B", lora.rank))
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    for name, p in model.head.named_parameters():
        p.requires_grad_(True)
        infos.append(TrainableTensorInfo(f"head.{name}", f"head.{name}", tuple(p.shape), None, "head", 0))
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
    return model, infos

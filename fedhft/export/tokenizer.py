"""The device's tokenizer.json: the model's own, or built once here from its vocabulary files; never a placeholder.

transformers 5 builds an empty 5-token tokenizer when a directory has no vocabulary file its class can read;
with it every text becomes [CLS] [UNK] [SEP] and training learns nothing. So every tokenizer this module ships
is checked against the model: it must cover its vocabulary file and fit the model's embedding table.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from fedhft.device_profiles.model_shape import TOKENIZER_FILE, ModelSpec, first_line
from fedhft.errors import FedHFTError


class TokenizerError(FedHFTError):
    """No tokenizer that matches the model can be shipped."""


def _vocab_file_size(model_dir: Path, files: tuple[str, ...]) -> int | None:
    """Entries in a WordPiece vocab.txt or a BPE vocab.json (None for a sentencepiece model)."""
    path = model_dir / files[0]
    if path.name == "vocab.txt":
        return len({line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()})
    if path.name == "vocab.json":
        return len(json.loads(path.read_text(encoding="utf-8")))
    return None


def _build_from_vocab_files(spec: ModelSpec, dest: Path) -> None:
    """Let transformers build the family's fast tokenizer from its vocabulary files (and tokenizer_config.json
    options such as do_lower_case), then save its `tokenizers` form."""
    files = spec.tokenizer_files  # read_model checked they exist
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(spec.directory, local_files_only=True)
        backend = tok.backend_tokenizer
    except Exception as e:  # conversion failures surface as many types (e.g. a sentencepiece model it cannot read)
        raise TokenizerError(
            f"{spec.directory}: cannot build a tokenizer from {' + '.join(files)}: {first_line(e)}"
        ) from e
    expected = _vocab_file_size(spec.directory, files)
    got = backend.get_vocab_size(with_added_tokens=False)
    if expected is not None and got < expected:
        raise TokenizerError(
            f"{spec.directory}: the tokenizer built from {files[0]} has {got} tokens, the file has {expected}"
        )
    backend.save(str(dest))


def check_tokenizer(path: Path, spec: ModelSpec, origin: str) -> int:
    """The tokenizer's size; TokenizerError unless it loads, fits the embedding table and is not a placeholder.

    `origin` names the tokenizer in messages (the user's file, not the temporary copy).
    """
    from tokenizers import Tokenizer

    try:
        size = Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    except Exception as e:
        raise TokenizerError(f"{origin}: not a readable tokenizer.json ({first_line(e)})") from e
    if size > spec.vocab_size:
        raise TokenizerError(
            f"{origin} has {size} tokens, more than the model's {spec.vocab_size} embeddings: "
            "not this model's tokenizer"
        )
    if 2 * size < spec.vocab_size:
        raise TokenizerError(
            f"{origin} has only {size} tokens for a model with {spec.vocab_size} embeddings: a placeholder or "
            "another model's tokenizer"
        )
    return size


def write_tokenizer(spec: ModelSpec, dest_dir: Path) -> str:
    """Write the model's checked tokenizer.json into `dest_dir`; return its file name (for the manifest)."""
    dest = dest_dir / TOKENIZER_FILE
    if spec.tokenizer_files == (TOKENIZER_FILE,):
        src = spec.directory / TOKENIZER_FILE
        shutil.copyfile(src, dest)
        origin = str(src)
    else:
        _build_from_vocab_files(spec, dest)
        origin = f"the tokenizer built from {spec.directory}/{spec.tokenizer_files[0]}"
    check_tokenizer(dest, spec, origin)
    return TOKENIZER_FILE

"""Wire tensor names, the one place that builds or parses them (the convention is in fedhft.protocol.messages).

LoRA tensors are ``<module>`` + a suffix (``.A``, ``.B``, ``.B_rows``, ``.rows``), the classifier head is
``head.weight`` / ``head.bias`` and a dense (full fine-tuning) tensor is ``<param>.delta``. Inside a message
body an int8 tensor ``<name>`` also stores its scales as ``<name>#scale``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

A_SUFFIX = ".A"
B_SUFFIX = ".B"
B_ROWS_SUFFIX = ".B_rows"
ROWS_SUFFIX = ".rows"
DELTA_SUFFIX = ".delta"  # dense messages: <param>.delta for every parameter
UPDATE_SUFFIXES = (A_SUFFIX, B_ROWS_SUFFIX, ROWS_SUFFIX)
MODEL_SUFFIXES = (A_SUFFIX, B_SUFFIX)
LORA_SUFFIXES = (A_SUFFIX, B_ROWS_SUFFIX, ROWS_SUFFIX, B_SUFFIX)
HEAD_WEIGHT = "head.weight"
HEAD_BIAS = "head.bias"
HEAD_NAMES = (HEAD_WEIGHT, HEAD_BIAS)
SCALE_SUFFIX = "#scale"
MAX_NAME = 256
NAME_RE = re.compile(r"[A-Za-z0-9._-]+")


def a_name(module: str) -> str:
    """``<module>.A``: LoRA A (rank, in_features), in updates and models."""
    return module + A_SUFFIX


def b_name(module: str) -> str:
    """``<module>.B``: the full LoRA B (out_features, rank) of a model."""
    return module + B_SUFFIX


def b_rows_name(module: str) -> str:
    """``<module>.B_rows``: the uploaded rows of LoRA B (k, rank) in an update."""
    return module + B_ROWS_SUFFIX


def rows_name(module: str) -> str:
    """``<module>.rows``: the output-row indices (k,) of ``<module>.B_rows``."""
    return module + ROWS_SUFFIX


def delta_name(param: str) -> str:
    """``<param>.delta``: a parameter's dense delta (full fine-tuning)."""
    return param + DELTA_SUFFIX


def scale_name(name: str) -> str:
    """``<name>#scale``: the stored per-row scales of int8 tensor ``name``."""
    return name + SCALE_SUFFIX


def is_valid_name(name: object) -> bool:
    """A wire tensor name: 1-MAX_NAME characters of ``[A-Za-z0-9._-]``."""
    return isinstance(name, str) and len(name) <= MAX_NAME and NAME_RE.fullmatch(name) is not None


def is_wire_name(stored: str) -> bool:
    """A stored body tensor that is a wire tensor, not an encoding's side tensor (``<name>#scale``)."""
    return "#" not in stored


def is_head_name(name: str) -> bool:
    return name in HEAD_NAMES


def is_delta_name(name: str) -> bool:
    """``<param>.delta`` with a non-empty ``<param>``."""
    return name.endswith(DELTA_SUFFIX) and len(name) > len(DELTA_SUFFIX)


def is_rows_name(name: str) -> bool:
    """Named like an index tensor (``.rows`` suffix): the only tensors stored with the ``index`` encoding."""
    return name.endswith(ROWS_SUFFIX)


def split_name(name: str, suffixes: Iterable[str] = LORA_SUFFIXES) -> tuple[str, str] | None:
    """``(module, suffix)`` of a LoRA tensor name with one of ``suffixes`` and a non-empty module, else None."""
    for suffix in suffixes:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], suffix
    return None


def module_names(names: Iterable[str]) -> list[str]:
    """The adapted modules of a message's tensor names (those with a ``.A`` tensor), sorted."""
    return sorted(name[: -len(A_SUFFIX)] for name in names if name.endswith(A_SUFFIX))


def head_tensors(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The head tensors among ``tensors`` (``head.weight`` first, then ``head.bias``)."""
    return {name: tensors[name] for name in HEAD_NAMES if name in tensors}


def dense_deltas(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``<param>.delta`` tensors keyed by ``<param>``; other tensors are left out."""
    return {name[: -len(DELTA_SUFFIX)]: arr for name, arr in tensors.items() if is_delta_name(name)}


@dataclass(frozen=True)
class UploadedRows:
    """One module of a LoRA update: the uploaded rows of ΔW are ``B_rows @ A`` at indices ``rows``."""

    A: np.ndarray  # (r, in_features)
    B_rows: np.ndarray  # (k, r)
    rows: np.ndarray  # (k,) int32, sorted and unique


@dataclass(frozen=True)
class LoraParts:
    """A LoRA update's tensors by meaning: each module's uploaded rows and the head (may be empty)."""

    modules: dict[str, UploadedRows]  # sorted by module name
    head: dict[str, np.ndarray]


def lora_parts(tensors: Mapping[str, np.ndarray]) -> LoraParts:
    """Group the tensors of a decoded (hence checked) LoRA update by module, plus its head."""
    modules = {
        name: UploadedRows(A=tensors[a_name(name)], B_rows=tensors[b_rows_name(name)], rows=tensors[rows_name(name)])
        for name in module_names(tensors)
    }
    return LoraParts(modules=modules, head=head_tensors(tensors))

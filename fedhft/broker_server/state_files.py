"""The tensor files of the server's state dir: durable writes, batches of update payloads, cluster states, heads.

Everything is safetensors (no pickle). A batch file holds one group commit's payloads as uint8 tensors
``"0"``, ``"1"``, ...; an update row names its payload ``<batch file>#<index>``.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedhft.atomic import fsync_dir
from fedhft.broker_server.aggregation import ClusterState


def write_file_durably(path: Path, data: bytes | Sequence[bytes], sync_dir: bool = True) -> None:
    """Write ``data`` (or its chunks, in order) to ``path`` via temp file + fsync + rename (+ folder fsync)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for chunk in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def safetensors_bytes_chunks(blobs: Sequence[bytes], metadata: Mapping[str, str]) -> list[bytes]:
    """A safetensors file holding ``blobs[i]`` as uint8 tensor ``"i"``, as chunks to write in order (the
    blobs themselves are not copied)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for i, blob in enumerate(blobs):
        header[str(i)] = {"dtype": "U8", "shape": [len(blob)], "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return [len(text).to_bytes(8, "little"), text, *blobs]


def head_to_blob(head: Mapping[str, np.ndarray]) -> bytes:
    return bytes(st_save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in head.items()}))


def head_from_blob(blob: bytes | None) -> dict[str, np.ndarray] | None:
    if not blob:
        return None
    return {k: v.astype(np.float64) for k, v in st_load(bytes(blob)).items()}


def state_to_bytes(state: ClusterState) -> bytes:
    tensors = {f"dw/{k}": np.ascontiguousarray(v, dtype=np.float64) for k, v in state.modules.items()}
    tensors.update({f"head/{k}": np.ascontiguousarray(v, dtype=np.float64) for k, v in state.head.items()})
    return bytes(st_save(tensors, metadata={"format": "fedhft-cluster-state-1"}))


def state_from_bytes(data: bytes) -> ClusterState:
    tensors = st_load(data)
    return ClusterState(
        modules={k[3:]: v for k, v in tensors.items() if k.startswith("dw/")},
        head={k[5:]: v for k, v in tensors.items() if k.startswith("head/")},
    )


def split_ref(ref: str) -> tuple[str, int]:
    """``<file>#<index>`` -> (file, index); a plain file name is index 0."""
    name, _, index = ref.partition("#")
    return name, int(index or 0)

"""The native ExecuTorch trainer (C++, torch-free) driven from Python through a subprocess.

`fedhft-et-trainer PROGRAM.pte WEIGHTS.ptd` (sources in fedhft/edge_runtime/native/) runs the joint
forward+backward program and applies AdamW itself; this wrapper exchanges batches, parameters and optimizer
state with it as little-endian binary frames on its stdin/stdout (see native/frames.h). A subprocess keeps
this side torch-free and free of Python-extension ABI ties, isolates runtime crashes from the client, and
the same binary runs on a device without Python bindings; the cost is a copy of each batch and of the
adapter when it is exchanged (bytes, next to a step's compute).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from fedhft.edge_runtime.adamw import AdamW, load_train_state, save_train_state
from fedhft.edge_runtime.executorch_backend import (
    check_parameters,
    chunked_eval,
    load_executorch_package,
    prepare_batch,
)
from fedhft.edge_runtime.trainer import DEFAULT_TRAINER_TIMEOUT, BackendError, StepResult
from fedhft.protocol.manifest import Manifest

BINARY_NAME = "fedhft-et-trainer"
ENV_BINARY = "FEDHFT_NATIVE_TRAINER"
SOURCE_DIR = Path(__file__).parent / "native"
DEFAULT_BUILD_DIR = Path(__file__).resolve().parents[2] / "build" / "native"
OP_HELLO, OP_TRAIN, OP_EVAL, OP_GET_PARAMS, OP_SET_PARAMS = 1, 2, 3, 4, 5
OP_SET_LR, OP_GET_STATE, OP_SET_STATE, OP_QUIT = 6, 7, 8, 9


def find_trainer_binary() -> Path:
    """$FEDHFT_NATIVE_TRAINER, else build/native/fedhft-et-trainer in this checkout, else one on PATH."""
    env = os.environ.get(ENV_BINARY)
    candidates = [Path(env)] if env else []
    candidates.append(DEFAULT_BUILD_DIR / BINARY_NAME)
    which = shutil.which(BINARY_NAME)
    if which:
        candidates.append(Path(which))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c.resolve()  # absolute: a relative $FEDHFT_NATIVE_TRAINER (a device bundle's) runs from any cwd
    raise BackendError(f"the native trainer is not built: run `make native` (or set ${ENV_BINARY})")


ELF_MACHINES = {62: "x86_64", 183: "aarch64"}  # ELF e_machine -> the profiles' arch names


def binary_arch(path: Path) -> str | None:
    """The CPU architecture an ELF executable is built for ("x86_64", "aarch64"), None when not a known ELF."""
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    order = "little" if head[5] == 1 else "big"
    return ELF_MACHINES.get(int.from_bytes(head[18:20], order))


def executorch_root() -> Path:
    """site-packages/executorch, located without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("executorch")
    if spec is None or not spec.submodule_search_locations:
        raise BackendError("executorch is not installed: pip install executorch==1.5.1")
    return Path(list(spec.submodule_search_locations)[0])


def build_native(build_dir: Path = DEFAULT_BUILD_DIR, et_root: Path | None = None, timeout: float = 600) -> Path:
    """Configure and build the native trainer with CMake (Ninja when available); return the binary."""
    et_root = et_root or executorch_root()
    cmake = shutil.which("cmake")
    if cmake is None:
        raise BackendError("cmake is needed to build the native trainer (apt-get install cmake g++)")
    gen = ["-G", "Ninja"] if shutil.which("ninja") and not (build_dir / "Makefile").exists() else []
    steps = [
        [cmake, "-S", str(SOURCE_DIR), "-B", str(build_dir), *gen, "-DCMAKE_BUILD_TYPE=Release",
         f"-DEXECUTORCH_ROOT={et_root}"],
        [cmake, "--build", str(build_dir)],
    ]  # fmt: skip
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if r.returncode != 0:
            raise BackendError(f"building the native trainer failed: {(r.stdout + r.stderr).strip()[-1500:]}")
    return build_dir / BINARY_NAME


class NativeProcess:
    """One running `fedhft-et-trainer` and its frame protocol."""

    def __init__(
        self, binary: Path, pte: Path, ptd: Path, timeout: float = DEFAULT_TRAINER_TIMEOUT, threads: int | None = None
    ) -> None:
        self.timeout = timeout
        self._stderr = tempfile.TemporaryFile()
        env = dict(os.environ)
        if threads:
            env["FEDHFT_NATIVE_THREADS"] = str(int(threads))
        try:
            self.proc = subprocess.Popen(
                [str(binary), str(pte), str(ptd)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                env=env,
            )
        except OSError as e:
            self._stderr.close()
            raise BackendError(f"cannot start the native trainer {binary}: {e}") from e

    def call(self, op: int, payload: bytes = b"") -> bytes:
        proc = self.proc
        if proc.poll() is not None or proc.stdin is None:
            raise BackendError(f"the native trainer has exited{self._stderr_tail()}")
        try:
            proc.stdin.write(struct.pack("<IQ", op, len(payload)) + payload)
            proc.stdin.flush()
            status, n = struct.unpack("<IQ", self._read(12))
            body = self._read(n) if n else b""
        except (BrokenPipeError, OSError) as e:
            raise BackendError(f"the native trainer stopped: {e}{self._stderr_tail()}") from e
        if status != 0:
            raise BackendError(f"native trainer: {body.decode(errors='replace')}")
        return body

    def _read(self, n: int) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        chunks, left = [], n
        while left:
            ready, _, _ = select.select([fd], [], [], self.timeout)
            if not ready:
                self.close()
                raise BackendError(
                    f"the native trainer did not answer within {self.timeout:g} s (raise --trainer-timeout)"
                )
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                raise BackendError(f"the native trainer exited mid-answer{self._stderr_tail()}")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _stderr_tail(self) -> str:
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._stderr.seek(0)
        tail = self._stderr.read().decode(errors="replace").strip()[-600:]
        return f" (exit {self.proc.returncode}): {tail}" if tail else f" (exit {self.proc.returncode})"

    def close(self) -> None:
        proc = self.proc
        if proc.poll() is None:
            try:
                assert proc.stdin is not None
                proc.stdin.write(struct.pack("<IQ", OP_QUIT, 0))
                proc.stdin.close()
                proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait(timeout=5)
        for f in (proc.stdin, proc.stdout):
            if f is not None and not f.closed:
                f.close()
        self._stderr.close()


class NativeTrainer:
    """Trains a profile's ExecuTorch program in the native C++ trainer (same interface as OrtTrainer)."""

    def __init__(
        self,
        profile_dir: str | Path,
        manifest: Manifest | None = None,
        learning_rate: float = 1e-3,
        binary: Path | None = None,
        timeout: float = DEFAULT_TRAINER_TIMEOUT,
        threads: int | None = None,
    ) -> None:
        self.dir = Path(profile_dir)
        self.manifest, self.spec, files = load_executorch_package(self.dir, manifest)
        self._names = [p.name for p in self.spec.parameters]
        self._shapes = {p.name: tuple(p.shape) for p in self.spec.parameters}
        self._index = {name: i for i, name in enumerate(self._names)}
        self._lr = float(learning_rate)
        self.proc = NativeProcess(binary or find_trainer_binary(), files["program"], files["weights"], timeout, threads)
        try:
            self._hello()
            self.set_learning_rate(learning_rate)
        except BaseException:
            self.proc.close()
            raise

    def _hello(self) -> None:
        b, s = self.spec.batch_bounds[0], self.spec.seq_bounds[0]
        ids = np.zeros((b, s), np.int64)
        info = json.loads(self.proc.call(OP_HELLO, _step_payload(ids, np.ones_like(ids), np.zeros(b, np.int64))))
        self.info: dict = info  # max_batch, max_seq, planned_bytes (memory-planned arenas), parameters
        got = [(p["name"], tuple(p["shape"])) for p in info["parameters"]]
        want = [(p.program_name, tuple(p.shape)) for p in self.spec.parameters]
        if got != want:
            missing = sorted({n for n, _ in want} - {n for n, _ in got})
            raise BackendError(f"the program's parameters do not match program.json (missing {missing[:3]})")

    def close(self) -> None:
        """Stop the trainer process (also done when the object is collected)."""
        self.proc.close()

    def __enter__(self) -> NativeTrainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None:
            proc.close()

    # ---- steps ---------------------------------------------------------------------------------------------
    def _call_step(self, op: int, ids: np.ndarray, mask: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        body = self.proc.call(op, _step_payload(ids, mask, y))
        loss, cols = struct.unpack_from("<fq", body)
        return float(loss), np.frombuffer(body, np.float32, offset=12).reshape(ids.shape[0], cols).copy()

    def train_step(self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray) -> StepResult:
        ids, mask, y = prepare_batch(self.spec, input_ids, attention_mask, labels, self.manifest.max_seq_len)
        return StepResult(*self._call_step(OP_TRAIN, ids, mask, y))

    def eval_step(self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray) -> StepResult:
        """Loss and logits without an update, for any batch size (chunked); the joint program computes
        gradients and they are dropped."""
        ids, mask, y = prepare_batch(
            self.spec, input_ids, attention_mask, labels, self.manifest.max_seq_len, any_batch=True
        )
        run = lambda a, b, c: self._call_step(OP_EVAL, a, b, c)  # noqa: E731
        return chunked_eval(run, ids, mask, y, self.spec.batch_bounds[1])

    def set_learning_rate(self, lr: float) -> None:
        self.proc.call(OP_SET_LR, struct.pack("<d", float(lr)))
        self._lr = float(lr)

    # ---- parameters and state ------------------------------------------------------------------------------
    def _split(self, body: bytes, offset: int = 0) -> tuple[dict[str, np.ndarray], int]:
        out: dict[str, np.ndarray] = {}
        for name in self._names:
            n = int(np.prod(self._shapes[name]))
            out[name] = np.frombuffer(body, np.float32, count=n, offset=offset).reshape(self._shapes[name]).copy()
            offset += 4 * n
        return out, offset

    def get_parameters(self) -> dict[str, np.ndarray]:
        """Trainable tensors by manifest name (copies)."""
        return self._split(self.proc.call(OP_GET_PARAMS))[0]

    def set_parameters(self, values: dict[str, np.ndarray]) -> None:
        """Overwrite trainable tensors (by manifest name); shapes must match the manifest exactly."""
        checked = check_parameters(values, self._shapes)
        parts = [struct.pack("<I", len(checked))]
        for name, arr in checked.items():
            parts.append(struct.pack("<IQ", self._index[name], arr.size))
            parts.append(arr.tobytes())
        self.proc.call(OP_SET_PARAMS, b"".join(parts))

    def _optimizer(self) -> AdamW:
        body = self.proc.call(OP_GET_STATE)
        (step,) = struct.unpack_from("<q", body)
        m, off = self._split(body, 8)
        v, _ = self._split(body, off)
        return AdamW(dict(self._shapes), lr=self._lr, step=step, m=m, v=v)

    def save_state(self, path: Path) -> None:
        """Write parameters and AdamW state (moments, step) to `path` atomically (as ExecuTorchTrainer)."""
        extra = {"program_sha256": self.spec.files["program"].sha256}
        save_train_state(Path(path), self.get_parameters(), self._optimizer(), extra)

    def load_state(self, path: Path) -> None:
        """Restore parameters and AdamW state written by `save_state` (the learning rate stays as set)."""
        params, m, v, step, _ = load_train_state(Path(path), self._shapes)
        state = [struct.pack("<q", step)]
        state += [m[n].tobytes() for n in self._names] + [v[n].tobytes() for n in self._names]
        self.set_parameters(params)
        self.proc.call(OP_SET_STATE, b"".join(state))


def _step_payload(ids: np.ndarray, mask: np.ndarray, labels: np.ndarray) -> bytes:
    b, s = ids.shape
    return b"".join(
        [
            struct.pack("<qq", b, s),
            np.ascontiguousarray(ids, "<i8").tobytes(),
            np.ascontiguousarray(mask, "<i8").tobytes(),
            np.ascontiguousarray(labels, "<i8").tobytes(),
        ]
    )

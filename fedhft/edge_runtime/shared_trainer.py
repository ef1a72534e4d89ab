"""One loaded training runtime shared by the devices a host runs (`fedhft edge host`).

Devices with the same package, backend and learning rate share one trainer (the base weights are loaded once);
each device holds a :class:`DeviceTrainer` view. Before a view runs anything on the shared trainer it swaps
its own adapter state in (parameters, AdamW moments and step), saving the previous owner's state first, so
a hosted device trains exactly as it would alone. The state travels through the trainer's own
``save_state``/``load_state`` files (a temporary directory per runtime): a swap costs a small file, not a
model load (ORT rebuilds its session from the cached model file).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedhft.edge_runtime.local_train import open_trainer
from fedhft.edge_runtime.trainer import StepResult, Trainer
from fedhft.protocol.manifest import Manifest, load_manifest


@dataclass
class SharedRuntime:
    """One loaded trainer and the view whose state it holds now."""

    trainer: Trainer
    dir: Path  # swap files: the pristine state, then one per view
    owner: DeviceTrainer | None = None
    views: int = 0

    def __post_init__(self) -> None:
        self.pristine = self.dir / "pristine.state"
        self.trainer.save_state(self.pristine)  # what a device that never trained starts from

    def view(self) -> DeviceTrainer:
        self.views += 1
        return DeviceTrainer(self, self.dir / f"device-{self.views}.state")

    def acquire(self, view: DeviceTrainer) -> Trainer:
        """The shared trainer holding ``view``'s state (the previous owner's saved first)."""
        if self.owner is not view:
            if self.owner is not None:
                self.trainer.save_state(self.owner.swap)
                self.owner.saved = True
            self.trainer.load_state(view.swap if view.saved else self.pristine)
            self.owner = view
        return self.trainer

    def close(self) -> None:
        close = getattr(self.trainer, "close", None)
        if close is not None:
            close()


@dataclass(eq=False)
class DeviceTrainer:
    """One device's trainer on a shared runtime (the Trainer interface; its state swapped in on use)."""

    runtime: SharedRuntime
    swap: Path
    saved: bool = False  # its state is in ``swap`` (else it is the pristine one, or resident)

    def _t(self) -> Trainer:
        return self.runtime.acquire(self)

    def train_step(self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray) -> StepResult:
        return self._t().train_step(input_ids, attention_mask, labels)

    def eval_step(self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray) -> StepResult:
        return self._t().eval_step(input_ids, attention_mask, labels)

    def get_parameters(self) -> dict[str, np.ndarray]:
        return self._t().get_parameters()

    def set_parameters(self, params: dict[str, np.ndarray]) -> None:
        self._t().set_parameters(params)

    def save_state(self, path: Path) -> None:
        self._t().save_state(path)

    def load_state(self, path: Path) -> None:
        self._t().load_state(path)


@dataclass
class SharedTrainers:
    """The runtimes of one host, by (package directory, backend, learning rate)."""

    runtimes: dict[tuple[Path, str, float], SharedRuntime] = field(default_factory=dict)
    _tmp: tempfile.TemporaryDirectory | None = None

    def trainer_for(
        self, artifacts: Path, backend: str, learning_rate: float, manifest: Manifest | None = None
    ) -> DeviceTrainer:
        """A new device's view of the runtime for its package (loaded on first use)."""
        key = (Path(artifacts).resolve(), backend, float(learning_rate))
        rt = self.runtimes.get(key)
        if rt is None:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="fedhft-host-")
            d = Path(self._tmp.name) / f"runtime-{len(self.runtimes)}"
            d.mkdir()
            trainer = open_trainer(backend, artifacts, manifest or load_manifest(artifacts), learning_rate)
            rt = self.runtimes[key] = SharedRuntime(trainer, d)
        return rt.view()

    def close(self) -> None:
        for rt in self.runtimes.values():
            rt.close()
        self.runtimes.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

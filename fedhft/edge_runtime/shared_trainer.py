"""One loaded training runtime shared by the devices a host runs (`fedhft edge host`).

Devices with the same package, backend and learning rate share one trainer (the base weights are loaded once);
each device holds a :class:`DeviceTrainer` view. Before a view runs anything on the shared trainer it swaps
its own adapter state in (parameters, AdamW moments and step), saving the previous owner's state first, so
a hosted device trains exactly as it would alone. The state travels through the trainer's own
``save_state``/``load_state`` files (a temporary directory per runtime); a state already saved (the device's
checkpoint after a round) is not saved again. A swap costs the state file: with the native trainer the
adapter and its moments; with ORT, whose checkpoint also holds the frozen weights, a rebuilt session.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedhft.edge_runtime.local_train import open_trainer
from fedhft.edge_runtime.trainer import DEFAULT_TRAINER_TIMEOUT, StepResult, Trainer
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
        """The shared trainer holding ``view``'s state (the previous owner's saved first, unless it is)."""
        if self.owner is not view:
            if self.owner is not None and not self.owner.saved:
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
    saved: bool = False  # ``swap`` holds its current state (else: resident, or pristine when never used)

    def _t(self, changes: bool = False) -> Trainer:
        trainer = self.runtime.acquire(self)
        if changes:
            self.saved = False
        return trainer

    def train_step(self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray) -> StepResult:
        return self._t(changes=True).train_step(input_ids, attention_mask, labels)

    def eval_step(self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray) -> StepResult:
        return self._t().eval_step(input_ids, attention_mask, labels)

    def get_parameters(self) -> dict[str, np.ndarray]:
        return self._t().get_parameters()

    def set_parameters(self, params: dict[str, np.ndarray]) -> None:
        self._t(changes=True).set_parameters(params)

    def save_state(self, path: Path) -> None:
        """Save to the swap file and copy it to ``path`` (the device's checkpoint): the next swap saves nothing."""
        trainer = self._t()
        if not self.saved:
            trainer.save_state(self.swap)
            self.saved = True
        shutil.copyfile(self.swap, path)

    def load_state(self, path: Path) -> None:
        self._t(changes=True).load_state(path)


@dataclass
class SharedTrainers:
    """The runtimes of one host, by (package directory, backend, learning rate, trainer timeout)."""

    runtimes: dict[tuple[Path, str, float, float], SharedRuntime] = field(default_factory=dict)
    _tmp: tempfile.TemporaryDirectory | None = None

    def trainer_for(
        self,
        artifacts: Path,
        backend: str,
        learning_rate: float,
        manifest: Manifest | None = None,
        trainer_timeout: float = DEFAULT_TRAINER_TIMEOUT,
    ) -> DeviceTrainer:
        """A new device's view of the runtime for its package (loaded on first use)."""
        key = (Path(artifacts).resolve(), backend, float(learning_rate), float(trainer_timeout))
        rt = self.runtimes.get(key)
        if rt is None:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="fedhft-host-")
            d = Path(self._tmp.name) / f"runtime-{len(self.runtimes)}"
            d.mkdir()
            manifest = manifest or load_manifest(artifacts)
            trainer = open_trainer(backend, artifacts, manifest, learning_rate, trainer_timeout)
            rt = self.runtimes[key] = SharedRuntime(trainer, d)
        return rt.view()

    def close(self) -> None:
        for rt in self.runtimes.values():
            rt.close()
        self.runtimes.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

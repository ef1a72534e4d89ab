"""In-process federated poisoning experiment (shared by tests/scenarios/test_poisoning.py and bench/poisoning.py).

Real training, no broker: every device is an :class:`OrtTrainer` on the same exported profile (each with its
own AdamW state, as on a device) and the server is a :class:`Federation` driven directly: each round every
client takes its model (``client_model`` -> ``model_to_params``), trains ``local_steps`` batches, and builds
its masked update (``build_update_tensors``); the buffer of all clients is one FedBuff flush.

Task: the label (0, 1, 2) is the keyword group whose words appear in a short text of filler words, so it
is learnable by a tiny random BERT in a few rounds; clients get IID samples.

Attack: an attacker trains honestly, then multiplies its update by ``factor``: ΔW (``B_rows``) and its
head's change from the model it received. -10 is a sign flip with scaling, 50 a pure boost. Attackers
report the same sample counts as honest clients.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedhft.broker_server.federation import Federation, FederationConfig, PendingUpdate
from fedhft.broker_server.validation import ClientPlan, GlobalSpec
from fedhft.edge_runtime.data import shuffled_batches
from fedhft.edge_runtime.masking import AdapterSpec, build_update_tensors, model_to_params
from fedhft.edge_runtime.ort_backend import OrtTrainer
from fedhft.edge_runtime.tokenize import TextEncoder
from fedhft.protocol.manifest import load_manifest
from fedhft.protocol.tensor_names import HEAD_NAMES, b_rows_name, module_names

GROUPS = (("apple", "banana", "cherry"), ("car", "train", "plane"), ("red", "blue", "green"))
FILLER = ("the", "a", "of", "and", "to")
ATTACKS: dict[str, float | None] = {"none": None, "sign-flip": -10.0, "scale": 50.0}
DEFENCES: dict[str, dict[str, Any]] = {
    "mean": {},
    "clip": {"clip_multiple": 2.0},
    "trimmed-mean": {"robust": "trimmed-mean", "trim_fraction": 0.2},
    "median": {"robust": "median"},
    "trimmed-mean+clip": {"robust": "trimmed-mean", "trim_fraction": 0.2, "clip_multiple": 2.0},
}


def keyword_texts(n: int, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    """``n`` texts of 3-6 filler words with two words of the label's keyword group inserted."""
    texts, labels = [], np.zeros(n, dtype=np.int64)
    for i in range(n):
        label = int(rng.integers(len(GROUPS)))
        words = [str(w) for w in rng.choice(FILLER, size=int(rng.integers(3, 7)))]
        for _ in range(2):
            words.insert(int(rng.integers(len(words) + 1)), str(rng.choice(GROUPS[label])))
        texts.append(" ".join(words))
        labels[i] = label
    return texts, labels


def poison(tensors: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray], factor: float) -> dict[str, np.ndarray]:
    """The update multiplied by ``factor``: every ``B_rows`` (so ΔW) and the head's change from ``start``."""
    out = dict(tensors)
    for module in module_names(tensors):
        out[b_rows_name(module)] = (np.float32(factor) * tensors[b_rows_name(module)]).astype(np.float32)
    for key in HEAD_NAMES:
        if key in tensors:
            base = np.asarray(start[key], np.float32)
            out[key] = (base + np.float32(factor) * (tensors[key] - base)).astype(np.float32)
    return out


def encoded(encoder: TextEncoder, texts: list[str], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, labels), tokenized once."""
    ids, mask = encoder.encode(texts)
    return ids, mask, labels


@dataclass(frozen=True)
class Setup:
    """Size of one experiment."""

    honest: int = 8
    attackers: int = 2
    rounds: int = 5
    local_steps: int = 8
    batch_size: int = 8
    samples_per_client: int = 48
    test_samples: int = 240
    learning_rate: float = 1e-2
    mask_ratio: float | None = None  # None: the manifest's
    seed: int = 0


@dataclass
class Outcome:
    """Accuracy of the global model on the test set after each round (index 0: before training)."""

    accuracy: list[float] = field(default_factory=list)
    clipped: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0

    @property
    def final(self) -> float:
        return self.accuracy[-1]


def run(profile_dir: Path, setup: Setup, defence: Mapping[str, Any], attack: float | None) -> Outcome:
    """One federated run: ``setup.attackers`` clients poison with factor ``attack`` (None: all honest)."""
    t0, c0 = time.perf_counter(), time.process_time()
    manifest = load_manifest(profile_dir)
    adapter = AdapterSpec.from_manifest(manifest)
    mask = manifest.mask_ratio if setup.mask_ratio is None else setup.mask_ratio
    adapter = AdapterSpec(adapter.modules, adapter.alpha, mask, adapter.head_shapes)
    spec = GlobalSpec.from_manifest(manifest)
    plan = ClientPlan.from_plan(dict(manifest.plan, mask_ratio=mask), spec)
    n = setup.honest + setup.attackers
    config = FederationConfig(buffer_size=n, window_seconds=3600.0, staleness_exponent=0.0, **dict(defence))
    fed = Federation(spec, config)
    encoder = TextEncoder.for_manifest(manifest, profile_dir)
    rng = np.random.default_rng(setup.seed)
    clients = [f"c{i:02d}" for i in range(n)]  # the last `attackers` ones attack
    data = {cid: encoded(encoder, *keyword_texts(setup.samples_per_client, rng)) for cid in clients}
    test = encoded(encoder, *keyword_texts(setup.test_samples, rng))
    trainers = {cid: OrtTrainer(profile_dir, manifest, learning_rate=setup.learning_rate, threads=1) for cid in clients}
    judge = OrtTrainer(profile_dir, manifest, threads=1)
    for cid in clients:
        fed.register(cid, plan)
    outcome = Outcome()

    def accuracy() -> float:
        judge.set_parameters(model_to_params(adapter, fed.client_model(clients[0]).tensors))
        ids, mask, labels = test
        correct = 0
        for lo in range(0, len(labels), 64):
            logits = judge.eval_step(ids[lo : lo + 64], mask[lo : lo + 64], labels[lo : lo + 64]).logits
            correct += int((np.asarray(logits).argmax(1) == labels[lo : lo + 64]).sum())
        return correct / len(labels)

    outcome.accuracy.append(accuracy())
    next_id = 0
    for rnd in range(setup.rounds):
        for i, cid in enumerate(clients):
            trainer = trainers[cid]
            trainer.set_parameters(model_to_params(adapter, fed.client_model(cid).tensors))
            start = trainer.get_parameters()
            ids, mask, labels = data[cid]
            batches = shuffled_batches(len(labels), setup.batch_size, setup.seed * 1000 + rnd * 100 + i)
            for _, idx in zip(range(setup.local_steps), batches, strict=False):
                trainer.train_step(ids[idx], mask[idx], labels[idx])
            tensors = build_update_tensors(adapter, trainer.get_parameters(), start)
            if attack is not None and i >= setup.honest:
                tensors = poison(tensors, start, attack)
            samples = setup.local_steps * setup.batch_size
            fed.add_pending(PendingUpdate(next_id, cid, rnd, fed.version, samples, time.time(), tensors))
            next_id += 1
        result = fed.aggregate()
        fed.apply(result)
        outcome.clipped += result.clipped
        outcome.accuracy.append(accuracy())
    outcome.seconds = time.perf_counter() - t0
    outcome.cpu_seconds = time.process_time() - c0
    return outcome

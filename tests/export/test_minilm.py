"""Export of the packaged MiniLM (slow: runs in CI): int8 fidelity, artifact size, planner vs measured memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedhft.datasets import load_bbc_news
from fedhft.device_profiles.profile import load_profile
from fedhft.edge_runtime.stepbench import measure_in_subprocess
from fedhft.export.pipeline import ExportOptions, export_profile
from fedhft.protocol.manifest import load_manifest
from tests.support.torchfree import run_torchfree

pytestmark = pytest.mark.slow
PROFILES = ("rpi4-4gb", "laptop-x86-16gb")


@pytest.fixture(scope="module")
def minilm_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("minilm")
    dirs = {}
    for name in PROFILES:
        dirs[name] = export_profile(None, load_profile(name), out, opts=ExportOptions(num_labels=5)).directory
    # The same plan as rpi4-4gb, fp32 base: the reference for int8 fidelity and size.
    plan = load_manifest(dirs["rpi4-4gb"]).plan
    from fedhft.device_profiles.planner import LoraPlan

    dirs["rpi4-fp32"] = export_profile(
        None,
        load_profile("rpi4-4gb"),
        out,
        opts=ExportOptions(num_labels=5, int8=False),
        plan=LoraPlan.from_dict(plan),
        name="rpi4-fp32",
    ).directory
    return dirs


def _logits(profile_dir: Path, texts: list[str]) -> np.ndarray:
    from fedhft.edge_runtime.ort_backend import OrtTrainer
    from fedhft.edge_runtime.tokenize import TextEncoder

    t = OrtTrainer(profile_dir)
    params = t.get_parameters()
    # A non-trivial adapter and head, identical for both models, so that LoRA paths matter too.
    rng = np.random.default_rng(0)
    t.set_parameters({k: rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in params.items()})
    ids, mask = TextEncoder.for_manifest(t.manifest, profile_dir).encode(texts)
    return t.eval_step(ids, mask, np.zeros(len(texts), dtype=np.int64)).logits


def test_int8_logits_match_fp32_on_real_text(minilm_exports: dict[str, Path]) -> None:
    data = load_bbc_news(max_chars=800)
    texts = data.texts[::150][:16]
    a = _logits(minilm_exports["rpi4-4gb"], texts).ravel()
    b = _logits(minilm_exports["rpi4-fp32"], texts).ravel()
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert cos >= 0.99, cos


def test_int8_artifacts_are_at_least_3x_smaller(minilm_exports: dict[str, Path]) -> None:
    def size(d: Path) -> int:
        return sum(f.bytes for f in load_manifest(d).artifacts["ort"].values())

    assert size(minilm_exports["rpi4-fp32"]) >= 3 * size(minilm_exports["rpi4-4gb"])


def test_planner_estimate_within_30_percent_of_measured_peak(minilm_exports: dict[str, Path]) -> None:
    for name in PROFILES:
        est = load_manifest(minilm_exports[name]).plan["estimate"]["memory_mb"]
        measured = measure_in_subprocess(minilm_exports[name], batch=8, seq=128, steps=2)["peak_rss_mb"]
        assert abs(est - measured) <= 0.3 * measured, (name, est, measured)


def test_minilm_trains_torch_free_on_real_sentences(minilm_exports: dict[str, Path]) -> None:
    res = run_torchfree(
        "import json, sys, numpy as np\n"
        "from fedhft.datasets import load_bbc_news\n"
        "from fedhft.edge_runtime.ort_backend import OrtTrainer\n"
        "from fedhft.edge_runtime.tokenize import TextEncoder\n"
        f"d = {str(minilm_exports['rpi4-4gb'])!r}\n"
        "t = OrtTrainer(d, learning_rate=3e-3)\n"
        "data = load_bbc_news(max_chars=400)\n"
        "idx = np.arange(0, len(data.texts), len(data.texts) // 8)[:8]\n"
        "ids, mask = TextEncoder.for_manifest(t.manifest, d).encode([data.texts[i] for i in idx])\n"
        "y = np.array([data.labels[i] for i in idx])\n"
        "losses = [t.train_step(ids[:, :64], mask[:, :64], y).loss for _ in range(20)]\n"
        "print(json.dumps({'losses': losses, 'torch': 'torch' in sys.modules}))\n"
    )
    assert res["torch"] is False
    assert res["losses"][-1] < 0.5 * res["losses"][0], res["losses"]


def test_the_packaged_model_is_named_by_its_hub_id_in_a_peft_adapter(minilm_exports: dict[str, Path]) -> None:
    from fedhft.edge_runtime.adapter_io import peft_config

    manifest = load_manifest(next(iter(minilm_exports.values())))
    assert manifest.extra["hub_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert manifest.extra["model_type"] == "bert"
    config = peft_config(manifest)
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]

"""The backward recompute of dequantized int8 weights: same numbers, no forward copy kept for backward."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx

from fedhft.edge_runtime.ort_backend import OrtTrainer
from fedhft.export.ort_artifacts import ROLES, generate_ort_artifacts
from fedhft.export.ort_graph_passes import _find_chains
from fedhft.protocol.manifest import load_manifest, sha256_file


def _grad_consumers_of_forward_dequant(path: Path) -> int:
    graph = onnx.load(str(path)).graph
    outs = {c.output for c in _find_chains(graph)}
    return sum(1 for n in graph.node if "_Grad/" in n.name and any(i in outs for i in n.input))


def _losses(profile_dir: Path) -> list[float]:
    t = OrtTrainer(profile_dir, learning_rate=1e-2)
    rng = np.random.default_rng(3)
    ids = rng.integers(1000, 5000, size=(4, 16))
    mask = np.ones_like(ids)
    y = np.arange(4) % 3
    return [t.train_step(ids, mask, y).loss for _ in range(4)]


def test_recompute_pass_keeps_numbers_and_drops_the_forward_copy(tiny_export: Path, tmp_path: Path) -> None:
    exported = tiny_export / "ort" / "training_model.onnx"
    assert _grad_consumers_of_forward_dequant(exported) == 0
    rewired = [n for n in onnx.load(str(exported)).graph.node if n.op_type == "DequantizeLinear"]
    assert rewired, "the tiny plan adapts layers whose input gradients need the base weights"

    # Regenerate the same artifacts without the pass and compare the training numbers.
    from fedhft.device_profiles.planner import LoraPlan
    from fedhft.export.model import build_training_model, load_encoder
    from fedhft.export.ort_artifacts import export_onnx

    m = load_manifest(tiny_export)
    plain = tmp_path / "plain"
    shutil.copytree(tiny_export, plain)
    model_dir = Path(m.extra["model_dir"])
    model, infos = build_training_model(
        load_encoder(model_dir), LoraPlan.from_dict(m.plan), m.num_labels, int8=True, seed=m.extra["seed"]
    )
    onnx_model = export_onnx(model, tmp_path / "model.onnx")
    shutil.rmtree(plain / "ort")
    generate_ort_artifacts(onnx_model, infos, plain / "ort", recompute_dequant=False)
    assert _grad_consumers_of_forward_dequant(plain / "ort" / "training_model.onnx") > 0
    d = json.loads((plain / "manifest.json").read_text())
    for role, name in ROLES.items():
        d["artifacts"]["ort"][role]["sha256"] = sha256_file(plain / "ort" / name)
        d["artifacts"]["ort"][role]["bytes"] = (plain / "ort" / name).stat().st_size
    (plain / "manifest.json").write_text(json.dumps(d))
    np.testing.assert_allclose(_losses(tiny_export), _losses(plain), rtol=1e-5)

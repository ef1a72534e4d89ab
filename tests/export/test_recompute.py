"""Activation recomputation in ExecuTorch programs: same loss and gradients, less planned memory, recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedhft.device_profiles.planner import RECOMPUTE_MODES

BATCH, SEQ, LABELS = 8, 32, 3


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_profile_path: Path) -> dict:
    """The tiny BERT with both layers adapted (non-zero B, so every factor gets a gradient), exported once per
    recompute mode: mode -> program directory."""
    from fedhft.device_profiles.model_shape import read_model
    from fedhft.device_profiles.planner import uniform_plan
    from fedhft.device_profiles.profile import load_profile
    from fedhft.export.executorch_export import export_executorch
    from fedhft.export.model import build_training_model, load_encoder

    shape = read_model(tiny_model_dir).shape(LABELS, SEQ, BATCH)
    plan = uniform_plan(
        shape, load_profile(tiny_profile_path), rank=4, depth=2, targets=("query", "value", "ffn_out"), int8=True
    )
    model, infos = build_training_model(load_encoder(tiny_model_dir), plan, LABELS, int8=True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    out = tmp_path_factory.mktemp("recompute")
    return {
        mode: export_executorch(model, infos, out / mode, max_batch=BATCH, max_seq_len=SEQ, recompute=mode)
        for mode in RECOMPUTE_MODES
    }


def _step(artifacts: object) -> list[torch.Tensor]:
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    files = artifacts.files  # type: ignore[attr-defined]
    module = _load_for_executorch(str(files["program"]), data_path=str(files["weights"]))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (BATCH, SEQ), generator=gen)
    mask = torch.ones_like(ids)
    mask[:, SEQ - 7 :] = 0  # padding: the mask path is recomputed too
    labels = torch.randint(0, LABELS, (BATCH,), generator=gen)
    return [t.clone() for t in module.run_method("forward", (ids, mask, labels))]


def _planned_bytes(artifacts: object) -> int:
    from executorch.exir._serialize._program import deserialize_pte_binary

    pte = deserialize_pte_binary(artifacts.files["program"].read_bytes())  # type: ignore[attr-defined]
    return sum(pte.program.execution_plan[0].non_const_buffer_sizes)


def test_every_mode_gives_the_same_loss_logits_and_gradients(programs: dict) -> None:
    reference = _step(programs["none"])
    assert len(reference) > 2 + 2 * 6  # loss, logits, then a gradient per trainable tensor
    assert any(float(g.abs().sum()) > 0 for g in reference[2:])
    for mode in RECOMPUTE_MODES[1:]:
        got = _step(programs[mode])
        assert len(got) == len(reference)
        for a, b in zip(reference, got, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_recomputation_lowers_the_planned_memory(programs: dict) -> None:
    planned = {mode: _planned_bytes(a) for mode, a in programs.items()}
    # on this tiny model (hidden 32) layer inputs are a large share of a layer's activations, so full is not
    # always below selective; on MiniLM it is (bench/edge_memory.py)
    assert planned["selective"] < 0.9 * planned["none"]
    assert planned["full"] < 0.95 * planned["none"]


def test_the_program_records_what_it_recomputes(programs: dict) -> None:
    from fedhft.protocol.program_spec import load_program_spec

    for mode, artifacts in programs.items():
        spec, _ = load_program_spec(artifacts.files["spec"].parent)
        passes = [p for p in spec.exporter["graph_passes"] if p.startswith("recompute")]
        if mode == "none":
            assert passes == []
        else:
            assert len(passes) == 1 and passes[0].startswith(f"recompute {mode} x")
            assert int(passes[0].rsplit("x", 1)[1]) > 0


def test_an_unknown_mode_is_refused_before_exporting(tmp_path: Path) -> None:
    from fedhft.export.executorch_export import ExecuTorchExportError, export_executorch

    with pytest.raises(ExecuTorchExportError, match="recompute 'half' is not one of none, selective, full"):
        export_executorch(None, [], tmp_path / "et", max_seq_len=16, recompute="half")  # type: ignore[arg-type]
    assert not (tmp_path / "et").exists()

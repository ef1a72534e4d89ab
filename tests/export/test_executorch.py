"""ExecuTorch export: program.json describes the program, passes keep values, bad options are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedhft.export.executorch_export import (
    TransposedFrozenLinear,
    export_executorch,
    split_addmm,
    transpose_frozen_linears,
)
from fedhft.export.layers import FrozenLinear
from fedhft.protocol.manifest import load_manifest, sha256_file, verify_artifacts
from fedhft.protocol.program_spec import load_program_spec, verify_program_files
from tests.support.executorch_builds import MAX_SEQ_LEN, NUM_LABELS, both_formats


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_profile_path: Path) -> Path:
    return both_formats(tmp_path_factory, tiny_model_dir, tiny_profile_path)


def test_program_json_describes_the_program(profile: Path) -> None:
    spec, spec_dir = load_program_spec(profile)
    assert spec_dir == profile / "executorch"
    files = verify_program_files(spec, spec_dir)
    assert {p.name for p in files.values()} == {"train.pte", "adapter.ptd"}
    for role, f in spec.files.items():
        assert f.sha256 == sha256_file(files[role]) and f.bytes == files[role].stat().st_size
    m = load_manifest(profile)
    if "executorch" in m.artifacts:  # the export pipeline lists the three files in the manifest
        assert set(verify_artifacts(m, profile, "executorch")) == {"program", "weights", "spec"}
    assert sorted(p.name for p in spec.parameters) == sorted(t.name for t in m.trainable)
    by_name = {t.name: t for t in m.trainable}
    for p in spec.parameters:
        assert p.shape == by_name[p.name].shape
        assert p.program_name == "model." + by_name[p.name].graph_name
    assert spec.batch_bounds == (1, 8)  # the profile's batch size: the memory plan's largest batch
    assert spec.seq_bounds == (8, MAX_SEQ_LEN)
    assert spec.num_labels == NUM_LABELS and spec.inputs == ["input_ids", "attention_mask", "labels"]
    assert spec.outputs[:2] == ["loss", "logits"]
    passes = " ".join(spec.exporter["graph_passes"])
    assert "addmm->add(mm)" in passes and "xnnpack: mm" in passes and "transposed frozen linears" in passes
    # the adapter file carries only the trainable tensors; the int8 base stays in the program
    assert files["weights"].stat().st_size < files["program"].stat().st_size / 10
    raw = json.loads((spec_dir / "program.json").read_text())
    assert raw["format"] == "fedhft-executorch-program" and raw["version"] == 1


def test_split_addmm_keeps_values() -> None:
    lin = torch.nn.Linear(6, 4)
    x = torch.randn(3, 6)
    ep = torch.export.export(lin, (x,))
    ep = ep.run_decompositions()
    before = sum(n.target == torch.ops.aten.addmm.default for n in ep.graph.nodes)
    assert before == 1
    assert split_addmm(ep.graph_module) == 1
    assert not any(n.target == torch.ops.aten.addmm.default for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x), lin(x))


@pytest.mark.parametrize("int8", [True, False])
def test_transposed_frozen_linear_matches(int8: bool) -> None:
    torch.manual_seed(0)
    frozen = FrozenLinear(torch.nn.Linear(16, 8), int8=int8)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(TransposedFrozenLinear(frozen)(x), frozen(x), rtol=1e-5, atol=1e-6)
    holder = torch.nn.Sequential(frozen, torch.nn.ReLU())
    assert transpose_frozen_linears(holder) == 1 and isinstance(holder[0], TransposedFrozenLinear)


def test_bad_options_are_refused_before_exporting(tmp_path: Path) -> None:
    from fedhft.export.executorch_export import ExecuTorchExportError

    with pytest.raises(ExecuTorchExportError, match="max_seq_len"):
        export_executorch(torch.nn.Linear(2, 2), [], tmp_path, max_seq_len=1)  # type: ignore[arg-type]
    with pytest.raises(ExecuTorchExportError, match="XNNPACK"):
        export_executorch(torch.nn.Linear(2, 2), [], tmp_path, max_seq_len=8, xnnpack=("conv",))  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir()), "nothing written"

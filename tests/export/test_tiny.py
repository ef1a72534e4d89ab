"""Export round trip on a tiny random BERT: artifacts train torch-free, names match, bad input is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedhft.cli import main
from fedhft.protocol.manifest import ManifestError, load_manifest, verify_artifacts
from tests.support.torchfree import run_torchfree

TRAIN_20 = """
import json, numpy as np
from fedhft.edge_runtime.ort_backend import OrtTrainer
import sys
t = OrtTrainer({dir!r}, learning_rate=5e-3)
rng = np.random.default_rng(0)
ids = rng.integers(1000, 5000, size=(8, 24)); mask = np.ones_like(ids); mask[:, 20:] = 0
y = np.arange(8) % 3
losses = [t.train_step(ids, mask, y).loss for _ in range(20)]
p = t.get_parameters()
print(json.dumps({{"losses": losses, "torch": "torch" in sys.modules, "names": sorted(p),
                  "shapes": {{k: list(v.shape) for k, v in p.items()}}}}))
"""


def test_artifacts_train_torch_free_and_lower_the_loss(tiny_export: Path) -> None:
    res = run_torchfree(TRAIN_20.format(dir=str(tiny_export)))
    assert res["torch"] is False
    losses = res["losses"]
    assert losses[-1] < 0.7 * losses[0], losses
    manifest = load_manifest(tiny_export)
    assert res["names"] == sorted(t.name for t in manifest.trainable)
    for t in manifest.trainable:
        assert tuple(res["shapes"][t.name]) == t.shape


def test_manifest_describes_plan_and_global_adapter(tiny_export: Path) -> None:
    m = load_manifest(tiny_export)
    verify_artifacts(m, tiny_export, "ort")
    assert m.num_labels == 3 and m.max_seq_len == 32
    assert (tiny_export / m.tokenizer).is_file()
    assert m.quantization["base"] == "int8"
    assert len(m.global_adapter) == 2 * 6  # 2 layers x 6 module kinds
    ranks = m.module_ranks()
    assert ranks, "some module is adapted"
    plan_modules = {f"layers.{lp['layer']}.{k}" for lp in m.plan["layers"] for k in lp["targets"]}
    assert set(ranks) == plan_modules
    assert m.mask_ratio == m.plan["mask_ratio"]
    assert set(m.artifacts["ort"]) == {"training_model", "eval_model", "optimizer_model", "checkpoint"}


def test_checkpoint_names_match_the_manifest(tiny_export: Path) -> None:
    from fedhft.edge_runtime.ort_backend import OrtTrainer

    t = OrtTrainer(tiny_export)
    names = t.checkpoint_names()
    for tt in t.manifest.trainable:
        assert tt.graph_name in names


def test_set_parameters_round_trip_and_validation(tiny_export: Path) -> None:
    import numpy as np

    from fedhft.edge_runtime.ort_backend import OrtTrainer
    from fedhft.edge_runtime.trainer import BackendError

    t = OrtTrainer(tiny_export)
    params = t.get_parameters()
    new = {k: np.full_like(v, 0.01) for k, v in params.items()}
    t.set_parameters(new)
    got = t.get_parameters()
    for k in params:
        np.testing.assert_allclose(got[k], 0.01)
    name = next(iter(params))
    with pytest.raises(BackendError, match="shape"):
        t.set_parameters({name: np.zeros((1, 1), np.float32)})
    with pytest.raises(BackendError, match="unknown"):
        t.set_parameters({"nope": np.zeros(1, np.float32)})
    with pytest.raises(BackendError, match="non-finite"):
        t.set_parameters({name: np.full(params[name].shape, np.nan, np.float32)})


def test_save_and_load_state_restores_parameters_and_optimizer(tiny_export: Path, tmp_path: Path) -> None:
    import numpy as np

    from fedhft.edge_runtime.ort_backend import OrtTrainer

    rng = np.random.default_rng(1)
    ids = rng.integers(1000, 5000, size=(4, 16))
    mask = np.ones_like(ids)
    y = np.arange(4) % 3
    a = OrtTrainer(tiny_export, learning_rate=1e-2)
    for _ in range(3):
        a.train_step(ids, mask, y)
    a.save_state(tmp_path / "state.ckpt")
    next_a = a.train_step(ids, mask, y).loss
    b = OrtTrainer(tiny_export, learning_rate=1e-2)
    b.load_state(tmp_path / "state.ckpt")
    assert b.train_step(ids, mask, y).loss == pytest.approx(next_a, rel=1e-5)


def test_corrupted_artifact_is_refused(tiny_export: Path, tmp_path: Path) -> None:
    import shutil

    from fedhft.edge_runtime.ort_backend import OrtTrainer

    copy = tmp_path / "copy"
    shutil.copytree(tiny_export, copy)
    with open(copy / "ort" / "training_model.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ManifestError, match="sha256"):
        OrtTrainer(copy)
    (copy / "ort" / "checkpoint").unlink()
    with pytest.raises(ManifestError, match="missing"):
        OrtTrainer(copy)


# ---- bad input at the command line: one clear line, non-zero exit, nothing half-written -------------------
def _export(args: list[str]) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["export", *args])
    return r.exit_code, r.output


def test_model_dir_without_weights(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    code, out = _export(["--model", str(tmp_path / "m"), "--profile", "rpi4-4gb", "--out", str(tmp_path / "o")])
    assert code == 1 and "has no weights" in out
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_unknown_profile(tmp_path: Path, tiny_model_dir: Path) -> None:
    code, out = _export(["--model", str(tiny_model_dir), "--profile", "toaster", "--out", str(tmp_path / "o")])
    assert code == 1 and "toaster" in out


def test_profile_with_negative_field(tmp_path: Path, tiny_model_dir: Path, tiny_profile_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(tiny_profile_path.read_text().replace("ram_mb = 2048", "ram_mb = -5"))
    code, out = _export(["--model", str(tiny_model_dir), "--profile", str(bad), "--out", str(tmp_path / "o")])
    assert code == 1 and "ram_mb" in out


def test_plan_that_cannot_fit(tmp_path: Path, tiny_model_dir: Path, tiny_profile_path: Path) -> None:
    small = tmp_path / "small.toml"
    small.write_text(tiny_profile_path.read_text().replace("ram_mb = 2048", "ram_mb = 16"))
    code, out = _export(["--model", str(tiny_model_dir), "--profile", str(small), "--out", str(tmp_path / "o")])
    assert code == 1 and "no LoRA plan fits" in out
    assert not any(p.name.startswith(".") for p in (tmp_path / "o").iterdir()), "no temp dir left behind"


def test_unwritable_output_dir(tmp_path: Path, tiny_model_dir: Path, tiny_profile_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, out = _export(
        ["--model", str(tiny_model_dir), "--profile", str(tiny_profile_path), "--out", str(blocker / "sub")]
    )
    assert code == 1 and "not writable" in out


def test_cli_export_and_plan(tmp_path: Path, tiny_model_dir: Path, tiny_profile_path: Path) -> None:
    code, out = _export(
        [
            "--model",
            str(tiny_model_dir),
            "--profile",
            str(tiny_profile_path),
            "--out",
            str(tmp_path / "o"),
            "--num-labels",
            "4",
            "--max-seq-len",
            "16",
        ]
    )
    assert code == 0, out
    assert (tmp_path / "o" / "tiny-test" / "manifest.json").is_file()
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["tiny-test"]
    r = CliRunner().invoke(main, ["plan", "--model", str(tiny_model_dir), "--profile", "rpi4-4gb", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["depth"] >= 1


def test_format_the_profile_cannot_run_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    code, out = _export(
        ["--model", str(tiny_model_dir), "--profile", "rpi4-4gb", "--format", "ort", "--out", str(tmp_path / "o")]
    )
    assert code == 1 and "profile rpi4-4gb runs executorch, not ort" in out
    assert len(out.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_format_auto_writes_each_profiles_runtime(
    tmp_path: Path, tiny_model_dir: Path, tiny_profile_path: Path
) -> None:
    et_only = tmp_path / "tiny-et.toml"
    text = tiny_profile_path.read_text().replace('name = "tiny-test"', 'name = "tiny-et"')
    et_only.write_text(
        "\n".join(
            'runtimes = ["executorch"]'
            if ln.startswith("runtimes")
            else 'default_runtime = "executorch"'
            if ln.startswith("default_runtime")
            else ln
            for ln in text.splitlines()
        )
    )
    out = tmp_path / "o"
    args = ["--model", str(tiny_model_dir), "--profile", f"{tiny_profile_path},{et_only}", "--out", str(out)]
    code, text_out = _export([*args, "--num-labels", "3", "--max-seq-len", "16"])
    assert code == 0, text_out
    assert sorted(load_manifest(out / "tiny-test").artifacts) == ["ort"]
    assert sorted(load_manifest(out / "tiny-et").artifacts) == ["executorch"]


def test_export_records_the_memory_objective_in_the_manifest(
    tmp_path: Path, tiny_model_dir: Path, tiny_profile_path: Path
) -> None:
    args = ["--model", str(tiny_model_dir), "--profile", str(tiny_profile_path), "--num-labels", "4"]
    args += ["--max-seq-len", "16"]
    code, out = _export([*args, "--out", str(tmp_path / "o"), "--objective", "memory"])
    assert code == 0, out
    assert "memory: est" in out
    plan = load_manifest(tmp_path / "o" / "tiny-test").plan
    r = CliRunner().invoke(main, ["plan", *args, "--objective", "memory", "--json"])
    assert r.exit_code == 0, r.output
    assert plan["objective"] == "memory" and json.loads(r.output) == plan  # the plan command shows what export wrote

"""ExecuTorch-Python trainer: parity with torch eager and ORT, parameter exchange, state, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedhft.edge_runtime.executorch_backend import ExecuTorchTrainer
from fedhft.edge_runtime.ort_backend import OrtTrainer
from fedhft.edge_runtime.trainer import BackendError
from fedhft.protocol.manifest import ManifestError, load_manifest
from tests.support.executorch_builds import LR, MAX_SEQ_LEN, batch, both_formats, copy_profile, vouch
from tests.support.torchfree import run_torchfree


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_profile_path: Path) -> Path:
    return both_formats(tmp_path_factory, tiny_model_dir, tiny_profile_path)


def eager_reference(
    profile: Path, model_dir: Path, steps: int, eps: float = 1e-6
) -> tuple[list[float], dict[str, np.ndarray]]:
    """torch eager: the same model, cross-entropy, torch.optim.AdamW with ORT's hyperparameters."""
    import torch
    from torch.nn import functional as F

    from fedhft.device_profiles.planner import LoraPlan
    from fedhft.export.model import build_training_model, load_encoder

    m = load_manifest(profile)
    model, infos = build_training_model(
        load_encoder(model_dir), LoraPlan.from_dict(m.plan), m.num_labels, int8=True, seed=m.extra["seed"]
    )
    params = dict(model.named_parameters())
    trainable = [params[i.graph_name] for i in infos]
    opt = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.999), eps=eps, weight_decay=0.0)
    ids, mask, y = (torch.from_numpy(a) for a in batch())
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(ids, mask), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, {i.name: params[i.graph_name].detach().numpy().copy() for i in infos}


def test_parity_eager_ort_executorch(profile: Path, tiny_model_dir: Path) -> None:
    ids, mask, y = batch()
    ort, et = OrtTrainer(profile, learning_rate=LR), ExecuTorchTrainer(profile, learning_rate=LR)
    p_ort, p_et = ort.get_parameters(), et.get_parameters()
    assert sorted(p_ort) == sorted(p_et)
    for k in p_ort:
        np.testing.assert_array_equal(p_ort[k], p_et[k], err_msg=f"initial {k}")
    # ORT's AdamW (Hugging Face mode) adds eps to sqrt(v) before the bias correction, torch after it: for
    # step 1 the two agree when torch's eps is ORT's divided by sqrt(1 - beta2).
    eager_losses, eager_params = eager_reference(profile, tiny_model_dir, 1, eps=1e-6 / np.sqrt(1 - 0.999))
    first_ort, first_et = ort.train_step(ids, mask, y), et.train_step(ids, mask, y)
    for loss in (first_ort.loss, first_et.loss):
        assert abs(loss - eager_losses[0]) / eager_losses[0] <= 1e-3
    np.testing.assert_allclose(first_et.logits, first_ort.logits, atol=1e-4)
    p_ort, p_et = ort.get_parameters(), et.get_parameters()
    for k in p_ort:  # one AdamW step, three implementations (ORT op, numpy, torch)
        np.testing.assert_allclose(p_et[k], p_ort[k], atol=1e-3, err_msg=k)
        np.testing.assert_allclose(p_et[k], eager_params[k], atol=1e-3, err_msg=k)
    ort_losses = [first_ort.loss] + [ort.train_step(ids, mask, y).loss for _ in range(19)]
    et_losses = [first_et.loss] + [et.train_step(ids, mask, y).loss for _ in range(19)]
    eager_losses, _ = eager_reference(profile, tiny_model_dir, 20)
    for losses in (ort_losses, et_losses, eager_losses):
        assert losses[-1] < 0.9 * losses[0], losses
    np.testing.assert_allclose(et_losses, ort_losses, rtol=1e-3)


def test_every_trainable_tensor_reaches_the_program(profile: Path) -> None:
    """Perturb one tensor at a time: ExecuTorch's logits follow ORT's (no tensor frozen into a delegate)."""
    ort, et = OrtTrainer(profile), ExecuTorchTrainer(profile)
    rng = np.random.default_rng(1)
    base = {k: (rng.standard_normal(v.shape) * 0.05).astype(np.float32) for k, v in ort.get_parameters().items()}
    ids, mask, y = batch(seed=2, b=4, s=16, pad_from=None)
    for name in base:
        values = dict(base, **{name: base[name] + 0.3 * rng.standard_normal(base[name].shape).astype(np.float32)})
        ort.set_parameters(values)
        et.set_parameters(values)
        a, b = ort.eval_step(ids, mask, y), et.eval_step(ids, mask, y)
        np.testing.assert_allclose(b.logits, a.logits, atol=1e-4, err_msg=name)


def test_set_parameters_round_trip_and_validation(profile: Path) -> None:
    t = ExecuTorchTrainer(profile)
    params = t.get_parameters()
    t.set_parameters({k: np.full_like(v, 0.01) for k, v in params.items()})
    assert all(np.all(v == np.float32(0.01)) for v in t.get_parameters().values())
    name = next(iter(params))
    before = t.get_parameters()
    with pytest.raises(BackendError, match="shape"):
        t.set_parameters({"head.bias": np.zeros(3, np.float32), name: np.zeros((1, 1), np.float32)})
    with pytest.raises(BackendError, match="unknown"):
        t.set_parameters({"nope": np.zeros(1, np.float32)})
    with pytest.raises(BackendError, match="non-finite"):
        t.set_parameters({name: np.full(params[name].shape, np.nan, np.float32)})
    after = t.get_parameters()
    assert all(np.array_equal(before[k], after[k]) for k in before), "a refused update changed nothing"


def test_save_and_load_state_restores_parameters_and_optimizer(profile: Path, tmp_path: Path) -> None:
    ids, mask, y = batch(seed=1, b=4, s=16, pad_from=None)
    a = ExecuTorchTrainer(profile, learning_rate=1e-2)
    for _ in range(3):
        a.train_step(ids, mask, y)
    a.save_state(tmp_path / "state.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["state.safetensors"], "atomic write leaves no temp file"
    next_a = a.train_step(ids, mask, y).loss
    b = ExecuTorchTrainer(profile, learning_rate=1e-2)
    b.load_state(tmp_path / "state.safetensors")
    assert b.optimizer.step == 3
    assert b.train_step(ids, mask, y).loss == pytest.approx(next_a, rel=1e-6)
    (tmp_path / "bad").write_bytes((tmp_path / "state.safetensors").read_bytes()[:100])
    with pytest.raises(BackendError, match="not a readable training state"):
        b.load_state(tmp_path / "bad")


def test_short_sequences_padded_large_eval_batches_chunked(profile: Path) -> None:
    ids, mask, y = batch(seed=3, b=4, s=5, pad_from=None)
    ort, et = OrtTrainer(profile), ExecuTorchTrainer(profile)
    assert et.eval_step(ids, mask, y).loss == pytest.approx(ort.eval_step(ids, mask, y).loss, rel=1e-4)
    big = batch(seed=4, b=19, s=12, pad_from=None)  # more rows than the program's max batch (8)
    a, b = ort.eval_step(*big), et.eval_step(*big)
    assert b.loss == pytest.approx(a.loss, rel=1e-4) and b.logits.shape == (19, 3)
    np.testing.assert_allclose(b.logits, a.logits, atol=1e-4)
    with pytest.raises(BackendError, match="outside the program's bounds 1..8"):
        et.train_step(*big)
    with pytest.raises(BackendError, match="sequence length"):
        et.train_step(*batch(seed=3, b=2, s=MAX_SEQ_LEN + 1, pad_from=None))


def _rewrite_spec(profile: Path, edit) -> None:  # noqa: ANN001
    path = profile / "executorch" / "program.json"
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))
    vouch(profile, "executorch/program.json")


def test_corrupted_program_is_refused(profile: Path, tmp_path: Path) -> None:
    copy = copy_profile(profile, tmp_path / "copy")
    pte = copy / "executorch" / "train.pte"
    with open(pte, "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ManifestError, match="sha256"):
        ExecuTorchTrainer(copy)
    # truncated, with checksums that vouch for it: the runtime itself must refuse it
    pte.write_bytes((profile / "executorch" / "train.pte").read_bytes()[:5000])
    vouch(copy, "executorch/train.pte")
    with pytest.raises(BackendError, match="cannot load"):
        ExecuTorchTrainer(copy)
    (copy / "executorch" / "adapter.ptd").unlink()
    with pytest.raises(ManifestError, match="missing"):
        ExecuTorchTrainer(copy)


def test_program_lacking_a_parameter_is_refused(profile: Path, tmp_path: Path) -> None:
    copy = copy_profile(profile, tmp_path / "lacks")
    _rewrite_spec(copy, lambda d: d["parameters"].pop())
    with pytest.raises(ManifestError, match="lacks trainable tensor"):
        ExecuTorchTrainer(copy)
    shutil.rmtree(copy)
    copy = copy_profile(profile, tmp_path / "renamed")
    _rewrite_spec(copy, lambda d: d["parameters"][0].update(program_name="model.not.there"))
    with pytest.raises(BackendError, match="do not match program.json"):
        ExecuTorchTrainer(copy)
    (copy / "executorch" / "program.json").write_text("{not json")
    vouch(copy, "executorch/program.json")
    with pytest.raises(ManifestError, match="not a readable JSON"):
        ExecuTorchTrainer(copy)


def test_manifest_sha256_is_checked_when_it_lists_executorch(profile: Path, tmp_path: Path) -> None:
    copy = copy_profile(profile, tmp_path / "listed")
    d = json.loads((copy / "manifest.json").read_text())
    art = {"path": "executorch/train.pte", "sha256": "0" * 64, "bytes": 1}
    d["artifacts"].setdefault("executorch", {})["program"] = art
    (copy / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="sha256"):
        ExecuTorchTrainer(copy)


def test_backend_module_is_torch_free_until_used(profile: Path) -> None:
    code = f"""
import json, sys
from fedhft.edge_runtime import executorch_backend, adamw, native_backend
from fedhft.protocol import program_spec
from fedhft.edge_runtime.trainer import BackendError
try:
    executorch_backend.ExecuTorchTrainer({str(profile)!r})
    msg = ""
except BackendError as e:
    msg = str(e)
print(json.dumps({{"torch": "torch" in sys.modules, "msg": msg}}))
"""
    res = run_torchfree(code)
    assert res["torch"] is False
    assert "native trainer" in res["msg"]

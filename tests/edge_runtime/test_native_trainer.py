"""The native C++ trainer: built against the executorch wheel, torch-free, identical to ExecuTorch-Python."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from fedhft.edge_runtime.executorch_backend import ExecuTorchTrainer
from fedhft.edge_runtime.native_backend import NativeTrainer
from fedhft.edge_runtime.trainer import BackendError
from tests.support.executorch_builds import LR, batch, both_formats, copy_profile, native_binary, vouch
from tests.support.torchfree import run_torchfree


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_profile_path: Path) -> Path:
    return both_formats(tmp_path_factory, tiny_model_dir, tiny_profile_path)


@pytest.fixture(scope="module")
def binary() -> Path:
    return native_binary()


TRAIN = """
import json, sys, numpy as np
from fedhft.edge_runtime.native_backend import NativeTrainer
rng = np.random.default_rng(0)
ids = rng.integers(1000, 5000, size=(8, 24)); mask = np.ones_like(ids); mask[:, 20:] = 0
y = np.arange(8) % 3
with NativeTrainer({dir!r}, learning_rate={lr}, binary={binary!r}) as t:
    losses = [t.train_step(ids, mask, y).loss for _ in range(20)]
    p = t.get_parameters()
print(json.dumps({{"losses": losses, "torch": "torch" in sys.modules,
                  "params": {{k: v.ravel()[:6].tolist() for k, v in p.items()}}}}))
"""


def test_native_matches_executorch_python_torch_free(profile: Path, binary: Path) -> None:
    res = run_torchfree(TRAIN.format(dir=str(profile), lr=LR, binary=str(binary)))
    assert res["torch"] is False
    ids, mask, y = batch()
    et = ExecuTorchTrainer(profile, learning_rate=LR)
    et_losses = [et.train_step(ids, mask, y).loss for _ in range(20)]
    # same program, same kernels, same float32 AdamW: equal up to thread scheduling in reductions
    np.testing.assert_allclose(res["losses"], et_losses, rtol=1e-5)
    assert res["losses"][-1] < 0.9 * res["losses"][0]
    p = et.get_parameters()
    for k, head in res["params"].items():
        np.testing.assert_allclose(head, p[k].ravel()[:6], rtol=1e-4, atol=1e-6, err_msg=k)


def test_parameters_state_and_validation(profile: Path, binary: Path, tmp_path: Path) -> None:
    ids, mask, y = batch(seed=1, b=4, s=16, pad_from=None)
    with NativeTrainer(profile, learning_rate=1e-2, binary=binary) as n:
        init = ExecuTorchTrainer(profile).get_parameters()
        got = n.get_parameters()
        assert all(np.array_equal(got[k], init[k]) for k in init)
        name = next(iter(init))
        with pytest.raises(BackendError, match="shape"):
            n.set_parameters({name: np.zeros((1, 1), np.float32)})
        with pytest.raises(BackendError, match="unknown"):
            n.set_parameters({"nope": np.zeros(1, np.float32)})
        with pytest.raises(BackendError, match="non-finite"):
            n.set_parameters({name: np.full(init[name].shape, np.inf, np.float32)})
        n.set_parameters({name: np.full(init[name].shape, 0.02, np.float32)})
        assert np.all(n.get_parameters()[name] == np.float32(0.02))
        for _ in range(3):
            n.train_step(ids, mask, y)
        n.save_state(tmp_path / "native.safetensors")
        expected = n.train_step(ids, mask, y).loss
        assert n.eval_step(ids, mask, y).loss == pytest.approx(n.eval_step(ids, mask, y).loss)
        big = batch(seed=5, b=11, s=9, pad_from=None)  # chunked: the program takes at most 8 rows
        assert n.eval_step(*big).logits.shape == (11, 3)
    # the state file is the same format for both ExecuTorch trainers
    et = ExecuTorchTrainer(profile, learning_rate=1e-2)
    et.load_state(tmp_path / "native.safetensors")
    assert et.optimizer.step == 3
    assert et.train_step(ids, mask, y).loss == pytest.approx(expected, rel=1e-5)


def test_thread_count_does_not_change_results(profile: Path, binary: Path) -> None:
    ids, mask, y = batch(seed=6, b=4, s=16, pad_from=None)
    losses = []
    for threads in (1, 2):
        with NativeTrainer(profile, learning_rate=LR, binary=binary, threads=threads) as n:
            losses.append([n.train_step(ids, mask, y).loss for _ in range(3)])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_protocol_errors_keep_the_process_usable(profile: Path, binary: Path) -> None:
    from fedhft.edge_runtime import native_backend as nb

    n = NativeTrainer(profile, binary=binary)
    try:
        with pytest.raises(BackendError, match="unknown op"):
            n.proc.call(99)
        with pytest.raises(BackendError, match="truncated"):
            n.proc.call(nb.OP_TRAIN, struct.pack("<qq", 2, 8))
        with pytest.raises(BackendError, match="bad parameter index"):
            n.proc.call(nb.OP_SET_PARAMS, struct.pack("<IIQ", 1, 999, 1) + b"\0\0\0\0")
        with pytest.raises(BackendError, match="outside the program's bounds"):
            n.proc.call(nb.OP_TRAIN, struct.pack("<qq", 64, 8))
        ids, mask, y = batch(seed=2, b=2, s=8, pad_from=None)
        assert np.isfinite(n.train_step(ids, mask, y).loss)
        n.proc.proc.kill()
        n.proc.proc.wait(timeout=10)
        with pytest.raises(BackendError, match="exited"):
            n.train_step(ids, mask, y)
    finally:
        n.close()
    assert n.proc.proc.poll() is not None


def test_bad_program_is_refused_and_no_process_is_left(profile: Path, binary: Path, tmp_path: Path) -> None:
    copy = copy_profile(profile, tmp_path / "copy")
    pte = copy / "executorch" / "train.pte"
    pte.write_bytes(pte.read_bytes()[:5000])
    vouch(copy, "executorch/train.pte")
    with pytest.raises(BackendError, match="ExecuTorch cannot load"):
        NativeTrainer(copy, binary=binary)
    with pytest.raises(BackendError, match="not built|cannot start"):
        NativeTrainer(profile, binary=tmp_path / "no-such-binary")


def test_a_trainer_slower_than_its_timeout_stops_with_one_line_naming_the_option(
    profile: Path, binary: Path, tmp_path: Path
) -> None:
    """--trainer-timeout reaches the native trainer: loading the program takes far longer than 0.1 ms."""
    from click.testing import CliRunner

    from fedhft.cli import main

    with pytest.raises(BackendError) as err:
        NativeTrainer(profile, binary=binary, timeout=1e-4)
    assert str(err.value) == "the native trainer did not answer within 0.0001 s (raise --trainer-timeout)"
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"word{i} text,{i % 3}\n" for i in range(8)))
    args = ["edge", "train", "--artifacts", str(profile), "--data", str(data), "--steps", "1", "--backend", "native"]
    with_env = {"FEDHFT_NATIVE_TRAINER": str(binary)}
    r = CliRunner().invoke(main, [*args, "--trainer-timeout", "0.0001"], env=with_env)
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and lines == [
        "error: the native trainer did not answer within 0.0001 s (raise --trainer-timeout)"
    ], r.output
    r = CliRunner().invoke(main, [*args, "--trainer-timeout", "60"], env=with_env)
    assert r.exit_code == 0 and "trained 1 steps" in r.output, r.output


AUTO_TRAIN = """
import json, sys
from click.testing import CliRunner
from fedhft.cli import main
r = CliRunner().invoke(main, ["edge", "train", "--artifacts", {dir!r}, "--data", {data!r}, "--steps", "3",
                              "--eval-fraction", "0"])
print(json.dumps({{"code": r.exit_code, "out": r.output, "torch": "torch" in sys.modules}}))
"""


def test_backend_auto_trains_an_executorch_package_on_the_native_trainer(
    profile: Path, binary: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from fedhft.edge_runtime.backend_choice import choose_backend

    pkg = copy_profile(profile, tmp_path / "pi")
    m = json.loads((pkg / "manifest.json").read_text())
    del m["artifacts"]["ort"]  # as `fedhft export --format auto` writes it for rpi4-4gb
    (pkg / "manifest.json").write_text(json.dumps(m))
    monkeypatch.setenv("FEDHFT_NATIVE_TRAINER", str(binary))
    assert choose_backend(pkg) == "native"
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"word{i} text,{i % 3}\n" for i in range(24)))
    res = run_torchfree(AUTO_TRAIN.format(dir=str(pkg), data=str(data)))
    assert res["code"] == 0, res["out"]
    assert "trained 3 steps" in res["out"] and res["torch"] is False

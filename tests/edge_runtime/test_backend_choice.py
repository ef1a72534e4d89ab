"""`--backend auto`: ORT where the package has it and onnxruntime is here, else the native trainer, else one line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedhft.edge_runtime import backend_choice, native_backend
from fedhft.edge_runtime.backend_choice import choose_backend
from fedhft.edge_runtime.trainer import BackendError
from fedhft.protocol.manifest import load_manifest


@pytest.fixture
def no_trainer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(native_backend.ENV_BINARY, raising=False)
    monkeypatch.setattr(native_backend, "DEFAULT_BUILD_DIR", tmp_path / "nothing")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))


def _fake_trainer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    exe = tmp_path / "fedhft-et-trainer"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv(native_backend.ENV_BINARY, str(exe))


def test_ort_package_runs_ort(tiny_export: Path) -> None:
    assert choose_backend(tiny_export) == "ort"


def test_executorch_program_runs_native_without_onnxruntime(
    tiny_export: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    m = load_manifest(tiny_export)
    both = dataclasses.replace(m, artifacts={**m.artifacts, "executorch": {}})
    _fake_trainer(monkeypatch, tmp_path)
    assert choose_backend(tiny_export, both) == "ort"  # ORT first where it can run
    monkeypatch.setattr(backend_choice, "onnxruntime_installed", lambda: False)
    assert choose_backend(tiny_export, both) == "native"
    only_et = dataclasses.replace(m, artifacts={"executorch": {}})
    monkeypatch.setattr(backend_choice, "onnxruntime_installed", lambda: True)
    assert choose_backend(tiny_export, only_et) == "native"


def test_nothing_runnable_says_what_is_missing(tiny_export: Path, no_trainer: None, monkeypatch) -> None:  # noqa: ANN001
    m = load_manifest(tiny_export)
    only_et = dataclasses.replace(m, artifacts={"executorch": {}})
    with pytest.raises(BackendError, match=r"native trainer fedhft-et-trainer \(set \$FEDHFT_NATIVE_TRAINER\)") as e:
        choose_backend(tiny_export, only_et)
    assert "\n" not in str(e.value)
    monkeypatch.setattr(backend_choice, "onnxruntime_installed", lambda: False)
    with pytest.raises(BackendError, match="ORT artifacts need onnxruntime"):
        choose_backend(tiny_export, m)

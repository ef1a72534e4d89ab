"""`--trainer-timeout` (edge train, edge run, and so the `edge host` devices file): seconds > 0, default 600,
carried into the client's config; anything else is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedhft.cli import main
from fedhft.cli.edge import device_configs


def _run_args(tiny_export: Path, tmp: Path) -> list[str]:
    (tmp / "d.csv").write_text("text,label\na,0\n")
    (tmp / "k.pub").write_text("00" * 32)
    return [
        *("--artifacts", str(tiny_export), "--data", str(tmp / "d.csv"), "--broker", "mqtt://127.0.0.1:1"),
        *("--task", "t", "--client-id", "a", "--state-dir", str(tmp / "s"), "--server-key", str(tmp / "k.pub")),
    ]


@pytest.mark.parametrize("value", ["0", "-5", "soon"])
@pytest.mark.parametrize("command", ["run", "train"])
def test_a_timeout_that_is_not_positive_seconds_is_refused_in_one_line(
    tiny_export: Path, tmp_path: Path, command: str, value: str
) -> None:
    args = _run_args(tiny_export, tmp_path)
    args = args if command == "run" else args[:4]  # edge train: --artifacts and --data
    r = CliRunner().invoke(main, ["edge", command, *args, "--backend", "ort", "--trainer-timeout", value])
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert r.exit_code == 2 and len(errors) == 1 and "'--trainer-timeout'" in errors[0], r.output
    assert "Traceback" not in r.output and not (tmp_path / "s").exists()


def test_the_devices_file_takes_the_timeout_as_edge_run_does(tiny_export: Path, tmp_path: Path) -> None:
    args = _run_args(tiny_export, tmp_path)
    device = {a[2:]: v for a, v in zip(args[::2], args[1::2], strict=True)}
    path = tmp_path / "devices.json"
    path.write_text(json.dumps([{**device, "backend": "ort"}, {**device, "backend": "ort", "trainer-timeout": 3600}]))
    default, slow = device_configs(path)
    assert (default.trainer_timeout, slow.trainer_timeout) == (600.0, 3600.0)
    path.write_text(json.dumps([{**device, "backend": "ort", "trainer-timeout": 0}]))
    r = CliRunner().invoke(main, ["edge", "host", "--devices", str(path)])
    assert r.exit_code != 0 and "device 1" in r.output and "--trainer-timeout" in r.output, r.output

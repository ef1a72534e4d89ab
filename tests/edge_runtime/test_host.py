"""`fedhft edge host`'s devices file: each device's table is parsed as `fedhft edge run`'s options (same
defaults and checks), with the file's defaults under it; a bad device is named in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedhft.cli import main
from fedhft.cli.edge import device_configs
from fedhft.edge_runtime.client_config import ClientConfig, ClientError
from fedhft.edge_runtime.device_file import device_entries, option_args


def _device(tiny_export: Path, tmp: Path, cid: str, **extra: object) -> dict[str, object]:
    (tmp / "d.csv").write_text("text,label\na,0\n")
    (tmp / "k.pub").write_text("00" * 32)
    return {
        "artifacts": str(tiny_export),
        "data": str(tmp / "d.csv"),
        "client-id": cid,
        "state_dir": str(tmp / cid),
        "server-key": str(tmp / "k.pub"),
        **extra,
    }


def test_option_tables_become_edge_run_arguments() -> None:
    args = option_args({"client_id": "c1", "virtual-time": True, "reset-state": False, "until-time": None, "lr": 0.5})
    assert args == ["--client-id", "c1", "--virtual-time", "--lr", "0.5"]


def test_devices_take_the_defaults_and_edge_runs_parsing(tiny_export: Path, tmp_path: Path) -> None:
    shared = {"broker": "mqtt://127.0.0.1:1", "task": "t", "local-steps": 3, "backend": "ort", "virtual-time": True}
    devices = [_device(tiny_export, tmp_path, "a"), _device(tiny_export, tmp_path, "b", **{"local-steps": 7})]
    path = tmp_path / "devices.json"
    path.write_text(json.dumps({"defaults": shared, "devices": devices}))
    a, b = device_configs(path)
    assert isinstance(a, ClientConfig) and (a.client_id, b.client_id) == ("a", "b")
    assert (a.local_steps, b.local_steps) == (3, 7) and a.virtual_time and a.state_dir == tmp_path / "a"
    assert a.encoding == "fp16" and a.ack_timeout == 300.0 and a.learning_rate == 1e-3  # edge run's defaults
    toml = tmp_path / "devices.toml"
    toml.write_text('[defaults]\ntask = "t"\nbroker = "mqtt://127.0.0.1:1"\nbackend = "ort"\n\n[[devices]]\n')
    toml.write_text(toml.read_text() + "".join(f"{k} = {json.dumps(v)}\n" for k, v in devices[0].items()))
    assert [c.client_id for c in device_configs(toml)] == ["a"]


def test_bad_devices_files_are_one_line_errors(tiny_export: Path, tmp_path: Path) -> None:
    path = tmp_path / "devices.json"
    path.write_text("[]")
    with pytest.raises(ClientError, match="non-empty list"):
        device_entries(path)
    bad = _device(tiny_export, tmp_path, "a", broker="mqtt://127.0.0.1:1", task="t", **{"local-steps": 0})
    path.write_text(json.dumps([bad]))
    r = CliRunner().invoke(main, ["edge", "host", "--devices", str(path)])
    assert r.exit_code != 0 and "device 1" in r.output and "--local-steps" in r.output, r.output
    assert "Traceback" not in r.output

"""`fedhft loadgen` against a real Mosquitto and a real `fedhft server run`: every update acked, none lost."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedhft.cli import main
from fedhft.protocol import decode_update
from fedhft.simulate.load_plan import load_spec
from fedhft.simulate.loadgen import LoadConfig, LoadError, UpdateFactory, check_loopback, run_load
from tests.support.mosquitto import Mosquitto
from tests.support.server import ServerProcess

TASK = "load"


def test_loopback_only() -> None:
    assert check_loopback("127.0.0.1") == "127.0.0.1"
    assert check_loopback("localhost") == "localhost"
    for host in ("10.1.2.3", "192.168.0.1", "example.invalid", "0.0.0.0"):
        with pytest.raises(LoadError, match="loopback only"):
            check_loopback(host)
    result = CliRunner().invoke(main, ["loadgen", "--broker", "10.0.0.7:1883", "--devices", "1"])
    assert result.exit_code != 0 and "loopback only" in result.output


def test_updates_decode_with_fresh_headers_around_tensors_encoded_once() -> None:
    load = load_spec("phone-midrange-6gb")
    factory = UpdateFactory(load, TASK, "fp16", seed=0)
    a, b = factory.payload("dev-1", 5, 0), factory.payload("dev-2", 6, 3)
    shapes = load.client_plan.update_shapes(load.spec)
    ua = decode_update(a, shapes, expected_task=TASK, expected_client_id="dev-1")
    ub = decode_update(b, shapes, expected_task=TASK, expected_client_id="dev-2")
    assert (ua.seq, ua.base_version, ub.seq, ub.base_version) == (5, 0, 6, 3)
    assert not factory.deflate and not a[6] & 1  # random fp16 tensors: zlib saves < 15%, sent stored


def test_loadgen_50_devices_all_acked(tmp_path: Path, mosquitto: Mosquitto) -> None:
    manifest = tmp_path / "manifest"
    result = CliRunner().invoke(main, ["loadgen", "--write-manifest", str(manifest)])
    assert result.exit_code == 0, result.output
    server = ServerProcess(
        mosquitto.url, TASK, tmp_path / "state", manifest,
        "--buffer-size", "100000", "--window-seconds", "1e6", "--max-staleness", "1000",
    ).start()  # fmt: skip
    try:
        t0 = time.monotonic()
        cfg = LoadConfig(
            devices=50, rate=40, duration=3, port=mosquitto.port, task=TASK, loops=3, register_timeout=30, drain=20
        )
        report = run_load(cfg, load_spec("phone-midrange-6gb", manifest), server_pid=server.proc.pid)
        assert time.monotonic() - t0 < 60
        assert report.registered == 50 and report.hellos_per_s and report.hellos_per_s > 0
        assert report.sent >= 100  # 40/s for 3 s, give or take the loops' start
        assert report.accepted == report.acked == report.sent
        assert report.lost == 0 and report.rejects == {} and report.disconnects == 0
        assert report.latency_p50_ms is not None and report.latency_p99_ms is not None
        assert 0 < report.latency_p50_ms <= report.latency_p99_ms <= report.latency_max_ms
        assert report.acked_per_s > 0 and report.server_rss_mb and report.server_rss_mb > 10
        accepted = server.metric('fedhft_updates_total{reason="",status="accepted"}')
        assert accepted == report.sent

        # the command line: the same devices again (already registered: their retained models answer), a report
        out = tmp_path / "report.json"
        args = ["loadgen", "--devices", "50", "--rate", "30", "--duration", "1", "--broker"]
        args += [f"127.0.0.1:{mosquitto.port}", "--task", TASK, "--manifest", str(manifest), "--json", str(out)]
        args += ["--server-pid", str(server.proc.pid)]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        assert "ack latency p50/p99/max" in result.output and "lost (sent, never acked)  0" in result.output
        again = json.loads(out.read_text())
        assert again["lost"] == 0 and again["accepted"] == again["sent"] > 0
    finally:
        server.stop()

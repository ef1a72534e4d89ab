"""README's production guide, walked as written: the fenced block between the GUIDE:PRODUCTION markers, run line
by line by bash in order (variables set to this test's folders, a CA and server certificate made here, a free
port), against a real TLS Mosquitto, ending with one federated round of the provisioned device.

Long-running lines (mosquitto, server run, edge run) start in the background; the edge line gets `--rounds 1
--local-steps 3` appended so that it ends by itself, and it must equal the line `fedhft device add` printed.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from fedhft.procs import stop_process
from tests.edge_runtime.test_local_train import write_csv
from tests.support import ROOT
from tests.support.mosquitto import free_port
from tests.support.tls_broker import make_tls_files, wait_until

BACKGROUND = ("mosquitto ", "fedhft server run ", "fedhft edge run ")


def guide_block() -> list[str]:
    """The guide's lines: comments dropped, backslash continuations joined."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- GUIDE:PRODUCTION -->\n```sh\n(.*?)```\n<!-- /GUIDE:PRODUCTION -->", text, re.S)
    assert block, "README has no GUIDE:PRODUCTION block"
    lines: list[str] = []
    for raw in block.group(1).replace("\\\n", " ").splitlines():
        line = re.sub(r"\s+#.*$", "", raw).strip() if not raw.startswith("#") else ""
        if line:
            lines.append(re.sub(r"\s+", " ", line))
    return lines


def assignments(line: str) -> dict[str, str] | None:
    """``A=x B=y`` -> {A: x, B: y}; None when the line is a command."""
    pairs = [p.split("=", 1) for p in line.split()]
    return {k: v for k, v in pairs} if all(len(p) == 2 and re.fullmatch(r"[A-Z_]+", p[0]) for p in pairs) else None


def fedhft_bin(folder: Path) -> Path:
    """A `fedhft` on PATH that runs this checkout with this interpreter."""
    folder.mkdir()
    exe = folder / "fedhft"
    exe.write_text(f'#!/bin/sh\nexec {sys.executable} -m fedhft.cli "$@"\n')
    exe.chmod(0o755)
    return folder


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def test_the_production_guide_runs_as_written(tiny_export: Path, tmp_path: Path) -> None:
    lines = guide_block()
    defined: dict[str, str] = {}
    for line in lines:
        defined |= assignments(line) or {}
    root = Path(tempfile.mkdtemp(prefix="fedhft-guide-"))  # 0755: Mosquitto (as the mosquitto user) reads it
    root.chmod(0o755)
    procs: dict[str, subprocess.Popen] = {}
    try:
        certs = root / "certs"
        certs.mkdir()
        make_tls_files(certs)
        run = root / "run"
        run.mkdir()
        run.chmod(0o1777)  # what the guide asks of $RUN: writable by the mosquitto user
        ours = {
            "T": "sst",
            "STATE": str(root / "state"),
            "CONF": str(root / "conf"),
            "CERTS": str(certs),
            "DATA": str(root / "mosquitto-data"),
            "HOST": "127.0.0.1",
            "PORT": str(free_port()),
            "PROFILE": str(tiny_export),
            "RUN": str(run),
        }
        assert set(defined) == set(ours), f"the guide's variables changed: {sorted(defined)}"
        (root / "mosquitto-data").mkdir(mode=0o777)
        (root / "mosquitto-data").chmod(0o777)
        path = f"{fedhft_bin(tmp_path / 'bin')}{os.pathsep}/usr/sbin{os.pathsep}{os.environ.get('PATH', '')}"
        env = dict(os.environ, **ours, PATH=path, PYTHONPATH=str(ROOT))
        device = tmp_path / "device"
        outputs: list[str] = []
        for line in (x for x in lines if assignments(x) is None):
            if line.startswith("fedhft edge run "):
                shutil.copytree(Path(ours["CONF"]) / "devices" / "pi-017", device)
                assert (device / "model" / "manifest.json").is_file(), "device add --artifacts bundles the model"
                write_csv(device / "data.csv", 24)
                expanded = subprocess.run(["bash", "-c", f"echo {line}"], env=env, capture_output=True, text=True)
                assert expanded.stdout.strip() in outputs[-1].splitlines(), (expanded.stdout, outputs[-1])
                res = subprocess.run(
                    ["bash", "-c", f"exec {line} --rounds 1 --local-steps 3"],
                    env=env,
                    cwd=device,
                    capture_output=True,
                    text=True,
                    timeout=180,
                )
                assert res.returncode == 0, res.stderr[-3000:]
                assert "1 round(s) trained, 1 update(s) acked" in res.stdout, res.stdout + res.stderr
                assert f"connected to 127.0.0.1:{ours['PORT']}" in res.stderr.splitlines()
                continue
            if line.startswith(BACKGROUND):
                name = "mosquitto" if line.startswith("mosquitto ") else "server"
                log = open(root / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
                procs[line] = subprocess.Popen(["bash", "-c", f"exec {line}"], env=env, stdout=log, stderr=log)
                if line.startswith("mosquitto "):
                    up = wait_until(lambda: listening(int(ours["PORT"])) and (run / "mosquitto.pid").exists(), 15)
                    assert up, (root / "mosquitto.log").read_text()[-2000:]
                continue
            res = subprocess.run(["bash", "-c", line], env=env, capture_output=True, text=True, timeout=120)
            assert res.returncode == 0, f"{line}\n{res.stdout}{res.stderr}"
            outputs.append(res.stdout)
            if line.startswith("fedhft device add "):
                pid = int((run / "mosquitto.pid").read_text())
                assert f"sent SIGHUP to the broker (PID {pid})" in res.stderr
        assert device.exists(), "the guide never ran `fedhft edge run`"
        server = next(p for line, p in procs.items() if line.startswith("fedhft server run "))
        assert server.poll() is None, (root / "server.log").read_text()[-3000:]
    finally:
        for p in reversed(list(procs.values())):
            stop_process(p)
        shutil.rmtree(root, ignore_errors=True)


def test_the_guide_first_creates_what_later_lines_use() -> None:
    """Order: the server key before `device add`, the broker's pid file before a SIGHUP, the server's password
    file from `broker config` before `server run`."""
    lines = guide_block()
    first = {k: next(i for i, x in enumerate(lines) if x.startswith(k)) for k in BACKGROUND + ("fedhft ",)}
    init = next(i for i, x in enumerate(lines) if x.startswith("fedhft server init "))
    config = next(i for i, x in enumerate(lines) if x.startswith("fedhft broker config "))
    add = next(i for i, x in enumerate(lines) if x.startswith("fedhft device add "))
    assert init < add and config < first["mosquitto "] < add < first["fedhft edge run "]
    assert (
        config < first["fedhft server run "]
        and "--password-file $CONF/srv-$T.password" in lines[first["fedhft server run "]]
    )
    assert "--pid-file $RUN/mosquitto.pid" in lines[config] and "--pid-file $RUN/mosquitto.pid" in lines[add]

"""A fleet-sized load on one machine: `fedhft loadgen` with 1,000 and 10,000 device identities against one
Mosquitto and one `fedhft server run` (SQLite state, aggregation held off so ingest alone is measured).

For each fleet size: a fresh broker and server; every device connects and registers (hello -> its model), then
the fleet sends --rate updates/s (phone-midrange-6gb plan on MiniLM, fp16) for --duration s. Reported:
registration rate, acked/s, ack latency p50/p99, rejects, lost, server RSS, and the host load (1-minute load
average from /proc/loadavg) before and after. Writes bench/results/loadgen.json and prints a table.

Run: `.venv/bin/python bench/loadgen.py [--devices 1000,10000] [--rate 100] [--duration 20]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from fedhft.broker_server.broker.embedded import EmbeddedBroker
from fedhft.broker_server.metrics import parse_metrics
from fedhft.procs import stop_process
from fedhft.simulate.load_plan import load_spec, write_shapes_manifest
from fedhft.simulate.loadgen import LoadConfig, run_load

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PROFILE = "phone-midrange-6gb"
TASK = "load"


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metrics(port: int) -> dict[str, float]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return parse_metrics(r.read().decode())
    except OSError:
        return {}


def start_server(broker_url: str, work: Path, manifest: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    log = open(work / "server.log", "wb")  # noqa: SIM115 - lives as long as the process
    server = subprocess.Popen(
        [
            sys.executable, "-m", "fedhft.cli", "server", "run", "--broker", broker_url, "--task", TASK,
            "--state", str(work / "state"), "--manifest", str(manifest), "--buffer-size", "10000000",
            "--window-seconds", "1e9", "--max-staleness", "1000", "--metrics-port", str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    deadline = time.time() + 60
    while metrics(port).get("fedhft_ready") != 1.0:
        if time.time() > deadline or server.poll() is not None:
            raise RuntimeError(f"server did not start: {(work / 'server.log').read_text()[-2000:]}")
        time.sleep(0.2)
    return server, port


def one_run(devices: int, rate: float, duration: float, loops: int, register_timeout: float) -> dict:
    work = Path(tempfile.mkdtemp(prefix="fedhft-loadgen-"))
    manifest = work / "manifest"
    write_shapes_manifest(PROFILE, manifest)
    load_before = load_average()
    try:
        with EmbeddedBroker(port=0) as broker:
            server, mport = start_server(broker.url, work, manifest)
            try:
                cfg = LoadConfig(
                    devices=devices, rate=rate, duration=duration, port=broker.port, task=TASK, loops=loops,
                    register_timeout=register_timeout, drain=60.0,
                )  # fmt: skip
                report = run_load(cfg, load_spec(PROFILE, manifest), server.pid, progress=print).to_dict()
                m = metrics(mport)
                report["server_accepted"] = m.get('fedhft_updates_total{reason="",status="accepted"}', 0.0)
                report["broker"] = broker.chosen
            finally:
                stop_process(server, grace=30)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["load_avg_before"], report["load_avg_after"] = load_before, load_average()
    return report


COLS = [
    ("devices", "devices"),
    ("registered", "registered"),
    ("hellos/s", "hellos_per_s"),
    ("rate", "target_rate"),
    ("sent/s", "sent_per_s"),
    ("acked/s", "acked_per_s"),
    ("p50 ms", "latency_p50_ms"),
    ("p99 ms", "latency_p99_ms"),
    ("lost", "lost"),
    ("rejects", "rejects"),
    ("server RSS MiB", "server_rss_mb"),
    ("load before/after", "load"),
]


def table(rows: list[dict]) -> str:
    cells = [[h for h, _ in COLS]]
    for r in rows:
        r = dict(r, load=f"{r['load_avg_before']:.1f}/{r['load_avg_after']:.1f}", rejects=sum(r["rejects"].values()))
        cells.append([str(r.get(k, "")) for _, k in COLS])
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", default="1000,10000", help="comma-separated fleet sizes")
    ap.add_argument("--rate", type=float, default=100.0, help="updates/s over the fleet")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--loops", type=int, default=4)
    ap.add_argument("--register-timeout", type=float, default=420.0)
    ap.add_argument("--out", type=Path, default=RESULTS / "loadgen.json")
    a = ap.parse_args()
    rows = []
    for n in (int(x) for x in a.devices.split(",")):
        print(f"--- {n} devices, {a.rate:g} updates/s for {a.duration:g} s")
        rows.append(one_run(n, a.rate, a.duration, a.loops, a.register_timeout))
        print(table(rows))
    result = {
        "profile": PROFILE,
        "model": "MiniLM-L6-H384 shapes; updates fp16, random values of the plan's exact shapes",
        "server": "one `fedhft server run`, SQLite state, aggregation held off (ingest only)",
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
        "note": "load generator, broker and server share this machine's cores; load_avg_* is /proc/loadavg (1 min)",
        "runs": rows,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
